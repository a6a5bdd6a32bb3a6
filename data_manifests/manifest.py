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
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_json, now_iso
from .sample import RAW
from .shard import ShardInfo
from .textstats import TextStats

FORMAT = "holiclip-dataset/1"
MANIFEST_NAME = "manifest.json"
RECORDS_DIR = "_shards"

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
        by_status: dict[str, int] = {}
        for s in self.shards.values():
            by_status[s.status] = by_status.get(s.status, 0) + 1
        return {"samples": self.num_samples, "shards": len(self.shards),
                **{f"shards_{k}": v for k, v in by_status.items()}}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset_id": self.dataset_id,
            "stage": self.stage,
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "parent": self.parent,
            "counts": self.counts(),
            "texts": self.texts,
            "text_stats": self.text_stats.to_json(),
            "run": self.run,
            "shards": [asdict(self.shards[name]) for name in sorted(self.shards)],
        }

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
        entry = ShardEntry(name=info.name, status=COMPLETE, samples=info.samples, bytes=info.bytes,
                           sha256=info.sha256, completed=now_iso(), failed_samples=failed_samples,
                           info=extra or {}, txt=info.txt)
        atomic_write_json(self.root / RECORDS_DIR / f"{info.name}.json",
                          {**asdict(entry), "text_stats": stats.to_json()})
        if old is not None and old.status == COMPLETE:
            # Redone shard: rebuild the totals from the records rather than subtract.
            self.manifest.shards[info.name] = entry
            self._rebuild_stats()
        else:
            self.manifest.shards[info.name] = entry
            self.manifest.text_stats.merge(stats)
        self.maybe_flush()
        return entry

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
            entry.status = FAILED
            entry.info = {k: v for k, v in entry.info.items() if k != "rerun_helps"}
            entry.info["error"] = reason
            if not rerun_helps:
                entry.info["rerun_helps"] = False
            self.manifest.shards[name] = entry

    def _rebuild_stats(self) -> None:
        stats = TextStats()
        for name, rec in _read_records(self.root).items():
            if self.manifest.shards.get(name, ShardEntry(name)).status == COMPLETE:
                stats.merge(rec.get("text_stats", {}))
        self.manifest.text_stats = stats

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self.manifest.updated = now_iso()
        atomic_write_json(self.root / MANIFEST_NAME, self.manifest.to_json())
        self._last_flush = time.monotonic()

    def finish(self) -> Manifest:
        """Write the final manifest; the status says whether every expected shard is done."""
        done = all(s.status == COMPLETE for s in self.manifest.shards.values())
        self.manifest.status = COMPLETE if done else INCOMPLETE
        self.flush()
        return self.manifest
