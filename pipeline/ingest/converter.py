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
JPEG, PNG and WebP bytes are never re-encoded. Other formats (GIF, BMP, TIFF, PPM, AVIF), which
the URL ingest gets re-encoded by img2dataset, are decoded here (a GIF's first frame) and stored
as lossless PNG, with `source.original_format` and the input's `original_sha256`.
A sample that cannot be written is refused and counted with its reason, never dropped silently;
that includes the tar reader's refusals (unsafe or repeated member names).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_manifests import (
    RAW,
    Problem,
    Sample,
    SampleFormatError,
    ShardInfo,
    ShardWriter,
    TarReader,
    TextStats,
    read_img2dataset_stats,
    readable_name,
    sha256_hex,
    top_reasons,
)
from data_manifests.sample import KEY_RE

IMAGE_MEMBERS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}  # stored as they are
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Stored as PNG. HEIC is listed so that such files are counted with a reason: PIL has no decoder for it here.
CONVERTED_IMAGE_MEMBERS = ("gif", "bmp", "tif", "tiff", "ppm", "avif", "heic")
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # what PIL writes to PNG without a conversion


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


# --- one sample -----------------------------------------------------------------------------
def describe_image(data: bytes, max_image_area: float, member: str) -> tuple[str, int, int]:
    """(PIL's format name, width, height) of the image bytes of member `.member`, decoding them
    fully. Raises SampleRejected."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
            if width * height > max_image_area:
                raise SampleRejected("image area too large")
            im.load()
    except SampleRejected:
        raise
    except Image.DecompressionBombError:
        raise SampleRejected("image area too large") from None
    except Image.UnidentifiedImageError:
        if f".{member}" not in Image.registered_extensions():
            raise SampleRejected(f"image format .{member} cannot be decoded here") from None
        raise SampleRejected("not an image (format not recognized)") from None
    except Exception as e:  # PIL raises many kinds for bad data
        # Numbers (byte counts, addresses) vary per file; without them reasons stay countable.
        detail = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", str(e).splitlines()[0] if str(e) else "")[:80]
        raise SampleRejected(f"image does not decode ({type(e).__name__}: {detail})") from None
    return fmt or "unknown", width, height


def to_png(data: bytes) -> bytes:
    """An image (its first frame) as PNG: lossless for the pixel modes PNG stores, which are the
    usual ones; others (CMYK, YCbCr, floats) are converted to RGB(A) first."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in PNG_MODES:
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            im = im.convert("RGBA" if has_alpha else "RGB")
        out = io.BytesIO()
        im.save(out, "PNG")
    return out.getvalue()


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
    images = [ext for ext in members if ext in IMAGE_MEMBERS or ext in CONVERTED_IMAGE_MEMBERS]
    if not images:
        raise SampleRejected("no image member")
    if len(images) > 1:
        raise SampleRejected(f"several image members ({', '.join(sorted(images))})")
    member = images[0]
    image = members[member]
    ext = IMAGE_MEMBERS.get(member, "png")  # a converted image is stored as PNG
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or beyond what Python parses
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
    has_size = isinstance(sample.source.get("width"), int) and isinstance(sample.source.get("height"), int)
    converted = False
    if options.check_images or member not in IMAGE_MEMBERS or not has_size:
        fmt, width, height = describe_image(image, options.max_image_area, member)
        if fmt not in PIL_FORMATS:
            sample.image, sample.image_ext, converted = to_png(image), "png", True
            sample.source["original_format"] = fmt
        elif options.check_images:
            sample.image_ext = PIL_FORMATS[fmt]  # the bytes decide, not the member's extension
        if options.check_images or not has_size:
            sample.source["width"], sample.source["height"] = width, height
    digest = sha256_hex(sample.image)
    before = sample.source.get("sha256") or (sha256_hex(image) if converted else None)
    if before and before != digest:
        sample.source["original_sha256"] = before
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
    problems: list[Problem] = []
    failures: Counter = Counter()
    stats = TextStats()
    keys: set[str] = set()
    reader = TarReader(src)
    with ShardWriter(dst) as writer:
        # In key order: img2dataset writes samples in the order downloads finish.
        for index, (key, members) in enumerate(reader.by_key()):
            name = key if KEY_RE.match(key) else f"{_safe_stem(dst.name)}_{index:06d}"
            try:
                sample = to_sample(name, members, options)
                if name != key:
                    sample.source["original_key"] = readable_name(key)
                if sample.key in keys:
                    raise SampleRejected("key appears twice in the shard")
                keys.add(sample.key)
                writer.write(sample)
                if on_sample is not None:
                    on_sample(len(keys))
            except (SampleRejected, SampleFormatError) as e:
                reason = str(e).removeprefix(f"sample {name}: ")
                failures[reason] += 1
                if len(problems) < 20:
                    problems.append(Problem(src.name, key, reason))
                continue
            stats.add(sample)
        info = writer.close()
    failures.update(reader.refused)
    problems = reader.problems + problems  # the tar's problems are all found before the first sample
    extra: dict[str, Any] = {}
    failed = sum(failures.values())
    if downloaded is not None:
        extra["img2dataset"] = downloaded
        failed += downloaded["count"] - downloaded["successes"]
    if failures:
        extra["failures"] = top_reasons(failures)
    if problems:
        extra["problems"] = [str(p) for p in problems[:20]]
    return ConvertedShard(info=info, stats=stats, failed_samples=failed, extra=extra)
