"""The data contract holds under any input: every sample is stored and read back equal, or
refused with a reason; nothing is dropped silently and nothing else raises out of a reader or
a writer.

Property-based (hypothesis, bounded and derandomized: the same examples on every run) over the
real writer and every real reader: data_manifests.ShardReader, the trainer's stream reader
(train.data.read_shard + Sample.from_members), the ingest converter (convert_shard) and eval's
labelled-shard reader. Then the cases seen in the field, end to end through `pipeline.ingest`.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import image_bytes, make_dataset, write_raw_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_manifests import (
    COMPLETE,
    Sample,
    SampleFormatError,
    ShardReader,
    ShardReadError,
    ShardWriter,
    TarReader,
    load_manifest,
    parse_member_name,
)
from data_manifests.index import index_dataset
from data_manifests.verify import verify_dataset
from eval.data import EvalSet, _read_labelled_shards
from pipeline.ingest.cli import main as ingest
from pipeline.ingest.converter import ConvertOptions, convert_shard
from train.data import read_shard

BOUNDED = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- what hypothesis draws --------------------------------------------------------------------
# Texts of any characters (control characters, NUL, line separators, non-ASCII, very long), any
# JSON as source, any bytes as the image. One sample in three is then broken in one way that the
# format must refuse: a lone surrogate (valid in JSON as "\udcff", not storable as UTF-8) in any
# field, NaN, a key or text id outside the format, ...


def mostly(good, other):
    """`good` three times in four."""
    return st.integers(0, 3).flatmap(lambda i: other if i == 3 else good)


SPECIAL = st.sampled_from(["\x00", "\n", "\t", "\x7f", "\u2028", "é", "猫", "\U0001f600"])
CHARS = st.one_of(st.characters(codec=None), SPECIAL)  # any character but a lone surrogate
SHORT = st.text(CHARS, max_size=20)
LONG = st.builds(lambda part, n: part * n, st.text(CHARS, min_size=1, max_size=3), st.integers(1_000, 20_000))
TEXT = mostly(SHORT, LONG)
KEY = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
TEXT_ID = st.sampled_from(["raw", "detail", "qwen2vl-7b/style", "a.b", "x_1"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SHORT, inner, max_size=4),
                    max_leaves=12)
IMAGE = st.one_of(st.binary(max_size=200), st.sampled_from([image_bytes(1), image_bytes(2, fmt="PNG")]))
BREAKS = ("surrogate in a text", "surrogate in an error", "surrogate in a flag", "surrogate in a source value",
          "surrogate in a source key", "NaN in the source", "a set in the source", "a bad key", "a bad text id",
          "a gif", "flags of a missing text")


def with_surrogate(draw, text: str) -> str:
    i = draw(st.integers(0, len(text)))
    return text[:i] + chr(draw(st.integers(0xD800, 0xDFFF))) + text[i:]


@st.composite
def samples(draw, how: str | None = None) -> Sample:
    """A sample, broken in one way of BREAKS one time in three, or always in the way `how`."""
    texts = draw(st.dictionaries(TEXT_ID, TEXT, min_size=1, max_size=3))
    flags = draw(st.dictionaries(st.sampled_from(sorted(texts)), st.lists(SHORT, max_size=2), max_size=2))
    sample = Sample(key=draw(KEY), image=draw(IMAGE), image_ext=draw(st.sampled_from(["jpg", "png", "webp"])),
                    texts=texts, flags=flags, errors=draw(st.dictionaries(TEXT_ID, SHORT, max_size=2)),
                    source=draw(st.dictionaries(SHORT, JSON, min_size=1, max_size=4)))
    if how is None:
        if draw(st.integers(0, 2)) < 2:
            return sample
        how = draw(st.sampled_from(BREAKS))
    some_text = draw(st.sampled_from(sorted(texts)))
    some_field = draw(st.sampled_from(sorted(sample.source)))
    if how == "surrogate in a text":
        sample.texts[some_text] = with_surrogate(draw, sample.texts[some_text])
    elif how == "surrogate in an error":
        sample.errors[draw(TEXT_ID)] = with_surrogate(draw, draw(SHORT))
    elif how == "surrogate in a flag":
        sample.flags[some_text] = [with_surrogate(draw, draw(SHORT))]
    elif how == "surrogate in a source value":
        sample.source[some_field] = {"deep": [with_surrogate(draw, draw(SHORT))]}
    elif how == "surrogate in a source key":
        sample.source[with_surrogate(draw, some_field)] = 1
    elif how == "NaN in the source":
        sample.source[some_field] = [draw(st.sampled_from([math.nan, math.inf, -math.inf]))]
    elif how == "a set in the source":
        sample.source[some_field] = {1, 2}
    elif how == "a bad key":
        sample.key = draw(st.one_of(SHORT, st.sampled_from(["", "a.b", "a/b", "x" * 201]))).replace("-", ".")
    elif how == "a bad text id":
        sample.texts[draw(st.sampled_from(["", "bad id!", "/raw", "a//b"]))] = "text"
    elif how == "a gif":
        sample.image_ext = "gif"
    else:
        sample.flags["missing"] = ["empty"]
    return sample


def fields(sample: Sample) -> tuple:
    """What a round trip keeps: empty flag lists are not written."""
    return (sample.key, sample.image, sample.image_ext, sample.texts, {k: v for k, v in sample.flags.items() if v},
            sample.errors, sample.source)


GOOD = [Sample(key=f"good{i}", image=image_bytes(i), image_ext="jpg", texts={"raw": f"good {i}"},
               source={"width": 24, "height": 16}) for i in range(2)]


# --- writer and readers -------------------------------------------------------------------------
@BOUNDED
@given(drawn=st.lists(samples(), min_size=1, max_size=3))
def test_any_sample_is_stored_and_read_back_equal_or_refused_with_a_reason(drawn):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        stored, refused = [], 0
        with ShardWriter(path) as writer:
            for sample in [GOOD[0], *drawn, GOOD[1]]:
                try:
                    writer.write(sample)
                except SampleFormatError as e:  # the reason names the sample, or its key if that is the trouble
                    assert str(e).startswith((f"sample {sample.key}: ", "sample key "))
                    refused += 1
                    continue
                stored.append(sample)
            info = writer.close()
        assert info.samples == len(stored) and stored[0] is GOOD[0] and stored[-1] is GOOD[1]

        reader = ShardReader(path)
        assert [fields(s) for s in reader] == [fields(s) for s in stored] and not reader.refused and not reader.problems

        trained = [Sample.from_members(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
                   for raw in read_shard(str(path))]
        assert [fields(s) for s in trained] == [fields(s) for s in stored]

        converted = convert_shard(path, Path(tmp) / "out.tar")
        out = {s.key: s for s in ShardReader(Path(tmp) / "out.tar")}
        assert converted.info.samples + converted.failed_samples == len(stored)
        assert sum(converted.extra.get("failures", {}).values()) == converted.failed_samples
        added = {"sha256", "original_sha256", "width", "height", "original_format"}  # what the converter records
        for sample in stored:
            if sample.key in out:
                back = out[sample.key]
                assert (back.texts, back.errors) == (sample.texts, sample.errors)
                assert {k: v for k, v in back.source.items() if k not in added} == \
                       {k: v for k, v in sample.source.items() if k not in added}
        assert {"good0", "good1"} <= set(out)


@pytest.mark.parametrize("how", BREAKS)
@settings(max_examples=4, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_each_way_of_breaking_a_sample_is_refused_with_a_reason_naming_the_field(how, data):
    sample = data.draw(samples(how))
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(SampleFormatError, match=r"^sample ") as refused, ShardWriter(Path(tmp) / "00000.tar") as w:
            w.write(sample)
        assert not list(Path(tmp).iterdir())  # nothing published, no partial file left
        if how in ("a set in the source", "a bad key", "a gif"):
            return  # not expressible in a shard's JSON
        # The same sample as a shard's members (JSON escapes keep the surrogates): every reader refuses it.
        record = {"texts": sample.texts, "flags": sample.flags, "errors": sample.errors, "source": sample.source}
        path = Path(tmp) / "00000.tar"
        write_raw_tar(path, [(f"{sample.key}.jpg", image_bytes(1)), (f"{sample.key}.json", json.dumps(record).encode()),
                             ("good.jpg", image_bytes(2)), ("good.json", b'{"texts": {"raw": "ok"}}')])
        reader = ShardReader(path)
        assert [s.key for s in reader] == ["good"] and sum(reader.refused.values()) == 1
        reason = refused.value.args[0].removeprefix(f"sample {sample.key}: ")
        assert [p.message for p in reader.problems] == [reason]
        converted = convert_shard(path, Path(tmp) / "out.tar")
        assert converted.info.samples == 1 and converted.extra["failures"] == {reason: 1}


MEMBER_NAME = st.one_of(
    st.builds(lambda k, e: f"{k}.{e}", st.sampled_from(["a", "b", "c"]),
              st.sampled_from(["jpg", "JPEG", "png", "webp", "gif", "json", "txt", "cls", "json.gz", ""])),
    st.sampled_from(["../../a.jpg", "/abs/b.json", "dir\\c.jpg", "d/../e.png", "sub/a.json", ".hidden", "a"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20),  # tar ends names at NUL
)
# A sample's JSON: mostly a record of the format, with lone surrogates escaped in it at times;
# else any JSON, or JSON that is not UTF-8.
RECORD = st.fixed_dictionaries({"texts": st.dictionaries(TEXT_ID, st.one_of(TEXT, SHORT.map(lambda t: t + "\udcff")),
                                                         max_size=2)},
                               optional={"source": JSON, "flags": JSON, "errors": JSON, "key": SHORT})
MEMBER_JSON = st.builds(lambda v, ascii_: json.dumps(v, ensure_ascii=ascii_).encode("utf-8", "surrogatepass"),
                        mostly(RECORD, JSON), st.booleans())
MEMBER_DATA = st.one_of(st.binary(max_size=100), st.sampled_from([image_bytes(3), image_bytes(4, fmt="GIF")]),
                        MEMBER_JSON)


@st.composite
def tar_members(draw) -> list[tuple[str, bytes]]:
    """A few samples (an image and a JSON each), with any other members put anywhere among them."""
    members = []
    for key in draw(st.lists(st.sampled_from(["s0", "s1", "s2", "s3"]), max_size=4)):
        ext = draw(mostly(st.sampled_from(["jpg", "png", "webp", "jpeg"]), st.sampled_from(["gif", "bmp"])))
        members += [(f"{key}.{ext}", draw(mostly(st.sampled_from([image_bytes(5), image_bytes(6, fmt="PNG")]),
                                                 st.binary(max_size=50)))),
                    (f"{key}.json", draw(MEMBER_JSON))]
    for name, data in draw(st.lists(st.tuples(MEMBER_NAME, MEMBER_DATA), max_size=4)):
        members.insert(draw(st.integers(0, len(members))), (name, data))
    return members


@BOUNDED
@given(members=tar_members())
def test_any_tar_is_read_by_every_reader_and_every_sample_is_accounted_for(members):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        write_raw_tar(path, members)
        with tarfile.open(path) as tar:  # the names as a reader sees them
            keys = [parse_member_name(m.name).key for m in tar.getmembers() if not m.isdir()]
        runs = sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)  # samples in file order

        reader = ShardReader(path)
        read = list(reader)
        assert len(read) + sum(reader.refused.values()) == runs
        assert all(p.message for p in reader.problems) and bool(reader.problems) == bool(reader.refused)

        tar_reader = TarReader(path)
        groups = list(read_shard(str(path), tar_reader))
        bad = 0
        for raw in groups:
            try:
                Sample.from_members(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
            except SampleFormatError:
                bad += 1
        assert len(groups) - bad == len(read) and len(groups) + sum(tar_reader.refused.values()) == runs

        converted = convert_shard(path, Path(tmp) / "out.tar", ConvertOptions(check_images=True))
        assert converted.info.samples + converted.failed_samples == runs  # in key order: the same rule
        assert all(reason for reason in converted.extra.get("failures", {}))

        labelled = EvalSet(Path(tmp), "webdataset", None, None, [])
        assert len(list(_read_labelled_shards(labelled, ["00000.tar"]))) + labelled.skipped == runs


def _shard_bytes(tmp: Path) -> bytes:
    make_dataset(tmp / "ds", shards=1, per_shard=3)
    return (tmp / "ds" / "00000.tar").read_bytes()


def test_a_shard_cut_anywhere_is_truncated_for_every_reader(tmp_path):
    data = _shard_bytes(tmp_path)
    with tarfile.open(tmp_path / "ds" / "00000.tar") as tar:
        boundary = tar.getmembers()[2].offset  # between the first and the second sample
    end = -(-len(data.rstrip(b"\0")) // 512) * 512
    for cut in (boundary, boundary + 100, boundary - 10, end, end + 512):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        readers = {
            "ShardReader": lambda p: list(ShardReader(p)),
            "TarReader (key order)": lambda p: list(TarReader(p).by_key()),
            "trainer": lambda p: list(read_shard(str(p))),
            "trainer (fsspec URL)": lambda p: list(read_shard(f"file://{p}")),
            "converter": lambda p: convert_shard(p, tmp_path / "out.tar"),
        }
        for who, read in readers.items():
            with pytest.raises(ShardReadError) as exc:
                read(path)
            assert exc.value.shard == path.name, who
        assert not (tmp_path / "out.tar").exists()  # nothing published from a cut input


# --- through the ingest, as a user runs it --------------------------------------------------------
def _members(key: str, caption: str | None = None, record: dict | None = None, image: bytes | None = None):
    out = [(f"{key}.jpg", image or image_bytes(len(key)))]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    if record is not None:
        out.append((f"{key}.json", json.dumps(record).encode()))  # ensure_ascii: "\udcff" stays an escape
    return out


def test_a_lone_surrogate_refuses_its_sample_not_the_import(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    # img2dataset's layout, then the project's own (indexed in place unless a sample breaks it).
    write_raw_tar(src / "00000.tar", _members("s1", "first", {"url": "http://x/1"})
                  + _members("s2", "second", {"url": "http://x/\udcff"})
                  + _members("s3", "third", {"url": "http://x/3"}))
    write_raw_tar(src / "00001.tar", _members("t1", record={"texts": {"raw": "bad \udcff"}, "source": {}})
                  + _members("t2", record={"texts": {"raw": "fine"}, "source": {}}))
    write_raw_tar(src / "00002.tar", _members("u1", "later shard"))
    out = tmp_path / "out"
    assert ingest(["--from-webdataset", str(src), "--out", str(out), "--no-progress"]) == 0
    m = load_manifest(out)
    assert m.status == COMPLETE and m.num_samples == 4
    texts = sorted(s.texts.get("raw") for n in m.shards for s in ShardReader(out / n))
    assert texts == ["fine", "first", "later shard", "third"]
    assert [m.shards[n].failed_samples for n in sorted(m.shards)] == [1, 1, 0]
    surrogate = "holds a lone UTF-16 surrogate, which UTF-8 cannot store"
    assert m.shards["00000.tar"].info["failures"] == {f"source field 'url' {surrogate}": 1}
    assert m.shards["00001.tar"].info["failures"] == {f"text 'raw' {surrogate}": 1}
    assert "lone UTF-16 surrogate" in capsys.readouterr().out
    assert verify_dataset(out).ok


def test_unsafe_member_names_are_counted_by_every_importer_and_reader(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    record = {"texts": {"raw": "ok"}, "source": {}}
    members = (_members("good", record=record) + _members("../../up", record=record)
               + [("/abs/x.jpg", image_bytes(5)), ("/abs/x.json", json.dumps(record).encode())])
    write_raw_tar(src / "00000.tar", members)

    reader = ShardReader(src / "00000.tar")
    assert [s.key for s in reader] == ["good"] and reader.refused == Counter({"unsafe member path": 2})
    stream = TarReader(src / "00000.tar")
    assert [raw["__key__"] for raw in read_shard(str(src / "00000.tar"), stream)] == ["good"]
    assert sum(stream.refused.values()) == 2

    out = tmp_path / "out"
    assert ingest(["--from-webdataset", str(src), "--out", str(out), "--no-progress"]) == 0
    entry = load_manifest(out).shards["00000.tar"]
    assert entry.samples == 1 and entry.failed_samples == 2 and entry.info["failures"] == {"unsafe member path": 2}
    assert any("'../../up.jpg' has an unsafe path" in p for p in entry.info["problems"])

    index_dataset(src)  # the manifest tool on the shards as they are
    entry = load_manifest(src).shards["00000.tar"]
    assert entry.samples == 1 and entry.failed_samples == 2 and entry.info["failures"] == {"unsafe member path": 2}
    assert not (tmp_path / "up.jpg").exists() and not Path("/abs/x.jpg").exists()


def test_unreadable_input_shards_are_named_and_no_rerun_is_promised(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_raw_tar(src / "00000.tar", _members("a", "fine"))
    (src / "00001.tar").write_bytes(b"")
    (src / "00002.tar").write_bytes(b"not a tar at all\n" * 100)
    with tarfile.open(src / "00000.tar") as tar:
        boundary = tar.getmembers()[1].offset
    (src / "00003.tar").write_bytes((src / "00000.tar").read_bytes()[:boundary])  # cut exactly after a member
    out = tmp_path / "out"
    assert ingest(["--from-webdataset", str(src), "--out", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    for name, why in (("00001.tar", "not a readable tar file (empty file)"),
                      ("00002.tar", "not a readable tar file (invalid header)"),
                      ("00003.tar", "truncated tar (no end-of-archive marker)")):
        assert f"{src / name}: {why}" in printed
    assert "rerun the same command to finish" not in printed and "Fix or remove the files named there" in printed
    m = load_manifest(out)
    assert m.num_samples == 1 and not any(e.rerun_helps for e in m.shards.values())


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGBA"), ("PPM", "RGB"), ("TIFF", "I;16"),
                                      ("TIFF", "CMYK")])
def test_folder_images_in_other_formats_are_stored_as_lossless_png(tmp_path, fmt, mode):
    image = Image.new("RGB", (7, 5))
    image.putdata([(x * 30, y * 50, (x * y) % 256) for y in range(5) for x in range(7)])
    image = image.convert(mode)
    src = tmp_path / "in"
    src.mkdir()
    buf = io.BytesIO()
    image.save(buf, fmt)
    (src / f"p.{fmt.lower()}").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert ingest(["--from-folder", str(src), "--out", str(out), "--no-progress"]) == 0
    (sample,) = ShardReader(out / "00000.tar")
    assert sample.image_ext == "png" and sample.source["original_format"] == fmt
    assert (sample.source["width"], sample.source["height"]) == (7, 5)
    with Image.open(io.BytesIO(sample.image)) as png, Image.open(buf) as original:
        assert png.format == "PNG"
        # The same pixels: a palette image compared as colours, CMYK (which PNG lacks) as its RGB.
        expected = original.convert({"P": "RGBA", "CMYK": "RGB"}.get(mode, original.mode))
        assert list(png.convert(expected.mode).getdata()) == list(expected.getdata())


def test_eval_counts_skipped_samples_not_problem_lines(tmp_path):
    """A labelled sample refused for two bad members is one skipped sample (and two problems)."""
    from eval.data import open_classification_set

    write_raw_tar(tmp_path / "00000.tar", [("a.jpg", image_bytes(1)), ("a.cls", b"0"),
                                           ("../b.jpg", image_bytes(2)), ("../b.cls", b"1"),
                                           ("c.jpg", image_bytes(3))])  # c: no label
    eval_set = open_classification_set(tmp_path)
    assert [item.key for item in eval_set] == ["a"]
    assert eval_set.skipped == 2 and len(eval_set.problems) == 3


def test_a_key_split_in_two_runs_is_refused_alike_in_file_order_and_in_key_order(tmp_path):
    """Both ways of reading a shard apply one rule: the key's first run is its sample, a later run
    of the same key (after another key's members) is a second sample of that key, refused."""
    from data_manifests import TarReader

    record = json.dumps({"key": "a", "texts": {"raw": "a"}, "source": {}}).encode()
    shard = tmp_path / "00000.tar"
    write_raw_tar(shard, [("a.jpg", image_bytes(1)), ("a.json", record), ("b.jpg", image_bytes(2)),
                          ("b.json", record.replace(b'"a"', b'"b"')), ("a.txt", b"late")])
    for how in ("file order", "key order"):
        reader = TarReader(shard)
        got = list(reader) if how == "file order" else list(reader.by_key())
        assert [key for key, _ in got] == ["a", "b"], how
        assert sorted(got[0][1]) == ["jpg", "json"], how
        assert reader.refused == Counter({"key appears more than once in the shard": 1}), how
