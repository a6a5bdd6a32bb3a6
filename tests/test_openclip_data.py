"""Our shards train with stock OpenCLIP unchanged: its own WebDataset pipeline reads every sample
with the right caption from `<key>.txt`, and `holiclip-manifest txt` changes that caption.

OpenCLIP's `open_clip_train/data.py` is taken from its released wheel (open_clip_torch 3.3.0)
and its `get_wds_dataset` is run as its training does, with the webdataset its `training` extra
pins (0.2.86: data.py's own tar grouping does not work with the project's webdataset 1.0.2).
Both come from the registry with `pip download --no-deps` into a temporary directory (read
here, never committed) and run in a subprocess, so the two webdatasets never meet. data.py
imports `torchvision.datasets` for its ImageNet folder loader, which this pipeline never calls:
that import is given an empty module, so nothing of torchvision runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifests import DatasetWriter, ShardReader, load_manifest
from data_manifests import shard as shard_module
from data_manifests.cli import main as manifest_main
from data_manifests.txt import set_txt_member
from tests.synthetic_data import make_synthetic_dataset

ROOT = Path(__file__).parent.parent
WHEELS = ("open_clip_torch==3.3.0", "webdataset==0.2.86")

# One epoch of OpenCLIP's training pipeline (shard shuffle, split by node and worker, its tar
# grouping, sample shuffle, select, decode("pilrgb"), rename(image="jpg;png;jpeg;webp", text="txt"),
# map_dict, to_tuple, batched) over the shards; prints [image sha256, caption] pairs as JSON.
RUN_OPENCLIP = """
import hashlib, json, sys, types
import numpy as np
import open_clip_train_data as data
image_id = lambda im: hashlib.sha256(np.asarray(im).tobytes()).hexdigest()
out = []
for shards, samples in zip(sys.argv[1::2], sys.argv[2::2]):
    args = types.SimpleNamespace(train_data=shards, val_data=None, train_num_samples=int(samples),
                                 dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=8,
                                 workers=0, world_size=1)
    info = data.get_wds_dataset(args, image_id, is_train=True, tokenizer=lambda text: [text])
    out.append([pair for images, texts in info.dataloader for pair in zip(images, texts)])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def openclip_site(tmp_path_factory) -> Path:
    """A directory for PYTHONPATH: OpenCLIP's data.py, webdataset 0.2.86, an empty torchvision.datasets."""
    where = tmp_path_factory.mktemp("open_clip")
    done = subprocess.run([sys.executable, "-m", "pip", "download", *WHEELS, "--no-deps", "--quiet", "-d", str(where)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    site = where / "site"
    with zipfile.ZipFile(next(where.glob("webdataset-*.whl"))) as z:
        z.extractall(site, [n for n in z.namelist() if n.startswith("webdataset/")])
    with zipfile.ZipFile(next(where.glob("open_clip_torch-*.whl"))) as z:
        (site / "open_clip_train_data.py").write_bytes(z.read("open_clip_train/data.py"))
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text("")
    (site / "torchvision" / "datasets.py").write_text("# only open_clip_train.data.get_imagenet uses it\n")
    return site


def openclip_train_samples(site: Path, *datasets: tuple[Path, int]) -> list[Counter]:
    """(image, caption) pairs of one epoch of OpenCLIP's training pipeline, per (dataset, samples)."""
    argv = [x for root, n in datasets for x in ("::".join(map(str, sorted(root.glob("*.tar")))), str(n))]
    done = subprocess.run([sys.executable, "-c", RUN_OPENCLIP, *argv],
                          capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return [Counter(map(tuple, pairs)) for pairs in json.loads(done.stdout.splitlines()[-1])]


def manifest_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = manifest_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def image_id(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def expected(root: Path, text_id: str) -> Counter:
    """(image, text) of each sample that has the text, read with our reader, decoded as OpenCLIP does (pilrgb)."""
    want = Counter()
    for name in sorted(load_manifest(root).shards):
        for sample in ShardReader(root / name):
            if text_id in sample.texts:
                want[image_id(Image.open(io.BytesIO(sample.image))), sample.texts[text_id]] += 1
    return want


def test_openclip_trains_on_our_shards_and_txt_can_be_changed(openclip_site, tmp_path, monkeypatch, capsys):
    root = make_synthetic_dataset(tmp_path / "ds", shards=2, per_shard=16, seed=5, missing_style_every=4)
    shards = sorted(root.glob("*.tar"))
    assert {e.txt for e in load_manifest(root).shards.values()} == {"raw"}  # what the writers put in .txt
    as_written = shutil.copytree(root, tmp_path / "as_written")
    want_raw = expected(root, "raw")

    # Another text in .txt, without re-captioning. A failure inside the second shard leaves it as
    # it was (atomic rewrite); the same command then finishes only what is left.
    writes = 0
    real_write = shard_module.ShardWriter.write

    def failing_write(self, sample):
        nonlocal writes
        writes += 1
        if writes == 16 + 5:
            raise OSError("disk gone")
        return real_write(self, sample)

    before = shards[1].read_bytes()
    monkeypatch.setattr(shard_module.ShardWriter, "write", failing_write)
    with pytest.raises(OSError):
        set_txt_member(root, "detail")
    monkeypatch.undo()
    assert shards[1].read_bytes() == before and not list(root.glob(".*partial*"))
    assert [e.txt for _, e in sorted(load_manifest(root).shards.items())] == ["detail", "raw"]
    code, out, err = manifest_cli(capsys, "txt", str(root), "--text-id", "detail")
    assert code == 0, err
    assert "1 rewritten, 1 already did" in out
    manifest = load_manifest(root)
    assert {e.txt for e in manifest.shards.values()} == {"detail"} and manifest.run["txt"]["text_id"] == "detail"
    # Our own reader sees the same samples and texts as before; verify agrees with the new checksums.
    assert expected(root, "raw") == want_raw
    code, out, err = manifest_cli(capsys, "verify", str(root))
    assert code == 0, out + err
    detail = shutil.copytree(root, tmp_path / "detail")

    # A text id some samples lack: those get no .txt, and OpenCLIP skips them (its no-caption filter).
    code, out, err = manifest_cli(capsys, "txt", str(root), "--text-id", "style")
    assert code == 0 and "8 samples have no 'style' text" in out  # every 4th of 32 samples
    assert DatasetWriter(root, stage="caption").txt == "style"  # what a resumed stage writes into new shards
    code, _, err = manifest_cli(capsys, "txt", str(root), "--text-id", "colour")
    assert code == 2 and "no text id 'colour'" in err and err.count("\n") == 1

    # Every sample with the right caption through OpenCLIP's own pipeline (whole batches of 8: 32 and 24 samples).
    got_raw, got_detail, got_style = openclip_train_samples(openclip_site, (as_written, 32), (detail, 32), (root, 24))
    assert got_raw == want_raw and sum(got_raw.values()) == 32
    assert got_detail == expected(detail, "detail")
    assert got_style == expected(root, "style") and sum(got_style.values()) == 24
