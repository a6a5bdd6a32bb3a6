"""img2dataset's per-shard `<shard>_stats.json`, as a manifest entry keeps it.

The ingest records it for every shard it downloads and `holiclip-manifest index` for shards
that img2dataset made; both keep the same figures and the same number of failure reasons.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

MAX_REASONS = 50  # distinct failure reasons kept per shard (img2dataset's own errors can include URLs)
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def top_reasons(counts: dict[str, int] | Counter, limit: int = MAX_REASONS) -> dict[str, int]:
    """The `limit` most frequent reasons, the rest summed as "(other reasons)"."""
    counts = Counter(counts)
    kept = dict(counts.most_common(limit))
    rest = sum(counts.values()) - sum(kept.values())
    if rest:
        kept["(other reasons)"] = rest
    return kept


def stats_path(shard: Path) -> Path:
    """Where img2dataset puts the stats of `shard` (00042.tar -> 00042_stats.json)."""
    return shard.with_name(f"{shard.stem}_stats.json")


def read_img2dataset_stats(path: Path) -> dict[str, Any]:
    """The figures of a `_stats.json` and its top failure reasons. Raises ValueError (also for
    a file that cannot be read) naming the file."""
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read img2dataset's stats ({e})") from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), int) for k in ("count", "successes")):
        raise ValueError(f"{path}: not an img2dataset stats file")
    keep: dict[str, Any] = {k: stats[k] for k in COUNTS if isinstance(stats.get(k), int)}
    if isinstance(stats.get("duration"), (int, float)):
        keep["duration_s"] = round(float(stats["duration"]), 3)
    status = stats.get("status_dict")
    reasons = {str(k): v for k, v in status.items() if isinstance(v, int)} if isinstance(status, dict) else {}
    keep["status_dict"] = top_reasons(reasons)
    return keep
