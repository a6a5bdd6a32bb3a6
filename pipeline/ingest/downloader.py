"""A download: a URL list to image shards with img2dataset.

    python -m pipeline.ingest --urls cc3m.tsv --out data/cc3m
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipeline.ingest --urls laion/ --url-col URL --caption-col TEXT --out /shared/laion --distributor ray

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

import math
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from data_manifests import COMPLETE, RAW, DatasetWriter, atomic_write_json
from data_manifests.manifest import read_json

from .config import DownloadConfig, IngestError
from .converter import ConvertOptions, convert_shard, reason_of, top_reasons
from .output import hold_lock, open_writer, remove_leftovers, report
from .staging import ShardCollector, Staging, crash_here
from .url_list import PART_ROWS, UrlList, prepare

STAGING = "_ingest"


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
        return ("was started with other settings ("
                + ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                + "); resume with the same ones")
    return None


class DownloadRun:
    """One run of `--urls`: prepare the list, download with img2dataset while converting, record."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
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
            "per_sample": {"downloads": f"{STAGING}/img2dataset/<shard>.parquet: "
                                        "every URL with its status and error_message",
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
        collector = ShardCollector(writer, self.staging, names,
                                   ConvertOptions(caption_keys=("txt",) if cfg.caption_col else ()), submit,
                                   max_in_flight=cfg.convert_workers, crash_at=cfg.crash_at, progress=cfg.progress)
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
                writer.fail(name, "img2dataset did not finish this shard" + (f" ({error})" if error else "")
                                  + "; rerun to retry")
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
                        f"{counts['refused']} refused"
                        + (f", {counts['pending']} not done yet" if counts["pending"] else "")),
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
    from pipeline.cluster import ClusterError, connect

    env = {k: os.environ[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE", "OPENCV_IO_MAX_IMAGE_PIXELS")
           if k in os.environ}
    try:
        connect(embedded=False, env_vars=env)
    except ClusterError as e:
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
