"""Ranking metrics on score matrices: recall at k and top-k accuracy. Pure functions of tensors.

Every metric here comes from one number per query, the rank of its best positive:

    rank = #{candidates c that are not positives of the query : score[c] >= best positive score}

0 means "first". A tie between a negative and the best positive counts against the query (the
pessimistic rule): a model that gives many candidates the same score cannot be lucky, and a
collapsed model (every embedding equal) scores 0 rather than 1. Ties among positives do not
matter: any positive in the top k makes the query right, as in the COCO and Flickr30k protocols
where an image query has several captions.

Candidates can carry a multiplicity (`weights`): one unique text standing for several identical
captions is counted as many times as it appears, so scoring unique strings gives the same ranks
as scoring every caption.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_KS = (1, 5, 10)
ACCURACY_KS = (1, 5)


def ranks(scores: torch.Tensor, positives: torch.Tensor, weights: torch.Tensor | None = None,
          negatives: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each query's best positive (rule in the module docstring).

    scores: (Q, C) float; positives: (Q, C) bool, at least one True per row; weights: (C,)
    multiplicity of each candidate (default 1). negatives: (Q, C), instead of weights, how many
    negatives of the query each column stands for (a string read by the query's image and by
    others is both a positive and, for the others' copies, a negative). Returns (Q,) float64.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} "
                         "must be the same (Q, C) shape")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    if negatives is not None:
        return ((scores >= best).double() * negatives.double()).sum(dim=1)
    ahead = (scores >= best) & ~positives
    if weights is None:
        return ahead.sum(dim=1).double()
    return ahead.double() @ weights.double()


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS,
                query_weights: torch.Tensor | None = None) -> dict[int, float]:
    """Share of queries whose best positive is in the top k, for each k (weighted by query_weights)."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    w = torch.ones_like(ranks, dtype=torch.float64) if query_weights is None else query_weights.double()
    return {k: float(((ranks < k).double() * w).sum() / w.sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = ACCURACY_KS) -> dict[int, float]:
    """Classification accuracy: scores (N, classes), labels (N,) class indices. Same tie rule."""
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(labels)), labels] = True
    return recall_at_k(ranks(scores, positives), ks)
