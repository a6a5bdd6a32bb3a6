"""A small synthetic multi-text dataset in the project's format, learnable from its images.

Each image is one coloured shape at some position on a plain background. Each text type
describes a different part of the picture, so every type is predictable from the pixels and
the branches of a multi-branch model have something different to specialise on:

    raw          "red circle"                                         colour + shape (alt-text-like)
    detail       "a red circle at the top left on a gray background"  everything
    background   "a plain gray background"                            background colour
    main_object  "a circle"                                           shape
    style        "bright red tones"                                   object colour

Written with data_manifests.DatasetWriter, so shards, records and manifest are the real thing.
"""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from data_manifests import DatasetWriter, Sample, quality_flags, sha256_hex
from demo.scenes import draw_shape

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128), "pink": (240, 160, 200)}
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
TEXT_IDS = ("raw", "detail", "background", "main_object", "style")
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))

PROVENANCE = {
    "raw": {"kind": "alt_text", "source": "tests/synthetic_data.py"},
    **{
        text_id: {"kind": "caption",
                  "captioner": {"name": "synthetic", "model": "tests/synthetic_data.py", "revision": "1"},
                  "prompt": {"set": "synthetic", "set_hash": "sha256:0", "id": text_id,
                             "text": f"the {text_id} of the image"},
                  "sampling": {"temperature": 0.0, "max_tokens": 77}}
        for text_id in TEXT_IDS[1:]
    },
}


def draw(shape: str, colour: str, background: str, position: str, size: int, jitter: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    cx, cy = POSITIONS[position]
    cx, cy = cx * size + jitter.uniform(-1, 1), cy * size + jitter.uniform(-1, 1)
    r = size * jitter.uniform(0.17, 0.22)
    draw_shape(pen, shape, cx, cy, r, COLOURS[colour])
    return image


def make_sample(index: int, rng: random.Random, size: int, missing_style: bool) -> Sample:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    background, position = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    ext, fmt = FORMATS[index % len(FORMATS)]
    buf = io.BytesIO()
    draw(shape, colour, background, position, size, rng).save(buf, fmt, **({"quality": 95} if fmt != "PNG" else {}))
    data = buf.getvalue()
    texts = {
        "raw": f"{colour} {shape}",
        "detail": f"a {colour} {shape} at the {position} on a {background} background",
        "background": f"a plain {background} background",
        "main_object": f"a {shape}",
        "style": f"bright {colour} tones",
    }
    errors = {}
    if missing_style:
        del texts["style"]
        errors["style"] = "synthetic: left out on purpose"
    return Sample(key=f"s{index:07d}", image=data, image_ext=ext, texts=texts,
                  flags={t: f for t in texts if (f := quality_flags(texts[t]))}, errors=errors,
                  source={"url": f"synthetic://{index}", "width": size, "height": size, "sha256": sha256_hex(data),
                          "shape": shape, "colour": colour, "background": background, "position": position})


def make_synthetic_dataset(root: str | Path, shards: int = 8, per_shard: int = 48, size: int = 32,
                           seed: int = 0, missing_style_every: int = 0) -> Path:
    """Write `shards` x `per_shard` samples to root (a dataset directory with its manifest).

    missing_style_every = k > 0 leaves the "style" text out of every k-th sample (recorded as
    an error, as the captioning stage does), to exercise skipping and fallback texts.
    """
    root = Path(root)
    rng = random.Random(seed)
    writer = DatasetWriter(root, stage="synthetic", dataset_id=f"synthetic-{seed}", flush_every_s=0)
    names = [f"{s:05d}.tar" for s in range(shards)]
    writer.expect(names)
    writer.set_texts(PROVENANCE)
    for s, name in enumerate(names):
        indices = range(s * per_shard, (s + 1) * per_shard)
        writer.write_shard(name, [make_sample(i, rng, size, missing_style_every > 0 and i % missing_style_every == 0)
                                  for i in indices])
    writer.finish()
    return root


def add_truncated_shard(root: str | Path, name: str, source: str = "00000.tar", keep: float = 0.5) -> Path:
    """A copy of `source` cut inside the data of the member found at `keep` of its length: a
    shard whose download or copy was interrupted. Its first samples are readable, then the tar
    ends unexpectedly. (A cut exactly between members would read as a shorter, valid tar.)"""
    root = Path(root)
    data = (root / source).read_bytes()
    with tarfile.open(root / source) as tar:
        member = next(m for m in tar.getmembers() if m.offset_data + m.size >= len(data) * keep)
    target = root / name
    target.write_bytes(data[: member.offset_data + member.size // 2])
    return target


def add_garbage_shard(root: str | Path, name: str) -> Path:
    """A .tar that is not a tar at all."""
    target = Path(root) / name
    target.write_bytes(b"this is not a tar file\n" * 100)
    return target


def copy_dataset(source: str | Path, target: str | Path) -> Path:
    shutil.copytree(source, target)
    return Path(target)
