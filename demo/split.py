"""The demo's split: captioned shards -> train and test datasets, plus labelled zero-shot sets.

The last `test_shards` shards of the captioned dataset are held out. Every sample gains the
scene generator's reference texts (text ids `ref/*`, provenance kind "reference": written from
the drawn attributes by demo/scenes.py, not by a VLM). The test shards' pictures are also
filed by attribute value, OUT/zeroshot/<attribute>/<value>/<key>.<ext>, with the class names and
prompt templates `python -m eval zeroshot` reads.

Shard by shard with the dataset bookkeeping of the other stages: a rerun skips finished shards.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_manifests import (
    COMPLETE,
    DatasetWriter,
    ShardReader,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_manifest,
    quality_flags,
)
from demo import scenes as sc


class SplitError(RuntimeError):
    pass


def reference_provenance() -> dict[str, dict[str, Any]]:
    from caption_prompts import load_prompt_set

    prompts = {p.id: p.text for p in load_prompt_set("default").prompts}
    return {text_id: {"kind": "reference", "source": "demo/scenes.py",
                      "note": "written from the drawn attributes by the scene generator, not by a VLM",
                      "stands_in_for": {"prompt_set": "default", "id": pid, "text": prompts[pid]}}
            for text_id, pid in sc.REFERENCE_TEXTS.items()}


def split(captioned: Path, out: Path, test_shards: int) -> dict[str, Any]:
    manifest = load_manifest(captioned)
    shards = sorted(manifest.shards)
    unfinished = [n for n in shards if manifest.shards[n].status != COMPLETE]
    if unfinished:
        raise SplitError(f"{captioned}: shards {', '.join(unfinished[:3])} are not captioned yet; "
                         "rerun the caption stage")
    parts = {"train": shards[:-test_shards], "test": shards[-test_shards:]}
    texts = {**manifest.texts, **reference_provenance()}
    parent = {"path": str(captioned), "dataset_id": manifest.dataset_id}
    counts = {}
    for part, names in parts.items():
        writer = DatasetWriter(out / part, stage="split", parent=parent, dataset_id=f"demo-{part}", flush_every_s=0)
        writer.expect(names)
        writer.set_texts(texts)
        for name in names:
            if not writer.is_complete(name):
                writer.write_shard(name, with_references(captioned / name))
        counts[part] = writer.finish().num_samples
    counts["zeroshot"] = write_zeroshot_sets(out / "test", out / "zeroshot")
    return counts


def with_references(path: Path):
    reader = ShardReader(path)
    for sample in reader:
        labels = {a: str(sample.source.get(a, "")) for a in sc.ATTRIBUTES}
        missing = [a for a, v in labels.items() if not v]
        if missing:
            raise SplitError(f"{path} sample {sample.key}: no {', '.join(missing)} in its source record "
                             "(the ingest keeps them with --keep-columns)")
        refs = sc.reference_texts(labels)
        flags = {**sample.flags, **{t: f for t, s in refs.items() if (f := quality_flags(s))}}
        yield replace(sample, texts={**sample.texts, **refs}, flags=flags)
    if reader.problems:
        raise SplitError(f"{path}: {reader.problems[0]}; check it with `holiclip-manifest verify {path.parent}`")


def write_zeroshot_sets(test: Path, root: Path) -> int:
    """OUT/zeroshot/<attribute>/<value>/<key>.<ext> from the test split; the number of images."""
    manifest = load_manifest(test)
    done = root / ".complete.json"
    made_from = [manifest.shards[n].sha256 for n in sorted(manifest.shards)]
    with contextlib.suppress(OSError, ValueError, KeyError):
        record = json.loads(done.read_text())
        if record["made_from"] == made_from:
            return int(record["images"])
    n = 0
    for name in sorted(manifest.shards):
        for sample in ShardReader(test / name):
            n += 1
            for attribute in sc.ATTRIBUTES:
                folder = root / attribute / str(sample.source[attribute])
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(folder / f"{sample.key}.{sample.image_ext}", sample.image)
    for attribute in sc.ATTRIBUTES:
        classes = sorted(d.name for d in (root / attribute).iterdir() if d.is_dir())
        atomic_write_text(root / attribute / "classnames.txt", "\n".join(classes) + "\n")
        atomic_write_text(root / attribute / "templates.txt", "\n".join(sc.TEMPLATES[attribute]) + "\n")
    atomic_write_json(done, {"made_from": made_from, "images": n})  # last: it marks the sets complete
    return n
