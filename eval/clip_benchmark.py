"""Our exports in CLIP_benchmark (LAION-AI/CLIP_benchmark), through its model-loading hook.

CLIP_benchmark loads a model with the function its `clip_benchmark.models.TYPE2FUNC` maps the
`--model_type` to, called as f(model_name=--model, pretrained=--pretrained, cache_dir=...,
device=...) and returning (model, transform, tokenizer): `model.encode_image(images)` and
`model.encode_text(tokenizer(texts))` give one embedding each (CLIP_benchmark normalises
them), `transform` turns a PIL image into a tensor. `load_holiclip` is that function for an
export (`RUN/export`); this module registers it as model type `holiclip` and runs CLIP_benchmark:

    python -m eval.clip_benchmark eval --model_type holiclip --pretrained runs/m2m_cls/export \\
        --model holiclip --dataset wds/mscoco_captions --dataset_root DIR --task zeroshot_retrieval

(CLIP_benchmark installed beside this project: `pip install clip-benchmark`.) `--model holiclip`
uses every branch, `--model holiclip:0,2` or `holiclip:main_object` a subset (by index or by
the text id that trained it, as `python -m eval --branches`). An image's embedding is the mean
of the chosen branches' normalised embeddings, which CLIP_benchmark renormalises: for image
queries and zero-shot classes that ranks exactly as our `average` fusion does; for text queries
(T2I) it ranks by the cosine with the mean, where `python -m eval` takes the paper's average of
the branch scores (docs/evaluation.md). With one branch the two agree everywhere.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch import nn

from train.export import load_exported
from train.transform import eval_transform

from .fusion import parse_branches

MODEL_TYPE = "holiclip"


class MeanOfBranches(nn.Module):
    """CLIP's interface (one image embedding) over a multi-branch model: the mean of the chosen branches."""

    def __init__(self, model: nn.Module, branches: tuple[int, ...] | None) -> None:
        super().__init__()
        self.model = model
        self.branches = list(branches) if branches else list(range(model.num_branches))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)[:, self.branches].mean(dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def load_holiclip(model_name: str = MODEL_TYPE, pretrained: str | None = None, cache_dir: str | None = None,
                  device: str | torch.device = "cpu"):
    """CLIP_benchmark's loading function: (model, transform, tokenizer) of the export `pretrained`."""
    if not pretrained:
        raise ValueError("--pretrained must name a holiclip export directory (config.json + model.safetensors)")
    model, tokenizer, meta = load_exported(pretrained, device)
    spec = model_name.split(":", 1)[1] if model_name.startswith(f"{MODEL_TYPE}:") else None
    ids = list(meta.get("branch_text_ids") or [])
    branches = parse_branches(spec, [ids[m] if m < len(ids) else None for m in range(model.num_branches)])
    return MeanOfBranches(model, branches).eval(), partial(eval_transform, size=model.config.image_size), tokenizer


def register() -> None:
    """Add `holiclip` to CLIP_benchmark's model types (its TYPE2FUNC / MODEL_TYPES)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_holiclip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the same list its CLI offers as --model_type choices


def main() -> int:
    try:
        register()
        from clip_benchmark.cli import main as clip_benchmark_main
    except ImportError as e:
        print(f"python -m eval.clip_benchmark: CLIP_benchmark is not installed here ({e}); "
              "`pip install clip-benchmark` beside this project", file=sys.stderr)
        return 2
    return clip_benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
