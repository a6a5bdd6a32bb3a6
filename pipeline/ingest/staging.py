"""The staging area of a download, and the collector that turns it into the dataset's shards.

img2dataset writes into OUT/_ingest/img2dataset/: per shard a .tar, a .parquet (every URL with
its status and error message) and, last, after closing the tar, a _stats.json. `ShardCollector`
runs beside img2dataset in the ingest's process: each shard whose _stats.json has appeared is
converted (converter.py, in a thread or as a Ray task), committed to the manifest, and its
staging .tar deleted. The .parquet and _stats.json stay: they are the per-URL record, and they
tell img2dataset's incremental mode that the shard is done. See downloader.py for what a
rerun does after a kill at each of these points.

Fault injection for the resume tests: HOLICLIP_INGEST_CRASH=<point> (read once, in the entry
point) makes the run kill its own process group with SIGKILL, as `kill -9` would, the first time
it reaches that point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from data_manifests import DatasetWriter, ManifestError, stats_path
from data_manifests.manifest import read_json

from .converter import ConvertOptions, convert_shard

POLL_S = 1.0
CRASH_POINTS = ("prepare", "staged", "converting", "published", "committed")


def crash_here(point: str) -> None:
    """Die like `kill -9` of this run's process group (img2dataset's workers included)."""
    sys.stderr.write(f"HOLICLIP_INGEST_CRASH: killed at {point!r}\n")
    sys.stderr.flush()
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class Staging:
    """OUT/_ingest/img2dataset: img2dataset's own output, one .tar/.parquet/_stats.json per shard."""

    def __init__(self, root: Path):
        self.root = root

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        """(tar, _stats.json, parquet) of shard `name` ("00042.tar")."""
        tar = self.root / name
        return tar, stats_path(tar), tar.with_suffix(".parquet")

    def finished(self) -> list[str]:
        """Shards img2dataset has finished: it writes _stats.json last, after closing the tar."""
        try:
            return sorted(e.name.removesuffix("_stats.json") + ".tar" for e in os.scandir(self.root)
                          if e.name.endswith("_stats.json"))
        except FileNotFoundError:
            return []

    def stats_readable(self, name: str) -> bool:
        try:
            read_json(self.paths(name)[1], "img2dataset stats")
            return True
        except ManifestError:
            return False

    def forget(self, name: str) -> None:
        """Make img2dataset's incremental mode download this shard again."""
        for p in self.paths(name):
            p.unlink(missing_ok=True)

    def reconcile(self, writer: DatasetWriter, names: set[str]) -> None:
        """Before img2dataset starts: forget finished-looking shards that have nothing to convert.

        img2dataset writes _stats.json in place, so a kill can leave it cut short; and a staging
        tar is deleted once its shard is committed, so a shard whose published file was lost
        since has no source left. Either way img2dataset would skip the shard: download it again.
        """
        for name in self.finished():
            if name in names and not writer.is_complete(name):
                if not self.stats_readable(name) or not self.paths(name)[0].exists():
                    self.forget(name)


class ShardCollector(threading.Thread):
    """Converts img2dataset's finished shards while it downloads the next ones, and commits them.

    The only thread that touches the DatasetWriter while img2dataset runs (one writer per dataset).
    """

    def __init__(self, writer: DatasetWriter, staging: Staging, names: list[str], options: ConvertOptions,
                 submit: Callable[..., Future], max_in_flight: int, crash_at: str | None, progress: bool):
        super().__init__(name="shard-collector", daemon=True)
        from tqdm import tqdm

        self.writer, self.staging, self.options = writer, staging, options
        self.names = set(names)
        self.submit, self.max_in_flight, self.crash_at = submit, max_in_flight, crash_at
        self.handled: set[str] = set()
        self.in_flight: dict[str, Future] = {}
        self.downloads_done = threading.Event()
        self.error: BaseException | None = None
        self.converted = 0
        self.samples = 0
        done = sum(1 for n in names if writer.is_complete(n))
        self.bar = tqdm(total=len(names), initial=done, unit="shard", desc="ingest", disable=not progress,
                        mininterval=1)

    def _crash(self, point: str) -> None:
        if self.crash_at == point:
            crash_here(point)

    def run(self) -> None:
        try:
            while True:
                final = self.downloads_done.is_set()
                started = self._scan(final)
                self._collect(wait=final)
                if final and not started and not self.in_flight:
                    return
                if not final:
                    self.downloads_done.wait(POLL_S)
        except BaseException as e:  # surfaced by finish() in the main thread
            self.error = e
        finally:
            self.bar.close()

    def _scan(self, final: bool) -> int:
        """Start converting the shards img2dataset has finished; returns how many were taken up."""
        taken = 0
        for name in self.staging.finished():
            if name in self.handled or name in self.in_flight or name not in self.names:
                continue
            if len(self.in_flight) >= self.max_in_flight:
                return taken + 1  # more to do once a conversion finishes
            tar, stats, _ = self.staging.paths(name)
            if self.writer.is_complete(name):
                tar.unlink(missing_ok=True)  # killed after the commit, before this cleanup
                self.handled.add(name)
                continue
            if not self.staging.stats_readable(name) or not tar.exists():
                if not final:
                    continue  # img2dataset may be writing _stats.json right now
                self.writer.fail(name, "img2dataset's result for this shard is incomplete; rerun to download it again")
                self.staging.forget(name)
                self.handled.add(name)
                continue
            self._crash("staged")
            kwargs: dict[str, Any] = {"img2dataset_stats": stats}
            if self.crash_at == "converting":
                kwargs["on_sample"] = lambda n: n >= 2 and crash_here("converting")
            self.in_flight[name] = self.submit(convert_shard, tar, self.writer.shard_path(name), self.options, **kwargs)
            taken += 1
        return taken

    def _collect(self, wait: bool) -> None:
        from data_manifests import ShardReadError, ShardWriteError

        for name, fut in list(self.in_flight.items()):
            if not wait and not fut.done():
                continue
            del self.in_flight[name]
            self.handled.add(name)
            try:
                result = fut.result()
            except Exception as e:
                cause = getattr(e, "cause", None) or e  # a Ray task error wraps the conversion's own
                if isinstance(cause, (ShardReadError, ValueError)):
                    self.writer.fail(name, f"img2dataset's shard could not be read ({cause}); "
                                           "rerun to download it again")
                    self.staging.forget(name)
                elif isinstance(cause, (ShardWriteError, OSError)):
                    self.writer.fail(name, f"could not write the shard ({cause}); rerun to retry")
                else:  # a bug: recorded, and raised once the manifest is written
                    self.writer.fail(name, f"conversion failed ({type(cause).__name__}: {cause})")
                    self.error = self.error or cause
                continue
            self._crash("published")
            self.writer.commit(result.info, result.stats, failed_samples=result.failed_samples, extra=result.extra)
            self._crash("committed")
            self.staging.paths(name)[0].unlink(missing_ok=True)
            self.converted += 1
            self.samples += result.info.samples
            self.bar.set_postfix(images=self.samples, refresh=False)
            self.bar.update()

    def finish(self) -> None:
        self.downloads_done.set()
        self.join()
