"""One optimizer step: mixed precision, contrastive-exact gradient accumulation, the loss check.

Plain PyTorch over a small engine interface, so tests run it without DeepSpeed:
`engine(images, tokens) -> {"image", "text", "logit_scale"}`, `engine.backward(loss,
scale_wrt_gas=...)` and `engine.step()` (a no-op before the last micro-batch of a step, as
DeepSpeed's). The DeepSpeed engine is one; tests use a plain module with the same three calls.

Gradient accumulation (train.accumulation, docs/training.md#gradient-accumulation):
- "exact" (default): the contrastive loss of a step is the loss of the whole global batch, as if
  it fitted in one forward. First every micro-batch is embedded without a graph; the loss of
  the rank's rows against every rank's columns is computed from those embeddings (that is the
  logged loss, checked before any backward). Then each micro-batch is embedded again with a
  graph, put in place of its cached embeddings, and the loss is backpropagated: its gradient
  reaches only that micro-batch's embeddings, so the sum over micro-batches is the gradient of
  the full-batch loss. The logit scale's gradient is taken 1/accumulation times per pass. Cost:
  one extra forward of every micro-batch (about a third more compute), no extra activations.
  This is OpenCLIP's --accum-freq, with the logit scale counted once rather than once per pass.
- "independent": each micro-batch is its own contrastive batch (micro_batch_size x ranks
  negatives) and the step averages their gradients. Cheaper, but a different objective: the
  first-step loss follows ln(micro x ranks), not ln(global batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .distributed import Bookkeeping
from .loss import MultiTextContrastiveLoss
from .transform import normalize

ACCUMULATION_MODES = ("exact", "independent")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops rather than corrupt the weights.

    args[0] is the list [total, per text type..., diversity] that was not finite.
    """


@dataclasses.dataclass
class StepResult:
    losses: list[float]  # [total, one per text type, diversity]: the global batch's (mean over ranks)
    logit_scale: float


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a step computes. compute: the autocast dtype (None: as the weights); weights: the
    dtype the engine's parameters are in (fp16 only under DeepSpeed's fp16 mode)."""

    compute: torch.dtype | None
    weights: torch.dtype = torch.float32

    @classmethod
    def named(cls, name: str) -> Precision:
        if name == "bf16":  # fp32 master weights and gradients, bf16 matmuls (OpenCLIP's amp_bf16)
            return cls(torch.bfloat16)
        if name == "fp16":  # DeepSpeed's fp16 mode: fp16 weights, fp32 master copy, loss scaling
            return cls(None, torch.float16)
        if name == "fp32":
            return cls(None)
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {name!r}")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute)


def to_device(batch: dict[str, Any], device: torch.device, precision: Precision) -> tuple[torch.Tensor, Any]:
    """A loader batch -> (normalised images in the weights' dtype, tokens), on the device.

    Images cross the loader as uint8 and are normalised here, on the device; tokens are a
    tensor (B, M, T) or, trimmed per text type, a list of M tensors (B, T_m).
    """
    images = normalize(batch["images"].to(device, non_blocking=True)).to(precision.weights)
    tokens = batch["tokens"]
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.to(device, non_blocking=True)
    else:
        tokens = [t.to(device, non_blocking=True) for t in tokens]
    return images, tokens


def _checked(losses: dict[str, torch.Tensor], logit_scale: torch.Tensor, books: Bookkeeping) -> torch.Tensor:
    """[total, per text type..., diversity, logit scale], averaged over ranks, on the host: the
    step's one synchronisation with the device. Every rank sees a non-finite loss at the same
    moment, so all stop together, before any update."""
    values = torch.cat([losses["loss"].detach().reshape(1), losses["per_text_type"].detach().reshape(-1),
                        losses["diversity"].detach().reshape(1), logit_scale.detach().float().reshape(-1)[:1]])
    mean = books.mean(values)
    if not torch.isfinite(mean[:-1]).all():
        raise NonFiniteLoss(mean[:-1].tolist())
    return mean


def run_step(engine, inputs: Sequence[tuple[torch.Tensor, Any]], loss_fn: MultiTextContrastiveLoss,
             precision: Precision, device: torch.device, books: Bookkeeping, accumulation: str = "exact",
             backward: Callable | None = None) -> StepResult:
    """Forward and backward of the step's micro-batches (already on the device); the engine
    reduces the gradients and updates at the last engine.step().

    backward(loss, scale_wrt_gas): defaults to engine.backward.
    """
    if accumulation not in ACCUMULATION_MODES:
        raise ValueError(f"accumulation must be one of {ACCUMULATION_MODES}, got {accumulation!r}")
    backward = backward or (lambda loss, scale_wrt_gas: engine.backward(loss, scale_wrt_gas=scale_wrt_gas))
    n = len(inputs)
    if n == 1 or accumulation == "independent":
        sums = None
        for images, tokens in inputs:
            with precision.autocast(device):
                out = engine(images, tokens)
            losses = loss_fn(out["image"], out["text"], out["logit_scale"])
            mean = _checked(losses, out["logit_scale"], books)
            backward(losses["loss"], True)  # DeepSpeed divides by the accumulation steps: the mean
            engine.step()
            sums = mean if sums is None else sums + mean
        sums /= n
        return StepResult(sums[:-1].tolist(), float(sums[-1]))

    # Exact: the embeddings of every micro-batch first, without a graph.
    with torch.no_grad(), precision.autocast(device):
        cached = [engine(images, tokens) for images, tokens in inputs]
    images_all = [c["image"].float() for c in cached]
    texts_all = [c["text"].float() for c in cached]
    with torch.no_grad():
        losses = loss_fn(torch.cat(images_all), torch.cat(texts_all), cached[0]["logit_scale"])
    mean = _checked(losses, cached[0]["logit_scale"], books)
    for j, (images, tokens) in enumerate(inputs):
        with precision.autocast(device):
            out = engine(images, tokens)
        image = torch.cat([*images_all[:j], out["image"].float(), *images_all[j + 1:]])
        text = torch.cat([*texts_all[:j], out["text"].float(), *texts_all[j + 1:]])
        scale = out["logit_scale"]
        scale = scale.detach() + (scale - scale.detach()) / n  # same value; its gradient once per step
        backward(loss_fn(image, text, scale)["loss"], False)  # a part of one loss's gradient: summed
        engine.step()
    return StepResult(mean[:-1].tolist(), float(mean[-1]))
