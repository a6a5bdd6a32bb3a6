"""Small builders shared by the tests: images, samples and datasets in the project's format."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from data_manifests import DatasetWriter, Sample, quality_flags, sha256_hex

PROVENANCE = {
    "raw": {"kind": "alt_text", "source": "test"},
    "detail": {"kind": "caption", "captioner": {"name": "tiny", "model": "tests/tiny-vlm", "revision": "sha256:abc"},
               "prompt": {"set": "default", "set_hash": "sha256:1", "id": "detail",
                          "text": "Describe this image in detail."},
               "sampling": {"temperature": 0.0, "max_tokens": 77}},
}


def image_bytes(seed: int, size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> bytes:
    im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def make_sample(shard: int, i: int) -> Sample:
    data = image_bytes(shard * 1000 + i)
    detail = f"A {i}-sided shape of colour {shard} on a plain background, drawn large."
    return Sample(key=f"{shard:05d}{i:04d}", image=data, image_ext="jpg",
                  texts={"raw": f"shape {i}", "detail": detail},
                  flags={"detail": quality_flags(detail, "length" if i % 4 == 3 else "stop")},
                  source={"url": f"http://127.0.0.1/{shard}/{i}.jpg", "width": 24, "height": 16,
                          "sha256": sha256_hex(data)})


def make_dataset(root: Path, shards: int = 3, per_shard: int = 6) -> Path:
    writer = DatasetWriter(root, stage="test", flush_every_s=0)
    names = [f"{s:05d}.tar" for s in range(shards)]
    writer.expect(names)
    writer.set_texts(PROVENANCE)
    for s, name in enumerate(names):
        writer.write_shard(name, [make_sample(s, i) for i in range(per_shard)])
    writer.finish()
    return root


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members (names unchecked), to build bad shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Everything under a directory: path -> (size, mtime_ns, content), to prove read-only. A
    job's lock file (`.<stage>.lock`, which names the last job that held it) is not data."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock")):
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out
