"""DeepSpeed checkpoints: save, find, resume, and read back as one fp32 state dict.

Layout: RUN/checkpoints/step00001000/ (DeepSpeed's files for every rank), and two marks that
rank 0 writes once every rank has finished writing (after a barrier): step.../COMPLETE and
RUN/checkpoints/complete (the newest complete tag), which `--resume auto` follows.
DeepSpeed's own RUN/checkpoints/latest is not enough: rank 0 writes it as soon as its own files
are saved, while other ranks may still be writing theirs, so a job killed at that moment left a
`latest` pointing at a checkpoint with a truncated file (seen in the whole-pipeline kill test).
Our own state (step, data position, configs) rides in DeepSpeed's
client state under the key "holiclip", so a checkpoint directory is self-describing: the
exporter needs nothing else.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from data_manifests import atomic_write_text

log = logging.getLogger(__name__)

CLIENT_KEY = "holiclip"
TAG_RE = re.compile(r"^step(\d{8,})$")
DONE = "COMPLETE"  # in a step directory: every rank finished writing it
POINTER = "complete"  # in the checkpoints directory: the newest complete tag


class CheckpointError(ValueError):
    """A checkpoint path the user gave that cannot be used (the message says why)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(checkpoint_dir: Path) -> list[str]:
    """Step tags in a checkpoints directory, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def resolve(path: str | Path) -> Path:
    """A tag directory (RUN/checkpoints/step00000100) or a checkpoints directory (its newest complete one)."""
    path = Path(path)
    if not TAG_RE.match(path.name) and path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint here (a step directory with a {DONE} mark)")
        path = found
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint "
                              "(no *model_states.pt; expected RUN/checkpoints or one of its step directories)")
    if not (path / DONE).is_file():
        log.warning("%s has no %s mark: it may be a checkpoint whose save was interrupted", path, DONE)
    return path


def latest(checkpoint_dir: Path) -> Path | None:
    """The last completely saved checkpoint of a run, or None."""
    pointer = checkpoint_dir / POINTER
    if pointer.is_file():
        tag = checkpoint_dir / pointer.read_text().strip()
        if (tag / DONE).is_file():
            return tag
    complete = [t for t in list_tags(checkpoint_dir) if (checkpoint_dir / t / DONE).is_file()]
    return checkpoint_dir / complete[-1] if complete else None


def save(engine, checkpoint_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Save on every rank (a collective), mark it complete, then prune old step checkpoints on rank 0."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={CLIENT_KEY: state})
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        atomic_write_text(checkpoint_dir / tag / DONE, f"{tag}\n")
        atomic_write_text(checkpoint_dir / POINTER, tag)
        if keep_last:
            for old in list_tags(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()
    return checkpoint_dir / tag


def load(engine, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (DeepSpeed) and return our client state."""
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None or client is None or CLIENT_KEY not in client:
        raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint, "
                              "or it was not written by this trainer")
    return client[CLIENT_KEY]


def read_state(path: Path) -> dict[str, Any]:
    """Our client state, read from the files without DeepSpeed running."""
    files = sorted(path.glob("*model_states.pt"))  # rank 0's sorts first under every ZeRO stage
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if CLIENT_KEY not in states:
        raise CheckpointError(f"{path}: not written by this trainer (no '{CLIENT_KEY}' client state)")
    return states


def consolidated_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict of the whole model, our client state) from a checkpoint directory.

    ZeRO 1-3: DeepSpeed's zero_to_fp32 reassembles the fp32 master weights from every rank's
    optimizer partitions. ZeRO 0: the module weights as saved, in fp32 (with bf16/fp16 training
    these are the 16-bit weights the model computed with; the fp32 masters of ZeRO 0 sit in
    DeepSpeed's own optimizer layout, which we do not read).
    """
    path = resolve(path)
    states = read_state(path)
    meta = states[CLIENT_KEY]
    if meta["zero_stage"] == 0:
        weights = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # Own, contiguous fp32 copies: zero_to_fp32 returns views into flat buffers, which
    # safetensors refuses to save (shared memory).
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}, meta
