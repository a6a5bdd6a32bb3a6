"""The manifest: what a dataset holds and how every text in it was made.

A dataset directory:

    DIR/manifest.json        consolidated view (what tools read first)
    DIR/_shards/<name>.json  one completion record per finished shard, written when it finishes
    DIR/<name>.tar           the shards

The per-shard records are the source of truth for resumption (DataTrove-style): finishing a
shard writes one small file, so the cost does not grow with the number of shards already done,
and a job killed between two consolidations loses nothing. `manifest.json` is rewritten from
memory every `flush_every_s` seconds and when a job ends; `load_manifest` folds in any record
newer than it. Every write goes aside and is renamed into place, so neither a record nor the
manifest is ever seen half-written.

Costs at 100,000 shards (bench/books_scale.py): committing a shard writes its record and updates
running totals (a redone shard's old counters are subtracted, read from its one old record), so
it costs the same at any size. The periodic manifest rewrite is the only whole-dataset step: the
committing thread only takes a snapshot (a list of the immutable entries), and a writer thread
encodes it with the C JSON encoder and writes it.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .files import atomic_write_json, now_iso, partial_path, publish
from .sample import RAW
from .shard import ShardInfo, file_sha256
from .textstats import TextStats

FORMAT = "holiclip-dataset/1"
MANIFEST_NAME = "manifest.json"
RECORDS_DIR = "_shards"
INTENT_SUFFIX = ".intent"  # _shards/<name>.intent: the record a shard about to replace its file will have

COMPLETE, FAILED, PENDING = "complete", "failed", "pending"
IN_PROGRESS, INCOMPLETE = "in_progress", "incomplete"


class ManifestError(Exception):
    """A manifest that is missing, unreadable or inconsistent (the message names the file)."""


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no {what} here") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: {what} is not valid JSON ({e})") from None


@dataclass
class ShardEntry:
    """One shard's line in the books. Never changed once in a manifest (a new entry replaces it),
    so a snapshot of the entries can be encoded on another thread."""

    name: str
    status: str = PENDING
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    completed: str | None = None
    failed_samples: int = 0  # samples of the input that could not be written (with reasons in info)
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific: download stats, timings
    txt: str | None = None  # text id of the samples' `.txt` member (None: none written, or not known)

    @property
    def rerun_helps(self) -> bool:
        """Whether rerunning the job can finish this shard (see DatasetWriter.fail)."""
        return self.status != COMPLETE and self.info.get("rerun_helps", True) is not False

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> ShardEntry:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"text_stats"}
        if unknown or "name" not in d:
            raise ManifestError(f"{where}: bad shard entry {d.get('name')!r} (unknown keys {sorted(unknown)})")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies and costs ~15x more, 100,000 times per manifest.
        return {"name": self.name, "status": self.status, "samples": self.samples, "bytes": self.bytes,
                "sha256": self.sha256, "completed": self.completed, "failed_samples": self.failed_samples,
                "info": self.info, "txt": self.txt}


def shard_counts(entries) -> dict[str, int]:
    samples, by_status, n = 0, {}, 0
    for s in entries:
        n += 1
        by_status[s.status] = by_status.get(s.status, 0) + 1
        if s.status == COMPLETE:
            samples += s.samples
    return {"samples": samples, "shards": n, **{f"shards_{k}": v for k, v in by_status.items()}}


@dataclass
class Manifest:
    dataset_id: str
    stage: str  # "ingest", "caption", "index", ...
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    status: str = IN_PROGRESS
    parent: dict[str, Any] | None = None  # {"path", "dataset_id"} of the dataset this was made from
    texts: dict[str, dict[str, Any]] = field(default_factory=dict)  # text id -> provenance
    shards: dict[str, ShardEntry] = field(default_factory=dict)
    text_stats: TextStats = field(default_factory=TextStats)
    run: dict[str, Any] = field(default_factory=dict)  # stage-level info: sources, figures, failures
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards.values() if s.status == COMPLETE)

    def counts(self) -> dict[str, int]:
        return shard_counts(self.shards.values())

    def header_json(self) -> dict[str, Any]:
        """Everything but the shard list and its counts; small whatever the number of shards."""
        return {
            "format": self.format,
            "dataset_id": self.dataset_id,
            "stage": self.stage,
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "parent": self.parent,
            "texts": self.texts,
            "text_stats": self.text_stats.to_json(),
            "run": self.run,
        }

    def to_json(self) -> dict[str, Any]:
        return manifest_json(self.header_json(), self.shards.values())

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a holiclip manifest (format is "
                                f"{d.get('format') if isinstance(d, dict) else None!r}, expected {FORMAT!r})")
        for key in ("dataset_id", "stage", "shards"):
            if key not in d:
                raise ManifestError(f"{where}: missing key {key!r}")
        shards = {}
        for raw in d["shards"]:
            entry = ShardEntry.from_json(raw, where)
            shards[entry.name] = entry
        return cls(
            dataset_id=d["dataset_id"], stage=d["stage"], created=d.get("created", ""),
            updated=d.get("updated", ""), status=d.get("status", IN_PROGRESS), parent=d.get("parent"),
            texts=d.get("texts", {}), shards=shards, text_stats=TextStats(d.get("text_stats", {})),
            run=d.get("run", {}), format=d["format"],
        )


def manifest_json(header: dict[str, Any], entries) -> dict[str, Any]:
    entries = sorted(entries, key=lambda e: e.name)
    return {**header, "counts": shard_counts(entries), "shards": [e.to_json() for e in entries]}


def list_shard_files(root: str | os.PathLike) -> list[str]:
    """Names of the published `.tar` shards in a directory (partial files are hidden)."""
    return sorted(p.name for p in Path(root).iterdir() if p.suffix == ".tar" and not p.name.startswith("."))


def _read_records(root: Path) -> dict[str, dict[str, Any]]:
    records = {}
    rdir = root / RECORDS_DIR
    if rdir.is_dir():
        for p in sorted(rdir.iterdir()):
            if p.suffix == ".json" and not p.name.startswith("."):
                rec = read_json(p, "shard record")
                records[rec.get("name", p.stem)] = rec
    return records


def _has_newer_records(root: Path, than_ns: int) -> bool:
    # `>=`: on file systems with coarse timestamps a record written in the same tick as the
    # manifest may or may not be in it; reading the records then is merely redundant.
    rdir = root / RECORDS_DIR
    if not rdir.is_dir():
        return False
    with os.scandir(rdir) as it:
        return any(e.name.endswith(".json") and not e.name.startswith(".") and e.stat().st_mtime_ns >= than_ns
                   for e in it)


def load_manifest(root: str | os.PathLike) -> Manifest:
    """The manifest of a dataset with every shard record folded in. Reads only."""
    root = Path(root)
    path = root / MANIFEST_NAME
    manifest = Manifest.from_json(read_json(path, "manifest"), str(path))
    # manifest.json is rewritten from memory that holds every record committed before it, so
    # only a record newer than it can say something new: the records themselves (one small file
    # per shard, 100k for a large dataset) are read only then.
    if not _has_newer_records(root, path.stat().st_mtime_ns):
        return manifest
    records = _read_records(root)
    entries = {name: ShardEntry.from_json(rec, str(root / RECORDS_DIR / f"{name}.json"))
               for name, rec in records.items()}
    stale = [e for name, e in entries.items() if manifest.shards.get(name) != e]
    if stale:
        # The job stopped between two consolidations: the records are the truth.
        for entry in stale:
            manifest.shards[entry.name] = entry
        manifest.text_stats = TextStats()
        for name, rec in records.items():
            if manifest.shards[name].status == COMPLETE:
                manifest.text_stats.merge(rec.get("text_stats", {}))
    return manifest


class DatasetWriter:
    """Bookkeeping of a stage that writes a dataset shard by shard (ingest, caption, index).

    A new directory gets a fresh manifest; an existing one is resumed: its completed shards
    stay, and `is_complete` tells the stage which to skip. One writer per dataset (the job's
    driver); workers write shard files, the driver commits them.
    """

    def __init__(self, root: str | os.PathLike, *, stage: str, parent: dict[str, Any] | None = None,
                 dataset_id: str | None = None, flush_every_s: float = 30.0):
        self.root = Path(root)
        self.flush_every_s = flush_every_s
        self._last_flush = 0.0
        try:
            (self.root / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ManifestError(f"cannot create the dataset directory {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK):
            raise ManifestError(f"{self.root}: output directory is not writable")
        if (self.root / MANIFEST_NAME).exists():
            self.manifest = load_manifest(self.root)
            self.resumed = True
        else:
            self.manifest = Manifest(
                dataset_id=dataset_id or f"{self.root.resolve().name}-{uuid.uuid4().hex[:8]}",
                stage=stage, parent=parent,
            )
            self.resumed = False
        self.manifest.status = IN_PROGRESS
        self._flusher = _ManifestFlusher(self.root / MANIFEST_NAME)
        # The text id new shards put in `.txt`: the one most complete shards have (what `holiclip-manifest
        # txt` chose, kept by a resumed stage), else the alt-text.
        chosen = Counter(e.txt for e in self.manifest.shards.values() if e.status == COMPLETE and e.txt)
        self.txt: str = chosen.most_common(1)[0][0] if chosen else RAW

    # --- what is done -------------------------------------------------------------------
    def shard_path(self, name: str) -> Path:
        return self.root / name

    def is_complete(self, name: str, check_file: bool = True) -> bool:
        """A shard is done when its record says so and its file has the recorded size.

        The size check is cheap; `holiclip-manifest verify` recomputes the checksums.
        """
        entry = self.manifest.shards.get(name)
        if entry is None or entry.status != COMPLETE:
            return False
        if not check_file:
            return True
        try:
            return self.shard_path(name).stat().st_size == entry.bytes
        except FileNotFoundError:
            return False

    def expect(self, names: list[str]) -> None:
        """Register shards the job will produce, so that an unfinished one shows as pending."""
        for name in names:
            self.manifest.shards.setdefault(name, ShardEntry(name=name))

    # --- recording ----------------------------------------------------------------------
    def set_texts(self, provenance: dict[str, dict[str, Any]]) -> None:
        self.manifest.texts.update(provenance)

    def commit(self, info: ShardInfo, stats: TextStats, *, failed_samples: int = 0,
               extra: dict[str, Any] | None = None) -> ShardEntry:
        """Record a published shard: its record first, then (throttled) the manifest."""
        old = self.manifest.shards.get(info.name)
        record = self.root / RECORDS_DIR / f"{info.name}.json"
        # A redone shard (an incremental run adds texts to every shard): its old counters leave
        # the totals. They are read from its old record before the new one replaces it.
        old_stats = _record_stats(record) if old is not None and old.status == COMPLETE else {}
        entry = ShardEntry(name=info.name, status=COMPLETE, samples=info.samples, bytes=info.bytes,
                           sha256=info.sha256, completed=now_iso(), failed_samples=failed_samples,
                           info=extra or {}, txt=info.txt)
        atomic_write_json(record, {**entry.to_json(), "text_stats": stats.to_json()})
        (self.root / RECORDS_DIR / f"{info.name}{INTENT_SUFFIX}").unlink(missing_ok=True)
        self.manifest.shards[info.name] = entry
        if old_stats is None:  # the old record is gone: the totals are rebuilt from all records
            self._rebuild_stats()
        else:
            self.manifest.text_stats.merge(old_stats, sign=-1)
            self.manifest.text_stats.merge(stats)
        self.maybe_flush()
        return entry

    def recover_intents(self) -> list[str]:
        """Record the shards a stopped job published but did not record (see write_intent).

        A published file that matches its intent (same SHA-256) is recorded from the intent; an
        intent whose file was never published is dropped. Only shards in flight when a job
        stopped have one, so this reads a handful of files whatever the size of the dataset.
        """
        recovered = []
        for path in sorted((self.root / RECORDS_DIR).glob(f"*{INTENT_SUFFIX}")):
            try:
                intent = read_json(path, "intent record")
                info = ShardInfo(**intent["info"])
                _, sha = file_sha256(self.shard_path(info.name))
            except (ManifestError, KeyError, TypeError, FileNotFoundError):
                sha, info = None, None
            entry = self.manifest.shards.get(info.name) if info else None
            if info and sha == info.sha256 and not (entry and entry.status == COMPLETE and entry.sha256 == sha):
                self.commit(info, TextStats(intent.get("text_stats", {})),
                            failed_samples=intent.get("failed_samples", 0), extra=intent.get("extra"))
                recovered.append(info.name)
            path.unlink(missing_ok=True)
        return recovered

    def write_shard(self, name: str, samples, *, failed_samples: int = 0,
                    extra: dict[str, Any] | None = None) -> ShardEntry:
        """Write samples as shard `name` (atomically) and commit it, in this process."""
        from .shard import ShardWriter

        stats = TextStats()
        with ShardWriter(self.shard_path(name), txt=self.txt) as shard:
            for sample in samples:
                shard.write(sample)
                stats.add(sample)
            info = shard.close()
        return self.commit(info, stats, failed_samples=failed_samples, extra=extra)

    def reset(self, name: str) -> None:
        """Forget what a previous run concluded about a shard that is about to be redone."""
        self.manifest.shards[name] = ShardEntry(name=name)

    def fail(self, name: str, reason: str, *, rerun_helps: bool = True) -> None:
        """Record a shard that could not be made. `rerun_helps=False` says that the same input
        fails the same way (a file that cannot be read), so no one is told to rerun for it."""
        entry = self.manifest.shards.get(name) or ShardEntry(name=name)
        if entry.status != COMPLETE:
            info = {k: v for k, v in entry.info.items() if k != "rerun_helps"}
            info["error"] = reason
            if not rerun_helps:
                info["rerun_helps"] = False
            self.manifest.shards[name] = replace(entry, status=FAILED, info=info)

    def _rebuild_stats(self) -> None:
        stats = TextStats()
        for name, rec in _read_records(self.root).items():
            if self.manifest.shards.get(name, ShardEntry(name)).status == COMPLETE:
                stats.merge(rec.get("text_stats", {}))
        self.manifest.text_stats = stats

    def maybe_flush(self) -> None:
        """Rewrite manifest.json in the background if `flush_every_s` has passed."""
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self._flusher.submit(self._snapshot(background=True))
            self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Rewrite manifest.json now; returns once it is on disk."""
        self._flusher.submit(self._snapshot(background=False), wait=True)
        self._last_flush = time.monotonic()

    def _snapshot(self, background: bool) -> tuple[dict[str, Any], list[ShardEntry], int | None]:
        # A background write lands after later commits: its file is dated to this instant, before
        # the copy, so that a record committed meanwhile is newer than it and load_manifest reads
        # the records. A write the committing thread waits for is dated when it is written.
        taken_ns = time.time_ns() if background else None
        self.manifest.updated = now_iso()
        header = copy.deepcopy(self.manifest.header_json())  # small: texts, stats, run figures
        return header, list(self.manifest.shards.values()), taken_ns

    def finish(self) -> Manifest:
        """Write the final manifest; the status says whether every expected shard is done."""
        done = all(s.status == COMPLETE for s in self.manifest.shards.values())
        self.manifest.status = COMPLETE if done else INCOMPLETE
        self.flush()
        self._flusher.close()
        return self.manifest

    def close(self) -> None:
        """For a run that stops on an error: wait for a manifest write in progress, start none.
        The records written so far are the truth (load_manifest reads them); `finish` is how a
        run that got to its end writes the manifest."""
        self._flusher.close(wait=True)


def write_intent(root: str | os.PathLike, info: ShardInfo, stats: TextStats, *, failed_samples: int = 0,
                 extra: dict[str, Any] | None = None) -> None:
    """Phase one of recording a shard whose file replaces a published one: what its record will
    say, written by whoever publishes it, after the new file is on disk and before the rename
    (ShardWriter.close's `before_publish`). If the job stops between the rename and the record,
    the next job's `recover_intents` records the shard from it: the texts the replaced file did
    not have (an incremental run's) are never taken for missing, nor the file rebuilt without
    them. The committing DatasetWriter removes the intent with its record."""
    atomic_write_json(Path(root) / RECORDS_DIR / f"{info.name}{INTENT_SUFFIX}",
                      {"info": asdict(info), "text_stats": stats.raw, "failed_samples": failed_samples,
                       "extra": extra or {}})


def _record_stats(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path, "shard record").get("text_stats", {})
    except ManifestError:
        return None


class _ManifestFlusher:
    """Writes manifest.json on its own thread, newest snapshot first (an older one still waiting
    is dropped). `submit(wait=True)` returns when its snapshot is on disk; a write that failed
    (a full disk) is raised to the next caller."""

    # Slack for file systems whose timestamps lag the clock by a tick: records this much older
    # than the snapshot are read again by load_manifest, which only costs a re-read.
    MTIME_SLACK_NS = 2_000_000_000

    def __init__(self, path: Path):
        self.path = path
        self._cond = threading.Condition()
        self._pending = None
        self._submitted = self._written = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, snapshot, wait: bool = False) -> None:
        with self._cond:
            self._raise_error()
            self._submitted += 1
            self._pending = (self._submitted, snapshot)
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="manifest-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            if wait:
                mine = self._submitted
                self._cond.wait_for(lambda: self._written >= mine or self._error is not None)
                self._raise_error()

    def close(self, wait: bool = False) -> None:
        """Let the thread end once nothing is pending; `wait`: until it has (a write in progress
        finishes and leaves no half-written file behind)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None:
            thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (seq, (header, entries, taken_ns)), self._pending = self._pending, None
            try:
                self._write(manifest_json(header, entries), taken_ns)
            except BaseException as e:  # noqa: BLE001 - handed to the committing thread
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                continue
            with self._cond:
                self._written = max(self._written, seq)
                self._error = None  # an earlier failure no longer matters: the file is current
                self._cond.notify_all()

    def _write(self, obj: dict[str, Any], taken_ns: int | None) -> None:
        # json.dumps without indent runs the C encoder (json.dump and indent= run the Python
        # one, ~10x slower: seconds per rewrite at 100,000 shards). backslashreplace: see
        # files.atomic_write_json.
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")
        partial = partial_path(self.path)
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.write(b"\n")
                f.flush()
                if taken_ns is not None:
                    mtime = taken_ns - self.MTIME_SLACK_NS
                    os.utime(f.fileno(), ns=(mtime, mtime))
                os.fsync(f.fileno())
            publish(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
