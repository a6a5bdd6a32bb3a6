"""Branch fusion: one score per (image, text) from an image's H branch embeddings (docs/method.md#5-inference).

With v_h the L2-normalised embedding of branch h (h in the chosen subset B) and t a text
embedding, s_h = <v_h, t>:

- average (default, the paper's best):  s = mean_h s_h. The mean of the branch embeddings is not
  renormalised, as in the paper ("average of the branch logits"). For image queries this ranks
  like the cosine with the renormalised mean; for text queries it does not, and we follow the paper.
- max:       s = max_h s_h.
- norm-max:  s = max_h (s_h - mu_h) / sigma_h, where mu_h and sigma_h are the mean and standard
  deviation of branch h's scores over the whole evaluation matrix (every image against every
  candidate text). **Decision**: the paper names Norm-Max without defining it; its public code
  computes exactly this per-branch mean over the image x text matrix (and then leaves it unused).
  We also divide by the standard deviation so that branches whose scores spread differently
  become comparable before the max. The statistics are exact and cheap: mu_h = <mean_i v_ih,
  mean_t t> and E[s_h^2] = <V_h^T V_h / N, T^T T / M> (D x D second moments), so the matrix is
  never materialised. They depend on the evaluation set, like any transductive normalisation.

- adaptive:  s = sum_h w_h(t) s_h, with weights from texts alone (no image, no label):
  w(t) = softmax_h(a_h(t) / T), a_h(t) the largest cosine between t less the mean of the texts
  scored with it and a sampled training text of branch h less the mean of branch h's texts; the
  texts, means and T are in the export (train.export.BranchProfile; `python -m train.export
  --add-branch-profile` adds them to an older export). Ranking images for a text (T2I), the
  text's own weights score every image; ranking texts for an image (I2T, zero-shot classes),
  every text is scored with the texts' mean weights, since texts scored with different mixes
  are not comparable. **Decision** (ours, not the paper's, which averages or picks a subset by
  hand per task, Table 8); docs/evaluation.md#query-adaptive-fusion has why and what it measured.

Embedding customisation (Table 8 of the paper) is a subset B of the branches; every method
then fuses only those. With one branch every method ranks identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from train.export import BranchProfile

METHODS = ("average", "max", "norm-max", "adaptive")


class FusionError(ValueError):
    """A fusion method or branch subset that does not fit the checkpoint (message says which)."""


@dataclass(frozen=True)
class Fusion:
    method: str = "average"
    branches: tuple[int, ...] | None = None  # None: every branch
    # adaptive only: the export's branch profile (train.export.load_branch_profile)
    profile: BranchProfile | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FusionError(f"fusion {self.method!r} is not one of {', '.join(METHODS)}")

    def chosen(self, num_branches: int) -> list[int]:
        return list(range(num_branches)) if self.branches is None else list(self.branches)

    @property
    def label(self) -> str:
        """Short name for tables and file names: 'average', 'max[0,2]'."""
        return self.method if self.branches is None else f"{self.method}[{','.join(map(str, self.branches))}]"


def parse_branches(spec: str | None, branch_text_ids: Sequence[str | None]) -> tuple[int, ...] | None:
    """'0,2' or 'main_object,style' (the text ids that trained the branches) -> branch indices.

    branch_text_ids: config.json's list, one entry per branch (None for a branch no text trained).
    """
    if spec is None or spec.strip() in ("", "all"):
        return None
    h = len(branch_text_ids)
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if part.isdigit():
            index = int(part)
            if index >= h:
                raise FusionError(f"--branches: branch {index} does not exist; this checkpoint has {h} (0-{h - 1})")
        elif part in branch_text_ids:
            index = list(branch_text_ids).index(part)
        else:
            named = ", ".join(f"{i}={t}" for i, t in enumerate(branch_text_ids) if t) or "none"
            raise FusionError(f"--branches: {part!r} is neither a branch index (0-{h - 1}) "
                              f"nor a text id that trained a branch ({named})")
        if index in out:
            raise FusionError(f"--branches: branch {index} is listed twice")
        out.append(index)
    if not out:
        raise FusionError("--branches: no branch chosen")
    return tuple(out)


class Scorer:
    """Fused scores of images against candidate texts, computed block by block.

    image: (N, H, D) all images of the evaluation; text: (M, D) all candidate texts, with optional
    multiplicities `text_weights` (M,) (a unique string standing for several captions). Both are
    needed up front only for norm-max's statistics; scores() then takes any block of rows and
    columns, so memory stays at one block whatever the size of the evaluation set. Scores are
    computed on `device` (the model's), the embeddings having been gathered on the CPU.
    """

    def __init__(self, image: torch.Tensor, text: torch.Tensor, fusion: Fusion,
                 text_weights: torch.Tensor | None = None, device: str | torch.device = "cpu") -> None:
        if image.ndim != 3 or text.ndim != 2 or image.shape[2] != text.shape[1]:
            raise ValueError("expected image (N, H, D) and text (M, D), "
                             f"got {tuple(image.shape)} and {tuple(text.shape)}")
        self.fusion = fusion
        self.branches = fusion.chosen(image.shape[1])
        if max(self.branches) >= image.shape[1]:
            raise FusionError(f"branch {max(self.branches)} does not exist; the model has {image.shape[1]} branches")
        self.image = image[:, self.branches].float().to(device)
        self.text = text.float().to(device)
        self.mean = self.std = self.mix = self.shared_mix = None
        if fusion.method == "adaptive" and len(self.branches) > 1:
            if fusion.profile is None:
                raise FusionError("adaptive fusion needs the export's branch profile (Fusion(profile=...)); "
                                  "add it with `python -m train.export --add-branch-profile EXPORT`")
            self.mix = fusion.profile.weights(self.text, self.branches)  # (M, H): one mix per text
            # Ranking texts against each other (I2T, zero-shot classes) needs scores of one kind:
            # one mix for all of them, the mean of theirs (captions counted with multiplicity).
            share = (torch.ones(len(self.text), device=device) if text_weights is None
                     else text_weights.to(device, torch.float32))
            self.shared_mix = (share / share.sum()) @ self.mix
        if fusion.method == "norm-max":
            weights = None if text_weights is None else text_weights.to(device)
            self.mean, self.std = branch_score_stats(self.image, self.text, weights)

    def scores(self, rows: slice | torch.Tensor = slice(None), cols: slice | torch.Tensor = slice(None),
               ranking: str = "texts") -> torch.Tensor:
        """(len(rows), len(cols)) fused scores of images[rows] against texts[cols], on the scorer's device.

        ranking: what the scores will rank, "texts" (each image's row: I2T, zero-shot) or
        "images" (each text's column: T2I). Only adaptive fusion tells them apart: ranking
        images, each text scores with its own mix of the branches; ranking texts, with the
        texts' mean mix, so that the texts compared are scored alike.
        """
        per_branch = torch.einsum("nhd,md->hnm", self.image[rows], self.text[cols])
        if self.mix is not None:
            if ranking == "images":
                return torch.einsum("hnm,mh->nm", per_branch, self.mix[cols])
            return torch.einsum("hnm,h->nm", per_branch, self.shared_mix)
        if self.fusion.method in ("average", "adaptive"):  # adaptive with one branch: its score, weight 1
            return per_branch.mean(dim=0)
        if self.fusion.method == "max":
            return per_branch.amax(dim=0)
        return ((per_branch - self.mean[:, None, None]) / self.std[:, None, None]).amax(dim=0)


def branch_score_stats(image: torch.Tensor, text: torch.Tensor,
                       text_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of <v_ih, t_m> over all (i, m), per branch h, without the matrix.

    image (N, H, D), text (M, D); text_weights (M,) counts each text that many times.
    """
    v, t = image.double(), text.double()
    w = torch.ones(len(t), dtype=torch.float64, device=t.device) if text_weights is None else text_weights.double()
    w = w / w.sum()
    t_mean = w @ t  # (D,)
    t_second = t.T @ (t * w[:, None])  # (D, D)
    v_mean = v.mean(dim=0)  # (H, D)
    v_second = torch.einsum("nhd,nhe->hde", v, v) / len(v)  # (H, D, D)
    mean = v_mean @ t_mean
    second = (v_second * t_second).sum(dim=(1, 2))
    std = (second - mean**2).clamp(min=1e-12).sqrt()
    return mean.float(), std.float()
