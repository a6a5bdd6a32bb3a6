"""Foreign shards to the project's shards: img2dataset's output, or any WebDataset of images and captions.

`convert_shard(src, dst, options)` is a plain function of one input shard: it writes `dst`
(atomically, through data_manifests.ShardWriter) and returns what the driver commits to the
manifest. Ingest runs it in a thread or as a Ray task; importers call it directly. It never
touches the manifest itself: one writer per dataset.

What changes on the way (docs/data-format.md):
- the alt-text (`.txt`, or the member or JSON field named by the caption keys) becomes `texts.raw`;
- the sample's JSON (img2dataset's per-sample metadata: url, size, status, ...) becomes `source`,
  with `sha256` of the image bytes as stored. img2dataset hashes the bytes it downloaded, before
  resizing; that value is kept as `original_sha256` when it differs;
- samples are written in key order. img2dataset writes them in the order downloads finish, so
  this is what makes a resumed run's shards byte-identical to an uninterrupted run's.
Image bytes are never re-encoded.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from data_manifests import RAW, Sample, SampleFormatError, ShardInfo, ShardReadError, ShardWriter, TextStats, sha256_hex
from data_manifests.sample import KEY_RE

TAR_END_BYTES = 1024
IMAGE_MEMBERS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
OTHER_IMAGE_MEMBERS = ("gif", "bmp", "tif", "tiff", "ppm", "avif", "heic")
MAX_REASONS = 50  # distinct failure reasons kept per shard (img2dataset's own errors can include URLs)


class SampleRejected(Exception):
    """One sample cannot be written; the message is the reason recorded for it."""


@dataclass(frozen=True)
class ConvertOptions:
    # Member extensions or JSON fields holding the alt-text, tried in order; () for no caption.
    caption_keys: tuple[str, ...] = ("txt",)
    # Decode every image (imports). img2dataset's output was decoded and re-encoded already.
    check_images: bool = False
    max_image_area: float = math.inf


@dataclass
class ConvertedShard:
    """A written shard and what its manifest entry records."""

    info: ShardInfo
    stats: TextStats
    failed_samples: int
    extra: dict[str, Any] = field(default_factory=dict)


def reason_of(message: str | None) -> str:
    """A failure message as a short, countable reason."""
    if not message:
        return "unknown error"
    if "CV_IO_MAX_IMAGE_PIXELS" in message:
        # OpenCV's decoding guard (see ingest: it is set to --max-image-area): same cause as
        # img2dataset's own check, which only runs after a full decode.
        return "image area too large"
    if message.startswith("IncompleteRead("):
        return "IncompleteRead: the connection closed before the whole body arrived"  # byte counts vary
    return message.strip().splitlines()[0][:200] if message.strip() else "unknown error"


def top_reasons(counts: dict[str, int] | Counter, limit: int = MAX_REASONS) -> dict[str, int]:
    counts = Counter(counts)
    kept = dict(counts.most_common(limit))
    rest = sum(counts.values()) - sum(kept.values())
    if rest:
        kept["(other reasons)"] = rest
    return kept


def read_img2dataset_stats(path: Path) -> dict[str, Any]:
    """img2dataset's `<shard>_stats.json`, reduced to what a manifest entry keeps. Raises ValueError."""
    stats = json.loads(path.read_text())
    if not isinstance(stats, dict) or "count" not in stats or "successes" not in stats:
        raise ValueError(f"{path}: not an img2dataset stats file")
    keep = {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize") if k in stats}
    if "duration" in stats:
        keep["duration_s"] = round(float(stats["duration"]), 3)
    keep["status_dict"] = top_reasons(stats.get("status_dict") or {})
    return keep


# --- reading --------------------------------------------------------------------------------
def _member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member, or None for a name that could escape the shard."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return None
    base = path.name
    key, _, ext = base.partition(".")  # WebDataset splits at the first dot
    return key, ext.lower()


def read_groups(path: Path, problems: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The members of a shard grouped by key, in key order. Raises ShardReadError for a bad tar.

    The tar is indexed first (headers only: tarfile seeks over the data), then each group is
    read by offset, so memory holds one sample and the index, never the shard.
    """
    name = path.name
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardReadError(name, f"not a readable tar file ({e})") from None
    with tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                parsed = _member_key(info.name)
                if parsed is None:
                    problems.append(f"{name}: member {info.name!r} has an unsafe path; skipped")
                    continue
                key, ext = parsed
                members = groups.setdefault(key, {})
                if ext in members:
                    problems.append(f"{name}: member {info.name!r} appears twice; kept the first")
                    continue
                members[ext] = info
            size = path.stat().st_size
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardReadError(name, f"truncated or corrupt tar ({e})") from None
        if size - tar.offset < TAR_END_BYTES:
            raise ShardReadError(name, "truncated tar (no end-of-archive marker)")
        for key in sorted(groups):
            try:
                yield key, {ext: tar.extractfile(info).read() for ext, info in groups[key].items()}  # type: ignore[union-attr]
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ShardReadError(name, f"truncated or corrupt tar ({e})") from None


# --- one sample -----------------------------------------------------------------------------
def describe_image(data: bytes, max_image_area: float) -> tuple[str, int, int]:
    """(extension, width, height) of image bytes, decoding them fully. Raises SampleRejected."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
            if width * height > max_image_area:
                raise SampleRejected("image area too large")
            if fmt not in PIL_FORMATS:
                raise SampleRejected(f"unsupported image format {fmt} (shards hold jpg, png or webp)")
            im.load()
    except SampleRejected:
        raise
    except Image.DecompressionBombError:
        raise SampleRejected("image area too large") from None
    except Image.UnidentifiedImageError:
        raise SampleRejected("not an image (format not recognized)") from None
    except Exception as e:  # PIL raises many kinds for bad data
        # Numbers (byte counts, addresses) vary per file; without them reasons stay countable.
        detail = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", str(e).splitlines()[0] if str(e) else "")[:80]
        raise SampleRejected(f"image does not decode ({type(e).__name__}: {detail})") from None
    return PIL_FORMATS[fmt], width, height


def _caption(members: dict[str, bytes], meta: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(caption, the key it came from) from the first caption key present as a member or JSON field."""
    for k in keys:
        if k in members and k != "json":
            try:
                return members[k].decode("utf-8"), k
            except UnicodeDecodeError:
                raise SampleRejected(f"caption .{k} is not UTF-8") from None
        value = meta.get(k)
        if isinstance(value, str):
            return value, k
    return None, None


def to_sample(key: str, members: dict[str, bytes], options: ConvertOptions) -> Sample:
    """One group of tar members as a project sample. Raises SampleRejected with the reason."""
    images = [ext for ext in members if ext in IMAGE_MEMBERS]
    if not images:
        other = [ext for ext in members if ext in OTHER_IMAGE_MEMBERS]
        raise SampleRejected(f"unsupported image format .{other[0]} (shards hold jpg, png or webp)" if other
                             else "no image member")
    if len(images) > 1:
        raise SampleRejected(f"several image members ({', '.join(sorted(images))})")
    image = members[images[0]]
    ext = IMAGE_MEMBERS[images[0]]
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SampleRejected("its .json is not valid UTF-8 JSON") from None
        if not isinstance(meta, dict):
            raise SampleRejected("its .json is not an object")
    if "texts" in meta:
        # Already the project's format: parse it with the format's own reader.
        try:
            sample = Sample.from_members(key, {**members, ext: image}) if KEY_RE.match(key) else None
        except SampleFormatError as e:
            raise SampleRejected(str(e).removeprefix(f"sample {key}: ")) from None
        if sample is None:
            raise SampleRejected(f"key {key!r} is not allowed in the project's format")
    else:
        caption, used = _caption(members, meta, options.caption_keys)
        texts = {RAW: caption} if caption is not None else {}
        source = {k: v for k, v in meta.items() if v is not None and k not in ("key", "caption", used)}
        sample = Sample(key=key, image=image, image_ext=ext, texts=texts, source=source)
    if options.check_images:
        ext, width, height = describe_image(image, options.max_image_area)
        sample.image_ext = ext
        sample.source["width"], sample.source["height"] = width, height
    elif not (isinstance(sample.source.get("width"), int) and isinstance(sample.source.get("height"), int)):
        ext, width, height = describe_image(image, options.max_image_area)
        sample.source["width"], sample.source["height"] = width, height
    digest = sha256_hex(image)
    downloaded = sample.source.get("sha256")
    if downloaded and downloaded != digest:
        sample.source["original_sha256"] = downloaded
    sample.source["sha256"] = digest
    return sample


# --- one shard ------------------------------------------------------------------------------
def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name.split(".", 1)[0])[:60] or "shard"


def convert_shard(src: Path, dst: Path, options: ConvertOptions = ConvertOptions(),
                  img2dataset_stats: Path | None = None,
                  on_sample: Callable[[int], None] | None = None) -> ConvertedShard:
    """Write the samples of `src` as the project's shard `dst`; failures are counted with reasons.

    Raises ShardReadError when `src` cannot be read to its end (nothing is published then),
    ShardWriteError when `dst` cannot be written, ValueError for an unreadable stats file.
    `on_sample(n)` is called after each written sample (progress, and the resume tests' kill point).
    """
    src, dst = Path(src), Path(dst)
    downloaded = read_img2dataset_stats(img2dataset_stats) if img2dataset_stats else None
    problems: list[str] = []
    failures: Counter = Counter()
    stats = TextStats()
    keys: set[str] = set()
    with ShardWriter(dst) as writer:
        for index, (key, members) in enumerate(read_groups(src, problems)):
            try:
                if not KEY_RE.match(key):
                    sample = to_sample(f"{_safe_stem(dst.name)}_{index:06d}", members, options)
                    sample.source["original_key"] = key
                else:
                    sample = to_sample(key, members, options)
                if sample.key in keys:
                    raise SampleRejected("key appears twice in the shard")
                keys.add(sample.key)
                writer.write(sample)
                if on_sample is not None:
                    on_sample(len(keys))
            except (SampleRejected, SampleFormatError) as e:
                failures[str(e)] += 1
                if len(problems) < 20:
                    problems.append(f"{src.name} sample {key}: {e}")
                continue
            stats.add(sample)
        info = writer.close()
    extra: dict[str, Any] = {}
    failed = sum(failures.values())
    if downloaded is not None:
        extra["img2dataset"] = downloaded
        failed += downloaded["count"] - downloaded["successes"]
    if failures:
        extra["failures"] = top_reasons(failures)
    if problems:
        extra["problems"] = problems[:20]
    return ConvertedShard(info=info, stats=stats, failed_samples=failed, extra=extra)
