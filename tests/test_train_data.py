"""The data stream on real multi-text shards: sources, text selection, bad input, determinism
and exact resumption, splitting by node and worker, and the image transform. In-process (the
DataLoader with real worker processes where it matters); no DeepSpeed."""

from __future__ import annotations

import random
import shutil

import fsspec
import pytest
import torch
from PIL import Image
from synthetic_data import TEXT_IDS, add_garbage_shard, add_truncated_shard, make_synthetic_dataset

from data_manifests import DatasetWriter, Sample
from train.config import DataSection
from train.data import DataError, MultiTextStream, check_text_ids, make_loader, resolve_source, resolve_sources
from train.tokenizer import load_tokenizer
from train.transform import MEAN, STD, eval_transform, normalize, random_crop_box, train_transform

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 shards x 24 samples; every 5th sample lacks its "style" text."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", shards=4, per_shard=24, missing_style_every=5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("clip", context_length=32)


def section(dataset, **changes) -> DataSection:
    base = DataSection(shards=(str(dataset),), text_ids=TEXT_IDS, num_workers=0, shuffle_buffer=16)
    return base.model_copy(update=changes)


def stream(dataset, tokenizer, data=None, batch=4, **kw) -> MultiTextStream:
    data = data or section(dataset)
    urls = [u for s in resolve_sources(data.shards) for u in s.urls]
    return MultiTextStream(urls, data, tokenizer, SIZE, batch, **kw)


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- batches


def test_batches_follow_text_ids(dataset, tokenizer):
    ids = ("style", "main_object", "background")  # any order: branch m gets text_ids[m]
    batch = take(stream(dataset, tokenizer, section(dataset, text_ids=ids)), 1)[0]
    assert batch["images"].shape == (4, 3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
    # One tensor per text type, cut after its longest text (a multiple of 8, at most the context).
    assert len(batch["tokens"]) == 3 and all(t.dtype == torch.long for t in batch["tokens"])
    for tokens in batch["tokens"]:
        assert tokens.shape[0] == 4 and tokens.shape[1] % 8 == 0 and tokens.shape[1] <= 32
        assert (tokens[:, -8:] != tokenizer.pad_token_id).any()  # no column block that is all padding
    assert len(batch["keys"]) == 4 and batch["index"] == 0
    for row in zip(*batch["tokens"], strict=True):
        style, shape, background = (tokenizer.decode(t) for t in row)
        assert style.startswith("bright") and style.endswith("tones")
        assert shape.startswith("a ") and len(shape.split()) == 2
        assert background.startswith("a plain") and background.endswith("background")


def test_missing_text_is_skipped_and_counted(dataset, tokenizer):
    s = stream(dataset, tokenizer, section(dataset, resampled=False), batch=8)
    batches = take(s, 12)  # 96 samples are read in a pass; 1 in 5 lacks "style"
    counts = batches[-1]["counts"]
    assert counts["missing/style"] >= 15 and counts["samples"] == 96
    assert counts["missing/raw"] == counts["fallback_texts"] == 0
    used = {k for b in batches for k in b["keys"]}
    assert not any(int(k[1:]) % 5 == 0 for k in used)  # the generator's keys: s<index>


def test_fallback_text_and_dropped_flags(tmp_path, tokenizer):
    # One sample without "style", one whose "style" is flagged as a refusal: both fall back to "raw".
    writer = DatasetWriter(tmp_path / "ds", stage="test", flush_every_s=0)
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    import io
    buf = io.BytesIO()
    image.save(buf, "PNG")
    samples = [
        Sample(key="a", image=buf.getvalue(), image_ext="png", texts={"raw": "red square"}),
        Sample(key="b", image=buf.getvalue(), image_ext="png",
               texts={"raw": "red square", "style": "I'm sorry, I cannot"},
               flags={"style": ["refusal"]}),
        Sample(key="c", image=buf.getvalue(), image_ext="png", texts={"raw": "red square", "style": "warm red"}),
    ]
    writer.write_shard("00000.tar", samples)
    writer.finish()
    data = DataSection(shards=(str(tmp_path / "ds"),), text_ids=("style",), fallback_text_id="raw", num_workers=0,
                       shuffle_buffer=1, resampled=False)
    batch = take(stream(tmp_path / "ds", tokenizer, data, batch=3), 1)[0]
    texts = {k: tokenizer.decode(t) for k, t in zip(batch["keys"], batch["tokens"][0], strict=True)}
    assert texts == {"a": "red square", "b": "red square", "c": "warm red"}
    assert batch["counts"]["fallback_texts"] == 2
    without = data.model_copy(update={"fallback_text_id": None})
    batch = take(stream(tmp_path / "ds", tokenizer, without, batch=2), 1)[0]
    assert set(batch["keys"]) == {"c"} and batch["counts"]["missing/style"] >= 2  # c twice: a second pass


def test_corrupt_shards_in_the_middle_are_skipped_and_reported(dataset, tmp_path, tokenizer, caplog):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    add_truncated_shard(root, "00001.tar", source="00001.tar", keep=0.5)  # cut mid-member
    add_garbage_shard(root, "00002.tar")
    data = section(root, resampled=False, text_ids=("raw",))
    with caplog.at_level("WARNING", logger="train.data"):
        batches = take(stream(root, tokenizer, data, batch=6), 10)  # one pass: 24 + ~11 + 0 + 24 samples
    last = batches[-1]
    assert last["counts"]["corrupt_shards"] == 2 and last["counts"]["shards"] >= 2
    assert (any("00001.tar after" in p for p in last["problems"])
            and any("00002.tar after 0 samples" in p for p in last["problems"]))
    assert "skipped unreadable shard" in caplog.text
    keys = {k for b in batches for k in b["keys"]}
    first_of_truncated = {f"s{i:07d}" for i in range(24, 30)}
    assert first_of_truncated <= keys  # samples before the cut are kept


def test_stream_fails_clearly_when_nothing_is_usable(dataset, tmp_path, tokenizer):
    for i in range(2):
        add_garbage_shard(tmp_path, f"{i:05d}.tar")
    s = MultiTextStream([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")],
                        section(dataset), tokenizer, SIZE, 2)
    with pytest.raises(DataError, match="no readable samples"):
        take(s, 1)


# ----------------------------------------------------------------------------- determinism


def loader_batches(s: MultiTextStream, n: int) -> list[dict]:
    return take(make_loader(s), n)


def same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
            and all(torch.equal(x, y) for x, y in zip(a["tokens"], b["tokens"], strict=True)))


def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(dataset, tokenizer):
    # Two real DataLoader workers; segments of 4 batches. Starting at 8 (a segment boundary) and
    # at 5 (inside a segment: the slot replays its segment) must give exactly batches 8.. and 5..
    data = section(dataset, num_workers=2)
    full = loader_batches(stream(dataset, tokenizer, data, segment_batches=4), 12)
    assert [b["index"] for b in full] == list(range(12)) and [b["worker"] for b in full[:4]] == [0, 1, 0, 1]
    for start in (8, 5):
        resumed = loader_batches(stream(dataset, tokenizer, data, segment_batches=4, start_batch=start), 12 - start)
        assert [b["index"] for b in resumed] == list(range(start, 12))
        assert all(same(a, b) for a, b in zip(full[start:], resumed, strict=True))
    # Another seed (or salt, used when the layout changed) gives another stream.
    other = loader_batches(stream(dataset, tokenizer, data, segment_batches=4, salt=1), 2)
    assert not same(other[0], full[0])
    # The same with no worker processes: the stream does not depend on who runs it.
    single = section(dataset, num_workers=0)
    a = take(stream(dataset, tokenizer, single, segment_batches=4), 6)
    b = take(stream(dataset, tokenizer, single, segment_batches=4, start_batch=3), 3)
    assert all(same(x, y) for x, y in zip(a[3:], b, strict=True))


def test_split_by_node_and_worker(dataset, tokenizer):
    data = section(dataset, resampled=False, num_workers=2, text_ids=("raw",))
    keys = []
    for rank in (0, 1):
        s = stream(dataset, tokenizer, data, batch=4, rank=rank, world_size=2)
        batches = loader_batches(s, 12)  # one shard per worker: 24 samples each, 2 workers
        keys.append({k for b in batches for k in b["keys"]})
    assert keys[0].isdisjoint(keys[1])
    shards = [{int(k[1:]) // 24 for k in ks} for ks in keys]
    assert shards == [{0, 2}, {1, 3}]  # rank r reads shards r, r + 2; each worker one of them
    with pytest.raises(DataError, match="4 shards cannot be split over 2 ranks x 4 workers"):
        stream(dataset, tokenizer, data.model_copy(update={"num_workers": 4}), world_size=2)


def test_resampled_mode_reads_every_shard_on_every_rank(dataset, tokenizer):
    data = section(dataset, text_ids=("raw",))
    seen = [{int(k[1:]) // 24 for b in take(stream(dataset, tokenizer, data, batch=8, rank=r, world_size=2), 24)
             for k in b["keys"]} for r in (0, 1)]
    # Not a split: each rank draws (with replacement) from all shards, with its own seeds.
    assert len(seen[0]) >= 3 and len(seen[1]) >= 3 and seen[0] | seen[1] == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- sources


def test_sources_directory_glob_braces_and_urls(dataset):
    directory = resolve_source(str(dataset))
    assert len(directory.urls) == 4 and directory.samples == 96
    assert directory.text_counts["raw"] == 96 and directory.text_counts["style"] < 96
    assert resolve_source(f"{dataset}/0000[01].tar").urls == directory.urls[:2]
    braces = resolve_source(f"{dataset}/{{00001..00003}}.tar")
    assert braces.urls == directory.urls[1:] and braces.samples == 96  # counts come from the manifest
    file_url = resolve_source(f"file://{dataset}")
    assert file_url.urls == [f"file://{u}" for u in directory.urls]

    memory = fsspec.filesystem("memory")
    for path in sorted(dataset.iterdir()):
        if path.is_file():
            memory.pipe(f"/remote/ds/{path.name}", path.read_bytes())
    remote = resolve_source("memory://remote/ds")
    assert [u.rsplit("/", 1)[1] for u in remote.urls] == [u.rsplit("/", 1)[1] for u in directory.urls]
    assert remote.samples == 96
    with pytest.raises(DataError, match="no .tar shards found"):
        resolve_source(f"{dataset}/nothing-*.tar")


def test_remote_shards_stream(dataset, tokenizer):
    memory = fsspec.filesystem("memory")
    for path in dataset.glob("*.tar"):
        memory.pipe(f"/stream/{path.name}", path.read_bytes())
    data = section(dataset, text_ids=("raw",), shards=("memory://stream",))
    local = take(stream(dataset, tokenizer, section(dataset, text_ids=("raw",))), 3)
    remote = take(stream(dataset, tokenizer, data), 3)
    assert all(same(a, b) for a, b in zip(local, remote, strict=True))


def test_text_id_check(dataset, tmp_path):
    sources = resolve_sources([str(dataset)])
    with pytest.raises(DataError, match=f"data.text_ids: text id 'caption' is not in the dataset {dataset} "
                                        r"\(it has: background, detail, main_object, raw, style\)"):
        check_text_ids(sources, ["raw", "caption"], None)
    with pytest.raises(DataError, match="data.fallback_text_id: text id 'nope'"):
        check_text_ids(sources, ["raw"], "nope")
    warnings = check_text_ids(sources, ["raw", "style"], None)
    assert len(warnings) == 1 and "'style' is in 79.2% of the samples; those samples are skipped" in warnings[0]
    assert "'raw' is used instead" in check_text_ids(sources, ["style"], "raw")[0]
    # Without a manifest (e.g. plain img2dataset output) the first sample tells the text ids.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dataset / "00000.tar", bare)
    source = resolve_source(str(bare))
    assert source.samples is None and set(source.text_counts) == set(TEXT_IDS)
    with pytest.raises(DataError, match="'caption' is not in the dataset"):
        check_text_ids([source], ["caption"], None)


# ----------------------------------------------------------------------------- transform


def test_random_resized_crop_box():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(60, 40, (0.9, 1.0), rng)
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 60 and bottom <= 40
        assert 0.85 <= w * h / 2400 <= 1.0 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A very wide image cannot fit a box of that ratio and area: the centred fallback.
    assert random_crop_box(400, 10, (0.9, 1.0), random.Random(0)) == (193, 0, 206, 10)


def test_transforms():
    image = Image.new("RGB", (48, 30), (255, 0, 0))
    out = train_transform(image, 32, (0.9, 1.0), random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8  # normalised on the device, later
    assert out[:, 16, 16].tolist() == [255, 0, 0]
    expected = torch.tensor([(1 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]])
    assert torch.allclose(normalize(out)[:, 16, 16], expected, atol=1e-5)
    assert torch.equal(out, train_transform(image, 32, (0.9, 1.0), random.Random(0)))  # seeded
    # Centre crop: a left half black and right half white image stays split in the middle.
    split = Image.new("L", (64, 32), 0)
    split.paste(255, (32, 0, 64, 32))
    out = eval_transform(split, 16)
    assert out.shape == (3, 16, 16) and out[0, 8, 2] < 0 < out[0, 8, 13]
