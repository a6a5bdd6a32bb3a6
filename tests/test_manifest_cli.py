"""holiclip-manifest, run as a user runs it: the console script and `python -m data_manifests`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROVENANCE, image_bytes, make_dataset, make_sample, snapshot, write_raw_tar
from PIL import Image

from data_manifests import DatasetWriter

CLI = [str(Path(sys.executable).with_name("holiclip-manifest"))]


def run(*args, expect: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == expect, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"), shards=3, per_shard=6)


def test_help_explains_every_command():
    out = run("--help").stdout
    for command in ("summary", "verify", "show", "stats", "diff", "index"):
        assert command in out
        sub = run(command, "--help").stdout
        assert "--json" in sub and "usage:" in sub
    r = subprocess.run([sys.executable, "-m", "data_manifests", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "holiclip-manifest" in r.stdout


def test_read_only_commands_change_nothing(dataset, tmp_path):
    before = snapshot(dataset)
    run("summary", dataset)
    run("summary", dataset, "--json")
    run("verify", dataset)
    run("show", dataset, "--n", "2")
    run("stats", dataset, "--plot", tmp_path / "s.png")
    run("diff", dataset, dataset)
    assert snapshot(dataset) == before


def test_summary(dataset):
    out = run("summary", dataset).stdout
    assert "samples  18  in 3 shards (3 complete)" in out
    assert "caption by tests/tiny-vlm (tiny), prompt default/detail" in out
    data = json.loads(run("summary", dataset, "--json").stdout)
    assert data["counts"]["samples"] == 18 and data["texts"]["raw"]["kind"] == "alt_text"
    assert data["text_stats"]["detail"]["count"] == 18


def test_verify_ok_and_broken(dataset, tmp_path):
    assert "OK: 3 shards, 18 samples" in run("verify", dataset).stdout
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    raw = (broken / "00001.tar").read_bytes()
    (broken / "00001.tar").write_bytes(raw[:1000])
    r = run("verify", broken, expect=1)
    assert "PROBLEM: 00001.tar: truncated" in r.stdout and "FAILED" in r.stdout
    data = json.loads(run("verify", broken, "--json", expect=1).stdout)
    assert data["ok"] is False and any("00001.tar" in p for p in data["problems"])


def test_show_by_count_and_key(dataset):
    out = run("show", dataset, "--n", "2").stdout
    assert out.count("== ") == 2 and "detail" in out and "[truncated]" not in out.split("== ")[1]
    data = json.loads(run("show", dataset, "--key", "000010003", "--json").stdout)
    assert data[0]["key"] == "000010003" and data[0]["shard"] == "00001.tar"
    assert data[0]["flags"] == {"detail": ["truncated"]}
    r = run("show", dataset, "--key", "nope", expect=2)
    assert "no sample with key 'nope'" in r.stderr


def test_stats_and_plot(dataset, tmp_path):
    png = tmp_path / "stats.png"
    data = json.loads(run("stats", dataset, "--plot", png, "--json").stdout)
    assert data["text_stats"]["detail"]["flag_rates"]["truncated"] == pytest.approx(3 / 18, abs=1e-3)
    div = data["diversity"]
    assert 0 < div["distinct_n"]["raw"]["distinct_1"] <= 1
    assert 0 <= div["within_sample_similarity"]["mean"] <= 1
    assert div["samples_read"] == 18
    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 600


def test_diff_reports_texts_provenance_and_samples(dataset, tmp_path):
    other = tmp_path / "other"
    writer = DatasetWriter(other, stage="test")
    prov = json.loads(json.dumps(PROVENANCE))
    prov["detail"]["prompt"]["text"] = "Describe it."
    prov["style"] = {"kind": "caption"}
    writer.set_texts(prov)
    writer.write_shard("00000.tar", [make_sample(0, i) for i in range(6)])
    changed = make_sample(1, 0)
    changed.texts["detail"] = "something else"
    writer.write_shard("00001.tar", [changed] + [make_sample(1, i) for i in range(1, 5)])
    writer.finish()
    data = json.loads(run("diff", dataset, other, "--samples", "--json").stdout)
    assert data["texts_only_in_b"] == ["style"]
    assert data["provenance_changed"]["detail"]["prompt.text"] == ["Describe this image in detail.", "Describe it."]
    assert data["shards_only_in_a"] == ["00002.tar"]
    assert data["shards_content_differs"] == ["00001.tar"]
    assert data["samples"]["only_in_a"] == 1 and data["samples"]["texts_differ"] == {"detail": 1}
    run("diff", dataset, other, "--fail-on-diff", expect=1)
    assert "same shards, texts and provenance" in run("diff", dataset, dataset).stdout


def test_index_img2dataset_output(tmp_path):
    for s in range(2):
        members = []
        for i in range(4):
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", image_bytes(i)), (f"{key}.txt", f"caption {i}".encode()),
                        (f"{key}.json", json.dumps({"url": f"http://x/{i}", "key": key, "status": "success"}).encode())]
        write_raw_tar(tmp_path / f"{s:05d}.tar", members)
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 4, "failed_to_download": 1}))
    out = run("index", tmp_path).stdout
    assert "indexed 2 shards, 8 samples" in out
    summary = json.loads(run("summary", tmp_path, "--json").stdout)
    assert summary["texts"]["raw"]["kind"] == "alt_text"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["shards"][0]["info"]["img2dataset"]["failed_to_download"] == 1
    assert "OK" in run("verify", tmp_path).stdout
    r = run("index", tmp_path, expect=2)
    assert "already has a manifest" in r.stderr


def test_index_records_a_corrupt_shard_as_failed(tmp_path):
    make_dataset(tmp_path, shards=2, per_shard=3)
    os.remove(tmp_path / "manifest.json")
    shutil.rmtree(tmp_path / "_shards")
    raw = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(raw[:700])
    r = run("index", tmp_path, expect=1)
    assert "00001.tar: truncated" in r.stdout
    r = run("verify", tmp_path, expect=1)
    assert "00001.tar: shard is failed" in r.stdout


def test_errors_are_messages_not_tracebacks(tmp_path):
    r = run("summary", tmp_path / "missing", expect=2)
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run("index", tmp_path, expect=2)
    assert "no .tar shards" in r.stderr
