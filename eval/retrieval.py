"""Image-text retrieval: recall at 1, 5 and 10 in both directions, per text id and pooled.

Every text of an image is one of its captions. For a pool of captions (one text id, or several):

- image -> text (I2T): each image with at least one caption in the pool is a query against all
  captions of the pool; it is right at k if any of its captions is in the top k (COCO/Flickr30k).
- text -> image (T2I): each caption is a query against all images of the set; it is right at k
  if its image is in the top k.

Which captions are an image's positives is the `positives` rule:

- "own" (default; CLIP_benchmark's rule, so numbers compare with published ones): a caption's
  positives are the images it belongs to. A caption whose string another image also has is a
  negative for that other image, and in T2I only its own image is a right answer; identical
  strings tie exactly, and under the pessimistic tie rule (metrics.py) the copies rank ahead.
- "same-string": a caption whose string is identical to one of the query image's captions counts
  as that image's caption too (and in T2I, every image having that exact string is a right
  answer). No model can rank one identical string above another, so this measures what a model
  can tell apart; a generic caption shared by many images ("a plain gray background") stays
  retrievable. It is higher than CLIP_benchmark's rule on data with duplicate captions and is
  labelled apart (task `retrieval-same-string`).

Captions are scored once per distinct string and counted with their multiplicity, which gives
the same numbers as scoring every caption (tests check both rules against brute force).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .fusion import Fusion, Scorer
from .metrics import RECALL_KS, ranks, recall_at_k

BLOCK_ELEMENTS = 1 << 24  # scores held at once per block (H x rows x columns floats, 64 MiB)
POSITIVES = ("own", "same-string")  # the rules of the module docstring; "own" is CLIP_benchmark's


def retrieval_task(positives: str) -> str:
    """The task a result is labelled with: the same-string rule's numbers never pass for standard ones."""
    return "retrieval" if positives == "own" else f"retrieval-{positives}"


@dataclass
class Captions:
    """The captions of an evaluation set: distinct strings, and per text id which image has which string."""

    strings: list[str]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # text id -> (image index (C,), string index (C,))

    @classmethod
    def collect(cls, texts_per_image: Sequence[dict[str, str]], text_ids: Sequence[str]) -> Captions:
        index: dict[str, int] = {}
        pairs: dict[str, tuple[list[int], list[int]]] = {t: ([], []) for t in text_ids}
        for i, texts in enumerate(texts_per_image):
            for t in text_ids:
                if t in texts:
                    pairs[t][0].append(i)
                    pairs[t][1].append(index.setdefault(texts[t], len(index)))
        return cls(list(index), {t: (torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long))
                                 for t, (a, b) in pairs.items()})

    def pool(self, text_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, string index) of every caption of these text ids."""
        return torch.cat([self.pairs[t][0] for t in text_ids]), torch.cat([self.pairs[t][1] for t in text_ids])


def _grouped(keys: torch.Tensor, values: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values sorted by key, and offsets (num_keys + 1,) so key k owns values[offsets[k]:offsets[k+1]]."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_keys)
    return values[order], torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _dense(queries: torch.Tensor, grouped: tuple[torch.Tensor, torch.Tensor], num_candidates: int,
           amounts: torch.Tensor | None = None) -> torch.Tensor:
    """(len(queries), num_candidates): True (or the amount) where the candidate is related to the query."""
    values, offsets = grouped
    starts, lengths = offsets[queries], offsets[queries + 1] - offsets[queries]
    rows = torch.repeat_interleave(torch.arange(len(queries)), lengths)
    # values index of a row's first entry, less the row's offset
    first = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
    at = first + torch.arange(len(rows))
    if amounts is None:
        out = torch.zeros(len(queries), num_candidates, dtype=torch.bool)
        out[rows, values[at]] = True
    else:
        out = torch.zeros(len(queries), num_candidates, dtype=torch.long)
        out[rows, values[at]] = amounts[at]
    return out


def retrieval_recalls(image: torch.Tensor, string_emb: torch.Tensor, image_index: torch.Tensor,
                      string_index: torch.Tensor, fusion: Fusion, ks: Sequence[int] = RECALL_KS,
                      device: str | torch.device = "cpu", positives: str = "own") -> dict:
    """Recall at ks both ways for one pool of captions (rules in the module docstring).

    image: (N, H, D) every image of the set (all are T2I candidates); string_emb: (S, D) embeddings
    of distinct strings; caption c belongs to image image_index[c] and reads string string_index[c].
    """
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    if len(image_index) == 0:
        raise ValueError("no captions in this pool")
    n = len(image)
    strings, local, counts = torch.unique(string_index, return_inverse=True, return_counts=True)
    # Relation "image i has a caption reading pool string p", each pair once, with how many captions.
    relation, own = torch.unique(torch.stack([image_index, local], dim=1), dim=0, return_counts=True)
    scorer = Scorer(image, string_emb[strings], fusion, text_weights=counts, device=device)
    weights = counts.to(device)
    h = len(scorer.branches)

    # I2T: queries are the images with a caption in the pool; candidates the pool's strings,
    # each counted as many times as captions read it.
    query_images = torch.unique(relation[:, 0])
    order = torch.argsort(relation[:, 0], stable=True)
    by_image = _grouped(relation[:, 0], relation[:, 1], n)
    block = max(1, BLOCK_ELEMENTS // (h * len(strings)))
    i2t = []
    for q in query_images.split(block):
        scores, mask = scorer.scores(rows=q.to(device)), _dense(q, by_image, len(strings)).to(device)
        if positives == "own":  # the other images' copies of a string are negatives, even of a string the query has
            mine = _dense(q, by_image, len(strings), amounts=own[order]).to(device)
            i2t.append(ranks(scores, mask, negatives=weights[None] - mine).cpu())
        else:
            i2t.append(ranks(scores, mask, weights=weights).cpu())
    i2t = torch.cat(i2t)

    if positives == "own":
        # T2I: a query per (image, string) pair, weighing as many captions as it stands for; its image is the answer.
        block = max(1, BLOCK_ELEMENTS // (h * n))
        t2i = torch.cat([
            ranks(scorer.scores(cols=pairs[:, 1].to(device), ranking="images").T,
                  torch.nn.functional.one_hot(pairs[:, 0], n).bool().to(device)).cpu()
            for pairs in relation.split(block)
        ])
        t2i_weights = own
    else:
        # T2I: queries are the pool's strings, each weighing as many captions as read it.
        by_string = _grouped(relation[:, 1], relation[:, 0], len(strings))
        block = max(1, BLOCK_ELEMENTS // (h * n))
        t2i = torch.cat([
            ranks(scorer.scores(cols=q.to(device), ranking="images").T, _dense(q, by_string, n).to(device)).cpu()
            for q in torch.arange(len(strings)).split(block)
        ])
        t2i_weights = counts
    return {
        "i2t": {f"R@{k}": v for k, v in recall_at_k(i2t, ks).items()},
        "t2i": {f"R@{k}": v for k, v in recall_at_k(t2i, ks, query_weights=t2i_weights).items()},
        "images": int(len(query_images)),
        "captions": int(len(image_index)),
        "distinct_texts": int(len(strings)),
    }


def evaluate_retrieval(image: torch.Tensor, string_emb: torch.Tensor, captions: Captions, text_ids: Sequence[str],
                       fusion: Fusion, ks: Sequence[int] = RECALL_KS, device: str | torch.device = "cpu",
                       positives: str = "own") -> dict[str, dict]:
    """{text id: recalls} for each text id with captions, plus "all" (pooled) when there are several."""
    present = [t for t in text_ids if len(captions.pairs[t][0])]
    out = {t: retrieval_recalls(image, string_emb, *captions.pairs[t], fusion, ks, device, positives)
           for t in present}
    if len(present) > 1:
        out["all"] = retrieval_recalls(image, string_emb, *captions.pool(present), fusion, ks, device, positives)
    return out
