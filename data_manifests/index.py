"""`index`: build a manifest for shards that have none (img2dataset output, hand-made shards).

Shards are read, not rewritten: each readable shard becomes a complete entry with its counts
and checksums; img2dataset's per-shard `<shard>_stats.json`, when present, is kept in the entry.
Provenance cannot be known for texts found this way, and the manifest says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .img2dataset import read_img2dataset_stats, stats_path, top_reasons
from .manifest import MANIFEST_NAME, DatasetWriter, ManifestError, list_shard_files
from .sample import RAW
from .shard import ShardInfo, ShardReader, ShardReadError
from .textstats import TextStats


def _img2dataset_stats(shard: Path) -> dict[str, Any]:
    path = stats_path(shard)
    try:
        return {"img2dataset": read_img2dataset_stats(path)} if path.exists() else {}
    except ValueError:
        return {}  # a stats file is a nicety here: the shard itself is what gets indexed


def index_dataset(root: str | Path, *, progress: bool = False, force: bool = False) -> DatasetWriter:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    if (root / MANIFEST_NAME).exists() and not force:
        raise ManifestError(f"{root}: already has a manifest; use `verify`, or `index --force` to rebuild it")
    names = list_shard_files(root)
    if not names:
        raise ManifestError(f"{root}: no .tar shards to index")
    if force:
        (root / MANIFEST_NAME).unlink(missing_ok=True)
    writer = DatasetWriter(root, stage="index", flush_every_s=float("inf"))
    writer.expect(names)
    text_ids: set[str] = set()
    problems: list[str] = []
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, unit="shard", desc="index")
    for name in iterator:
        reader = ShardReader(root / name, with_images=False)
        stats = TextStats()
        try:
            for sample in reader:
                stats.add(sample)
        except ShardReadError as e:
            writer.fail(name, e.reason, rerun_helps=False)
            problems.append(str(e))
            continue
        problems.extend(str(p) for p in reader.problems)
        text_ids.update(stats.raw)
        writer.commit(ShardInfo(name, reader.samples, reader.bytes, reader.sha256), stats,
                      failed_samples=sum(reader.refused.values()),
                      extra={**_img2dataset_stats(root / name),
                             **({"failures": top_reasons(reader.refused)} if reader.refused else {}),
                             **({"problems": [str(p) for p in reader.problems[:20]]} if reader.problems else {})})
    writer.set_texts({
        t: {"kind": "alt_text" if t == RAW else "unknown",
            "note": "found by `holiclip-manifest index`; how this text was made is not recorded"}
        for t in sorted(text_ids)
    })
    writer.manifest.run["index"] = {"problems": problems[:100], "problem_count": len(problems)}
    writer.finish()
    return writer
