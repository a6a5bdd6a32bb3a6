"""Per-branch analysis: does branch m match text type n better than the others do?

For branch m and text id n, over the evaluation set:

- matched[m, n]   = mean over captions c of type n of cos(v_m(image of c), t_c): the branch against
                    its own image's text.
- unmatched[m, n] = mean of cos(v_m(i), t_c) over every other image i: the same branch against
                    texts of type n that describe something else.
- margin = matched - unmatched: how much branch m tells its image's type-n text from the others.
  A text type's raw similarity level differs by type (and by branch, since branches are not
  centred), so the margin is the number to read for specialisation; a Holistic CLIP whose branch
  m was trained on text m shows its largest margins on the diagonal (docs/method.md#4-loss).

Both are exact and cost O(captions x H x D): the sum over all (image, caption) pairs is the dot
product of the two sums, so no N x C matrix is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .retrieval import Captions


def branch_text_similarity(image: torch.Tensor, string_emb: torch.Tensor, captions: Captions, text_ids: Sequence[str],
                           branch_text_ids: Sequence[str | None]) -> dict:
    """{"text_ids", "branches", "matched", "unmatched", "margin", "best_text_id", "best_branch"} (lists, JSON-ready).

    image (N, H, D); rows of the matrices are branches, columns the text ids that have captions.
    """
    n, h, _ = image.shape
    text_ids = [t for t in text_ids if len(captions.pairs[t][0])]
    v = image.double()
    v_sum = v.sum(dim=0)  # (H, D)
    matched = torch.full((h, len(text_ids)), float("nan"), dtype=torch.float64)
    unmatched = matched.clone()
    for j, t in enumerate(text_ids):
        image_index, string_index = captions.pairs[t]
        text = string_emb[string_index].double()  # (C, D)
        own = torch.einsum("chd,cd->h", v[image_index], text)  # sum of cos over own pairs, per branch
        matched[:, j] = own / len(text)
        if n > 1:
            unmatched[:, j] = (v_sum @ text.sum(dim=0) - own) / (len(text) * (n - 1))
    margin = matched - unmatched
    labels = [f"{m} ({branch_text_ids[m]})" if m < len(branch_text_ids) and branch_text_ids[m] else str(m)
              for m in range(h)]
    finite = torch.nan_to_num(margin, nan=float("-inf"))
    return {
        "text_ids": text_ids,
        "branches": labels,
        "branch_text_ids": list(branch_text_ids),
        "matched": matched.tolist(),
        "unmatched": unmatched.tolist(),
        "margin": margin.tolist(),
        # Which text id each branch separates best, and which branch is best for each text id
        # (the branch to keep for that kind of text when customising the embedding).
        "best_text_id": [text_ids[int(i)] for i in finite.argmax(dim=1)] if text_ids else [],
        "best_branch": {t: int(finite[:, j].argmax()) for j, t in enumerate(text_ids)},
    }
