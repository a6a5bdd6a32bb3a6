"""The GPU check's driver (run it through bench/gpu_check.sh, which brings the packages).

    python bench/gpu_check.py [--cpu] [--steps N] [--batch B] [--out DIR] [--peak-tflops T]

On synthetic multi-text shards it writes itself (tests/synthetic_data.py: 5 texts per image),
it runs the real trainer (`deepspeed --num_gpus 1`, ZeRO 1, bf16 as autocast with fp32 weights)
three times and the eval CLI once:

  1. Psi_CLS H=5 (m2m), stopped with --stop-at-step at half its steps, then resumed: the second
     launch must say it resumed there, log every later step, and end with an export;
  2. Psi_MLP H=5 (m2m);
  3. O2O (one embedding, the alt-text only);
  4. `python -m eval retrieval` on the Psi_CLS export, on held-out synthetic shards.

GPU mode: ViT-B/16 (train/model_configs/vit_b16.json) at 224 px. --cpu: the tiny model at 32 px,
a few steps, DS_ACCELERATOR=cpu (what CI runs).

It prints, per run: samples/s and step time (medians of the trainer's TensorBoard scalars
perf/samples_per_s and perf/step_s, without the first steps after each start), the share of
the step spent waiting for data, model FLOPs per sample and model FLOPs utilisation, and peak
memory; then the step-time ratio Psi_CLS H=5 / O2O. FLOPs: torch.utils.flop_counter's count of
one training step (forward + backward of model and loss, no optimizer; attention included) on a
batch of the same data (the trainer's text trimming included), per sample; MFU = FLOPs per
sample x samples/s / the GPU's dense bf16 peak (bench/train_throughput.py's table, or
--peak-tflops). Exits non-zero on any failure; the JSON of everything is OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from synthetic_data import make_synthetic_dataset  # noqa: E402
from train_throughput import free_port, peak_bf16, stream_for, training_flops  # noqa: E402

from train.data import make_loader  # noqa: E402

# name -> (config of train/configs without the size prefix, (branch, H, loss mode) for the FLOP count)
RUNS = {"Psi_CLS H=5": ("m2m_cls", ("cls", 5, "m2m")), "Psi_MLP H=5": ("m2m_mlp", ("mlp", 5, "m2m")),
        "O2O": ("o2o", ("none", 1, "o2o"))}
RESUMED = "Psi_CLS H=5"
# Steps after each start left out of the medians (allocator, cuBLAS heuristics, the loader's first fill).
SKIP_STEPS = {"gpu": 3, "cpu": 1}


class CheckFailed(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU: tiny model, 32 px, a few steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 200 on the GPU, 8 on the CPU)")
    parser.add_argument("--batch", type=int, help="images per step (default: 256 on the GPU, 16 on the CPU)")
    parser.add_argument("--workers", type=int, help="data loader workers (default: 12 on the GPU, 1 on the CPU)")
    parser.add_argument("--out", type=Path, help="keep everything here (default: a temporary directory, removed)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak in TFLOP/s, if not in the built-in table (or any, for --cpu)")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        results = check(args)
    except CheckFailed as e:
        print(f"\ngpu_check: FAILED after {time.perf_counter() - started:.0f} s: {e}", flush=True)
        return 1
    print(f"\ngpu_check: OK ({'cpu' if args.cpu else 'gpu'} mode, {results['elapsed_s']:.0f} s)", flush=True)
    return 0


def check(args) -> dict:
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device visible to torch (torch.cuda.is_available() is False); --cpu for the dry run")
    if gpu and not torch.cuda.is_bf16_supported():
        raise CheckFailed(f"{torch.cuda.get_device_name()} has no bf16; this check trains in bf16")
    size, model_name = ("vit_b16", "vit_b16") if gpu else ("tiny", "tiny")
    steps = args.steps or (200 if gpu else 8)
    skip = SKIP_STEPS["gpu" if gpu else "cpu"]
    batch = args.batch or (256 if gpu else 16)
    workers = args.workers if args.workers is not None else (min(12, max(1, (os.cpu_count() or 4) - 2)) if gpu else 1)
    if steps < 2 * (skip + 1):
        raise CheckFailed(f"--steps {steps}: at least {2 * (skip + 1)} (the resumed run is split in two halves)")
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"}
    # --peak-tflops also on the CPU: CI exercises the MFU arithmetic that way.
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16(machine["device"]) if gpu else None
    print(f"gpu_check: {'GPU' if gpu else 'CPU dry run'}: {machine}; model {model_name}; {steps} steps x {batch} "
          f"images; {workers} loader workers; peak bf16 {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}",
          flush=True)

    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for old in ("data", "eval_data", "runs", "eval", "logs"):  # a reused --out: start afresh (no resume)
        shutil.rmtree(out / old, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        image_size = 224 if gpu else 32
        data = make_synthetic_dataset(out / "data", shards=32 if gpu else 4, per_shard=64 if gpu else 32,
                                      size=image_size, seed=0)
        held_out = make_synthetic_dataset(out / "eval_data", shards=4 if gpu else 2, per_shard=64 if gpu else 32,
                                          size=image_size, seed=1)
        print(f"data: {data} and {held_out} written in {time.perf_counter() - t0:.0f} s", flush=True)
        env = trainer_env(gpu)
        common = [f"data.shards={data}", f"train.steps={steps}", f"train.global_batch_size={batch}",
                  f"train.micro_batch_size={batch}", "train.precision=bf16", "train.zero_stage=1",
                  f"data.num_workers={workers}", f"data.shuffle_buffer={1000 if gpu else 100}",
                  f"optim.warmup_steps={max(1, steps // 10)}", "log.every_steps=1", "log.progress_bar=false",
                  "checkpoint.keep_last=1", f"checkpoint.every_steps={steps // 2}"]
        results: dict = {"machine": machine, "mode": "gpu" if gpu else "cpu", "model": model_name, "steps": steps,
                         "batch": batch, "workers": workers, "peak_flops": peak, "runs": {}}
        for name, (config, _) in RUNS.items():
            run_dir = out / "runs" / config
            sets = [*common, f"output_dir={run_dir}", f"checkpoint.export={'true' if name == RESUMED else 'false'}"]
            if name == RESUMED:
                first = launch(f"{config} (to step {steps // 2})", f"{size}_{config}", sets, env, out,
                               ["--stop-at-step", str(steps // 2)])
                second = launch(f"{config} (resumed)", f"{size}_{config}", sets, env, out, [])
                results["resume"] = check_resume(run_dir, steps, first, second)
            else:
                launch(config, f"{size}_{config}", sets, env, out, [])
            row = read_run(run_dir, steps, skip, resumed_at=steps // 2 if name == RESUMED else None)
            results["runs"][name] = row
        results["eval"] = run_eval(out / "runs" / RUNS[RESUMED][0] / "export", held_out, gpu, out)
        print("counting FLOPs of one training step per design ...", flush=True)
        sample = next(iter(make_loader(stream_for(data, image_size, 4, 0))))
        for name, (_, design) in RUNS.items():
            row = results["runs"][name]
            one_text = {**sample, "tokens": sample["tokens"][:1]} if design[2] == "o2o" else sample
            row["train_flops_per_sample"] = training_flops(model_name, design, one_text)
            row["mfu"] = row["train_flops_per_sample"] * row["samples_per_s"] / peak if peak else None
            # The same without the data wait: what the model and the trainer reach when fed.
            row["mfu_compute"] = row["train_flops_per_sample"] * batch / row["compute_s"] / peak if peak else None
        base = results["runs"]["O2O"]
        results["ratio_cls_o2o"] = {key: results["runs"][RESUMED][key] / base[key] for key in ("step_s", "compute_s")}
        results["elapsed_s"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
        report(results, out if args.out else None)
        return results
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


def trainer_env(gpu: bool) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # This Python's bin first on PATH: DeepSpeed builds its ops with the `ninja` found there, and
    # alternating between two ninja versions rebuilds them every launch (tests/test_train_launch.py).
    env = {**os.environ, "PYTHONPATH": path, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if gpu:
        env["DS_ACCELERATOR"] = "cuda"  # fail loudly rather than fall back to the CPU
    else:
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")}
        env.pop("CUDA_VISIBLE_DEVICES", None)
    # The launch is decided by the deepspeed launcher's variables (train/launch.py): none may leak in.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(label: str, config: str, sets: list[str], env: dict, out: Path, extra: list[str]) -> str:
    """One trainer launch, one rank, through the deepspeed launcher; returns its output."""
    log_path = out / "logs" / f"{label.split()[0]}{'-resumed' if 'resumed' in label else ''}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    memory_file = out / "logs" / f"{log_path.stem}.memory"
    # On the GPU through the deepspeed launcher, as users run it. The CPU dry run starts the same
    # program without it (one rank either way; train/launch.py decides "single"): the launcher's
    # two extra Python start-ups per launch would double the dry run's time, and the launcher
    # itself is tested by tests/test_train_launch.py.
    launcher = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                 str(free_port())] if env["DS_ACCELERATOR"] == "cuda" else [sys.executable])
    cmd = [*launcher, "-m" if launcher == [sys.executable] else "--module", "bench.gpu_check_rank",
           "--config", f"train/configs/{config}.yaml", *[a for s in sets for a in ("--set", s)], *extra]
    print(f"trainer: {label} ...", flush=True)
    t = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env={**env, "GPU_CHECK_MEMORY_FILE": str(memory_file)},
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    log_path.write_text(output)
    if result.returncode:
        raise CheckFailed(f"trainer {label} exited with {result.returncode} (log {log_path}):\n{output[-4000:]}")
    print(f"trainer: {label} done in {time.perf_counter() - t:.0f} s", flush=True)
    peak = json.loads(Path(f"{memory_file}.0").read_text()) if Path(f"{memory_file}.0").exists() else {}
    run_dir = Path(next(s.split("=", 1)[1] for s in sets if s.startswith("output_dir=")))
    memory = run_dir / "peak_memory.json"  # the largest over this run's launches
    before = json.loads(memory.read_text()) if memory.exists() else {}
    memory.write_text(json.dumps({k: max(v, before.get(k, v)) if isinstance(v, int) else v
                                  for k, v in peak.items()}) + "\n")
    return output


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def read_run(run_dir: Path, steps: int, skip: int, resumed_at: int | None) -> dict:
    tb = scalars(run_dir)
    missing = [t for t in ("loss/total", "perf/samples_per_s", "perf/step_s", "perf/data_wait_s", "perf/compute_s")
               if t not in tb]
    if missing:
        raise CheckFailed(f"{run_dir}: TensorBoard scalars {missing} missing (found {sorted(tb)})")
    if sorted(tb["loss/total"]) != list(range(1, steps + 1)):
        raise CheckFailed(f"{run_dir}: loss logged at steps {sorted(tb['loss/total'])}, expected 1..{steps}")
    losses = tb["loss/total"]
    if not all(math.isfinite(v) for v in losses.values()):
        raise CheckFailed(f"{run_dir}: a non-finite loss was logged")
    starts = [0] if resumed_at is None else [0, resumed_at]
    measured = [s for s in range(1, steps + 1) if not any(start < s <= start + skip for start in starts)]

    def median(tag: str) -> float:
        return statistics.median(tb[tag][s] for s in measured)

    memory = json.loads((run_dir / "peak_memory.json").read_text())
    return {"samples_per_s": median("perf/samples_per_s"), "step_s": median("perf/step_s"),
            "data_wait_s": median("perf/data_wait_s"), "compute_s": median("perf/compute_s"),
            "first_loss": losses[1], "last_loss": losses[steps], "measured_steps": len(measured),
            "peak_memory": memory}


def check_resume(run_dir: Path, steps: int, first: str, second: str) -> dict:
    half = steps // 2
    if (run_dir / "export").exists() and "exported" in first:
        raise CheckFailed(f"the run stopped at step {half} exported (it should only checkpoint)")
    pointer = run_dir / "checkpoints" / "complete"
    if f"at step {half}" not in second or "resumed from" not in second:
        raise CheckFailed(f"the second launch did not resume at step {half}:\n{second[-3000:]}")
    config = json.loads((run_dir / "export" / "config.json").read_text())
    if config["training"]["step"] != steps:
        raise CheckFailed(f"the export is of step {config['training']['step']}, expected {steps}")
    return {"stopped_at": half, "resumed_at": half, "final_step": steps,
            "checkpoint": pointer.read_text().strip() if pointer.exists() else None}


def run_eval(export: Path, data: Path, gpu: bool, out: Path) -> dict:
    cmd = [sys.executable, "-m", "eval", "retrieval", "--checkpoint", str(export), "--data", str(data),
           "--out", str(out / "eval"), "--results", str(out / "eval" / "results.jsonl"), "--no-progress",
           "--device", "cuda" if gpu else "cpu", "--precision", "bf16" if gpu else "fp32", "--batch-size", "128"]
    print("eval: retrieval on the held-out shards ...", flush=True)
    t = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / "eval.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise CheckFailed(f"eval exited with {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    records = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines() if line]
    pooled = records[-1]["metrics"]["all"]
    return {"seconds": time.perf_counter() - t, "images": records[-1]["data"]["images"],
            "i2t_R@1": pooled["i2t"]["R@1"], "t2i_R@1": pooled["t2i"]["R@1"]}


def report(r: dict, out: Path | None) -> None:
    gib = 2**30
    print(f"\n## gpu_check: {r['machine']['device']}, torch {r['machine']['torch']}, CUDA {r['machine']['cuda']}; "
          f"{r['model']}, {r['steps']} steps x {r['batch']} images, bf16, ZeRO 1, 1 rank")
    print("\n| run | samples/s | step (ms) | data wait (ms) | compute (ms) | train GFLOP/sample | MFU (compute only) | "
          "peak memory | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in r["runs"].items():
        mem = row["peak_memory"]
        memory = (f"{mem['max_allocated_bytes'] / gib:.1f} GiB allocated ({mem['max_reserved_bytes'] / gib:.1f} "
                  "reserved)" if "max_allocated_bytes" in mem else f"{mem.get('max_rss_bytes', 0) / gib:.2f} GiB RSS")
        mfu = f"{row['mfu']:.1%} ({row['mfu_compute']:.1%})" if row.get("mfu") is not None else "n/a"
        print(f"| {name} | {row['samples_per_s']:.0f} | {row['step_s'] * 1e3:.1f} | {row['data_wait_s'] * 1e3:.1f} | "
              f"{row['compute_s'] * 1e3:.1f} | {row['train_flops_per_sample'] / 1e9:.2f} | {mfu} | {memory} | "
              f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} |")
    ratio = r["ratio_cls_o2o"]
    print(f"\nstep-time ratio Psi_CLS H=5 / O2O: {ratio['step_s']:.2f} (step), {ratio['compute_s']:.2f} (compute only)")
    res = r["resume"]
    print(f"resume: stopped at step {res['stopped_at']}, resumed there, continued to step {res['final_step']}, "
          "exported")
    ev = r["eval"]
    print(f"eval: retrieval on {ev['images']} held-out images, Psi_CLS export: pooled I2T R@1 {ev['i2t_R@1']:.3f}, "
          f"T2I R@1 {ev['t2i_R@1']:.3f} ({ev['seconds']:.0f} s)")
    if out:
        print(f"results: {out / 'gpu_check.json'} (logs: {out / 'logs'})")


if __name__ == "__main__":
    sys.exit(main())
