"""Training throughput (a benchmark, not a test).

    python bench/train_throughput.py [--steps 30] [--batch 32] [--threads 1] [--json out.json]

On the CPU (DS_ACCELERATOR=cpu is set for the launches), with the tiny model and the synthetic
dataset of the tests (M = 5 texts per image):
  1. the data pipeline alone: samples/s of MultiTextStream with 0, 1, 2 DataLoader workers;
  2. a plain PyTorch loop (model + loss + AdamW on in-memory batches): step time for H = 1
     (O2M), Psi_CLS H = 5 and Psi_MLP H = 5, i.e. what the branches cost;
  3. the trainer itself (`deepspeed --num_gpus N --module train.main`, ZeRO 0, fp32): samples/s, step
     time split into data wait and compute, read back from its TensorBoard scalars; against (2)
     this is the DeepSpeed overhead for the same model and batch.
With a CUDA GPU, also ViT-B/16 (224 px, bf16): the plain loop's samples/s and model FLOPs
utilisation (FLOPs of one training step counted by torch's FlopCounterMode, over the GPU's
dense bf16 peak), and the trainer on 224 px synthetic data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from synthetic_data import TEXT_IDS, make_synthetic_dataset  # noqa: E402

from train.config import DataSection  # noqa: E402
from train.data import MultiTextStream, make_loader, resolve_sources  # noqa: E402
from train.loss import MultiTextContrastiveLoss  # noqa: E402
from train.model import HolisticCLIP, load_model_config, param_groups  # noqa: E402
from train.step import Precision, to_device  # noqa: E402
from train.tokenizer import load_tokenizer  # noqa: E402
from train.transform import normalize  # noqa: E402

DESIGNS = {"o2m (H=1)": ("none", 1, "o2m"), "cls (H=5)": ("cls", 5, "m2m"), "mlp (H=5)": ("mlp", 5, "m2m")}
CONFIGS = {"o2m (H=1)": "o2m", "cls (H=5)": "m2m_cls", "mlp (H=5)": "m2m_mlp"}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched as substrings of
# torch.cuda.get_device_name() in this order: the PCIe/NVL cards before the SXM parts they contain
# the name of ("NVIDIA H200 NVL" is 835, "NVIDIA H200" 989), A100 before A10.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_bf16(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def stream_for(root: Path, image_size: int, batch: int, workers: int) -> MultiTextStream:
    data = DataSection(shards=(str(root),), text_ids=TEXT_IDS, num_workers=workers, shuffle_buffer=500)
    urls = [u for s in resolve_sources(data.shards) for u in s.urls]
    tokenizer = load_tokenizer(
        "clip", context_length=load_model_config("tiny" if image_size == 32 else "vit_b16").context_length)
    return MultiTextStream(urls, data, tokenizer, image_size, batch, segment_batches=10**6)


def bench_data(root: Path, batch: int, batches: int) -> dict:
    out = {}
    for workers in (0, 1, 2):
        it = iter(make_loader(stream_for(root, 32, batch, workers)))
        next(it)  # start-up and the shuffle buffer's first fill
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        out[f"{workers} workers"] = round(batches * batch / (time.perf_counter() - t), 1)
        del it
    return out


def plain_loops(model_name: str, batches, steps: int, device: str, dtype, grad_clip: float | None = 1.0) -> dict:
    """Model + loss + AdamW (+ gradient clipping, as the tiny configs), as the trainer computes
    them, without DeepSpeed. `batches`: a list (in memory) or a live loader iterator (its worker
    then competes for the CPU as in the trainer; the wait for it is not timed).

    The designs take turns step by step, so a change in the machine's load hits them alike;
    per design the median and the fastest step are reported.
    """
    runs = {}
    for design, (branch, h, mode) in DESIGNS.items():
        torch.manual_seed(0)
        model = HolisticCLIP(dataclasses.replace(load_model_config(model_name), branch=branch,
                                                 num_branches=h)).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                      fused=device == "cuda")
        runs[design] = (model, MultiTextContrastiveLoss(mode), optimizer, [])
    size = None
    for i in range(steps + 3):
        batch = batches[i % len(batches)] if isinstance(batches, list) else next(batches)
        size = len(batch["images"])
        for model, loss_fn, optimizer, times in runs.values():
            sync(device)
            t = time.perf_counter()
            images, tokens = to_device(batch, torch.device(device), Precision(None))  # uint8 -> normalised
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out = model(images, tokens)
                loss = loss_fn(out["image"], out["text"], out["logit_scale"])["loss"]
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t)
    return {design: {"step_s": statistics.median(times), "min_step_s": min(times),
                     "samples_per_s": size / statistics.median(times)}
            for design, (_, _, _, times) in runs.items()}


def training_flops(model_name: str, design: str | tuple[str, int, str], batch: dict) -> float:
    """FLOPs of one forward + backward, per sample, counted on the CPU for 2 samples.

    design: a key of DESIGNS or (branch, H, loss mode). Attention runs on the math backend here:
    FlopCounterMode has no formula for the CPU's fused attention kernel and would count it as 0.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    branch, h, mode = DESIGNS[design] if isinstance(design, str) else design
    model = HolisticCLIP(dataclasses.replace(load_model_config(model_name), branch=branch, num_branches=h))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(normalize(batch["images"][:2].cpu()), [t[:2].cpu() for t in batch["tokens"]])
        MultiTextContrastiveLoss(mode)(out["image"], out["text"], out["logit_scale"])["loss"].backward()
    return counter.get_total_flops() / 2


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(config: str, data: Path, out: Path, ranks: int, micro: int, steps: int, sets: list[str], env: dict) -> dict:
    """Launch the real trainer and read its per-step scalars (steps after the first 3)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--module", "train.main", "--config", f"train/configs/{config}.yaml", "--set", f"data.shards={data}",
           "--set", f"output_dir={out}", "--set", f"train.steps={steps + 3}",
           "--set", f"train.micro_batch_size={micro}",
           "--set", f"train.global_batch_size={micro * ranks}", "--set", "checkpoint.every_steps=100000",
           "--set", "checkpoint.export=false", "--set", "log.progress_bar=false", "--set", "log.every_steps=1",
           "--set", "data.num_workers=1", "--set", "data.shuffle_buffer=500", *[a for s in sets for a in ("--set", s)]]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode:
        raise RuntimeError(f"trainer failed:\n{(result.stdout + result.stderr)[-4000:]}")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    values = {tag: [e.value for e in events.Scalars(tag)][3:]
              for tag in ("perf/step_s", "perf/data_wait_s", "perf/compute_s")}
    step = statistics.median(values["perf/step_s"])
    return {"samples_per_s": micro * ranks / step, "step_s": step,
            "data_wait_s": statistics.median(values["perf/data_wait_s"]),
            "compute_s": statistics.median(values["perf/compute_s"]), "min_compute_s": min(values["perf/compute_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per configuration")
    parser.add_argument("--batch", type=int, default=32, help="images per step per rank (tiny model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank trainer run")
    parser.add_argument("--gpu-batch", type=int, default=128, help="images per step for ViT-B/16 on a GPU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in list")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "torch": torch.__version__, "threads": args.threads,
                                 "gpu": torch.cuda.get_device_name() if cuda else None}}

    with tempfile.TemporaryDirectory(prefix="hcbench") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_dataset(tmp / "data", shards=16, per_shard=64)
        print("data pipeline (tiny, 32 px, M=5) ...", flush=True)
        results["data_samples_per_s"] = bench_data(data, args.batch, 20)

        # In-memory batches, so the plain loop measures compute only.
        it = iter(make_loader(stream_for(data, 32, args.batch, 0)))
        batches = [next(it) for _ in range(4)]
        print("plain loop, tiny, all designs in turn ...", flush=True)
        results["plain_cpu"] = plain_loops("tiny", batches, args.steps, "cpu", torch.float32)
        for design in DESIGNS:
            results["plain_cpu"][design]["train_flops_per_sample"] = training_flops("tiny", design, batches[0])
        # The same, fed by a DataLoader with one worker, as the 1-rank trainer runs below: the
        # fair baseline for the trainer (the worker's decoding competes for the same cores).
        print("plain loop with a loader worker, tiny, all designs in turn ...", flush=True)
        live = iter(make_loader(stream_for(data, 32, args.batch, 1)))
        results["plain_cpu_loader"] = plain_loops("tiny", live, args.steps, "cpu", torch.float32)
        del live

        # Each trainer configuration twice, in turns; the less disturbed of the two runs is kept.
        results["trainer"] = {}
        for attempt in range(2):
            for design, config in CONFIGS.items():
                print(f"trainer, 1 rank, tiny, {design}, run {attempt + 1} ...", flush=True)
                row = trainer(f"tiny_{config}", data, tmp / f"run1_{config}_{attempt}", 1, args.batch, args.steps,
                              ["train.zero_stage=0", "train.precision=fp32"], env)
                key = f"1 rank, {design}"
                if key not in results["trainer"] or row["min_compute_s"] < results["trainer"][key]["min_compute_s"]:
                    results["trainer"][key] = row
        print(f"trainer, {args.ranks} ranks, tiny, cls (H=5) ...", flush=True)
        results["trainer"][f"{args.ranks} ranks, cls (H=5)"] = trainer(
            "tiny_m2m_cls", data, tmp / "run2", args.ranks, args.batch, args.steps,
            ["train.zero_stage=0", "train.precision=fp32"], env)

        if cuda:
            results["gpu"] = bench_gpu(args, tmp, env)

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def bench_gpu(args, tmp: Path, env: dict) -> dict:
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16(name)
    data = make_synthetic_dataset(tmp / "data224", shards=16, per_shard=64, size=224)
    it = iter(make_loader(stream_for(data, 224, args.gpu_batch, 2)))
    batches = [next(it) for _ in range(2)]
    out = {}
    print("plain loop, vit_b16, all designs in turn, bf16 ...", flush=True)
    for design, row in plain_loops("vit_b16", batches, args.steps, "cuda", torch.bfloat16, grad_clip=None).items():
        row["train_flops_per_sample"] = training_flops("vit_b16", design, batches[0])
        if peak:
            row["mfu"] = row["train_flops_per_sample"] * row["samples_per_s"] / peak
        out[f"plain, {design}"] = row
    for design, config in CONFIGS.items():
        print(f"trainer, vit_b16, {design}, bf16, ZeRO 1 ...", flush=True)
        row = trainer(f"vit_b16_{config}", data, tmp / f"gpu_{config}", torch.cuda.device_count(), args.gpu_batch,
                      args.steps, ["train.zero_stage=1", "data.num_workers=4"], env)
        if peak:
            row["mfu"] = (out[f"plain, {design}"]["train_flops_per_sample"] * row["samples_per_s"]
                          / torch.cuda.device_count() / peak)
        out[f"trainer, {design}"] = row
    return out


def report(r: dict) -> None:
    print("\n## Results", json.dumps(r["machine"]))
    print("\ndata pipeline alone, samples/s:", r["data_samples_per_s"])
    base, base_min = r["plain_cpu"]["o2m (H=1)"]["step_s"], r["plain_cpu"]["o2m (H=1)"]["min_step_s"]
    print("\n| plain PyTorch loop, tiny, CPU | step median (ms) | step min (ms) | samples/s | vs H=1 (median / min) | "
          "train GFLOP/sample |")
    print("|---|---|---|---|---|---|")
    for design, row in r["plain_cpu"].items():
        print(f"| {design} | {row['step_s'] * 1e3:.1f} | {row['min_step_s'] * 1e3:.1f} | {row['samples_per_s']:.0f} | "
              f"{row['step_s'] / base - 1:+.1%} / {row['min_step_s'] / base_min - 1:+.1%} | "
              f"{row['train_flops_per_sample'] / 1e9:.3f} |")
    print("\n| trainer (DeepSpeed), tiny | samples/s | step (ms) | data wait (ms) | compute (ms) | compute min (ms) | "
          "vs plain loop with loader (median / min) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in r["trainer"].items():
        design = name.split(", ", 1)[1]
        plain = r["plain_cpu_loader"][design]
        overhead = (f"{row['compute_s'] / plain['step_s'] - 1:+.1%} / "
                    f"{row['min_compute_s'] / plain['min_step_s'] - 1:+.1%}" if name.startswith("1 rank") else "n/a")
        print(f"| {name} | {row['samples_per_s']:.0f} | {row['step_s'] * 1e3:.1f} | {row['data_wait_s'] * 1e3:.1f} | "
              f"{row['compute_s'] * 1e3:.1f} | {row['min_compute_s'] * 1e3:.1f} | {overhead} |")
    print("\n| plain loop + 1 loader worker, tiny | step median (ms) | step min (ms) |\n|---|---|---|")
    for design, row in r["plain_cpu_loader"].items():
        print(f"| {design} | {row['step_s'] * 1e3:.1f} | {row['min_step_s'] * 1e3:.1f} |")
    if "gpu" in r:
        print("\n| ViT-B/16, bf16, GPU | samples/s | step (ms) | MFU |\n|---|---|---|---|")
        for name, row in r["gpu"].items():
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
            print(f"| {name} | {row['samples_per_s']:.0f} | {row['step_s'] * 1e3:.1f} | {mfu} |")


if __name__ == "__main__":
    main()
