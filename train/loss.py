"""Multi-to-multi contrastive loss of Holistic CLIP (docs/method.md#4-loss), with its baselines.

For each text type m the image embedding of branch m is contrasted against the type-m texts of
the batch with a symmetric InfoNCE; the loss is the mean over m. Negatives are only type-m texts
(and branch-m embeddings) of other images, so no same-image masking is needed.

- "o2o": H = 1, M = 1, plain CLIP.
- "o2m": H = 1, M texts: every text type is matched with the single embedding.
- "m2m": H branches, M texts. When H != M, texts m < H use branch m and the others use, per
  sample, the branch most similar to that sample's own type-m text ("free matching").
  o2o and o2m are special cases of this rule; the mode only checks the shapes.

Like OpenCLIP's ClipLoss, the loss owns its distributed gather: each rank scores its local rows
against the columns gathered from all ranks (with gradient). With equal local batches the mean of
the rank losses is the loss of the global batch, and DDP/DeepSpeed gradient averaging gives its
exact gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ("o2o", "o2m", "m2m")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient for this rank's slice.

    Written out rather than torch.distributed.nn.functional.all_gather: that one is deprecated,
    and on gloo its backward scrambles incoming gradients that are not contiguous (its
    empty_like buffers keep their strides), which is what the einsums below produce.
    all_reduce + slice moves more bytes than a reduce-scatter, but works on every backend,
    and the embeddings are small next to the model's own gradient all-reduce.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, x.contiguous())
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate x from all ranks along dim 0, keeping the gradient path to every rank's slice.

    Returns (gathered, rank). Without an initialised process group of size > 1: (x, 0).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank()


def free_matching(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Pick the image branch that pairs with each text: image (B, H, D), text (B, M, D) -> (B, M, D).

    Text m < H pairs with branch m. Text m >= H pairs, per sample, with the branch most similar
    to that sample's own type-m text; the choice is an argmax, no gradient flows through it.
    If H > M, branches M..H-1 get no text and therefore no gradient from this loss.
    """
    h, m = image.shape[1], text.shape[1]
    index = torch.arange(m, device=image.device).clamp(max=h - 1).expand(image.shape[0], m).clone()
    if m > h:
        with torch.no_grad():
            sim = torch.einsum("bhd,bmd->bmh", image, text[:, h:])  # (B, M - H, H)
            index[:, h:] = sim.argmax(dim=-1)
    return image.gather(1, index.unsqueeze(-1).expand(-1, -1, image.shape[-1]))


def branch_similarity(image: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different branches of the same image; image (B, H, D), H > 1."""
    h = image.shape[1]
    sim = image @ image.transpose(1, 2)  # (B, H, H)
    off_diagonal = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (h * (h - 1))).mean()


class MultiTextContrastiveLoss(nn.Module):
    """Symmetric InfoNCE per text type, averaged over types, plus an optional branch-diversity hinge.

    Args:
        mode: "o2o", "o2m" or "m2m" (see the module docstring).
        diversity_weight: weight of max(0, branch_similarity - diversity_margin); 0 turns it off.
            It is computed on the local batch only, so with several ranks the mean of the rank
            hinges can differ slightly from the hinge of the global mean.
        diversity_margin: the 0.7 of the paper's public code.
    """

    def __init__(self, mode: str = "m2m", diversity_weight: float = 0.0, diversity_margin: float = 0.7) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"loss mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.diversity_weight = diversity_weight
        self.diversity_margin = diversity_margin

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> dict[str, torch.Tensor]:
        """image (B, H, D) and text (B, M, D), both L2-normalised; logit_scale already exp'd.

        Returns {"loss": scalar total, "per_text_type": (M,) detached, "diversity": detached term}.
        """
        image = image.unsqueeze(1) if image.ndim == 2 else image
        text = text.unsqueeze(1) if text.ndim == 2 else text
        self._check_shapes(image, text)
        # Softmax over thousands of columns in bf16 loses too much; the embeddings are small.
        image, text = image.float(), text.float()
        scale = torch.as_tensor(logit_scale, device=image.device).float().reshape(())

        paired = free_matching(image, text)  # (B, M, D): the branch that pairs with each text
        all_paired, rank = gather_with_grad(paired)
        all_text, _ = gather_with_grad(text)
        b, m = text.shape[:2]
        labels = (torch.arange(b, device=image.device) + rank * b).repeat(m)  # rows ordered (m, b)

        # Local rows against all columns, one (B, world * B) logit matrix per text type.
        logits_i2t = scale * torch.einsum("bmd,nmd->mbn", paired, all_text)
        logits_t2i = scale * torch.einsum("bmd,nmd->mbn", text, all_paired)
        loss_i2t = F.cross_entropy(logits_i2t.flatten(0, 1), labels, reduction="none").view(m, b).mean(1)
        loss_t2i = F.cross_entropy(logits_t2i.flatten(0, 1), labels, reduction="none").view(m, b).mean(1)
        per_text_type = (loss_i2t + loss_t2i) / 2
        loss = per_text_type.mean()

        diversity = loss.new_zeros(())
        if self.diversity_weight > 0 and image.shape[1] > 1:
            diversity = self.diversity_weight * F.relu(branch_similarity(image) - self.diversity_margin)
            loss = loss + diversity
        return {"loss": loss, "per_text_type": per_text_type.detach(), "diversity": diversity.detach()}

    def _check_shapes(self, image: torch.Tensor, text: torch.Tensor) -> None:
        if image.ndim != 3 or text.ndim != 3 or image.shape[0] != text.shape[0] or image.shape[2] != text.shape[2]:
            shapes = f"{tuple(image.shape)} and {tuple(text.shape)}"
            raise ValueError(f"expected image (B, H, D) and text (B, M, D), got {shapes}")
        h, m = image.shape[1], text.shape[1]
        if self.mode == "o2o" and (h, m) != (1, 1):
            raise ValueError(f"loss mode 'o2o' needs one branch and one text per image, got H={h}, M={m}")
        if self.mode == "o2m" and h != 1:
            raise ValueError(f"loss mode 'o2m' needs one branch per image, got H={h}")
