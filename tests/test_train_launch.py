"""The trainer as users run it: the real `deepspeed` launcher, DS_ACCELERATOR=cpu, 2 ranks on gloo.

One launch per branch design and loss (o2o, o2m, m2m with Psi_CLS, m2m with Psi_MLP), each on
another ZeRO stage and precision, trains the tiny model on the synthetic dataset (whose texts
are learnable from the images), checkpoints, and exports. The runs are shared by the tests
below through a module cache, because every launch costs seconds of start-up:

- the loss falls clearly, TensorBoard has every scalar, the export reloads (no DeepSpeed) and
  reproduces the embeddings of the live engine, and `python -m train.export` rebuilds the same
  weights from the DeepSpeed checkpoint (zero_to_fp32 for ZeRO 1-3) after the fact;
- a run resumed from the step-8 checkpoint (for ZeRO 3: a run stopped with --stop-at-step and
  resumed with --resume auto) logs the same losses at steps 9-16 as the uninterrupted run;
- a truncated shard in the middle of the stream is skipped and reported; a text id the data
  lacks fails before training with one clear message; a diverging run stops with one (this one
  runs as `python -m train.main`, one rank without the launcher).

The first DeepSpeed launch on a machine compiles its CPU shared-memory comm op with g++ (about
a minute, cached under <venv>/torch_extensions).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from synthetic_data import COLOURS, SHAPES, TEXT_IDS, add_truncated_shard, draw, make_synthetic_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.export import load_exported

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS, HALF = 16, 8  # the tiny configs: 16 steps, a checkpoint every 8
# Resumed runs must log the uninterrupted run's losses: the data stream is reproduced sample for
# sample and DeepSpeed restores weights, optimizer and schedule. Measured difference: 0.0.
RESUME_TOLERANCE = 1e-5
LAUNCH_TIMEOUT = 420  # seconds; a launch takes 15-60 s on a busy 2-core machine
# The venv's bin first on PATH for every process: DeepSpeed builds its CPU comm op with the
# `ninja` found there, and two ninja versions (the venv's and the system's) do not accept each
# other's build log, so alternating between them rebuilds the op (30-100 s) every time.
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}

# name: (config, ZeRO stage, precision, extra --set overrides)
RUNS = {
    "o2o-zero0-bf16": ("tiny_o2o", 0, "bf16", []),
    # Shards split by rank and read in passes: rank 1 reads the truncated shard 00003.tar every pass.
    "o2m-zero1-fp32": ("tiny_o2m", 1, "fp32", ["data.resampled=false"]),
    # Two decoding workers per rank and 2 micro-batches of 8 per step (gradient accumulation).
    "m2m_cls-zero2-bf16": ("tiny_m2m_cls", 2, "bf16", ["data.num_workers=2", "train.micro_batch_size=8"]),
    "m2m_mlp-zero3-fp32": ("tiny_m2m_mlp", 3, "fp32", []),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("launch") / "ds", shards=8, per_shard=48,
                                  missing_style_every=10)
    add_truncated_shard(root, "00003.tar", source="00003.tar", keep=0.5)  # an interrupted copy, mid-stream
    return root


def launch(config: str, out: Path, dataset: Path, *args: str, sets: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "train.main",
           "--config", f"train/configs/{config}.yaml", "--set", f"data.shards={dataset}", "--set", f"output_dir={out}",
           "--set", "log.progress_bar=false", *[a for s in sets for a in ("--set", s)], *args]
    return run(cmd, ENV)


def run(cmd: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout, have the ranks print their stacks (the trainer dumps
    them on SIGUSR1), then stop the whole process group, so no rank outlives the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "train.main" in " ".join(child.cmdline()):
                child.send_signal(signal.SIGUSR1)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{(stdout + stderr)[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{output[-6000:]}"
    return output


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


class Runs:
    """Each uninterrupted run is launched once, by the first test that needs it."""

    def __init__(self, root: Path, dataset: Path) -> None:
        self.root, self.dataset, self.done = root, dataset, {}

    def get(self, name: str) -> tuple[Path, str]:
        if name not in self.done:
            config, stage, precision, sets = RUNS[name]
            out = self.root / name
            output = ok(launch(config, out, self.dataset,
                               sets=[f"train.zero_stage={stage}", f"train.precision={precision}", *sets]))
            self.done[name] = (out, output)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), dataset)


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run(runs, name, tmp_path):
    run_dir, output = runs.get(name)
    config, stage, precision, _ = RUNS[name]
    text_ids = ["raw"] if config == "tiny_o2o" else list(TEXT_IDS)
    logged = scalars(run_dir)

    # Every scalar, every step (log.every_steps is 1 in the tiny configs).
    expected = {"loss/total", "train/logit_scale", "train/lr", "perf/samples_per_s", "perf/step_s",
                "perf/data_wait_s", "perf/compute_s", "data/samples", "data/corrupt_shards", "data/missing/raw"}
    assert expected | {f"loss/{t}" for t in text_ids} <= set(logged)
    assert all(sorted(logged[tag]) == list(range(1, STEPS + 1)) for tag in expected)
    # The loss falls clearly: the texts are learnable from the images.
    loss = [logged["loss/total"][s] for s in range(1, STEPS + 1)]
    assert sum(loss[-4:]) / 4 < 0.8 * sum(loss[:4]) / 4, loss
    for t in text_ids:
        assert logged[f"loss/{t}"][STEPS] < logged[f"loss/{t}"][1] + 0.1
    # Warm-up (5 steps to 1e-3) then cosine decay.
    lr = logged["train/lr"]
    assert lr[1] == pytest.approx(2e-4, rel=1e-6) and lr[5] == pytest.approx(1e-3, rel=1e-6)
    assert lr[STEPS] < lr[7] < lr[6] == lr[5]
    assert all(v > 0 for v in logged["perf/samples_per_s"].values())
    assert 1 / 0.07 - 1 < logged["train/logit_scale"][STEPS] < 100
    if config != "tiny_o2o":
        assert logged["data/missing/style"][STEPS] > 0  # every 10th sample lacks "style": skipped, counted
    if name.startswith("o2m"):  # the truncated shard was read on rank 1, skipped and reported
        assert logged["data/corrupt_shards"][STEPS] >= 1
        assert "skipped unreadable shard" in output and "00003.tar" in output

    # Checkpoints of both halves; the export reloads and reproduces the live engine's embeddings.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000008", "step00000016"]
    model, tokenizer, meta = load_exported(run_dir / "export")
    h = 1 if config in ("tiny_o2o", "tiny_o2m") else 5
    assert ((meta["branch"], meta["num_branches"], meta["text_ids"])
            == (config.split("_")[-1] if h > 1 else "none", h, text_ids))
    assert meta["training"]["zero_stage"] == stage and meta["training"]["step"] == STEPS
    # The branch profile for adaptive fusion, from the training shards (none with one branch).
    assert ("branch_profile" in meta) == (h > 1)
    if h > 1:
        section = meta["branch_profile"]  # the dataset is smaller than the sample: every text is read
        assert list(section["texts"]) == text_ids and all(n > 300 for n in section["texts"].values()), section
    check = meta["probe_check"]
    if precision == "fp32":
        assert check["max_abs_diff"] < 1e-5, check
    else:  # the engine computed in bf16, the export in fp32
        assert check["min_cosine"] > 0.999, check
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(images).shape == (2, h, 32)
        assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 32)

    # After the fact, from the DeepSpeed checkpoint alone: the same weights. ZeRO 1 and 2 take
    # the same zero_to_fp32 path as ZeRO 3, checked above through the run's own export.
    if stage not in (0, 3):
        return
    cli = run([sys.executable, "-m", "train.export", "--checkpoint-dir", str(run_dir / "checkpoints"),
               "--out", str(tmp_path / "cli")], ENV)
    assert cli.returncode == 0, cli.stderr[-3000:]
    auto, again = (load_file(str(run_dir / "export" / "model.safetensors")),
                   load_file(str(tmp_path / "cli" / "model.safetensors")))
    assert auto.keys() == again.keys() and all(torch.equal(auto[k], again[k]) for k in auto)
    assert load_exported(tmp_path / "cli")[2]["text_ids"] == text_ids


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory) -> list[str]:
    """Held-out sets for evaluation during training: a retrieval set in the project's format and a
    zero-shot image folder per colour, with two templates."""
    root = tmp_path_factory.mktemp("eval_sets")
    heldout = make_synthetic_dataset(root / "heldout", shards=1, per_shard=24, seed=9)
    rng = random.Random(9)
    for i in range(16):
        colour = list(COLOURS)[i % 4]
        (root / "colours" / colour).mkdir(parents=True, exist_ok=True)
        draw(rng.choice(SHAPES), colour, "gray", "top left", 32, rng).save(root / "colours" / colour / f"{i}.png")
    (root / "templates.txt").write_text("bright {} tones\na {} thing\n")
    return ["eval.every_steps=8", "checkpoint.export_every=true",
            f"eval.retrieval=[{{name: heldout, data: '{heldout}', text_ids: [raw, style]}}]",
            f"eval.zeroshot=[{{name: colours, data: '{root / 'colours'}', templates: '{root / 'templates.txt'}'}}]"]


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_matches_uninterrupted(runs, name, tmp_path, eval_sets):
    run_dir, _ = runs.get(name)
    config, stage, precision, sets = RUNS[name]
    sets = [f"train.zero_stage={stage}", f"train.precision={precision}", *sets]
    resumed = tmp_path / "resumed"
    if stage == 3:  # stopped after step 8 (checkpoint and exit), then resumed by --resume auto
        # With evaluation during training (ZeRO-3: the export's gather is collective): at step 8
        # before the stop, at step 16 after the resume, never twice.
        sets += eval_sets
        ok(launch(config, resumed, runs.dataset, "--stop-at-step", str(HALF), sets=sets))
        assert not (resumed / "export").exists() and (resumed / "checkpoints" / "latest").read_text() == "step00000008"
        # As if killed after the zero-shot set's records and before the retrieval set's: the
        # resumed run owes step 8 the retrieval set only, and evaluates it before going on.
        results = resumed / "results.jsonl"
        lines = results.read_text().splitlines()
        results.write_text("".join(f"{line}\n" for line in lines if '"set":"heldout"' not in line))
        assert len(lines) == 12 and len(results.read_text().splitlines()) == 6
        output = ok(launch(config, resumed, runs.dataset, sets=sets))
        assert "eval at step 8: heldout (" in output and "eval at step 8: colours" not in output
        check_evaluations(resumed)
    else:
        checkpoint = run_dir / "checkpoints" / f"step{HALF:08d}"
        output = ok(launch(config, resumed, runs.dataset, "--resume", str(checkpoint), sets=sets))
    assert f"at step {HALF} (data stream at micro-batch" in output
    full, again = scalars(run_dir), scalars(resumed)
    steps = range(HALF + 1, STEPS + 1)
    assert sorted(again["loss/total"])[-len(steps):] == list(steps)
    differences = [abs(full[tag][s] - again[tag][s]) for tag in full if tag.startswith("loss/") for s in steps]
    assert max(differences) <= RESUME_TOLERANCE, differences


def check_evaluations(run_dir: Path) -> None:
    """One record per evaluation step, set and fusion in RUN/results.jsonl (the eval CLI's format);
    the scalars and the heatmap in TensorBoard at both steps."""
    from eval.report import read_results

    records = read_results(run_dir / "results.jsonl")
    fusions = ["average", "average[0]", "average[1]", "average[2]", "average[3]", "average[4]"]  # H = 5
    for step in (HALF, STEPS):
        for name, task in (("heldout", "retrieval"), ("colours", "zeroshot")):
            mine = [r for r in records if r["training_eval"] == {"step": step, "set": name}]
            assert [r["fusion"]["label"] for r in mine] == fusions and {r["task"] for r in mine} == {task}
            assert all(r["checkpoint"]["config"]["training"]["step"] == step for r in mine)
    assert len(records) == 2 * 2 * len(fusions)  # nothing repeated across the resume
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step00000008", "step00000016"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("eval/heldout/average/all/t2i_R@1", "eval/heldout/average/raw/i2t_R@10",
                "eval/heldout/average[1]/style/t2i_R@5", "eval/colours/average/top1", "eval/colours/average[0]/top1"):
        assert tag in tags["scalars"], sorted(tags["scalars"])
        assert sorted({e.step for e in events.Scalars(tag)}) == [HALF, STEPS]
    zeroshot = {e.step: e.value for e in events.Scalars("eval/colours/average/top1")}
    assert zeroshot == pytest.approx({step: next(r["metrics"]["top1"] for r in records if r["task"] == "zeroshot"
                                                 and r["training_eval"]["step"] == step
                                                 and r["fusion"]["label"] == "average")
                                      for step in (HALF, STEPS)})
    heatmaps = events.Images("eval/heldout/branch_heatmap")
    assert sorted({e.step for e in heatmaps}) == [HALF, STEPS] and all(e.width > 400 for e in heatmaps)


def test_missing_text_id_fails_before_training(dataset, tmp_path):
    result = launch("tiny_m2m_cls", tmp_path / "run", dataset, sets=["data.text_ids=[raw, colour]"])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    message = f"error: data.text_ids: text id 'colour' is not in the dataset {dataset}"
    assert output.count(message) == 1, output[-4000:]
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_a_clear_message(dataset, tmp_path):
    # Without the launcher: `python -m train.main` runs one rank (the same program, world size 1).
    cmd = [sys.executable, "-m", "train.main", "--config", "train/configs/tiny_o2o.yaml",
           "--set", f"data.shards={dataset}", "--set", f"output_dir={tmp_path / 'run'}",
           "--set", "optim.lr=1.0e+30", "--set", "optim.warmup_steps=0"]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = run(cmd, env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("training stopped before the update") == 1, output[-4000:]
    assert "the loss is nan" in output or "the loss is inf" in output
    assert "The last checkpoint is none" in output and "Traceback" not in output


def test_logit_scale_is_clamped_on_the_parameter_under_every_zero_stage():
    """After a step that pushes it past ln 100, clamp_logit_scale brings the working parameter and
    the fp32 master copy (ZeRO 1-3) back to ln 100, and the next step starts from there: a clamp of
    the working copy alone would be undone by the master copy at the next step."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/logit_scale_check.py"]
    output = ok(run(cmd, {**ENV, "PYTHONPATH": str(ROOT)}))
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"stage"')]
    assert [r["stage"] for r in lines] == [0, 1, 2, 3], output[-4000:]
    for r in lines:
        top = float(torch.tensor(r["max"], dtype=torch.float32))  # ln 100 in the parameter's dtype
        (before, before_master), (after, after_master), (moved, moved_master) = r["before"], r["after"], r["moved"]
        assert before > top + 0.4  # the step went past the bound
        assert after == top and (after_master is None) == (r["stage"] == 0)
        if after_master is not None:
            assert after_master == top and before_master == before and moved_master == moved
        assert top < moved < top + 0.55  # one more step of at most lr, from the bound, not from `before`
