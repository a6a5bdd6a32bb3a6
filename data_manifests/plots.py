"""The `stats --plot` figure: lengths, flags and diversity of each text id on one page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_stats(stats: dict[str, dict[str, Any]], diversity: dict[str, Any], out: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_ids = sorted(stats)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(title, fontsize=13)

    ax = axes[0, 0]
    for t in text_ids:
        hist = {int(k): v for k, v in stats[t].get("words_hist", {}).items()}
        if not hist:
            continue
        xs = np.arange(0, max(hist) + 2)
        ys = np.array([hist.get(int(x), 0) for x in xs], dtype=float)
        ax.step(xs, ys / max(ys.sum(), 1), where="mid", label=f"{t} (median {stats[t]['words'].get('p50', 0)})")
    ax.set_title("Length distribution (words per text)")
    ax.set_xlabel("words")
    ax.set_ylabel("share of texts")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    flags = ["empty", "truncated", "refusal", "repetition"]
    width = 0.8 / max(len(flags), 1)
    x = np.arange(len(text_ids))
    for i, flag in enumerate(flags):
        rates = [100 * stats[t]["flag_rates"].get(flag, 0) for t in text_ids]
        ax.bar(x + i * width - 0.4 + width / 2, rates, width, label=flag)
    ax.set_xticks(x, text_ids, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of texts")
    ax.set_title("Quality flag rates")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    distinct = diversity.get("distinct_n", {})
    ids = [t for t in text_ids if t in distinct]
    for i, key in enumerate(("distinct_1", "distinct_2")):
        ax.bar(np.arange(len(ids)) + (i - 0.5) * 0.4, [distinct[t].get(key, 0) for t in ids], 0.4, label=key)
    ax.set_xticks(np.arange(len(ids)), ids, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Lexical diversity (distinct n-grams / all n-grams)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    sim = diversity.get("within_sample_similarity", {})
    pairs = sim.get("pairs", {})
    ids = sorted({p for key in pairs for p in key.split(" ~ ")})
    if ids:
        m = np.eye(len(ids))
        for key, value in pairs.items():
            a, b = key.split(" ~ ")
            m[ids.index(a), ids.index(b)] = m[ids.index(b), ids.index(a)] = value
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(ids)), ids, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(ids)), ids, fontsize=8)
        for i in range(len(ids)):
            for j in range(len(ids)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"Within-sample text similarity (mean {sim.get('mean')}, bag of words)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "one text per sample: no within-sample similarity", ha="center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
