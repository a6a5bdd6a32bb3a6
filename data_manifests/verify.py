"""`verify`: check a dataset directory against its manifest, without changing anything.

Recounts every shard, recomputes byte sizes and sha256, checks each sample's image against the
sha256 recorded in its source metadata, recounts texts per text id, and finds shards that are
missing, extra, unfinished, truncated or corrupt, and keys that appear in more than one shard.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import PARTIAL_GLOB
from .manifest import COMPLETE, Manifest, ManifestError, list_shard_files, load_manifest
from .shard import ShardReader, ShardReadError
from .textstats import TextStats


@dataclass
class ShardCheck:
    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)
    stats: TextStats = field(default_factory=TextStats)
    key_hashes: np.ndarray | None = None


@dataclass
class VerifyReport:
    root: str
    dataset_id: str | None = None
    shards_checked: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "dataset_id": self.dataset_id, "ok": self.ok,
                "shards_checked": self.shards_checked, "samples": self.samples,
                "problems": self.problems, "warnings": self.warnings}


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def check_shard(path: Path, decode_images: bool = False) -> ShardCheck:
    check = ShardCheck(path.name)
    reader = ShardReader(path)
    hashes = []
    try:
        for sample in reader:
            hashes.append(_key_hash(sample.key))
            check.stats.add(sample)
            expected = sample.source.get("sha256")
            if expected and hashlib.sha256(sample.image).hexdigest() != expected:
                check.problems.append(f"{path.name} sample {sample.key}: image bytes do not match the sha256 "
                                      "in its source metadata")
            if decode_images:
                from PIL import Image

                try:
                    with Image.open(io.BytesIO(sample.image)) as im:
                        im.load()
                except Exception as e:  # PIL raises many kinds for bad data
                    check.problems.append(f"{path.name} sample {sample.key}: image does not decode ({e})")
    except ShardReadError as e:
        check.problems.append(str(e))
    check.problems.extend(str(p) for p in reader.problems)
    check.samples, check.bytes, check.sha256 = reader.samples, reader.bytes, reader.sha256
    check.key_hashes = np.asarray(hashes, dtype=np.uint64)
    return check


def verify_dataset(root: str | Path, *, workers: int = 4, decode_images: bool = False,
                   progress: bool = False) -> VerifyReport:
    root = Path(root)
    report = VerifyReport(str(root))
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report
    try:
        manifest: Manifest = load_manifest(root)
    except ManifestError as e:
        report.problems.append(str(e))
        return report
    report.dataset_id = manifest.dataset_id

    files = set(list_shard_files(root))
    to_check = []
    for name, entry in sorted(manifest.shards.items()):
        if entry.status != COMPLETE:
            why = entry.info.get("error")
            then = ("rerun the job to finish it" if entry.rerun_helps
                    else "a rerun cannot finish it: fix or remove its input")
            report.problems.append(f"{name}: shard is {entry.status}" + (f" ({why})" if why else "") + f"; {then}")
        elif name not in files:
            report.problems.append(f"{name}: listed as complete but the file is missing")
        else:
            to_check.append(name)
    for name in sorted(files - set(manifest.shards)):
        report.problems.append(f"{name}: shard file is not in the manifest (extra)")
    for p in sorted(root.glob(PARTIAL_GLOB)):
        report.warnings.append(f"{p.name}: leftover of an interrupted write (not part of the dataset; safe to delete)")

    recount = TextStats()
    all_hashes, owners = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(to_check), unit="shard", desc="verify")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for idx, check in enumerate(pool.map(lambda n: check_shard(root / n, decode_images), to_check)):
            entry = manifest.shards[check.name]
            report.shards_checked += 1
            report.samples += check.samples
            report.problems.extend(check.problems)
            if check.sha256 and (check.bytes != entry.bytes or check.sha256 != entry.sha256):
                report.problems.append(
                    f"{check.name}: checksum mismatch (manifest: {entry.bytes} bytes sha256 {entry.sha256[:12]}..., "
                    f"file: {check.bytes} bytes sha256 {check.sha256[:12]}...)")
            if check.samples != entry.samples:
                report.problems.append(f"{check.name}: manifest says {entry.samples} samples, counted {check.samples}")
            recount.merge(check.stats)
            all_hashes.append(check.key_hashes)
            owners.append(np.full(len(check.key_hashes), idx, dtype=np.uint32))
            if bar:
                bar.update()
    if bar:
        bar.close()

    # Per-text counts must agree with the manifest's statistics.
    expected_counts = {t: e["count"] for t, e in manifest.text_stats.raw.items()}
    counted = {t: e["count"] for t, e in recount.raw.items()}
    for text_id in sorted(set(expected_counts) | set(counted)):
        if expected_counts.get(text_id, 0) != counted.get(text_id, 0):
            report.problems.append(f"text {text_id!r}: manifest counts {expected_counts.get(text_id, 0)}, "
                                   f"shards hold {counted.get(text_id, 0)}")
    if not report.problems and manifest.status != COMPLETE:
        report.problems.append(f"dataset status is {manifest.status!r}, not complete")

    # Keys across shards: 8-byte hashes, sorted, so memory stays ~12 bytes per sample.
    if all_hashes:
        hashes = np.concatenate(all_hashes)
        order = np.argsort(hashes, kind="stable")
        sorted_h = hashes[order]
        dup = np.nonzero(sorted_h[1:] == sorted_h[:-1])[0]
        if len(dup):
            shard_of = np.concatenate(owners)[order]
            pairs = {(to_check[shard_of[i]], to_check[shard_of[i + 1]]) for i in dup[:20]}
            report.problems.append(f"{len(dup)} sample keys appear in more than one place, e.g. in "
                                   + ", ".join(f"{a} and {b}" for a, b in sorted(pairs)))
    return report
