"""The trainer's bookkeeping collectives: losses to log, data counters, problem lines.

A process group serves only the device types its backends are registered for. DeepSpeed starts
the group with NCCL on GPUs, and NCCL serves CUDA tensors only: an all-reduce of a CPU tensor on
it raises "No backend type associated with device type cpu". The model's own collectives (the
gradient reduction, the loss's embedding gather) run on the device and are NCCL's job; the
bookkeeping here is a handful of numbers on the host. So it runs on a gloo group of its own
(Megatron-LM and torchtitan do the same), created once, unless the default group already serves
the CPU (gloo, as on the CPU accelerator). A GPU tensor handed to these functions is copied to
the host first; that copy is the step's one synchronisation with the device (docs/training.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def serves_cpu(backend: str) -> bool:
    """Whether a backend string as dist.get_backend() returns it ("gloo", "nccl",
    "cpu:gloo,cuda:nccl", "cuda:gloo") has a backend for CPU tensors."""
    parts = [p.strip() for p in backend.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        return parts[0] in ("gloo", "mpi", "ccl")  # the backends that take CPU tensors
    return any(p.split(":", 1)[0] == "cpu" for p in parts)


class Bookkeeping:
    """Sums, means and object gathers over all ranks, on CPU tensors, on a group that serves them.

    Build it on every rank after the default process group is initialised (new_group is
    collective); without a process group it works on this process alone.
    """

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = None
        if self.active and not serves_cpu(dist.get_backend()):
            self.group = dist.new_group(backend="gloo")
        self.world_size = dist.get_world_size() if self.active else 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """values (any device) -> their float64 sum over ranks, on the CPU."""
        total = values.detach().to("cpu", torch.float64).clone()
        if self.active:
            dist.all_reduce(total, group=self.group)
        return total

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
