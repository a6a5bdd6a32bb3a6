"""Run under the deepspeed launcher by tests/test_train_launch.py: the trainer's logit-scale clamp
on the parameter after an optimizer step, under ZeRO 0, 1, 2 and 3 (fp32; the CPU accelerator
has no fp16). For each stage a step pushes the scale above ln 100; after clamp_logit_scale both
the working parameter and the optimizer's fp32 master copy (ZeRO 1-3) must be at ln 100, and the
next step must move it again (its gradient is not zero). Prints one JSON line per stage on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from train.main import clamp_logit_scale
from train.model import LOGIT_SCALE_MAX, HolisticCLIP, load_model_config


def full_value(engine) -> tuple[float, float | None]:
    """(working parameter, fp32 master copy or None), gathered (collective under ZeRO 3)."""
    p = engine.module.logit_scale
    master = safe_get_full_fp32_param(p)
    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
        working = float(p.data.float().reshape(-1)[0])
    return working, None if master is None else float(master.reshape(-1)[0])


def step(engine, images, tokens) -> None:
    out = engine(images, tokens)
    # Pushes the scale up; the embeddings join with weight 0 so every parameter takes part.
    loss = -out["logit_scale"].sum() + 0 * (out["image"].sum() + out["text"].sum())
    engine.backward(loss)
    engine.step()


def main() -> None:
    deepspeed.init_distributed()
    cfg = dataclasses.replace(load_model_config("tiny"), branch="cls", num_branches=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(1, 49406, (1, 2, 8), generator=g)
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = HolisticCLIP(cfg)
        with torch.no_grad():
            model.logit_scale.fill_(LOGIT_SCALE_MAX - 0.01)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.0)
        config = {"train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 2**31 - 1}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        step(engine, images, tokens)
        before = full_value(engine)
        clamp_logit_scale(engine)
        after = full_value(engine)
        step(engine, images, tokens)
        moved = full_value(engine)
        if dist.get_rank() == 0:
            print(json.dumps({"stage": stage, "max": LOGIT_SCALE_MAX, "before": before, "after": after,
                              "moved": moved}), flush=True)
        del engine, optimizer, model
    dist.barrier()
    # Leave without tearing down: after four engines in one process, the C++ teardown once ended
    # in "terminate called without an active exception" (exit 250) after every check had passed.
    # The trainer itself runs one engine and shuts down normally (train/main.py: _shutdown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
