"""The output dataset of an ingest: one ingest per directory (a lock), its writer, leftovers of a
killed run, and the summary printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_manifests import COMPLETE, PARTIAL_GLOB, DatasetLocked, DatasetWriter, ManifestError
from data_manifests import hold_lock as hold_dataset_lock

from .config import IngestError


def hold_lock(out: Path):
    """One ingest per output directory: a second one would commit shards twice."""
    try:
        return hold_dataset_lock(out, "ingest")
    except (DatasetLocked, ManifestError) as e:
        raise IngestError(f"{e} (--out)") from None


def remove_leftovers(out: Path) -> None:
    """Half-written files of a killed run (`.<name>.partial-*`); safe while we hold the lock."""
    for d in (out, out / "_shards"):
        if d.is_dir():
            for p in d.glob(PARTIAL_GLOB):
                p.unlink(missing_ok=True)


def open_writer(out: Path, stage: str) -> DatasetWriter:
    writer = DatasetWriter(out, stage=stage, flush_every_s=30.0)
    if writer.resumed and writer.manifest.stage != stage:
        raise IngestError(f"{out}: already holds a dataset made by the {writer.manifest.stage!r} stage; "
                          "ingest into a new --out")
    return writer


def report(out: Path, manifest, run_info: dict[str, Any]) -> None:
    """The end-of-run summary; "rerun" only where a rerun can finish what is left."""
    counts = manifest.counts()
    print(f"{out}: {manifest.status}, {counts['samples']} samples in {counts['shards']} shards")
    if run_info.get("summary"):
        print(f"  {run_info['summary']}")
    for reason, n in list(run_info.get("failures", {}).items())[:10]:
        print(f"  {n:8d}  {reason}")
    unfinished = [e for _, e in sorted(manifest.shards.items()) if e.status != COMPLETE]
    for entry in unfinished:
        print(f"  {entry.name}: {entry.status} ({entry.info.get('error', '')})")
    if any(e.rerun_helps for e in unfinished):
        print("  rerun the same command to finish")
    stuck = sum(not e.rerun_helps for e in unfinished)
    if stuck:
        print(f"  {stuck} shard(s) above cannot be finished by a rerun: their input cannot be read as it is. "
              "Fix or remove the files named there, then import again into a new --out directory")

