"""The model under evaluation: an exported checkpoint (train/export.py), loaded with clear errors.

--checkpoint takes the export directory (config.json + model.safetensors) or a training run
directory, whose RUN/export the trainer writes at the end of a run. The *run directory* (the
export's parent) is where results.jsonl accumulates, so the runs of one experiment compare side
by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.export import (
    BranchProfile,
    ExportError,
    WeightsMismatch,
    load_branch_profile,
    load_exported,
    missing_profile_message,
)
from train.model import HolisticCLIP
from train.tokenizer import Tokenizer

from .data import EvalError


@dataclass
class Checkpoint:
    path: Path  # the export directory
    model: HolisticCLIP
    tokenizer: Tokenizer
    meta: dict[str, Any]  # config.json (+ "probe_check" when the probe was verified)

    @property
    def run_dir(self) -> Path:
        return self.path.resolve().parent

    @property
    def branch_text_ids(self) -> list[str | None]:
        ids = self.meta.get("branch_text_ids") or []
        h = self.model.num_branches
        return [ids[m] if m < len(ids) else None for m in range(h)]

    def branch_profile(self) -> BranchProfile:
        """What adaptive fusion needs; EvalError naming what is missing and how to add it."""
        try:
            profile = load_branch_profile(self.path, self.meta)
        except ExportError as e:
            raise EvalError(str(e)) from None
        if profile is None:
            raise EvalError(missing_profile_message(self.path))
        return profile

    def label(self) -> str:
        """'m2m cls H=3' / 'o2o none H=1': the loss the run used, the branch design and H."""
        cfg = self.model.config
        loss = ((self.meta.get("training") or {}).get("loss") or {}).get("mode")
        if loss is None:  # exports written outside the trainer: infer from the shapes
            loss = "m2m" if cfg.num_branches > 1 else ("o2o" if len(self.meta.get("text_ids") or []) <= 1 else "o2m")
        return f"{loss} {cfg.branch} H={cfg.num_branches}"

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "label": self.label(), "config": self.meta}


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load an export directory, or RUN/export for a run directory. Raises EvalError for user errors."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: no such checkpoint; "
                        "--checkpoint takes an export directory (config.json + model.safetensors)")
    if not (path / "config.json").exists() and (path / "export" / "config.json").exists():
        path = path / "export"
    try:
        model, tokenizer, meta = load_exported(path, device=device)
    except WeightsMismatch:
        raise EvalError(_size_mismatch(path)) from None
    except ExportError as e:
        raise EvalError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        # A config.json whose "model" section is missing or invalid (ModelConfig rejects it).
        raise EvalError(f"{path / 'config.json'}: not a valid export ({type(e).__name__}: {e}); "
                        "re-export the checkpoint with `python -m train.export`") from None
    return Checkpoint(path, model, tokenizer, meta)


def _size_mismatch(path: Path) -> str:
    """One line on how model.safetensors differs from the model config.json describes.

    load_exported's message carries PyTorch's list of every mismatched tensor, one per line; a
    user needs the gist: which size each side has.
    """
    import json

    import torch
    from safetensors import safe_open

    from train.model import ModelConfig

    meta = json.loads((path / "config.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in HolisticCLIP(ModelConfig(**meta["model"])).state_dict().items()}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    differ = [k for k in expected if k in stored and stored[k] != expected[k]]
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    cfg = meta["model"]
    size = ", ".join(f"{k} {cfg[k]}" for k in ("image_size", "patch_size", "vision_width", "vision_layers",
                                               "text_width", "text_layers", "embed_dim", "branch", "num_branches")
                     if k in cfg)
    detail = []
    if differ:
        k = differ[0]
        detail.append(f"{len(differ)} tensors have other shapes, e.g. {k} is {list(stored[k])} in the weights but "
                      f"{list(expected[k])} for config.json")
    if missing:
        detail.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return (f"{path / 'model.safetensors'}: the weights are not of the model size config.json describes ({size}): "
            f"{'; '.join(detail)}; use the config.json these weights were exported with, "
            "or export the checkpoint again")
