"""`diff`: what differs between two datasets, from their manifests and (optionally) samples.

The sample comparison pairs shards by name, so it needs memory for one shard at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import COMPLETE, load_manifest
from .sample import sha256_hex
from .shard import ShardReader, ShardReadError

MAX_EXAMPLES = 10


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def diff_provenance(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """Fields that differ between two provenance records, as {field: [a, b]}."""
    fa, fb = _flatten(a), _flatten(b)
    skip = ("created",)  # when a text was made is expected to differ
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and not k.endswith(skip)}


def diff_datasets(root_a: str | Path, root_b: str | Path, *, samples: bool = False) -> dict[str, Any]:
    a, b = load_manifest(root_a), load_manifest(root_b)
    out: dict[str, Any] = {
        "a": {"path": str(root_a), "dataset_id": a.dataset_id, **a.counts()},
        "b": {"path": str(root_b), "dataset_id": b.dataset_id, **b.counts()},
        "lineage": {"a_parent": (a.parent or {}).get("dataset_id"), "b_parent": (b.parent or {}).get("dataset_id")},
        "texts_only_in_a": sorted(set(a.texts) - set(b.texts)),
        "texts_only_in_b": sorted(set(b.texts) - set(a.texts)),
        "provenance_changed": {},
        "text_counts": {},
        "shards_only_in_a": sorted(set(a.shards) - set(b.shards)),
        "shards_only_in_b": sorted(set(b.shards) - set(a.shards)),
        "shards_content_differs": sorted(n for n in set(a.shards) & set(b.shards)
                                         if a.shards[n].sha256 != b.shards[n].sha256),
    }
    for t in sorted(set(a.texts) & set(b.texts)):
        changed = diff_provenance(a.texts[t], b.texts[t])
        if changed:
            out["provenance_changed"][t] = changed
    for t in sorted(set(a.text_stats.raw) | set(b.text_stats.raw)):
        ca = a.text_stats.raw.get(t, {}).get("count", 0)
        cb = b.text_stats.raw.get(t, {}).get("count", 0)
        if ca != cb:
            out["text_counts"][t] = [ca, cb]
    if samples:
        out["samples"] = _diff_samples(Path(root_a), Path(root_b), a, b, out["shards_content_differs"])
    out["identical"] = not any(out[k] for k in ("texts_only_in_a", "texts_only_in_b", "provenance_changed",
                                                "text_counts", "shards_only_in_a", "shards_only_in_b",
                                                "shards_content_differs"))
    return out


def _read(path: Path) -> tuple[dict[str, Any], str | None]:
    reader = ShardReader(path)
    try:
        return {s.key: s for s in reader}, None
    except ShardReadError as e:
        return {}, str(e)


def _diff_samples(ra: Path, rb: Path, a, b, shard_names: list[str]) -> dict[str, Any]:
    """Sample-level differences inside the shards whose checksums differ."""
    res: dict[str, Any] = {"only_in_a": 0, "only_in_b": 0, "image_differs": 0, "texts_differ": {},
                           "examples": [], "errors": []}
    for name in shard_names:
        if a.shards[name].status != COMPLETE or b.shards[name].status != COMPLETE:
            continue
        sa, err_a = _read(ra / name)
        sb, err_b = _read(rb / name)
        res["errors"] += [e for e in (err_a, err_b) if e]
        for key in sorted(set(sa) | set(sb)):
            x, y = sa.get(key), sb.get(key)
            if x is None or y is None:
                res["only_in_a" if y is None else "only_in_b"] += 1
                if len(res["examples"]) < MAX_EXAMPLES:
                    res["examples"].append(f"{name} {key}: only in {'a' if y is None else 'b'}")
                continue
            if sha256_hex(x.image) != sha256_hex(y.image):
                res["image_differs"] += 1
            for t in sorted(set(x.texts) | set(y.texts)):
                if x.texts.get(t) != y.texts.get(t):
                    res["texts_differ"][t] = res["texts_differ"].get(t, 0) + 1
                    if len(res["examples"]) < MAX_EXAMPLES:
                        res["examples"].append(f"{name} {key} [{t}]: {x.texts.get(t)!r} != {y.texts.get(t)!r}")
    return res
