"""The whole pipeline as `make demo` runs it, and the same job killed at every stage.

`python -m demo` (what `make demo` runs) at a small size: real img2dataset from a
loopback server, a real caption job on an embedded Ray with two vLLM engines serving the demo's
two trained tiny captioners (demo/captioners), real 2-rank DeepSpeed training, real evaluation. Then the
same command in a second directory, killed with SIGKILL during ingest, during captioning (the
driver and its embedded Ray) and during training, rerun after each kill; its data must equal the
uninterrupted run's (greedy decoding), every sample exactly once, and its trained weights must
match within the trainer's resume tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from caption_fixtures import read_texts
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_manifests import ShardReader, list_shard_files, load_manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 12  # the demo checkpoints every STEPS // 3 steps
SMALL = ["--scenes", "96", "--shard-size", "16", "--test-shards", "2", "--steps", str(STEPS),
         "--runs", "o2o,holistic"]
RESUME_TOLERANCE = 1e-5  # as tests/test_train_launch.py: a resumed run logs the same losses
TIMEOUT = 900


def start(out: Path, log: Path) -> subprocess.Popen:
    sink = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "demo", "--out", str(out), *SMALL], cwd=ROOT,
                            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})


def tail(log: Path, n: int = 8000) -> str:
    return log.read_text(errors="replace")[-n:]


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the demo did not finish in {TIMEOUT} s:\n{tail(log)}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail(log)}"
    return log.read_text(errors="replace")


def wait_until(proc: subprocess.Popen, log: Path, what: str, ready) -> None:
    deadline = time.time() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} after {TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.02)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the demo and everything it started (its session: stage commands, Ray, ranks)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in family:  # Ray workers run in process groups of their own
        try:
            p.kill()
        except psutil.Error:
            pass


def records(dataset: Path) -> int:
    return len(list((dataset / "_shards").glob("*.json"))) if (dataset / "_shards").is_dir() else 0


def images(root: Path) -> dict[str, str]:
    out = {}
    for name in list_shard_files(root):
        for s in ShardReader(root / name):
            assert s.key not in out, f"{s.key} appears twice in {root}"
            out[s.key] = s.source["sha256"]
    return out


def verify(root: Path) -> None:
    r = subprocess.run([str(BIN / "holiclip-manifest"), "verify", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def losses(run_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss/total")}


def options(tmp_path: Path, *args: str):
    from demo.main import parse_args

    return parse_args(["--out", str(tmp_path / "demo"), *args])


def test_the_caption_job_uses_the_shipped_captioners_and_one_prompt_set_each(tmp_path):
    from demo.main import caption_job

    job = caption_job(options(tmp_path))
    assert [(c["name"], Path(c["model"]), c["prompts"]) for c in job["captioners"]] == [
        ("plain", ROOT / "demo" / "captioners" / "tiny-plain", {"set": "default"}),
        ("terse", ROOT / "demo" / "captioners" / "tiny-terse", {"set": "one_prompt"})]
    assert all((Path(c["model"]) / "config.json").is_file() for c in job["captioners"])


def test_captioner_replaces_both_with_one_vlm_and_the_default_prompts(tmp_path, monkeypatch):
    from demo.main import DemoError, caption_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: say so at once rather than after a timeout
    vlm = tmp_path / "My.VLM-2B"
    vlm.mkdir()
    job = caption_job(options(tmp_path, "--captioner", str(vlm)))
    assert len(job["captioners"]) == 1
    captioner = job["captioners"][0]
    assert (captioner["name"], captioner["model"], captioner["prompts"]) == ("My-VLM-2B", str(vlm), {"set": "default"})
    with pytest.raises(DemoError, match="--captioner nowhere/NoSuchVLM: .*leave --captioner out"):
        caption_job(options(tmp_path, "--captioner", "nowhere/NoSuchVLM"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    out, log = root / "a", root / "a.log"
    output = finish(start(out, log), log)
    return {"out": out, "output": output}


def test_demo_runs_every_stage_and_reports(reference):
    from demo.main import text_groups
    from demo.report import caption_accuracy

    out, output = reference["out"], reference["output"]
    report = (out / "report.md").read_text()
    assert "FALLING BACK" not in output and "random weights" not in report
    assert "How the captions were made" in report and "python -m demo.train_captioner" in report
    for attribute in ("shape", "colour", "count", "position", "background"):
        assert f"| {attribute} |" in report
    assert "| text id | o2o | holistic |" in report and "| plain/background |" in report
    assert "### `holistic`: each fusion and each branch alone" in report
    assert "holistic vs o2o, mean over attributes" in report
    assert "holiclip-manifest summary" in output and "samples  96  in 6 shards (6 complete)" in output
    for dataset in ("images", "captioned", "train", "test"):
        verify(out / dataset)
    m = load_manifest(out / "captioned")
    captions = ["plain/detail", "plain/background", "plain/main_object", "plain/style", "terse/detail"]
    assert m.num_samples == 96 and list(m.texts) == ["raw", *captions]
    # the captioners' cards travel into the provenance of their texts
    cards = {t: m.texts[t]["captioner"]["card"] for t in captions}
    assert {t.split("/")[0]: c["style"] for t, c in cards.items()} == {"plain": "plain", "terse": "terse"}
    assert cards["plain/detail"]["data_sha256"] != cards["terse/detail"]["data_sha256"]
    assert all(c["trained_by"] == "demo.train_captioner" and "examples" not in c["heldout"] for c in cards.values())
    assert text_groups(out / "captioned") == {"raw": ["raw"], "captions": ["raw", *captions[:4]],
                                              "vlms": ["raw", "plain/detail", "terse/detail"],
                                              "ref": ["raw", "ref/detail", "ref/background", "ref/main_object",
                                                      "ref/style"]}
    # The captions vLLM wrote describe the held-out pictures (scored against the generator's truth).
    # The report measures the shipped captioners on the full demo's 128 pictures (their count and
    # terse's position fall short of the 90% target there); on these 32 the floors guard against a
    # captioner that no longer describes what it does describe: shape, colour, background.
    for text_id, attributes in caption_accuracy(out / "test", captions).items():
        for attribute in ("shape", "colour", "background"):
            right, said = attributes[attribute]
            assert said == 0 or right / said >= 0.9, (text_id, attribute, right, said)
        right, said = (sum(v[i] for v in attributes.values()) for i in (0, 1))
        assert said > 0 and right / said >= 0.65, (text_id, attributes)
    assert load_manifest(out / "train").texts["ref/detail"]["kind"] == "reference"
    assert load_manifest(out / "train").num_samples == 64 and load_manifest(out / "test").num_samples == 32
    for run, records_per_task in (("o2o", 1), ("holistic", 2)):  # holistic: average and adaptive fusion
        assert json.loads((out / "runs" / run / "export" / "config.json").read_text())["training"]["step"] == STEPS
        records = [json.loads(line) for line in (out / "eval" / run / "results.jsonl").read_text().splitlines()]
        assert sorted(r["task"] for r in records) == sorted((["retrieval"] + ["zeroshot"] * 5) * records_per_task)
    assert (out / "report_zeroshot.png").stat().st_size > 0 and (out / "report_captions.png").stat().st_size > 0
    assert list((out / "eval" / "holistic" / "retrieval").glob("branches-*.png"))


def test_rerunning_a_finished_demo_redoes_nothing(reference, tmp_path):
    out = reference["out"]
    shards = {p: p.read_bytes() for d in ("images", "captioned", "train", "test") for p in (out / d).glob("*.tar")}
    weights = (out / "runs" / "o2o" / "export" / "model.safetensors").read_bytes()
    log = tmp_path / "rerun.log"
    output = finish(start(out, log), log)
    assert "nothing to do: every shard already has every text" in output
    assert "train o2o: already trained" in output and "eval o2o: done already" in output
    assert {p: p.read_bytes() for p in shards} == shards
    assert (out / "runs" / "o2o" / "export" / "model.safetensors").read_bytes() == weights


def test_killed_at_every_stage_ends_with_the_uninterrupted_result(reference, tmp_path):
    a, b, log = reference["out"], tmp_path / "b", tmp_path / "b.log"
    kills = []

    # 1. ingest, as soon as its first shard is published (6 shards in all)
    proc = start(b, log)
    wait_until(proc, log, "an ingested shard", lambda: records(b / "images") >= 1)
    kill_all(proc)
    kills.append(("ingest", records(b / "images")))

    # 2. the caption driver with its embedded Ray, after its first captioned shard
    proc = start(b, log)
    wait_until(proc, log, "a captioned shard", lambda: records(b / "captioned") >= 1)
    kill_all(proc)
    kills.append(("caption driver", records(b / "captioned")))

    # 3. training, once its first checkpoint is complete (the rerun must resume from it). A kill
    #    while other ranks still write a checkpoint is tests/test_train_main.py's (resume follows
    #    only COMPLETE marks); a killed caption actor and a killed engine are tests/test_caption.py's.
    proc = start(b, log)
    checkpoints = b / "runs" / "o2o" / "checkpoints"
    wait_until(proc, log, "a complete training checkpoint", lambda: (checkpoints / "complete").is_file())
    kill_all(proc)
    kills.append(("training, checkpoint complete", (checkpoints / "complete").read_text()))
    assert kills[-1][1] != f"step{STEPS:08d}", f"training finished before it could be killed: {kills}"

    # 4. the same command once more, to the end
    before = log.stat().st_size
    finish(start(b, log), log)
    output = log.read_bytes()[before:].decode("utf-8", "replace")  # this run's output only
    assert f"resumed from {checkpoints / kills[-1][1]}" in output, "training did not resume from its checkpoint"
    assert any(0 < n < 6 for stage, n in kills[:2]), f"no kill landed mid-stage: {kills}"

    for dataset in ("images", "captioned", "train", "test"):
        verify(b / dataset)
    assert images(b / "images") == images(a / "images")
    # every sample exactly once (read_texts asserts it) with the texts of the uninterrupted run
    for dataset in ("captioned", "train", "test"):
        assert read_texts(b / dataset) == read_texts(a / dataset), dataset
    for run in ("o2o", "holistic"):
        # A logged loss is the mean since the previous log line (every 10 steps in the demo), so a
        # window cut by the kill differs; the last window lies wholly after the resume.
        # (tests/test_train_launch.py compares every step's loss, logging each step.)
        la, lb = losses(a / "runs" / run), losses(b / "runs" / run)
        assert abs(la[STEPS] - lb[STEPS]) <= RESUME_TOLERANCE, (run, la, lb)
        wa = load_file(str(a / "runs" / run / "export" / "model.safetensors"))
        wb = load_file(str(b / "runs" / run / "export" / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa), run
    assert "report:" in output and (b / "report.md").exists()
