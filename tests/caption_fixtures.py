"""Inputs for the captioning tests: tiny VLMs, an image dataset with bad images, configs."""

from __future__ import annotations

import io
import random
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from data_manifests import DatasetWriter, Sample, ShardReader, list_shard_files, sha256_hex

ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 32}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
BAD_KEYS = {"000000002": "truncated JPEG", "000000003": "not an image"}


def scene(seed: int, size=(448, 336)) -> bytes:
    """A random scene of ellipses: big enough (192 image tokens) for prefix caching to matter."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 60), rng.randrange(size[1] - 60)
        d.ellipse([x, y, x + rng.randrange(20, 60), y + rng.randrange(20, 60)],
                  fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_image_dataset(root: Path, shards: int, per_shard: int) -> Path:
    """An image dataset as ingest makes it (raw alt-text only), with two bad images in shard 0."""
    writer = DatasetWriter(root, stage="ingest", flush_every_s=0)
    writer.set_texts({"raw": {"kind": "alt_text", "source": "tests"}})
    writer.expect([f"{s:05d}.tar" for s in range(shards)])
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            data = scene(s * 1000 + i)
            if key == "000000002":
                data = data[:300]
            elif key == "000000003":
                data = b"<html>not an image</html>"
            samples.append(Sample(key=key, image=data, image_ext="jpg", texts={"raw": f"scene {s} {i}"},
                                  source={"url": f"http://127.0.0.1/{key}.jpg", "sha256": sha256_hex(data)}))
        writer.write_shard(f"{s:05d}.tar", samples)
    writer.finish()
    return root


def captioner(name: str, model: Path, prompts: dict, **extra) -> dict:
    return {"name": name, "model": str(model), "prompts": prompts, "engine": dict(ENGINE), "env": dict(ENV),
            "resources": {"num_cpus": 1}, **extra}


def write_config(path: Path, input_dir: Path, output_dir: Path, captioners: list[dict], **extra) -> Path:
    path.write_text(yaml.safe_dump({"input": str(input_dir), "output": str(output_dir),
                                    "captioners": captioners, **extra}, sort_keys=False))
    return path


def read_texts(root: Path) -> dict[str, dict]:
    """key -> (texts, errors) over a whole dataset; asserts no key appears twice."""
    out: dict[str, dict] = {}
    for name in list_shard_files(root):
        for s in ShardReader(root / name):
            assert s.key not in out, f"{s.key} appears twice"
            out[s.key] = {"texts": s.texts, "errors": s.errors, "flags": s.flags}
    return out
