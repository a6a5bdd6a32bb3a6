"""Checkpoints both ways with OpenCLIP: its ViT CLIP state dict <-> our HolisticCLIP.

    python -m train.openclip import OPENCLIP_WEIGHTS --out DIR [--branch cls|mlp --num-branches H] [--quick-gelu]
    python -m train.openclip export EXPORT_DIR --out FILE.safetensors [--branch-index M]

OpenCLIP's ViT CLIP (`open_clip.model.CLIP` with its `VisionTransformer` and text transformer:
no layer scale, token pooling, `ln_post` before the projection, argmax text pooling) and ours
compute the same function with differently named tensors; this module renames and reshapes.

Import (OpenCLIP -> ours), as weights to evaluate or to start training from:
- H = 1 (`branch: none`): a one-to-one copy; the same embeddings.
- Psi_MLP: the H copies of the second MLP linear of the last L blocks all start from its one;
  every branch computes OpenCLIP's embedding exactly.
- Psi_CLS: the H class tokens and their H position slots all start from OpenCLIP's one. Not
  exact: the patches attend to all H class tokens, so they see H copies of the one OpenCLIP's
  patches see (cosine with OpenCLIP's embedding 0.9998 on the tests' random tiny model); a start
  for training, where the tokens then differ.

Export (ours -> OpenCLIP's state-dict layout):
- H = 1: a one-to-one copy; exact.
- Psi_MLP: one chosen branch (`branch_index`), its MLP copies; exactly what branch m computes.
- Psi_CLS: one chosen branch, class token m and its position slot, only with `approximate`:
  our patches attend to every class token, OpenCLIP's to its one, so the result is close to
  branch m, not equal.
- The average of the branches is not offered: branches differ before a nonlinearity (LayerNorm
  after the MLP copy, attention over a different class token), so no single OpenCLIP model
  computes their average exactly.
OpenCLIP's "-quickgelu" models need `activation: quick_gelu` (`--quick-gelu`).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from train.model import ModelConfig


class ConversionError(ValueError):
    """Weights that are not of the expected layout (the message says which tensor)."""


def config_from_openclip(state: Mapping[str, torch.Tensor], branch: str = "none", num_branches: int = 1,
                         mlp_branch_layers: int = 3, quick_gelu: bool = False,
                         vision_heads: int | None = None, text_heads: int | None = None) -> ModelConfig:
    """Our ModelConfig for an OpenCLIP ViT state dict (sizes read from the tensors; heads from
    OpenCLIP's rule: width / 64 for the vision tower, text width / 64 for the text tower)."""
    try:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        tokens = state["visual.positional_embedding"].shape[0]
        grid = round((tokens - 1) ** 0.5)
        text_width = state["token_embedding.weight"].shape[1]
        vision_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        text_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        return ModelConfig(
            image_size=grid * patch, patch_size=patch, vision_width=width, vision_layers=vision_layers,
            vision_heads=vision_heads or max(1, width // 64), text_width=text_width, text_layers=text_layers,
            text_heads=text_heads or max(1, text_width // 64), embed_dim=state["text_projection"].shape[1],
            context_length=state["positional_embedding"].shape[0], vocab_size=state["token_embedding.weight"].shape[0],
            branch=branch, num_branches=num_branches, mlp_branch_layers=mlp_branch_layers,
            activation="quick_gelu" if quick_gelu else "gelu")
    except KeyError as e:
        raise ConversionError(f"not an OpenCLIP ViT CLIP state dict: no tensor {e.args[0]!r}") from None


def _block_names(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.ln_1.weight", f"{theirs}.ln_1.weight"), (f"{ours}.ln_1.bias", f"{theirs}.ln_1.bias"),
            (f"{ours}.attn.qkv.weight", f"{theirs}.attn.in_proj_weight"),
            (f"{ours}.attn.qkv.bias", f"{theirs}.attn.in_proj_bias"),
            (f"{ours}.attn.out.weight", f"{theirs}.attn.out_proj.weight"),
            (f"{ours}.attn.out.bias", f"{theirs}.attn.out_proj.bias"),
            (f"{ours}.ln_2.weight", f"{theirs}.ln_2.weight"), (f"{ours}.ln_2.bias", f"{theirs}.ln_2.bias"),
            (f"{ours}.mlp_fc.weight", f"{theirs}.mlp.c_fc.weight"), (f"{ours}.mlp_fc.bias", f"{theirs}.mlp.c_fc.bias")]


def _shared_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, OpenCLIP's name) of every tensor that maps one to one."""
    names = [("visual.patch_embed.weight", "visual.conv1.weight"), ("visual.ln_pre.weight", "visual.ln_pre.weight"),
             ("visual.ln_pre.bias", "visual.ln_pre.bias"), ("visual.ln_post.weight", "visual.ln_post.weight"),
             ("visual.ln_post.bias", "visual.ln_post.bias"), ("text.token_embedding.weight", "token_embedding.weight"),
             ("text.positional_embedding", "positional_embedding"), ("text.ln_final.weight", "ln_final.weight"),
             ("text.ln_final.bias", "ln_final.bias")]
    for i in range(cfg.vision_layers):
        names += _block_names(f"visual.blocks.{i}", f"visual.transformer.resblocks.{i}")
    for i in range(cfg.text_layers):
        names += _block_names(f"text.blocks.{i}", f"transformer.resblocks.{i}")
    return names


def _mlp_copies(cfg: ModelConfig, i: int) -> int:
    return cfg.num_branches if cfg.branch == "mlp" and i >= cfg.vision_layers - cfg.mlp_branch_layers else 1


def from_openclip(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `cfg` from an OpenCLIP ViT CLIP state dict (rules in the module docstring)."""
    h = cfg.num_branches
    k = h if cfg.branch == "cls" else 1  # class tokens
    try:
        out = {ours: state[theirs] for ours, theirs in _shared_names(cfg)}
        position = state["visual.positional_embedding"]
        out["visual.class_embedding"] = state["visual.class_embedding"].reshape(1, -1).repeat(k, 1)
        out["visual.positional_embedding"] = torch.cat([position[:1].repeat(k, 1), position[1:]])
        out["visual.proj.weight"] = state["visual.proj"].T
        out["text.proj.weight"] = state["text_projection"].T
        out["logit_scale"] = state["logit_scale"].reshape(1)
        for i in range(cfg.vision_layers):
            theirs = f"visual.transformer.resblocks.{i}.mlp.c_proj"
            for m in range(_mlp_copies(cfg, i)):
                for part in ("weight", "bias"):
                    out[f"visual.blocks.{i}.mlp_proj.{m}.{part}"] = state[f"{theirs}.{part}"]
        for i in range(cfg.text_layers):
            for part in ("weight", "bias"):
                out[f"text.blocks.{i}.mlp_proj.0.{part}"] = state[f"transformer.resblocks.{i}.mlp.c_proj.{part}"]
    except KeyError as e:
        raise ConversionError(f"not an OpenCLIP ViT CLIP state dict of this size: no tensor {e.args[0]!r}") from None
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def to_openclip(state: Mapping[str, torch.Tensor], cfg: ModelConfig, branch_index: int | None = None,
                approximate: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP's state dict for our weights; with H > 1, of branch `branch_index` (module docstring)."""
    h = cfg.num_branches
    if h > 1 and branch_index is None:
        raise ConversionError(f"the model has {h} branches: choose one (branch_index 0-{h - 1}); their average "
                              "is no OpenCLIP model (see train/openclip.py)")
    if h > 1 and cfg.branch == "cls" and not approximate:
        raise ConversionError("a branch of a Psi_CLS model is no exact OpenCLIP model (our patches attend to every "
                              "class token); ask for the approximate one (--approximate) if that will do")
    m = branch_index or 0
    if not 0 <= m < h:
        raise ConversionError(f"branch_index {m} does not exist; the model has {h} branches (0-{h - 1})")
    out = {theirs: state[ours] for ours, theirs in _shared_names(cfg)}
    token = m if cfg.branch == "cls" else 0
    k = h if cfg.branch == "cls" else 1
    position = state["visual.positional_embedding"]
    out["visual.class_embedding"] = state["visual.class_embedding"][token]
    out["visual.positional_embedding"] = torch.cat([position[token:token + 1], position[k:]])
    out["visual.proj"] = state["visual.proj.weight"].T
    out["text_projection"] = state["text.proj.weight"].T
    out["logit_scale"] = state["logit_scale"].reshape(())
    for i in range(cfg.vision_layers):
        ours = f"visual.blocks.{i}.mlp_proj.{m if _mlp_copies(cfg, i) > 1 else 0}"
        for part in ("weight", "bias"):
            out[f"visual.transformer.resblocks.{i}.mlp.c_proj.{part}"] = state[f"{ours}.{part}"]
    for i in range(cfg.text_layers):
        for part in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.mlp.c_proj.{part}"] = state[f"text.blocks.{i}.mlp_proj.0.{part}"]
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def init_from_openclip(model: torch.nn.Module, path: str | Path) -> None:
    """Load an OpenCLIP checkpoint into a freshly built model of ours (training's `model.init`)."""
    try:
        state = load_openclip_state(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as an OpenCLIP checkpoint ({e})") from None
    ours = from_openclip(state, model.config)
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(f"{path}: tensor for {name} has shape {list(tensor.shape)}, the model config "
                                  f"{list(expected[name].shape)}; choose model.config to match the checkpoint")
    model.load_state_dict(ours, strict=True)


def load_openclip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An OpenCLIP checkpoint: safetensors, or a torch file holding the state dict (or {"state_dict": ...},
    as its training saves, with DDP's "module." prefix)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from train.export import ExportError, export_checkpoint, load_exported
    from train.model import HolisticCLIP

    parser = argparse.ArgumentParser(prog="python -m train.openclip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="an OpenCLIP ViT checkpoint -> an export (to evaluate, or model.init to train)")
    i.add_argument("weights", type=Path, help="OpenCLIP state dict (.safetensors, .pt, .bin)")
    i.add_argument("--out", type=Path, required=True, help="export directory to write")
    i.add_argument("--branch", choices=["none", "cls", "mlp"], default="none")
    i.add_argument("--num-branches", type=int, default=1, help="H for cls/mlp (default 1)")
    i.add_argument("--mlp-branch-layers", type=int, default=3, help="L for mlp (default 3)")
    i.add_argument("--quick-gelu", action="store_true", help="weights trained with QuickGELU (OpenCLIP -quickgelu)")
    i.add_argument("--vision-heads", type=int, help="attention heads of the image tower (default: width / 64)")
    i.add_argument("--text-heads", type=int, help="attention heads of the text tower (default: width / 64)")
    i.add_argument("--text-ids", nargs="+", default=["raw"], help="text ids the branches stand for (config.json)")
    e = sub.add_parser("export", help="an export of ours -> an OpenCLIP state dict (safetensors)")
    e.add_argument("export", type=Path, help="our export directory (config.json + model.safetensors)")
    e.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    e.add_argument("--branch-index", type=int, help="with H > 1: the branch to export")
    e.add_argument("--approximate", action="store_true", help="Psi_CLS with H > 1: accept a close, not exact, model")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            state = load_openclip_state(args.weights)
            cfg = config_from_openclip(state, args.branch, args.num_branches, args.mlp_branch_layers, args.quick_gelu,
                                       args.vision_heads, args.text_heads)
            model = HolisticCLIP(cfg)
            model.load_state_dict(from_openclip(state, cfg))
            export_checkpoint(args.out, model, cfg, text_ids=args.text_ids, tokenizer="clip",
                              training={"step": 0, "init": {"openclip": str(args.weights)}})
            print(f"wrote {args.out} ({cfg.branch}, H={cfg.num_branches}) from {args.weights}")
        else:
            model, _, meta = load_exported(args.export)
            state = to_openclip(model.state_dict(), model.config, args.branch_index, args.approximate)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(args.out))
            which = "" if args.branch_index is None else f", branch {args.branch_index}"
            print(f"wrote {args.out} (OpenCLIP layout{which})")
    except (ConversionError, ExportError, ValueError, OSError) as err:
        print(f"python -m train.openclip {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

