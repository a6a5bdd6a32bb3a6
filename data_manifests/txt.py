"""`txt`: choose which text every sample's `.txt` member holds, on an existing dataset.

Stock WebDataset loaders (OpenCLIP's `--train-data`, img2dataset-based tools) read the caption
from `<key>.txt`. The stages write it with the alt-text (`raw`); this rewrites each shard with
another text id there (or back to `raw`), without re-captioning: samples, images and JSON are
copied unchanged, only the `.txt` member differs. Each shard is rewritten aside and renamed into
place (shard.ShardWriter), then its completion record says which text id it holds (`txt`), so a
killed run is resumed by running the same command: shards that already hold the id are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import now_iso
from .manifest import COMPLETE, MANIFEST_NAME, DatasetWriter, ManifestError
from .sample import SampleFormatError, check_text_id
from .shard import ShardReader, ShardReadError, ShardWriteError, ShardWriter
from .textstats import TextStats


def set_txt_member(root: str | Path, text_id: str, *, progress: bool = False) -> dict[str, Any]:
    """Rewrite the complete shards of dataset `root` whose `.txt` is not `text_id`. Returns a summary."""
    root = Path(root)
    if not (root / MANIFEST_NAME).exists():
        raise ManifestError(f"{root}: no {MANIFEST_NAME}; run `holiclip-manifest index {root}` first")
    try:
        check_text_id(text_id)
    except SampleFormatError as e:
        raise ManifestError(f"--text-id: {e}") from None
    writer = DatasetWriter(root, stage="txt", flush_every_s=30.0)
    try:
        manifest = writer.manifest
        known = sorted(set(manifest.texts) | set(manifest.text_stats.raw))
        if text_id not in known:
            raise ManifestError(f"{root / MANIFEST_NAME}: no text id {text_id!r} in this dataset; "
                                f"it has {', '.join(known) or 'none'}")
        names = [n for n, e in sorted(manifest.shards.items()) if e.status == COMPLETE]
        todo = [n for n in names if not (manifest.shards[n].txt == text_id and writer.is_complete(n))]
        without, refused = 0, 0
        iterator = todo
        if progress:
            from tqdm import tqdm

            iterator = tqdm(todo, unit="shard", desc=f"txt <- {text_id}")
        for name in iterator:
            old = manifest.shards[name]
            reader = ShardReader(writer.shard_path(name))
            stats = TextStats()
            try:
                with ShardWriter(writer.shard_path(name), txt=text_id) as shard:
                    for sample in reader:
                        shard.write(sample)
                        stats.add(sample)
                        without += text_id not in sample.texts
                    info = shard.close()
            except ShardReadError as e:
                raise ManifestError(f"{root / name}: cannot be read ({e.reason}); nothing of it was changed; "
                                    f"check it with `holiclip-manifest verify {root}`") from None
            except ShardWriteError as e:
                raise ManifestError(f"{root / name}: {e}; the shard is unchanged, rerun the same command") from None
            refused += sum(reader.refused.values())
            extra = {**old.info, "txt_rewritten": now_iso()}
            writer.commit(info, stats, failed_samples=old.failed_samples + sum(reader.refused.values()), extra=extra)
        summary = {"text_id": text_id, "shards": len(names), "rewritten": len(todo), "skipped": len(names) - len(todo),
                   "samples_without_text": without, "samples_refused": refused, "updated": now_iso()}
        manifest.run["txt"] = summary
    except BaseException:
        writer.close()  # no manifest write left running (or half-written) behind the error
        raise
    writer.finish()
    return summary
