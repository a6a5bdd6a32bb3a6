"""Holistic CLIP: a CLIP whose image tower emits H embeddings ("branches") per image.

Two ways to get H embeddings out of one ViT (docs/method.md#3-model):
- branch="cls" (Psi_CLS): H class tokens that cannot attend to each other.
- branch="mlp" (Psi_MLP): the last L blocks run H token streams that share everything except
  the second MLP linear.
- branch="none": plain CLIP (H = 1), used by the O2O and O2M baselines.

Model sizes are data (model_configs/*.json, read by load_model_config); the branch settings
usually come from the training config via dataclasses.replace(cfg, branch=..., num_branches=...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CONFIG_DIR = Path(__file__).parent / "model_configs"
BRANCH_TYPES = ("cls", "mlp", "none")
TEXT_POOLS = ("argmax", "last")
ACTIVATIONS = ("gelu", "quick_gelu")
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)  # exp(theta) <= 100, as in CLIP


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a HolisticCLIP. Validated on construction, so dataclasses.replace() is too."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    context_length: int = 77
    vocab_size: int = 49408
    branch: str = "none"  # "cls" | "mlp" | "none"
    num_branches: int = 1  # H
    mlp_branch_layers: int = 3  # L: how many final vision blocks are replicated by branch="mlp"
    # Where the text tower reads its embedding. "argmax": at the largest token id, which is
    # CLIP BPE's <end_of_text> (OpenAI's and OpenCLIP's rule). "last": at the last token that is
    # not pad_token_id, right for any tokenizer (a Hugging Face one's end token is rarely its
    # largest id); with the causal mask that token has seen the whole text.
    text_pool: str = "argmax"
    pad_token_id: int = 0
    # The MLP's activation: "gelu" (exact, OpenCLIP's default) or "quick_gelu" (x * sigmoid(1.702 x),
    # OpenAI CLIP's; OpenCLIP's "-quickgelu" models), for weights trained with it.
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "branch":
                if value not in BRANCH_TYPES:
                    raise ValueError(f"'branch' must be one of {BRANCH_TYPES}, got {value!r}")
            elif f.name == "text_pool":
                if value not in TEXT_POOLS:
                    raise ValueError(f"'text_pool' must be one of {TEXT_POOLS}, got {value!r}")
            elif f.name == "activation":
                if value not in ACTIVATIONS:
                    raise ValueError(f"'activation' must be one of {ACTIVATIONS}, got {value!r}")
            elif (isinstance(value, bool) or not isinstance(value, int)
                  or value < (0 if f.name == "pad_token_id" else 1)):
                kind = "a non-negative" if f.name == "pad_token_id" else "a positive"
                raise ValueError(f"{f.name!r} must be {kind} integer, got {value!r}")
        if self.branch == "none" and self.num_branches != 1:
            raise ValueError(f"'num_branches' must be 1 when branch is 'none', got {self.num_branches}")
        if self.branch == "mlp" and self.mlp_branch_layers > self.vision_layers:
            raise ValueError(
                f"'mlp_branch_layers' ({self.mlp_branch_layers}) must not exceed "
                f"'vision_layers' ({self.vision_layers})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"'image_size' ({self.image_size}) must be divisible by 'patch_size' ({self.patch_size})")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width!r} must be divisible by {heads!r}")


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Read a ModelConfig from a JSON file, or from model_configs/<name>.json for a bare name."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{path.name.removesuffix('.json')}.json"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise ValueError(f"model config {name_or_path}: no such file and no built-in config of that name ({known})")
    label = path.name if path.parent == CONFIG_DIR else str(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {label}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {label}: expected a JSON object")
    fields = dataclasses.fields(ModelConfig)
    for key in data:
        if key not in {f.name for f in fields}:
            raise ValueError(f"model config {label}: unknown key {key!r}")
    for f in fields:
        if f.default is dataclasses.MISSING and f.name not in data:
            raise ValueError(f"model config {label}: missing key {f.name!r}")
    try:
        return ModelConfig(**data)
    except ValueError as e:
        raise ValueError(f"model config {label}: {e}") from None


# ----------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Multi-head self-attention. attn_mask is boolean, True = may attend."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Pre-LN residual block.

    With num_branches = H > 1 (Psi_MLP) only the second MLP linear is replicated; the input then
    holds H token streams stacked branch-major, (H * B, T, width), and stream chunk i goes
    through the i-th copy. Attention never mixes rows, so the streams stay independent.
    """

    def __init__(self, width: int, heads: int, num_branches: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        self.quick_gelu = activation == "quick_gelu"
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.ModuleList(nn.Linear(4 * width, width) for _ in range(num_branches))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        h = self.mlp_fc(self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        h = torch.cat([proj(chunk) for proj, chunk in zip(self.mlp_proj, h.chunk(len(self.mlp_proj)), strict=True)])
        return x + h


def _run_block(block: Block, x: torch.Tensor, attn_mask: torch.Tensor | None, grad_checkpointing: bool) -> torch.Tensor:
    """With gradient checkpointing (training only), the block's activations are recomputed in
    the backward pass instead of kept: memory for about a third more compute."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, attn_mask, use_reentrant=False)
    return block(x, attn_mask)


def _init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """CLIP's initialisation: residual output projections shrink with depth so the stream stays O(1)."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * len(blocks)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.out.weight, std=proj_std)
        nn.init.normal_(block.mlp_fc.weight, std=fc_std)
        for proj in block.mlp_proj:
            nn.init.normal_(proj.weight, std=proj_std)
        for module in block.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- towers


class VisionTransformer(nn.Module):
    """ViT image tower: images (B, 3, S, S) -> unnormalised embeddings (B, H, embed_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.vision_width
        self.num_class_tokens = cfg.num_branches if cfg.branch == "cls" else 1
        self.num_streams = cfg.num_branches if cfg.branch == "mlp" else 1
        self.first_branch_block = cfg.vision_layers - (cfg.mlp_branch_layers if cfg.branch == "mlp" else 0)
        num_tokens = self.num_class_tokens + (cfg.image_size // cfg.patch_size) ** 2
        scale = width**-0.5

        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        # Psi_CLS adds H - 1 class tokens and H - 1 position slots: 2 * (H - 1) * width parameters.
        self.class_embedding = nn.Parameter(scale * torch.randn(self.num_class_tokens, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, cfg.vision_heads, self.num_streams if i >= self.first_branch_block else 1, cfg.activation)
            for i in range(cfg.vision_layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)
        _init_blocks(self.blocks, width)
        nn.init.normal_(self.proj.weight, std=scale)
        self.grad_checkpointing = False

        # Psi_CLS: class token i attends to itself and the patches, never to class token j != i;
        # patches attend to everything. This is a real block: the paper's public code ends up
        # adding +1 to those logits (a dtype cast) instead of -inf.
        mask = None
        if self.num_class_tokens > 1:
            mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool)
            mask[: self.num_class_tokens, : self.num_class_tokens] = torch.eye(self.num_class_tokens, dtype=torch.bool)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, num_patches, width)
        x = torch.cat([self.class_embedding.expand(b, -1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for i, block in enumerate(self.blocks):
            if i == self.first_branch_block and self.num_streams > 1:
                x = x.repeat(self.num_streams, 1, 1)  # Psi_MLP: H streams, stream of (branch h, image b) is row h*B + b
            x = _run_block(block, x, self.attn_mask, self.grad_checkpointing)
        x = self.proj(self.ln_post(x[:, : self.num_class_tokens]))  # (B, H, D), or (H*B, 1, D) for Psi_MLP
        if self.num_streams > 1:
            x = x.view(self.num_streams, b, -1).transpose(0, 1)
        return x


class TextTransformer(nn.Module):
    """Causal text tower: token ids (N, T) -> unnormalised embeddings (N, embed_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.blocks = nn.ModuleList(Block(width, cfg.text_heads, activation=cfg.activation)
                                    for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        _init_blocks(self.blocks, width)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        causal = torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool).tril()
        self.register_buffer("attn_mask", causal, persistent=False)
        self.pool, self.pad_token_id = cfg.text_pool, cfg.pad_token_id
        self.grad_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:t]
        for block in self.blocks:
            x = _run_block(block, x, self.attn_mask[:t, :t], self.grad_checkpointing)
        x = self.ln_final(x)
        if self.pool == "argmax":  # CLIP: <end_of_text> has the largest id of the vocabulary
            index = tokens.argmax(dim=-1)
        else:  # the last non-pad position (0 for an all-pad row)
            index = ((tokens != self.pad_token_id) * torch.arange(t, device=tokens.device)).argmax(dim=-1)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), index])


# ----------------------------------------------------------------------------- model


class HolisticCLIP(nn.Module):
    """Image tower with H branches + text tower + one learnable logit scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        # Shape (1,) rather than a 0-dim scalar: DeepSpeed cannot initialise 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))

    @property
    def num_branches(self) -> int:
        return self.config.num_branches

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass (both towers)."""
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enabled

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, S, S) -> (B, H, D)."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor | Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """tokens (N, T) -> (N, D), or (B, M, T) -> (B, M, D): the M texts of an image are encoded separately.
        A sequence of M tensors (B, T_m), each text type padded only to its own longest text, -> (B, M, D)."""
        if isinstance(tokens, torch.Tensor):
            x = self.text(tokens.flatten(0, -2)).unflatten(0, tokens.shape[:-1])
        else:
            x = torch.stack([self.text(t) for t in tokens], dim=1)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "image": self.encode_image(images),
            "text": self.encode_text(tokens),
            "logit_scale": self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp(),
        }


# Matrices get weight decay; these named ones do not, whatever their shape.
NO_WEIGHT_DECAY = ("class_embedding", "positional_embedding", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases, LayerNorms, the logit scale, class tokens
    and position embeddings (as in the paper's recipe); weight_decay on everything else."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D parameters are exactly the biases, the LayerNorm weights and the logit scale.
        if p.ndim < 2 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
