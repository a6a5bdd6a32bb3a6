"""Per-text-id statistics: mergeable counts for the manifest, diversity for `stats`.

`TextStats` holds only counters and a histogram of word counts per text id, so the statistics
of a whole dataset are the sum of its shards' (each shard's record carries its own) and the
percentiles stay exact without keeping any text in memory.

`Diversity` is for the `stats` command, over a bounded sample of the dataset: distinct-n (the
share of distinct n-grams among all n-grams of one text id) and the mean pairwise similarity
between the texts of one sample. The paper's Table 9 uses the latter (0.56 for 2 texts down to
0.48 for 5) with a learned text encoder; we use bag-of-words cosine, which needs no model and
ranks datasets the same way in practice, but whose values are not comparable to the paper's.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

from .quality import ALL_FLAGS, words
from .sample import Sample

MAX_WORDS_BIN = 4096  # longer texts share the last histogram bin
PERCENTILES = (5, 25, 50, 75, 95)


def _empty() -> dict[str, Any]:
    return {"count": 0, "errors": 0, "chars": 0, "flags": {}, "words_hist": {}}


class TextStats:
    """Counters per text id, addable sample by sample and mergeable across shards."""

    def __init__(self, raw: dict[str, dict[str, Any]] | None = None):
        self.raw: dict[str, dict[str, Any]] = {}
        if raw:
            self.merge(raw)

    def add(self, sample: Sample) -> None:
        for text_id, text in sample.texts.items():
            entry = self.raw.setdefault(text_id, _empty())
            entry["count"] += 1
            entry["chars"] += len(text)
            n = str(min(len(words(text)), MAX_WORDS_BIN))
            entry["words_hist"][n] = entry["words_hist"].get(n, 0) + 1
            for flag in sample.flags.get(text_id, ()):
                entry["flags"][flag] = entry["flags"].get(flag, 0) + 1
        for text_id in sample.errors:
            self.raw.setdefault(text_id, _empty())["errors"] += 1

    def merge(self, other: TextStats | dict[str, dict[str, Any]], sign: int = 1) -> None:
        """Add another's counters; `sign=-1` takes a shard's counters back out (a redone shard:
        the counters are plain sums, so subtracting is exact and costs one shard, not a rebuild)."""
        raw = other.raw if isinstance(other, TextStats) else other
        for text_id, src in raw.items():
            dst = self.raw.setdefault(text_id, _empty())
            for field in ("count", "errors", "chars"):
                dst[field] += sign * int(src.get(field, 0))
            for name in ("flags", "words_hist"):
                for k, v in src.get(name, {}).items():
                    n = dst[name].get(k, 0) + sign * int(v)
                    if n:
                        dst[name][k] = n
                    else:
                        dst[name].pop(k, None)

    def to_json(self) -> dict[str, dict[str, Any]]:
        """Mergeable counters plus the derived summary, as stored in manifests and records."""
        return {text_id: {**entry, **summarize(entry)} for text_id, entry in sorted(self.raw.items())}


def _percentile(hist: dict[int, int], total: int, q: float) -> int:
    # Nearest-rank percentile over an exact histogram.
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist) if hist else 0


def summarize(entry: dict[str, Any]) -> dict[str, Any]:
    """Readable figures derived from one text id's counters."""
    count = entry["count"]
    hist = {int(k): v for k, v in entry.get("words_hist", {}).items()}
    words_summary: dict[str, float] = {}
    if count:
        words_summary["mean"] = round(sum(k * v for k, v in hist.items()) / count, 2)
        for q in PERCENTILES:
            words_summary[f"p{q}"] = _percentile(hist, count, q)
        words_summary["max"] = max(hist)
    flag_rates = {f: round(entry.get("flags", {}).get(f, 0) / count, 4) if count else 0.0 for f in ALL_FLAGS}
    return {
        "words": words_summary,
        "mean_chars": round(entry.get("chars", 0) / count, 1) if count else 0.0,
        "flag_rates": flag_rates,
    }


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def bow_cosine(a: Counter, b: Counter) -> float:
    if not a or not b:
        return 0.0
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


class Diversity:
    """Distinct-n per text id and within-sample text similarity, over the samples added."""

    def __init__(self, max_ngrams: int = 2):
        self.max_n = max_ngrams
        self.grams: dict[str, list[set]] = {}
        self.totals: dict[str, list[int]] = {}
        self.pair_sums: dict[tuple[str, str], float] = {}
        self.pair_counts: dict[tuple[str, str], int] = {}
        self.sample_means: list[float] = []

    def add(self, sample: Sample) -> None:
        bags = {}
        for text_id, text in sample.texts.items():
            tokens = words(text)
            bags[text_id] = Counter(tokens)
            grams = self.grams.setdefault(text_id, [set() for _ in range(self.max_n)])
            totals = self.totals.setdefault(text_id, [0] * self.max_n)
            for n in range(1, self.max_n + 1):
                g = _ngrams(tokens, n)
                grams[n - 1].update(g)
                totals[n - 1] += len(g)
        sims = []
        for a, b in itertools.combinations(sorted(bags), 2):
            s = bow_cosine(bags[a], bags[b])
            sims.append(s)
            self.pair_sums[(a, b)] = self.pair_sums.get((a, b), 0.0) + s
            self.pair_counts[(a, b)] = self.pair_counts.get((a, b), 0) + 1
        if sims:
            self.sample_means.append(sum(sims) / len(sims))

    def to_json(self) -> dict[str, Any]:
        distinct = {
            text_id: {f"distinct_{n + 1}": round(len(self.grams[text_id][n]) / t, 4) if t else 0.0
                      for n, t in enumerate(totals)}
            for text_id, totals in sorted(self.totals.items())
        }
        pairs = {f"{a} ~ {b}": round(self.pair_sums[(a, b)] / self.pair_counts[(a, b)], 4)
                 for (a, b) in sorted(self.pair_sums)}
        mean = sum(self.sample_means) / len(self.sample_means) if self.sample_means else None
        return {
            "distinct_n": distinct,
            "within_sample_similarity": {
                "mean": round(mean, 4) if mean is not None else None,
                "measure": "bag-of-words cosine, averaged over text pairs, then samples",
                "samples": len(self.sample_means),
                "pairs": pairs,
            },
        }
