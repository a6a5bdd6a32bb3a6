"""Train a Holistic CLIP with DeepSpeed.

    deepspeed --num_gpus 8 --module train.main --config train/configs/vit_b16_m2m_cls.yaml
    deepspeed --hostfile hosts --master_addr node1 --module train.main --config ...      (multi-node)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module train.main --config ...          (CPU, gloo)

Options: --set section.key=value (repeatable, YAML values), --resume auto|none|PATH,
--stop-at-step N (checkpoint and exit after step N, e.g. before a job's time limit).

The model, loss and data pipeline are plain PyTorch (model.py, loss.py, data.py); DeepSpeed
only appears here (engine set-up, the step) and in checkpoint.py. docs/training.md describes
the config, the outputs and how exact a resumed run is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from train import checkpoint
from train.config import ConfigError, TrainConfig, load_config
from train.data import (
    DataCounts,
    DataError,
    MultiTextStream,
    check_text_ids,
    describe_counts,
    make_loader,
    resolve_sources,
)
from train.distributed import Bookkeeping
from train.evaluation import Evaluation
from train.export import ExportError, add_branch_profile_or_warn, export_checkpoint, probe_inputs
from train.launch import Launch, LaunchError, decide
from train.loss import MultiTextContrastiveLoss
from train.metrics import Metrics
from train.model import (
    LOGIT_SCALE_MAX,
    HolisticCLIP,
    ModelConfig,
    count_parameters,
    load_model_config,
    param_groups,
)
from train.openclip import ConversionError, init_from_openclip
from train.schedule import make_scheduler
from train.step import NonFiniteLoss, Precision, run_step, to_device
from train.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- set-up


def build_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model size from its JSON, the branch design from the training config, and the text
    side (vocabulary, pooling, padding) from the tokenizer, so the three always agree."""
    base = load_model_config(cfg.model.config)
    changes: dict[str, Any] = {"branch": cfg.model.branch, "num_branches": cfg.num_branches}
    if cfg.model.mlp_branch_layers is not None:
        changes["mlp_branch_layers"] = cfg.model.mlp_branch_layers
    changes |= {"vocab_size": tokenizer.vocab_size, "text_pool": tokenizer.text_pool,
                "pad_token_id": tokenizer.pad_token_id}
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    t = cfg.train
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        # bf16 is autocast around the forward (train/step.py): DeepSpeed keeps fp32 weights and
        # gradients and reduces them in fp32. Its own bf16 mode would keep bf16 weights and
        # reduce and accumulate gradients in bf16 (docs/training.md#precision).
        "bf16": {"enabled": False},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # torch's AdamW as the client optimizer: it runs everywhere and needs no DeepSpeed op
        # compiled with g++ on first use (cpu_adam / fused_adam); "untested" is DeepSpeed's word
        # for any optimizer it does not ship.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
    }
    return _merge(config, t.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def data_layout(cfg: TrainConfig, world_size: int, urls: list[str], image_size: int, tokenizer: str) -> dict[str, Any]:
    """Everything the data stream depends on: if any of it changes, a resumed stream cannot
    continue the saved one exactly (docs/training.md)."""
    d = cfg.data
    return {
        "world_size": world_size, "num_workers": d.num_workers, "micro_batch_size": cfg.train.micro_batch_size,
        "gradient_accumulation": cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size),
        "segment_steps": cfg.segment_steps, "seed": cfg.train.seed, "resampled": d.resampled,
        "shuffle_buffer": d.shuffle_buffer, "text_ids": list(d.text_ids), "fallback_text_id": d.fallback_text_id,
        "drop_flags": list(d.drop_flags), "crop_scale": list(d.crop_scale), "image_size": image_size,
        "tokenizer": tokenizer, "shards_sha256": hashlib.sha256("\n".join(urls).encode()).hexdigest(),
    }


def release_shm_buffer(rank: int) -> None:
    """Remove the name of DeepSpeed's CPU all-reduce buffer of this rank.

    DeepSpeed 0.19's CPU accelerator creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> (69 MB of memory) for each rank of a single-node job and never removes it, so
    every launch leaks memory until /dev/shm is full. init_distributed has mapped every rank's
    buffer once all ranks pass a barrier; the mappings outlive the name, so it can go now.
    """
    import torch.distributed as dist

    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if path.exists():
        dist.barrier()
        path.unlink(missing_ok=True)


def extensions_dir() -> Path:
    """Where torch builds DeepSpeed's JIT ops (on the CPU accelerator: its shared-memory comm op).

    Default: next to the Python environment (<venv>/torch_extensions), so two checkouts or
    environments never share, and rebuild, one build folder (torch's default,
    ~/.cache/torch_extensions, is keyed by Python and torch version only). TORCH_EXTENSIONS_DIR
    wins when set; a read-only environment keeps torch's default.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


@contextlib.contextmanager
def warn_if_waiting_for_a_build(after_s: float = 120.0):
    """torch waits without a word, and forever, while an op's build folder holds a `lock` file; a
    build that was killed leaves that file behind. Say which file after `after_s` seconds."""
    root = extensions_dir()
    done = threading.Event()

    def watch() -> None:
        if done.wait(after_s):
            return
        for lock in sorted(root.glob("*/*/lock")):
            log.warning("still waiting for %s: DeepSpeed is building an op there, or a build that was killed "
                        "left this lock. If no build runs (no ninja or cc1plus process), delete the file.", lock)

    threading.Thread(target=watch, daemon=True, name="build-lock-watch").start()
    try:
        yield
    finally:
        done.set()


def resume_path(resume: str, checkpoint_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.latest(checkpoint_dir)
    return checkpoint.resolve(resume)


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, resume: str = "auto", stop_at_step: int | None = None) -> None:
    run_dir = Path(cfg.output_dir)
    checkpoint_dir = run_dir / "checkpoints"

    # Everything a user can get wrong is checked before DeepSpeed is even imported.
    base_cfg = load_model_config(cfg.model.config)
    tokenizer = load_tokenizer(cfg.model.tokenizer, context_length=base_cfg.context_length)
    model_cfg = build_model_config(cfg, tokenizer)
    sources = resolve_sources(cfg.data.shards)
    urls = [url for source in sources for url in source.urls]
    data_warnings = (check_text_ids(sources, cfg.data.text_ids, cfg.data.fallback_text_id)
                     if cfg.data.check_text_ids else [])
    start_from = resume_path(resume, checkpoint_dir)
    if cfg.model.init and not Path(cfg.model.init).is_file():
        raise ConfigError(f"model.init: {cfg.model.init} is not a file")
    for key, s in [*((f"eval.zeroshot[{i}]", s) for i, s in enumerate(cfg.eval.zeroshot)),
                   *((f"eval.retrieval[{i}]", s) for i, s in enumerate(cfg.eval.retrieval))]:
        for field in ("data", "classnames", "templates"):
            value = getattr(s, field, None)
            if value and not Path(value).exists():
                raise ConfigError(f"{key}.{field}: {value} does not exist")

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if cfg.train.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError("train.precision: fp16 is not supported by DeepSpeed on the "
                          f"{get_accelerator().device_name()} accelerator; use bf16 or fp32")
    with warn_if_waiting_for_a_build():
        deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    release_shm_buffer(rank)
    books = Bookkeeping()  # host-side numbers on a group that serves the CPU (train/distributed.py)
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of train.micro_batch_size x "
            f"ranks ({cfg.train.micro_batch_size} x {world_size})"
        )
    accumulation = cfg.train.global_batch_size // per_step
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for warning in data_warnings:
            log.warning("data: %s", warning)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = HolisticCLIP(model_cfg)
    if cfg.model.init and start_from is None:
        try:
            init_from_openclip(model, cfg.model.init)
        except ConversionError as e:
            raise ConfigError(f"model.init: {e}") from None
        if rank == 0:
            log.info("model: initialised from the OpenCLIP checkpoint %s", cfg.model.init)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    num_parameters = count_parameters(model)  # before ZeRO-3 partitions them away
    o = cfg.optim
    device_type = get_accelerator().device_name()
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=device_type == "cuda")
    scheduler = make_scheduler(optimizer, o.warmup_steps, cfg.train.steps, o.lr, o.min_lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if cfg.train.compile:
        engine.compile()
    precision = Precision.named(cfg.train.precision)
    device = torch.device(engine.device)
    layout = data_layout(cfg, world_size, urls, model_cfg.image_size, cfg.model.tokenizer)
    log.info("model %s, branch %s, H=%d, %.1fM parameters; %d ranks x %d images x %d accumulation (%s); "
             "ZeRO %d, %s", cfg.model.config, model_cfg.branch, model_cfg.num_branches, num_parameters / 1e6,
             world_size, cfg.train.micro_batch_size, accumulation, cfg.train.accumulation, cfg.train.zero_stage,
             cfg.train.precision)

    step, start_batch, salt = 0, 0, 0
    if start_from is not None:
        state = checkpoint.load(engine, start_from)
        step = state["step"]
        saved = state["data"]
        if saved["layout"] == layout:
            start_batch, salt = saved["micro_batches"], saved["salt"]
        else:
            changed = sorted(k for k in layout if saved["layout"].get(k) != layout[k])
            salt = step  # a fresh stream, seeded differently from every earlier one
            if rank == 0:
                log.warning("data: %s changed since the checkpoint; the data stream restarts with new seeds "
                            "(the run continues, but not on the samples it would have seen)", changed)
        if rank == 0:
            log.info("resumed from %s at step %d (data stream at micro-batch %d)", start_from, step, start_batch)

    stream = MultiTextStream(
        urls, cfg.data, tokenizer, model_cfg.image_size, cfg.train.micro_batch_size, rank=rank,
        world_size=world_size, seed=cfg.train.seed, segment_batches=cfg.segment_steps * accumulation,
        start_batch=start_batch, salt=salt,
    )
    batches = iter(make_loader(stream, pin_memory=device_type == "cuda"))
    data_counts = DataCounts(stream.count_keys)
    loss_fn = MultiTextContrastiveLoss(cfg.loss.mode, cfg.loss.diversity_weight, cfg.loss.diversity_margin)
    last_step = min(cfg.train.steps, stop_at_step or cfg.train.steps)
    metrics = Metrics(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard, progress_bar=cfg.log.progress_bar,
                      total_steps=cfg.train.steps, start_step=step)
    text_ids = list(cfg.data.text_ids)
    first_step = step
    evaluation = Evaluation(cfg.eval, run_dir, cfg.train.steps, model_cfg.num_branches, str(device))

    def client_state() -> dict[str, Any]:
        return {
            "step": step, "zero_stage": cfg.train.zero_stage,
            "data": {"micro_batches": start_batch + (step - first_step) * accumulation, "salt": salt, "layout": layout},
            "model_config": dataclasses.asdict(model_cfg), "text_ids": text_ids, "tokenizer": cfg.model.tokenizer,
            "training": {"step": step, "model": cfg.model.config, "loss": cfg.loss.model_dump(),
                         "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
                         "data": list(cfg.data.shards), "config": cfg.to_dict()},
        }

    def empty_window() -> dict[str, Any]:  # what is averaged between two log lines
        return {"time": 0.0, "wait": 0.0, "steps": 0, "losses": 0.0}

    def export_and_evaluate(path: Path) -> None:
        """RUN/exports/<tag> of the checkpoint just saved (or resumed from), and the evaluation due there."""
        if not (cfg.checkpoint.export_every or evaluation.due(step)):
            return
        target = run_dir / "exports" / path.name
        export_run(engine, precision, tokenizer, model_cfg, target, path, rank, profile=evaluation.needs_profile)
        if rank == 0:
            if cfg.checkpoint.keep_last:
                for old in sorted(p.name for p in target.parent.iterdir() if p.is_dir())[:-cfg.checkpoint.keep_last]:
                    shutil.rmtree(target.parent / old, ignore_errors=True)
            evaluation.run(step, target, metrics.writer)
        dist.barrier()  # the other ranks wait for rank 0's evaluation

    if start_from is not None and evaluation.due(step):  # killed between the checkpoint and its evaluation?
        missing = [bool(evaluation.pending(step))] if rank == 0 else [None]
        dist.broadcast_object_list(missing, src=0)  # only rank 0 reads RUN/results.jsonl
        if missing[0]:
            export_and_evaluate(start_from)
    window = empty_window()
    engine.train()
    while step < last_step:
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        inputs = []
        for _ in range(accumulation):
            t = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - t
            data_counts.update(batch)
            inputs.append(to_device(batch, device, precision))
        try:
            result = run_step(engine, inputs, loss_fn, precision, device, books, cfg.train.accumulation)
        except NonFiniteLoss as e:
            values = e.args[0]  # [total, per text type..., diversity]
            raise NonFiniteLoss(
                f"step {step + 1}: the loss is {values[0]} "
                f"(per text type {dict(zip(text_ids, values[1:-1], strict=True))}); "
                "training stopped before the update. The last checkpoint is "
                f"{checkpoint.latest(checkpoint_dir) or 'none'}. Lower optim.lr, raise optim.warmup_steps, "
                "set optim.grad_clip, or use bf16 instead of fp16, then resume."
            ) from None
        clamp_logit_scale(engine)
        step += 1
        window["time"] += time.perf_counter() - started
        window["steps"] += 1
        window["losses"] = window["losses"] + torch.tensor(result.losses, dtype=torch.float64)
        metrics.advance()

        if step % cfg.log.every_steps == 0 or step == last_step:
            counts = books.sum(data_counts.vector())
            # Means over the steps since the last log line.
            n, total, losses = window["steps"], window["time"], (window["losses"] / window["steps"]).tolist()
            scalars = {
                "loss/total": losses[0],
                **{f"loss/{t}": v for t, v in zip(text_ids, losses[1:-1], strict=True)},
                **({"loss/diversity": losses[-1]} if cfg.loss.diversity_weight > 0 else {}),
                "train/logit_scale": result.logit_scale,
                "train/lr": lr,
                "perf/samples_per_s": n * cfg.train.global_batch_size / total,
                "perf/step_s": total / n,
                "perf/data_wait_s": window["wait"] / n,
                "perf/compute_s": (total - window["wait"]) / n,
                **{f"data/{k}": v for k, v in zip(stream.count_keys, counts.tolist(), strict=True)},
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            metrics.log(step, scalars)
            window = empty_window()

        if step % cfg.checkpoint.every_steps == 0 or step == last_step:
            path = checkpoint.save(engine, checkpoint_dir, step, client_state(), cfg.checkpoint.keep_last)
            if rank == 0:
                metrics.write(f"step {step}: loss {result.losses[0]:.4f}, checkpoint {path}")
            export_and_evaluate(path)

    if step == cfg.train.steps and cfg.checkpoint.export:  # the last step always checkpoints
        final = checkpoint_dir / checkpoint.tag_for(step)
        export_run(engine, precision, tokenizer, model_cfg, run_dir / "export", final, rank)
    counts = books.sum(data_counts.vector())
    problems = books.gather(data_counts.problems())
    metrics.close()
    if rank == 0:
        for problem in sorted({p for ps in problems for p in ps}):
            log.warning("data: %s", problem)
        log.info("data: %s", describe_counts(dict(zip(stream.count_keys, counts.tolist(), strict=True))))
        log.info("stopped at step %d of %d; checkpoints in %s", step, cfg.train.steps, checkpoint_dir)


def clamp_logit_scale(engine) -> None:
    """Keep the logit scale in [0, ln 100] on the parameter after each optimizer step, as OpenCLIP
    and EVA-CLIP do (a clamp in the forward pass would zero its gradient for good once it passed).

    The optimizer updates an fp32 master copy where DeepSpeed keeps one (ZeRO 1-3, and the fp16
    mode, which needs ZeRO >= 1 here) and copies it into the working parameter, so both are
    clamped. Only this rank's pieces are touched: no collective, no synchronisation.
    """
    p = engine.module.logit_scale
    with torch.no_grad():
        if hasattr(p, "ds_id"):  # ZeRO-3: both copies are partitioned across ranks
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(p)
            if master is not None and master.numel():
                safe_set_local_fp32_param(p, master.clamp(0, LOGIT_SCALE_MAX))
            p.ds_tensor.data.clamp_(0, LOGIT_SCALE_MAX)
            return
        p.data.clamp_(0, LOGIT_SCALE_MAX)
        mapping = getattr(p, "_hp_mapping", None)  # ZeRO 1-2: this rank's fragment of the master copy
        if mapping is not None and mapping.hp_fragment.numel():
            mapping.hp_fragment.data.clamp_(0, LOGIT_SCALE_MAX)


def export_run(engine, precision: Precision, tokenizer: Tokenizer, model_cfg: ModelConfig, target: Path,
               final: Path, rank: int, profile: bool = True) -> None:
    """An export (RUN/export, or RUN/exports/<tag>) of a checkpoint the live engine holds, with a
    probe computed by the engine.

    The probe forward is collective under ZeRO-3 (parameters are gathered), so every rank runs
    it; rank 0 converts the checkpoint (zero_to_fp32 for ZeRO >= 1) and writes the export. It
    runs in the weights' dtype without autocast: fp32 (bf16 runs keep fp32 weights), so the probe
    is what the exported fp32 weights compute.
    """
    import torch.distributed as dist

    images, tokens = probe_inputs(tokenizer, model_cfg.image_size)
    engine.eval()
    with torch.no_grad():
        out = engine(images.to(engine.device, precision.weights), tokens.to(engine.device))
    engine.train()
    if rank == 0:
        weights, state = checkpoint.consolidated_state_dict(final)
        probe = {"images": images, "tokens": tokens, "image_embeddings": out["image"].float().cpu(),
                 "text_embeddings": out["text"].float().cpu()}
        target = export_checkpoint(target, weights, model_cfg, text_ids=state["text_ids"],
                                   tokenizer=state["tokenizer"], training=state["training"], probe=probe)
        if profile:
            add_branch_profile_or_warn(target, device=engine.device)  # adaptive fusion's profile (issue 19)
        log.info("exported %s -> %s", final, target)
    dist.barrier()


# ----------------------------------------------------------------------------- entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepspeed --module train.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config YAML (train/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default): the latest checkpoint in OUTPUT/checkpoints if any; 'none'; "
                             "or a checkpoint path")
    parser.add_argument("--stop-at-step", type=int, help="checkpoint and exit after this step (the run can be resumed)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser.parse_args(argv)


def _join_launch() -> Launch:
    """Which rank this process is, from the launcher's variables (train/launch.py), exported for
    torch.distributed's env:// rendezvous and DeepSpeed. Without a launcher: one rank."""
    launch = decide(os.environ)
    os.environ.update(launch.env())
    return launch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        launch = _join_launch()
    except LaunchError as e:  # every process prints it: none knows its rank
        print(f"error: launch: {e}", file=sys.stderr, flush=True)
        return 2
    # `kill -USR1 <pid>` prints every thread's stack: the first thing to look at when a rank hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rank = launch.rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if rank == 0:
        log.info("launch: %s, rank %d of %d (local %d of %d), rendezvous %s:%d", launch.launcher, rank,
                 launch.world_size, launch.local_rank, launch.local_world_size, launch.master_addr, launch.master_port)
        for note in launch.notes:
            log.warning("launch: %s", note)
    try:
        cfg = load_config(args.config, args.set)
        train(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    except (ConfigError, DataError, ExportError, checkpoint.CheckpointError, NonFiniteLoss) as e:
        # A problem the user can fix: one clear message (from rank 0), no traceback. No barrier:
        # a rank that failed alone must not wait for the others; the launcher stops them.
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _shutdown(barrier=False)
        return 1 if isinstance(e, NonFiniteLoss) else 2
    _shutdown(barrier=True)
    return 0


def _shutdown(barrier: bool) -> None:
    # Barrier, then destroy: without it ZeRO-3 runs can abort at exit (docs/environment.md#deepspeed).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
