"""Ingest: URL lists to image shards with img2dataset, and existing datasets imported in place.

    python -m pipeline.ingest --urls cc3m.tsv --out data/cc3m
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipeline.ingest --urls laion/ --url-col URL --caption-col TEXT --out /shared/laion --distributor ray
    python -m pipeline.ingest --from-webdataset data/img2dataset_output --out data/laion
    python -m pipeline.ingest --from-folder photos/ --out data/photos

A download runs in three steps, all resumable:

1. The URL list is checked (schema and first rows only) and read once, streaming, into
   OUT/_ingest/urls/ (see url_list.py): non-http(s) URLs are refused there and recorded.
2. img2dataset downloads into OUT/_ingest/img2dataset/ (its own .tar, .parquet with every URL's
   status and error, and _stats.json per shard), in its incremental mode.
3. A collector thread in this process (staging.py) converts each img2dataset shard into OUT/<shard>.tar as
   soon as its _stats.json appears (img2dataset writes that file last), so conversion overlaps
   the download; it commits the shard to the manifest, then deletes the staging .tar. The
   staging .parquet and _stats.json stay: they are the per-URL record of failures, and they tell
   img2dataset's incremental mode that the shard is done. With `--distributor ray` the
   conversions run as Ray tasks (OUT must then be on storage every node sees, as img2dataset's
   Ray mode already needs).

Resuming (the same command again) after a kill at any point:
- while the list is read: no state.json marks it ready, so it is read again from the start;
- while img2dataset downloads a shard: no _stats.json, so img2dataset downloads it again;
- while img2dataset writes a _stats.json (in place, not atomically): the cut file is found
  before img2dataset starts again and the shard forgotten, so it is downloaded again;
- after img2dataset finished a shard, before or during its conversion: the staging .tar and
  _stats.json are there and the manifest has no record, so the shard is converted again; a
  half-written OUT/.<shard>.partial-* is deleted (shards are published by rename only);
- after the shard is published, before its record is written: converted again (same bytes);
- after the record, before the staging .tar is deleted: the record says complete, the staging
  .tar is deleted;
- while the manifest is rewritten: it is written aside and renamed; records are the truth.
A staging shard that cannot be read or converted is marked failed and its _stats.json removed,
so the next run downloads it again. Samples are written in key order, so a resumed run's shards
are byte-identical to an uninterrupted run's: no sample is lost or written twice.

Exit status: 0 complete, 1 incomplete (rerun to finish), 2 bad input or configuration.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_manifests import COMPLETE, RAW, DatasetWriter, ManifestError, atomic_write_json
from data_manifests.manifest import read_json

from .convert import ConvertOptions, convert_shard, reason_of, top_reasons
from .staging import CRASH_POINTS, ShardCollector, Staging, crash_here
from .url_list import PART_ROWS, UrlList, UrlListError, prepare

STAGING = "_ingest"
LOCK_NAME = ".ingest.lock"
RESIZE_MODES = ("keep_ratio_largest", "keep_ratio", "center_crop", "border", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
# img2dataset reserves these names for its own per-sample metadata.
RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}


class IngestError(Exception):
    """A configuration or input problem a user can fix; the message names the option or file."""


@dataclass(frozen=True)
class DownloadConfig:
    urls: Path
    out: Path
    url_col: str = "url"
    caption_col: str | None = "caption"
    keep_columns: tuple[str, ...] = ()
    input_format: str | None = None
    image_size: int = 448
    resize_mode: str = "keep_ratio_largest"
    allow_upscale: bool = False
    encode_format: str = "jpg"
    encode_quality: int | None = None
    shard_size: int = 10000
    max_image_area: float = 1e8
    allow_any_scheme: bool = False
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64
    timeout: int = 10
    retries: int = 0
    distributor: str = "multiprocessing"
    convert_workers: int = 2
    progress: bool = True
    crash_at: str | None = None

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 9 if self.encode_format == "png" else 95

    def validate(self) -> "DownloadConfig":
        checks = [
            (self.image_size >= 8, "--image-size must be at least 8"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (self.processes >= 1, "--processes must be at least 1"),
            (self.threads >= 1, "--threads must be at least 1"),
            (self.timeout >= 1, "--timeout must be at least 1 second"),
            (self.retries >= 0, "--retries cannot be negative"),
            (self.convert_workers >= 1, "--convert-workers must be at least 1"),
            (self.max_image_area > 0, "--max-image-area must be positive"),
            (self.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {', '.join(RESIZE_MODES)}"),
            (self.encode_format in ENCODE_FORMATS, f"--encode-format must be one of {', '.join(ENCODE_FORMATS)}"),
            (0 <= self.quality <= (9 if self.encode_format == "png" else 100),
             "--encode-quality must be 0-100 for jpg and webp, 0-9 (compression) for png"),
        ]
        for ok, message in checks:
            if not ok:
                raise IngestError(message)
        clash = sorted(RESERVED_COLUMNS & set(self.keep_columns))
        if clash:
            raise IngestError(f"--keep-columns: {', '.join(clash)} are names img2dataset uses for its own metadata; "
                              "keep other columns, or rename them in the list")
        return self

    def output_settings(self) -> dict[str, Any]:
        """What decides the shards' content; a resume must use the same (timeouts, threads may change)."""
        return {"url_col": self.url_col, "caption_col": self.caption_col, "keep_columns": list(self.keep_columns),
                "image_size": self.image_size, "resize_mode": self.resize_mode, "allow_upscale": self.allow_upscale,
                "encode_format": self.encode_format, "encode_quality": self.quality, "shard_size": self.shard_size,
                "max_image_area": self.max_image_area, "allow_any_scheme": self.allow_any_scheme}


def hold_lock(out: Path):
    """One ingest per output directory: a second one would commit shards twice."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IngestError(f"{out}: another ingest is writing to this directory ({out / LOCK_NAME} is locked); "
                          "wait for it, or use another --out") from None
    return handle  # the lock lasts as long as this file stays open (the kernel drops it on any exit)


def remove_leftovers(out: Path) -> None:
    """Half-written files of a killed run (`.<name>.partial-*`); safe while we hold the lock."""
    for d in (out, out / "_shards"):
        if d.is_dir():
            for p in d.glob(".*.partial-*"):
                p.unlink(missing_ok=True)


def open_writer(out: Path, stage: str) -> DatasetWriter:
    writer = DatasetWriter(out, stage=stage, flush_every_s=30.0)
    if writer.resumed and writer.manifest.stage != stage:
        raise IngestError(f"{out}: already holds a dataset made by the {writer.manifest.stage!r} stage; "
                          "ingest into a new --out")
    return writer


# --- a download run -----------------------------------------------------------------------
def _shard_names(kept: int, shard_size: int) -> list[str]:
    """img2dataset's shard names for `kept` URLs (it pads shard ids to the same width)."""
    count = math.ceil(kept / shard_size)
    digits = max(5, len(str(max(count - 1, 0))))
    return [f"{i:0{digits}d}.tar" for i in range(count)]


def _changed_input(previous: dict[str, Any] | None, source: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """Why a resume with this list and these settings would mix two different ingests, or None."""
    if not previous:
        return None
    if previous.get("source", {}).get("sha256") != source["sha256"]:
        return (f"was started from another URL list (sha256 {previous['source'].get('sha256', '?')[:12]}..., "
                f"now {source['sha256'][:12]}...); resume with the same list")
    old = previous.get("settings", {})
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        return ("was started with other settings (" + ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                + "); resume with the same ones")
    return None


class DownloadRun:
    """One run of `--urls`: prepare the list, download with img2dataset while converting, record."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg.validate()
        self.out = cfg.out
        self.work = cfg.out / STAGING
        self.state_path = self.work / "state.json"
        self.staging = Staging(self.work / "img2dataset")
        self.started = time.time()

    def run(self) -> int:
        cfg = self.cfg
        url_list = UrlList.open(cfg.urls, url_col=cfg.url_col, caption_col=cfg.caption_col,
                                keep_columns=cfg.keep_columns, input_format=cfg.input_format)
        lock = hold_lock(self.out)
        try:
            writer, state = self._open(url_list)
            names = _shard_names(state["prepared"]["kept"], cfg.shard_size)
            self._describe(writer, state, names)
            collector, error = None, None
            if not all(writer.is_complete(n) for n in names):
                collector, error = self._download(writer, names)
            return self._record(writer, state, names, collector, error)
        finally:
            lock.close()

    def _open(self, url_list: UrlList) -> tuple[DatasetWriter, dict[str, Any]]:
        """The dataset writer and the run's state, the URL list prepared when it has to be."""
        self.work.mkdir(exist_ok=True)
        state = read_json(self.state_path, "ingest state") if self.state_path.exists() else {}
        settings = self.cfg.output_settings()
        source = url_list.fingerprint(known=state.get("source"))
        writer = open_writer(self.out, "ingest")
        why = _changed_input(state or (writer.manifest.run.get("ingest") if writer.resumed else None), source, settings)
        if why:
            raise IngestError(f"{self.out}: {why}, or use a new --out")
        remove_leftovers(self.out)
        state = {"source": source, "settings": settings, "prepared": state.get("prepared"),
                 "urls_ready": bool(state.get("urls_ready")) and any((self.work / "urls").glob("*.parquet"))}
        done = state["prepared"] is not None and all(
            writer.is_complete(n) for n in _shard_names(state["prepared"]["kept"], self.cfg.shard_size))
        if not done and not state["urls_ready"]:
            rows_per_part = self.cfg.shard_size * max(1, PART_ROWS // self.cfg.shard_size)
            prepared = prepare(url_list, self.work / "urls", self.work / "refused.parquet", rows_per_part=rows_per_part,
                               allow_any_scheme=self.cfg.allow_any_scheme, progress=self.cfg.progress)
            if self.cfg.crash_at == "prepare":
                crash_here("prepare")
            state.update(prepared=prepared.to_json(), urls_ready=True)
        atomic_write_json(self.state_path, state)
        return writer, state

    def _describe(self, writer: DatasetWriter, state: dict[str, Any], names: list[str]) -> None:
        """Register every shard, what the texts are and where the run's records live; write the manifest."""
        cfg = self.cfg
        writer.expect(names)
        for name in names:
            if not writer.is_complete(name):
                writer.reset(name)  # a previous run's verdict is stale
        if cfg.caption_col:
            writer.set_texts({RAW: {"kind": "alt_text", "source": state["source"]["path"], "column": cfg.caption_col,
                                    "note": f"alt-text from column {cfg.caption_col!r} of the URL list"}})
        writer.manifest.run.setdefault("ingest", {}).update({
            "mode": "download", "source": {**state["source"], "url_col": cfg.url_col, "caption_col": cfg.caption_col},
            "settings": state["settings"],
            "per_sample": {"downloads": f"{STAGING}/img2dataset/<shard>.parquet: every URL with its status and error_message",
                           "refused": f"{STAGING}/refused.parquet: rows not sent to img2dataset (row, url, reason)"}})
        writer.flush()

    def _download(self, writer: DatasetWriter, names: list[str]) -> tuple[ShardCollector, str | None]:
        cfg = self.cfg
        self.staging.root.mkdir(exist_ok=True)
        self.staging.reconcile(writer, set(names))
        executor = None
        if cfg.distributor == "ray":
            _init_ray()
            import ray

            # num_cpus=0: conversions must not wait behind the download tasks holding every CPU;
            # the collector bounds how many run at once.
            remote_convert = ray.remote(num_cpus=0)(convert_shard)

            def submit(fn, *args, **kwargs):
                kwargs.pop("on_sample", None)  # the local fault-injection hook does not travel
                return remote_convert.remote(*args, **kwargs).future()
        else:
            executor = ThreadPoolExecutor(cfg.convert_workers, thread_name_prefix="convert")
            submit = executor.submit
        collector = ShardCollector(writer, self.staging, names, ConvertOptions(caption_keys=("txt",) if cfg.caption_col else ()),
                                   submit, max_in_flight=cfg.convert_workers, crash_at=cfg.crash_at, progress=cfg.progress)
        collector.start()
        error = None
        try:
            error = _run_img2dataset(cfg, self.work / "urls", self.staging.root, names)
        except (KeyboardInterrupt, SystemExit):  # img2dataset turns Ctrl-C into sys.exit(0)
            error = "interrupted"
        finally:
            collector.finish()
            if executor is not None:
                executor.shutdown()
        return collector, error

    def _record(self, writer: DatasetWriter, state: dict[str, Any], names: list[str],
                collector: ShardCollector | None, error: str | None) -> int:
        for name in names:
            if not writer.is_complete(name) and writer.manifest.shards[name].status != "failed":
                writer.fail(name, "img2dataset did not finish this shard" + (f" ({error})" if error else "") + "; rerun to retry")
        refused = state["prepared"]["refused"]
        totals, reasons = _aggregate(writer, refused)
        seconds = time.time() - self.started
        new = collector.samples if collector else 0
        counts = {"urls": state["prepared"]["rows"], "refused": sum(refused.values()),
                  "downloaded": totals.get("count", 0), "samples": totals.get("samples", 0),
                  "failed": totals.get("count", 0) - totals.get("samples", 0),
                  "pending": state["prepared"]["kept"] - totals.get("count", 0)}
        run_info = writer.manifest.run["ingest"]
        run_info.update({
            "counts": counts, "failures": reasons,
            "last_run": {"distributor": self.cfg.distributor, "seconds": round(seconds, 1),
                         "shards": collector.converted if collector else 0, "samples": new,
                         "images_per_s": round(new / seconds, 1) if seconds else 0.0},
            "summary": (f"{counts['urls']} URLs: {counts['samples']} images, {counts['failed']} failed, "
                        f"{counts['refused']} refused" + (f", {counts['pending']} not done yet" if counts["pending"] else "")),
        })
        manifest = writer.finish()
        if collector is not None and collector.error is not None:
            raise collector.error  # a bug in the conversion: the manifest above says which shards
        if manifest.status == COMPLETE:
            # The cleaned list is only needed to resume; img2dataset's per-URL parquets stay.
            shutil.rmtree(self.work / "urls", ignore_errors=True)
            shutil.rmtree(self.staging.root / "_tmp", ignore_errors=True)
            atomic_write_json(self.state_path, {**state, "urls_ready": False})
        report(self.out, manifest, run_info)
        return 0 if manifest.status == COMPLETE else 1


def _aggregate(writer: DatasetWriter, refused: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Totals and failure reasons over the complete shards (their entries keep img2dataset's stats)."""
    totals: Counter = Counter()
    reasons: Counter = Counter()
    for entry in writer.manifest.shards.values():
        if entry.status != COMPLETE:
            continue
        stats = entry.info.get("img2dataset", {})
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(stats.get(k, 0))
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                reasons[reason_of(message)] += int(n)
        reasons.update(entry.info.get("failures", {}))
        totals["samples"] += entry.samples
    reasons.update(refused)
    return dict(totals), top_reasons(reasons)


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE", "OPENCV_IO_MAX_IMAGE_PIXELS")
           if k in os.environ}
    try:
        # Under `ray job submit` "auto" finds the job's cluster. Ray's workers are not children
        # of this process: they get this environment through the runtime env.
        ray.init(address="auto", runtime_env={"env_vars": env}, log_to_driver=True)
    except ConnectionError as e:
        raise IngestError(f"--distributor ray: no Ray cluster to join ({e}); start one with `ray start --head` "
                          "or launch this command with `ray job submit`") from None


def _run_img2dataset(cfg: DownloadConfig, urls: Path, output: Path, names: list[str]) -> str | None:
    """img2dataset over the cleaned list; returns why it stopped early, or None."""
    import img2dataset

    try:
        img2dataset.download(
            url_list=str(urls), input_format="parquet", url_col="url",
            caption_col="caption" if cfg.caption_col else None,
            save_additional_columns=list(cfg.keep_columns) or None,
            output_folder=str(output), output_format="webdataset",
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=not cfg.allow_upscale,
            encode_format=cfg.encode_format, encode_quality=cfg.quality,
            processes_count=cfg.processes, thread_count=cfg.threads, number_sample_per_shard=cfg.shard_size,
            timeout=cfg.timeout, retries=cfg.retries,
            # EXIF is not needed to caption or train, and parsing it costs time per image.
            extract_exif=False, compute_hash="sha256",
            max_image_area=cfg.max_image_area, oom_shard_count=len(names[0].removesuffix(".tar")),
            incremental_mode="incremental", distributor=cfg.distributor, enable_wandb=False,
            max_shard_retry=1,
        )
    except Exception as e:  # img2dataset or Ray failing as a whole: the shards done so far are kept
        print(f"img2dataset stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return f"img2dataset stopped: {type(e).__name__}"
    return None


def report(out: Path, manifest, run_info: dict[str, Any]) -> None:
    counts = manifest.counts()
    print(f"{out}: {manifest.status}, {counts['samples']} samples in {counts['shards']} shards")
    if run_info.get("summary"):
        print(f"  {run_info['summary']}")
    for reason, n in list(run_info.get("failures", {}).items())[:10]:
        print(f"  {n:8d}  {reason}")
    if manifest.status != COMPLETE:
        for name, entry in sorted(manifest.shards.items()):
            if entry.status != COMPLETE:
                print(f"  {name}: {entry.status} ({entry.info.get('error', '')})")
        print("  rerun the same command to finish")


# --- command line -------------------------------------------------------------------------
HELP = __doc__.split("\n\n")[0]
EPILOG = """\
examples:
  python -m pipeline.ingest --urls cc3m.tsv --out data/cc3m
  python -m pipeline.ingest --urls laion/ --url-col URL --caption-col TEXT --out data/laion --processes 16
  ray job submit --address http://HEAD:8265 --working-dir . -- \\
      python -m pipeline.ingest --urls /shared/laion/ --url-col URL --caption-col TEXT --out /shared/laion_shards --distributor ray
  python -m pipeline.ingest --from-webdataset data/img2dataset_out --out data/imported
  python -m pipeline.ingest --from-webdataset data/our_shards            # index in place, no copy
  python -m pipeline.ingest --from-folder photos/ --out data/photos

The output is the project's dataset format (docs/data-format.md): OUT/*.tar + OUT/manifest.json.
A download keeps its working files in OUT/_ingest/: img2dataset's per-shard .parquet lists every
URL with its status and error message, refused.parquet the rows refused before downloading.
Rerun the same command to resume an interrupted ingest; only what is missing is done.
Exit status: 0 complete, 1 incomplete (rerun to finish), 2 bad input or configuration.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.ingest", description=HELP, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to ingest (one of)")
    src = what.add_mutually_exclusive_group(required=True)
    src.add_argument("--urls", type=Path, metavar="FILE|DIR",
                     help="URL list to download: .parquet, .csv, .tsv or .jsonl (.gz allowed for text formats), "
                          "or a directory of such files")
    src.add_argument("--from-webdataset", type=Path, metavar="DIR",
                     help="import WebDataset shards (img2dataset output, or any image + caption per sample); "
                          "shards already in the project's format are indexed in place, without copying")
    src.add_argument("--from-folder", type=Path, metavar="DIR",
                     help="import a folder of images (.jpg .png .webp) with sidecar .txt or .json captions")
    what.add_argument("--out", type=Path, metavar="DIR",
                      help="output dataset directory (optional for --from-webdataset: in place)")

    cols = p.add_argument_group("URL list")
    cols.add_argument("--url-col", default="url", metavar="NAME", help="column holding the URL (default: url)")
    cols.add_argument("--caption-col", default=None, metavar="NAME",
                      help="column holding the alt-text, stored as the 'raw' text (default: caption; '' for none). "
                           "For imports: member extensions or JSON fields holding the caption, comma-separated, "
                           "tried in order (default: txt,caption; a folder's <image>.txt is the txt member)")
    cols.add_argument("--keep-columns", default="", metavar="A,B",
                      help="other columns to keep in each sample's source metadata (e.g. uid)")
    cols.add_argument("--input-format", choices=("parquet", "csv", "tsv", "jsonl"),
                      help="format of the list when its extension does not say")
    cols.add_argument("--allow-any-scheme", action="store_true",
                      help="also download URLs that are not http(s) (file://, ftp://, data:); refused by default "
                           "because they can read local files")

    img = p.add_argument_group("images")
    img.add_argument("--image-size", type=int, default=448, metavar="PX",
                     help="target size in pixels (default 448: captioners tile or resize anyway)")
    img.add_argument("--resize-mode", default="keep_ratio_largest", choices=RESIZE_MODES,
                     help="img2dataset resize mode (default keep_ratio_largest: keep the aspect ratio, "
                          "the long side at most --image-size)")
    img.add_argument("--allow-upscale", action="store_true",
                     help="also enlarge smaller images (default: only shrink)")
    img.add_argument("--encode-format", default="jpg", choices=ENCODE_FORMATS)
    img.add_argument("--encode-quality", type=int, metavar="Q", help="0-100 for jpg/webp (default 95), 0-9 for png (default 9)")
    img.add_argument("--max-image-area", type=float, default=1e8, metavar="PIXELS",
                     help="refuse larger images before decoding them (default 1e8 = 100 megapixels)")

    dl = p.add_argument_group("download")
    dl.add_argument("--shard-size", type=int, default=10000, metavar="N",
                    help="samples per shard (default 10000; also for --from-folder)")
    dl.add_argument("--processes", type=int, default=os.cpu_count() or 1, metavar="N",
                    help="download processes (default: one per CPU; ignored with --distributor ray)")
    dl.add_argument("--threads", type=int, default=64, metavar="N", help="download threads per process (default 64)")
    dl.add_argument("--timeout", type=int, default=10, metavar="SECONDS", help="seconds before a URL counts as unreachable (default 10)")
    dl.add_argument("--retries", type=int, default=0, metavar="N", help="retries per failed URL (default 0)")
    dl.add_argument("--distributor", default="multiprocessing", choices=("multiprocessing", "ray"),
                    help="run img2dataset's shards on local processes, or as Ray tasks over a cluster "
                         "(launch with `ray job submit`; OUT must be on storage every node sees)")
    dl.add_argument("--convert-workers", type=int, default=2, metavar="N",
                    help="shards converted at the same time while downloading (default 2)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _set_environment(max_image_area: float) -> None:
    # Read by img2dataset's worker processes, which inherit this environment; set before importing it.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks the network at import
    os.environ.setdefault("WANDB_MODE", "disabled")
    if math.isfinite(max_image_area):
        # img2dataset checks the area only after a full decode; OpenCV's guard refuses a huge
        # image (a few KB of PNG can claim 50000x50000 pixels) from its header, before allocating.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(max_image_area))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    crash_at = os.environ.get("HOLICLIP_INGEST_CRASH") or None
    if crash_at is not None and crash_at not in CRASH_POINTS:
        print(f"error: HOLICLIP_INGEST_CRASH={crash_at!r} is not one of {', '.join(CRASH_POINTS)}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:
        if args.urls is not None:
            if args.out is None:
                raise IngestError("--urls needs --out DIR (where the shards and the manifest go)")
            _set_environment(args.max_image_area)
            cfg = DownloadConfig(
                urls=args.urls, out=args.out, url_col=args.url_col,
                caption_col="caption" if args.caption_col is None else (args.caption_col or None),
                keep_columns=_split(args.keep_columns), input_format=args.input_format,
                image_size=args.image_size, resize_mode=args.resize_mode, allow_upscale=args.allow_upscale,
                encode_format=args.encode_format, encode_quality=args.encode_quality, shard_size=args.shard_size,
                max_image_area=args.max_image_area, allow_any_scheme=args.allow_any_scheme,
                processes=args.processes, threads=args.threads, timeout=args.timeout, retries=args.retries,
                distributor=args.distributor, convert_workers=args.convert_workers, progress=progress,
                crash_at=crash_at)
            return DownloadRun(cfg).run()
        from .importers import ImportConfig, import_folder, import_webdataset

        icfg = ImportConfig(caption_keys=_split(args.caption_col) if args.caption_col else None,
                            shard_size=args.shard_size, max_image_area=args.max_image_area, progress=progress)
        if args.from_webdataset is not None:
            return import_webdataset(args.from_webdataset, args.out, icfg)
        if args.out is None:
            raise IngestError("--from-folder needs --out DIR (where the shards and the manifest go)")
        return import_folder(args.from_folder, args.out, icfg)
    except (IngestError, UrlListError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
