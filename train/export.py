"""Exported models: what evaluation loads, with no DeepSpeed and no training config needed.

    DIR/model.safetensors   fp32 weights of HolisticCLIP (its state_dict names)
    DIR/config.json         FORMAT, the ModelConfig, branch design, H, text ids in branch order,
                            tokenizer, image preprocessing, and how the model was trained
    DIR/tokenizer/          only for a tokenizer that is not the vendored CLIP BPE (a copy)
    DIR/probe.safetensors   a few fixed inputs and the embeddings the training engine gave them;
                            load_exported recomputes them to prove the weights reload intact

Python:  model, tokenizer, meta = load_exported(DIR)
CLI:     python -m train.export --checkpoint-dir RUN/checkpoints [--tag step00001000] --out DIR
         (after the fact, from a DeepSpeed checkpoint of any ZeRO stage; the trainer exports
         RUN/export itself at the end of a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from data_manifests import atomic_write_json, now_iso

from .model import HolisticCLIP, ModelConfig
from .tokenizer import Tokenizer, load_tokenizer
from .transform import preprocess_spec

FORMAT = "holiclip-export/1"
PROBE_TEXTS = ("a photo of a cat", "a red circle at the top left on a gray background", "", "bright yellow tones")
MIN_PROBE_COSINE = 0.99  # bf16 training vs fp32 reload stays above 0.999; a broken reload is near 0


class ExportError(ValueError):
    """An export directory that cannot be loaded (the message names the file)."""


class WeightsMismatch(ExportError):
    """model.safetensors holds tensors of other names or shapes than the model config.json describes."""


def probe_inputs(tokenizer: Tokenizer, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs: seeded noise images and a few texts (one empty)."""
    images = torch.randn(len(PROBE_TEXTS), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return images, tokenizer(list(PROBE_TEXTS))


def branch_text_ids(text_ids: list[str], num_branches: int) -> list[str | None]:
    """Which text id trained each branch: text m pairs with branch m (docs/method.md#4-loss).

    With H < M the extra texts pick a branch per sample (free matching) and are not listed;
    with H > M branches M.. had no text (None).
    """
    return [text_ids[h] if h < len(text_ids) else None for h in range(num_branches)]


def export_checkpoint(
    out_dir: str | Path,
    weights: nn.Module | Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    *,
    text_ids: list[str],
    tokenizer: str,
    training: dict[str, Any] | None = None,
    probe: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write an export directory (layout in the module docstring) and return its path.

    weights: a HolisticCLIP or its state dict. tokenizer: the name it was loaded with ("clip",
    a BPE .txt.gz or a Hugging Face directory; files are copied into DIR/tokenizer). probe:
    {"images", "tokens", "image_embeddings", "text_embeddings"} computed by the training engine.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()},
              str(out / "model.safetensors"))

    tokenizer_ref = tokenizer
    if tokenizer != "clip":
        source = Path(tokenizer)
        target = out / "tokenizer"
        shutil.rmtree(target, ignore_errors=True)
        if source.is_dir():
            shutil.copytree(source, target)
            tokenizer_ref = "tokenizer"
        else:
            target.mkdir()
            shutil.copy2(source, target / source.name)
            tokenizer_ref = f"tokenizer/{source.name}"
    if probe is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in probe.items()}, str(out / "probe.safetensors"))

    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(model_config),
        "branch": model_config.branch,
        "num_branches": model_config.num_branches,
        "text_ids": list(text_ids),
        "branch_text_ids": branch_text_ids(list(text_ids), model_config.num_branches),
        "tokenizer": {"name": tokenizer_ref, "context_length": model_config.context_length,
                      "vocab_size": model_config.vocab_size, "text_pool": model_config.text_pool,
                      "pad_token_id": model_config.pad_token_id},
        "preprocess": preprocess_spec(model_config.image_size),
        "training": training or {},
        "created": now_iso(),
        "software": {"torch": torch.__version__},
    }
    atomic_write_json(out / "config.json", meta)  # last, and whole: a killed export leaves no half config
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  verify: bool = True) -> tuple[HolisticCLIP, Tokenizer, dict[str, Any]]:
    """(model in eval mode, fp32 on `device`; its tokenizer; the config.json dict).

    With verify and a probe file, the probe inputs are re-encoded and compared with the
    embeddings recorded at export; meta["probe_check"] holds the minimum cosine and the largest
    absolute difference, and a mismatch raises ExportError.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no config.json here; export a checkpoint with `python -m train.export`") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path / 'config.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:  # missing section, unknown or invalid field
        raise ExportError(f"{path / 'config.json'}: not a valid export ({type(e).__name__}: {e})") from None
    model = HolisticCLIP(cfg)
    try:
        state = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise ExportError(f"{path}: no model.safetensors here") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        # PyTorch lists every mismatched tensor; the first line and one example are enough here.
        details = [line.strip() for line in str(e).splitlines() if line.strip()]
        example = next((d for d in details[1:] if "size mismatch" in d or "Missing" in d or "Unexpected" in d), "")
        raise WeightsMismatch(f"{path / 'model.safetensors'}: does not match config.json "
                          f"({len(details) - 1} problems, e.g. {example[:200]})") from None
    model = model.to(device).eval()

    name = meta["tokenizer"]["name"]
    tokenizer = load_tokenizer(name if name == "clip" else path / name, context_length=cfg.context_length)

    probe_file = path / "probe.safetensors"
    if verify and probe_file.is_file():
        probe = load_file(str(probe_file))
        with torch.no_grad():
            image = model.encode_image(probe["images"].to(device, torch.float32)).cpu()
            text = model.encode_text(probe["tokens"].to(device)).cpu()
        got, want = (torch.cat([image.flatten(0, 1), text]),
                     torch.cat([probe["image_embeddings"].flatten(0, 1), probe["text_embeddings"]]).float())
        cosine = F.cosine_similarity(got, want, dim=-1).min().item()
        meta["probe_check"] = {"min_cosine": cosine, "max_abs_diff": (got - want).abs().max().item()}
        if cosine < MIN_PROBE_COSINE:
            raise ExportError(
                f"{path}: the reloaded model does not reproduce the embeddings recorded at export "
                f"(min cosine {cosine:.4f}); the weights or config.json do not belong together"
            )
    return model, tokenizer, meta


def export_deepspeed_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a DeepSpeed checkpoint of this trainer (any ZeRO stage) without running DeepSpeed."""
    from .checkpoint import consolidated_state_dict

    weights, state = consolidated_state_dict(Path(checkpoint))
    return export_checkpoint(
        out_dir, weights, ModelConfig(**state["model_config"]), text_ids=state["text_ids"],
        tokenizer=state["tokenizer"], training=state["training"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, help="RUN/checkpoints, or one of its step directories")
    parser.add_argument("--tag", help="a step directory name (default: the latest checkpoint)")
    parser.add_argument("--out", required=True, help="export directory to write")
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError

    source = Path(args.checkpoint_dir) / args.tag if args.tag else Path(args.checkpoint_dir)
    try:
        out = export_deepspeed_checkpoint(source, args.out)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
