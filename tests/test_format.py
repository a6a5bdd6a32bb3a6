"""The shard format: round trips, stock readers, and every kind of bad shard."""

from __future__ import annotations

import json
import os
import random
import tarfile

import pytest
import webdataset as wds
from helpers import image_bytes, make_dataset, make_sample, write_raw_tar

from data_manifests import Sample, SampleFormatError, ShardReader, ShardReadError, ShardWriter, quality_flags
from data_manifests.quality import is_repetitive


def test_round_trip_keeps_every_field(tmp_path):
    samples = [make_sample(0, i) for i in range(5)]
    samples[2].errors = {"style": "image could not be decoded: broken data"}
    with ShardWriter(tmp_path / "00000.tar") as w:
        for s in samples:
            w.write(s)
        info = w.close()
    assert info.samples == 5 and info.bytes == (tmp_path / "00000.tar").stat().st_size
    reader = ShardReader(tmp_path / "00000.tar")
    back = list(reader)
    assert reader.problems == []
    assert [(s.key, s.image, s.texts, s.flags, s.errors, s.source) for s in back] == \
           [(s.key, s.image, s.texts, {k: v for k, v in s.flags.items() if v}, s.errors, s.source) for s in samples]
    assert reader.sha256 == info.sha256


def test_same_samples_give_identical_bytes(tmp_path):
    # Resumed runs are compared with uninterrupted ones byte for byte: writing must be deterministic.
    for name in ("a.tar", "b.tar"):
        with ShardWriter(tmp_path / name) as w:
            for i in range(3):
                w.write(make_sample(1, i))
            w.close()
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_stock_webdataset_reader_opens_shards(tmp_path):
    make_dataset(tmp_path, shards=2, per_shard=4)
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json")
    rows = list(ds)
    assert len(rows) == 8
    key, image, record = rows[0]
    assert image.size == (24, 16)
    assert record["key"] == key and record["texts"]["raw"] == "shape 0"


def test_multi_caption_picker_reads_texts_from_json_keys(tmp_path):
    # What an OpenCLIP-style multi-caption loader does: pick one of the JSON's text keys.
    make_dataset(tmp_path, shards=1, per_shard=6)
    rng = random.Random(0)
    picked = []
    for sample in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode():
        texts = sample["json"]["texts"]
        picked.append(texts[rng.choice(sorted(texts))])
    assert len(picked) == 6 and all(isinstance(t, str) and t for t in picked)


def test_writer_refuses_bad_samples_and_publishes_nothing_on_error(tmp_path):
    path = tmp_path / "00000.tar"
    with pytest.raises(SampleFormatError, match="key 'a.b'"):
        with ShardWriter(path) as w:
            w.write(make_sample(0, 0))
            bad = make_sample(0, 1)
            bad.key = "a.b"
            w.write(bad)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == [], "the partial file must be removed"
    with pytest.raises(SampleFormatError, match="text id"):
        Sample("k", b"x", "jpg", texts={"bad id!": "t"}).validate()
    with pytest.raises(SampleFormatError, match="written twice"):
        with ShardWriter(path) as w:
            w.write(make_sample(0, 0))
            w.write(make_sample(0, 0))


def test_partial_file_is_hidden_until_close(tmp_path):
    w = ShardWriter(tmp_path / "00000.tar")
    w.write(make_sample(0, 0))
    assert not (tmp_path / "00000.tar").exists()
    assert [p.name.startswith(".00000.tar.partial-") for p in tmp_path.iterdir()] == [True]
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["00000.tar"]


def test_truncated_shards_are_detected_at_any_cut(tmp_path):
    make_dataset(tmp_path, shards=1, per_shard=4)
    data = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        boundary = tar.getmembers()[2].offset  # header of the second sample's image
    # Inside a member's data, exactly at a member boundary (which tarfile accepts silently),
    # inside a header, and with only the end-of-archive blocks missing.
    end = len(data.rstrip(b"\0"))
    for cut in (boundary - 300, boundary, boundary + 100, -(-end // 512) * 512):
        bad = tmp_path / f"cut{cut}.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardReadError, match="truncated") as exc:
            list(ShardReader(bad))
        assert exc.value.shard == bad.name


def test_not_a_tar(tmp_path):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(ShardReadError, match="junk.tar"):
        list(ShardReader(bad))


def test_bad_samples_are_recorded_and_skipped(tmp_path):
    good = image_bytes(1)
    ok_json = json.dumps({"texts": {"raw": "fine"}, "source": {}}).encode()
    members = [
        ("good.jpg", good), ("good.json", ok_json),
        ("nojson.jpg", good),                                         # sample without its JSON
        ("notexts.jpg", good), ("notexts.json", b'{"source": {}}'),   # JSON without texts
        ("latin.jpg", good), ("latin.json", '{"texts": {"raw": "café"}}'.encode("latin-1")),  # not UTF-8
        ("badjson.jpg", good), ("badjson.json", b"{not json"),
        ("../escape.jpg", good), ("../escape.json", ok_json),         # tries to leave the directory
        ("/abs.jpg", good),
        ("noimage.json", ok_json),
        ("good2.png", good), ("good2.json", ok_json),
    ]
    write_raw_tar(tmp_path / "mixed.tar", members)
    reader = ShardReader(tmp_path / "mixed.tar")
    keys = [s.key for s in reader]
    assert keys == ["good", "good2"]
    messages = {(p.key, p.message.split(" (")[0]) for p in reader.problems}
    assert ("nojson", "no .json member") in messages
    assert ("notexts", ".json has no 'texts' and there is no .txt") in messages
    assert ("latin", ".json is not UTF-8") in messages
    assert ("badjson", ".json is not valid JSON") in messages
    assert ("noimage", "no image member") in messages
    unsafe = [p for p in reader.problems if "unsafe path" in p.message]
    assert len(unsafe) == 3 and all(p.shard == "mixed.tar" for p in unsafe)
    assert not (tmp_path.parent / "escape.jpg").exists()


def test_img2dataset_layout_is_read_with_txt_as_raw(tmp_path):
    meta = {"url": "http://x/1.jpg", "key": "000000001", "caption": "a cat", "status": "success",
            "width": 24, "height": 16}
    write_raw_tar(tmp_path / "00000.tar", [("000000001.jpg", image_bytes(2)), ("000000001.txt", b"a cat"),
                                          ("000000001.json", json.dumps(meta).encode())])
    (sample,) = list(ShardReader(tmp_path / "00000.tar"))
    assert sample.texts == {"raw": "a cat"}
    assert sample.source["url"] == "http://x/1.jpg" and sample.source["status"] == "success"


@pytest.mark.parametrize("text,finish,expected", [
    ("A dog on a beach.", "stop", []),
    ("", "stop", ["empty"]),
    ("A long description that went on", "length", ["truncated"]),
    ("I'm sorry, but I cannot see the image.", "stop", ["refusal"]),
    ("a red ball " * 12, "length", ["truncated", "repetition"]),
])
def test_quality_flags(text, finish, expected):
    assert quality_flags(text, finish) == expected


def test_repetition_needs_a_loop_not_just_length():
    varied = " ".join(f"word{i}" for i in range(40))
    assert not is_repetitive(varied)
    assert is_repetitive("the cat sat on the mat " * 6)


def test_a_write_error_keeps_its_errno_across_processes():
    """The caption driver tells a full disk by ShardWriteError.errno, raised in a writer actor: the
    number must survive pickling (Ray sends the exception back pickled)."""
    import errno
    import pickle

    import cloudpickle

    from data_manifests import ShardWriteError

    error = ShardWriteError("cannot write x: No space left on device", errno.ENOSPC)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(error))
        assert isinstance(back, ShardWriteError) and back.errno == errno.ENOSPC and str(back) == str(error)
