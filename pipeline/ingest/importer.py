"""Import without downloading: existing WebDataset shards, or a folder of images with captions.

`--from-webdataset DIR`
  - shards already in the project's format (image + JSON with `texts` and `source.sha256`,
    nothing else) are indexed: read once to check every image against its sha256 and count the
    texts, then recorded as they are. In place (no --out, or --out DIR) nothing is copied or
    rewritten; with another --out they are hard-linked (copied only across file systems);
  - anything else (img2dataset's output: `.txt` captions and its metadata JSON; or any WebDataset
    with an image and a caption per sample) is converted into --out by converter.py, every
    image decoded once. Such shards are never rewritten in place: that would destroy the input.
`--from-folder DIR`
  images with a sidecar `<name>.txt` or `<name>.json` caption, walked in sorted order, packed
  into shards of --shard-size; `source.path` says where each came from. JPEG, PNG and WebP files
  are stored as they are; GIF (first frame), BMP, TIFF, PPM and AVIF are stored as lossless PNG,
  as the URL ingest converts them (converter.py).

Both are resumable per shard like a download: a rerun skips the shards already recorded, and
refuses to continue if the input changed in between (its listing is fingerprinted). A sample
that cannot be imported is counted with its reason in its shard's entry. An input shard that
cannot be read (empty, not a tar, truncated) fails its shard with a message naming the file;
the others are imported and the exit status is 1, but a rerun cannot finish such a shard, and
the summary says to fix or remove the file instead.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_manifests import (
    COMPLETE,
    RAW,
    SampleFormatError,
    ShardInfo,
    ShardReader,
    ShardReadError,
    ShardWriter,
    TarReader,
    TextStats,
    list_shard_files,
    partial_path,
    publish,
    read_img2dataset_stats,
    readable_name,
    sha256_hex,
    stats_path,
    top_reasons,
)

from .config import ImportConfig, IngestError
from .converter import CONVERTED_IMAGE_MEMBERS, IMAGE_MEMBERS, ConvertOptions, SampleRejected, convert_shard, to_sample
from .output import hold_lock, open_writer, remove_leftovers, report

OUR_MEMBERS = {"jpg", "png", "webp", "json", "txt"}  # .txt: the caption stock loaders read (docs/data-format.md)


def _convert_options(cfg: ImportConfig) -> ConvertOptions:
    return ConvertOptions(caption_keys=cfg.keys, check_images=True, max_image_area=cfg.max_image_area)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc=desc, disable=not enabled, mininterval=1)


def _fingerprint(lines: Iterator[str]) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
        n += 1
    return n, h.hexdigest()


def _check_same_input(writer, mode: str, source: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    old = writer.manifest.run.get("ingest") if writer.resumed else None
    if not old:
        return
    if old.get("mode") != mode or old.get("source", {}).get("fingerprint") != source["fingerprint"]:
        raise IngestError(f"{out}: was started from another input "
                          f"({old.get('mode')} {old.get('source', {}).get('path')}), "
                          "or the input changed since; resume with the same input, or use a new --out")
    if old.get("settings", {}) != settings:
        raise IngestError(f"{out}: was started with other settings ({old.get('settings')}); resume with the same ones, "
                          "or use a new --out")


def _start_import(out: Path, mode: str, source: dict[str, Any], settings: dict[str, Any], names: list[str],
                  **run_info: Any) -> tuple[Any, dict[str, Any]]:
    """Open (or resume) an import's output dataset and record what it imports; (writer, run info)."""
    writer = open_writer(out, "ingest")
    _check_same_input(writer, mode, source, settings, out)
    remove_leftovers(out)
    run = writer.manifest.run.setdefault("ingest", {})
    run.update({"mode": mode, "source": source, "settings": settings, **run_info})
    writer.expect(names)
    writer.flush()
    return writer, run


def _text_provenance(stats: TextStats, source: str, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {t: ({"kind": "alt_text", "source": source, "note": f"caption imported from {' or '.join(keys)}"}
                if t == RAW else
                {"kind": "unknown", "note": f"imported from {source}; how this text was made is not recorded"})
            for t in sorted(stats.raw)}


def _finish(writer, out: Path, run: dict[str, Any], text_sources: TextStats, source: str,
            keys: tuple[str, ...]) -> int:
    failures: Counter = Counter()
    samples = failed = 0
    for entry in writer.manifest.shards.values():
        if entry.status == COMPLETE:
            samples += entry.samples
            failed += entry.failed_samples
            failures.update(entry.info.get("failures", {}))
    writer.set_texts(_text_provenance(writer.manifest.text_stats, source, keys))
    run.update({"counts": {"samples": samples, "failed": failed}, "failures": top_reasons(failures),
                "summary": f"{samples} images imported, {failed} samples could not be"})
    manifest = writer.finish()
    report(out, manifest, run)
    return 0 if manifest.status == COMPLETE else 1


# --- WebDataset -----------------------------------------------------------------------------
def layout_problem(path: Path) -> str | None:
    """Why a shard's members are not the project's layout (member names, and whether each JSON has
    `texts`: img2dataset's shards also have .jpg, .txt and .json), or None if they are."""
    exts: set[str] = set()
    reader = TarReader(path, read=lambda ext: ext == "json")
    without_texts = None
    try:
        for key, members in reader.by_key():
            exts.update(members)
            # A cheap look at the bytes; index_conforming parses every sample and decides.
            if without_texts is None and "json" in members and b'"texts"' not in members["json"]:
                without_texts = key
    except ShardReadError as e:
        return e.reason
    if reader.problems:  # a sample the tar reader refuses would not be in the indexed shard
        return str(reader.problems[0])
    extra = sorted(exts - OUR_MEMBERS)
    if extra:
        return "members " + ", ".join(f".{e}" for e in extra) + " are not part of the project's format"
    if "json" not in exts:
        return "no .json members"
    if without_texts is not None:
        return f"sample {without_texts}: its .json has no texts (img2dataset's layout, say)"
    return None


def index_conforming(path: Path) -> tuple[ShardInfo, TextStats, str | None]:
    """Read a shard in the project's layout; (info, text stats, why it does not conform or None)."""
    reader = ShardReader(path)
    stats = TextStats()
    why = None
    try:
        for sample in reader:
            stats.add(sample)
            if why is None:
                if sample.source.get("sha256") != sha256_hex(sample.image):
                    why = f"sample {sample.key}: source.sha256 missing or not the image's"
                elif not (isinstance(sample.source.get("width"), int) and isinstance(sample.source.get("height"), int)):
                    why = f"sample {sample.key}: source.width/height missing"
    except ShardReadError as e:
        return ShardInfo(path.name, 0, 0, ""), stats, e.reason
    if reader.problems and why is None:
        why = str(reader.problems[0])
    return ShardInfo(path.name, reader.samples, reader.bytes, reader.sha256), stats, why


def _img2dataset_extra(path: Path) -> dict[str, Any]:
    stats = stats_path(path)
    try:
        return {"img2dataset": read_img2dataset_stats(stats)} if stats.exists() else {}
    except ValueError:
        return {}


def _link_or_copy(src: Path, dst: Path) -> str:
    """Publish `src` as `dst` through a partial file: a hard link (no copy), else a copy."""
    partial = partial_path(dst)
    try:
        try:
            os.link(src, partial)
            how = "hard-linked"
        except OSError:  # another file system
            shutil.copyfile(src, partial)
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            how = "copied"
        publish(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return how


def import_webdataset(src: Path, out: Path | None, cfg: ImportConfig) -> int:
    if not src.is_dir():
        raise IngestError(f"--from-webdataset {src}: not a directory of .tar shards")
    names = list_shard_files(src)
    if not names:
        raise IngestError(f"--from-webdataset {src}: no .tar shards in this directory")
    in_place = out is None or out.resolve() == src.resolve()
    out = src if out is None else out
    if not in_place and out.resolve().is_relative_to(src.resolve()):
        raise IngestError(f"--out {out} is inside --from-webdataset {src}; use a directory outside it, or no --out")
    if in_place:
        # Everything is checked before anything is written into the user's directory.
        for name in names:
            why = layout_problem(src / name)
            if why:
                raise IngestError(f"{src / name}: cannot be indexed in place: {why}. Convert the shards with "
                                  "--out NEWDIR (or describe them as they are with `holiclip-manifest index`)")
    listing = (f"{n}\t{(src / n).stat().st_size}\t{(src / n).stat().st_mtime_ns}" for n in names)
    _, fingerprint = _fingerprint(listing)
    source = {"path": str(src.resolve()), "shards": len(names), "fingerprint": fingerprint}
    settings = {"caption_keys": list(cfg.keys), "max_image_area": cfg.max_image_area}
    lock = hold_lock(out)
    try:
        writer, run = _start_import(out, "webdataset", source, settings, names, in_place=in_place)
        bar = _bar(len(names), "import", cfg.progress)
        how_counts: Counter = Counter()
        for name in names:
            bar.update()
            if writer.is_complete(name):
                continue
            shard = src / name
            extra = _img2dataset_extra(shard)
            conforming = layout_problem(shard) is None
            if conforming:
                info, stats, why = index_conforming(shard)
                if why is None:
                    how = "indexed in place" if in_place else _link_or_copy(shard, out / name)
                    how_counts[how] += 1
                    writer.commit(info, stats, extra={**extra, "imported": how})
                    continue
                if in_place:
                    writer.fail(name, f"not in the project's format ({why}); import it with --out NEWDIR",
                                rerun_helps=False)
                    continue
            try:
                result = convert_shard(shard, out / name, _convert_options(cfg),
                                       img2dataset_stats=stats_path(shard) if extra else None)
            except ShardReadError as e:
                writer.fail(name, f"{src / name}: {e.reason}", rerun_helps=False)
                continue
            how_counts["converted"] += 1
            writer.commit(result.info, result.stats, failed_samples=result.failed_samples,
                          extra={**result.extra, "imported": "converted"})
        bar.close()
        run["shards_by_method"] = dict(sorted((Counter(run.get("shards_by_method", {})) + how_counts).items()))
        return _finish(writer, out, run, writer.manifest.text_stats, str(src.resolve()), cfg.keys)
    finally:
        lock.close()


# --- a folder of images -----------------------------------------------------------------------
def walk_images(root: Path, skip: Path | None) -> Iterator[tuple[Path, set[str]]]:
    """Image files under root in sorted order, each with the names of its directory (for sidecars).

    Lists one directory at a time; hidden entries and `skip` (the output, if inside) are left out.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise IngestError(f"--from-folder: cannot list {root} ({e.strerror})") from None
    names = {e.name for e in entries}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if skip is None or path.resolve() != skip:
                yield from walk_images(path, skip)
        elif path.suffix.lower().lstrip(".") in (*IMAGE_MEMBERS, *CONVERTED_IMAGE_MEMBERS):
            yield path, names


def _folder_members(path: Path, names: set[str]) -> dict[str, bytes]:
    ext = path.suffix.lower().lstrip(".")
    members = {ext: path.read_bytes()}
    for side in ("txt", "json"):
        sidecar = f"{path.stem}.{side}"
        if sidecar in names:
            members[side] = path.with_name(sidecar).read_bytes()
    if "txt" in members:
        members["txt"] = members["txt"].rstrip(b"\r\n")  # a text file's final newline is not part of the caption
    return members


def import_folder(src: Path, out: Path, cfg: ImportConfig) -> int:
    if not src.is_dir():
        raise IngestError(f"--from-folder {src}: not a directory")
    if cfg.shard_size < 1:
        raise IngestError("--shard-size must be at least 1")
    skip = out.resolve() if out.resolve().is_relative_to(src.resolve()) else None
    root = src.resolve()

    def listing() -> Iterator[str]:
        for path, _ in walk_images(src, skip):
            st = path.stat()
            yield f"{path.relative_to(src)}\t{st.st_size}\t{st.st_mtime_ns}"

    total, fingerprint = _fingerprint(listing())  # first pass: names only
    if total == 0:
        raise IngestError(f"--from-folder {src}: no images found (" +
                          " ".join(f".{e}" for e in (*IMAGE_MEMBERS, *CONVERTED_IMAGE_MEMBERS)) + ")")
    shards = math.ceil(total / cfg.shard_size)
    digits = max(5, len(str(shards - 1)))
    key_digits = max(9, len(str(total - 1)))
    names = [f"{i:0{digits}d}.tar" for i in range(shards)]
    source = {"path": str(root), "images": total, "fingerprint": fingerprint}
    settings = {"caption_keys": list(cfg.keys), "max_image_area": cfg.max_image_area, "shard_size": cfg.shard_size}
    options = _convert_options(cfg)
    lock = hold_lock(out)
    try:
        writer, run = _start_import(out, "folder", source, settings, names)
        bar = _bar(len(names), "import", cfg.progress)
        items = enumerate(walk_images(src, skip))
        for s, name in enumerate(names):
            count = min(cfg.shard_size, total - s * cfg.shard_size)
            if writer.is_complete(name):
                for _ in range(count):
                    next(items)
                bar.update()
                continue
            failures: Counter = Counter()
            problems: list[str] = []
            stats = TextStats()
            with ShardWriter(out / name) as shard:
                for _ in range(count):
                    i, (path, dir_names) = next(items)
                    key = f"{i:0{key_digits}d}"
                    rel = readable_name(str(path.relative_to(src)))  # a file name need not be UTF-8
                    try:
                        sample = to_sample(key, _folder_members(path, dir_names), options)
                        sample.source["path"] = rel
                        shard.write(sample)
                    except (SampleRejected, SampleFormatError, OSError) as e:
                        reason = (f"cannot read the file ({e.strerror or e})" if isinstance(e, OSError)
                                  else str(e).removeprefix(f"sample {key}: "))
                        failures[reason] += 1
                        if len(problems) < 20:
                            problems.append(f"{rel}: {reason}")
                        continue
                    stats.add(sample)
                info = shard.close()
            extra = {"failures": top_reasons(failures), "problems": problems} if failures else {}
            writer.commit(info, stats, failed_samples=sum(failures.values()), extra=extra)
            bar.update()
        bar.close()
        return _finish(writer, out, run, writer.manifest.text_stats, str(root), cfg.keys)
    finally:
        lock.close()
