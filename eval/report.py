"""Evaluation results: readable tables, JSON records, the run's results.jsonl and the branch heatmap.

A record is one evaluation (task x checkpoint x data x fusion) and is self-describing: the
checkpoint's config.json, the data's manifest id, the fusion and branch subset, the metrics.
`python -m eval` writes it as OUT/<task>-<data>-<fusion>.json and appends it as one line to
RUN/results.jsonl, so the runs of an experiment (O2O, O2M, M2M ...) compare side by side
(`python -m eval compare RUN*/results.jsonl`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_manifests import atomic_write_json

FORMAT = "holiclip-eval/1"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def title(record: dict[str, Any]) -> str:
    data = record["data"]
    return (f"{record['task']}: {record['checkpoint']['label']} ({record['checkpoint']['path']})\n"
            f"  data {data.get('dataset_id') or data['path']}: {data['images']} images"
            + (f", {data['skipped']} skipped" if data.get("skipped") else "")
            + f"; fusion {record['fusion']['label']}")


def retrieval_table(record: dict[str, Any]) -> str:
    rows = []
    for text_id, m in record["metrics"].items():
        rows.append([text_id, str(m["images"]), str(m["captions"]), str(m["distinct_texts"]),
                     *(_pct(m["i2t"].get(k)) for k in ("R@1", "R@5", "R@10")),
                     *(_pct(m["t2i"].get(k)) for k in ("R@1", "R@5", "R@10"))])
    header = ["text id", "images", "captions", "distinct", "I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10"]
    rule = ("  positives: an image's own captions (CLIP_benchmark's rule)" if record.get("positives") == "own" else
            "  positives: also every caption identical to one of the image's (same-string rule; not comparable "
            "with CLIP_benchmark)")
    return title(record) + "\n" + rule + "\n" + _table(header, rows)


def zeroshot_table(record: dict[str, Any]) -> str:
    m = record["metrics"]
    rows = [[record["fusion"]["label"], _pct(m.get("top1")), _pct(m.get("top5"))]]
    for b in m.get("per_branch", []):
        rows.append([f"branch {b['branch']}" + (f" ({b['text_id']})" if b.get("text_id") else ""),
                     _pct(b.get("top1")), _pct(b.get("top5"))])
    info = f"  {m['classes']} classes ({m['classnames']}), {m['templates']} templates ({m['templates_file']})"
    return title(record) + "\n" + info + "\n" + _table(["scores", "top-1", "top-5"], rows)


def branch_table(analysis: dict[str, Any]) -> str:
    """The margin matrix (own text minus other images' texts), branches x text ids, with matched below."""
    text_ids = analysis["text_ids"]
    header = ["branch \\ text id", *text_ids, "best"]
    margin = [[analysis["branches"][m], *(f"{x:+.3f}" for x in row), analysis["best_text_id"][m]]
              for m, row in enumerate(analysis["margin"])]
    matched = [[analysis["branches"][m], *(f"{x:.3f}" for x in row)] for m, row in enumerate(analysis["matched"])]
    best = ["best branch", *(str(analysis["best_branch"][t]) for t in text_ids), ""]
    return ("branch analysis: mean cosine with the image's own text minus other images' texts (margin)\n"
            + _table(header, [*margin, best])
            + "\n\nmean cosine with the image's own text (matched)\n" + _table(header[:-1], matched))


def compare_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per record, grouped by task: the headline metrics side by side."""
    out = []
    for task in sorted({r["task"] for r in records}):
        group = [r for r in records if r["task"] == task]
        base = ["checkpoint", "model", "data", "fusion"]
        if task == "zeroshot":
            header = [*base, "top-1", "top-5"]
            rows = [[*_ident(r), _pct(r["metrics"].get("top1")), _pct(r["metrics"].get("top5"))] for r in group]
        else:
            text_ids = list(dict.fromkeys(t for r in group for t in r["metrics"] if t != "all"))
            text_ids += ["all"] if any("all" in r["metrics"] for r in group) else []
            header = [*base, *(f"{t} {d}@1" for t in text_ids for d in ("I2T", "T2I"))]
            rows = [[*_ident(r), *(_pct(r["metrics"].get(t, {}).get(d, {}).get("R@1"))
                                   for t in text_ids for d in ("i2t", "t2i"))]
                    for r in group]
        out.append(f"{task} (recall and accuracy in %)\n" + _table(header, rows))
    return "\n\n".join(out)


def fusion_table(records: Sequence[dict[str, Any]]) -> str:
    """Per checkpoint, the fusions side by side: zero-shot top-1 per evaluation set (an attribute),
    retrieval R@1 (I2T/T2I) per text id. A single branch is one column whatever the fusion, and
    zero-shot records bring their per-branch numbers; the newest record of a cell wins. Empty
    when no checkpoint was evaluated with more than one fusion."""
    out = []
    for path in dict.fromkeys(r["checkpoint"]["path"] for r in records):
        mine = [r for r in records if r["checkpoint"]["path"] == path]
        cells: dict[tuple[str, str], str] = {}
        columns: dict[str, None] = {}
        rows: dict[str, None] = {}
        for r in mine:
            data = str(r["data"].get("dataset_id") or Path(r["data"]["path"]).name)
            branches, ids = r["fusion"]["branches"], r["fusion"].get("branch_text_ids") or []
            single = len(branches) == 1 and r["checkpoint"]["config"].get("num_branches", 1) > 1
            column = _branch_column(branches[0], ids[0] if ids else None) if single else r["fusion"]["label"]
            if r["task"] == "zeroshot":
                found = [(column, r["metrics"])] + [(_branch_column(b["branch"], b.get("text_id")), b)
                                                    for b in r["metrics"].get("per_branch", [])]
                for col, m in found:
                    columns.setdefault(col)
                    rows.setdefault(f"zeroshot {data}")
                    cells[f"zeroshot {data}", col] = _pct(m.get("top1"))
            else:
                columns.setdefault(column)
                for text_id, m in r["metrics"].items():
                    rows.setdefault(f"{r['task']} {data} {text_id}")
                    cells[f"{r['task']} {data} {text_id}", column] = (
                        f"{_pct(m['i2t'].get('R@1'))}/{_pct(m['t2i'].get('R@1'))}")
        fused = [c for c in columns if not c.startswith("branch ")]
        if len(columns) < 2:
            continue
        order = fused + [c for c in columns if c.startswith("branch ")]
        table = _table(["evaluation", *order], [[row, *(cells.get((row, c), "-") for c in order)] for row in rows])
        out.append(f"{mine[0]['checkpoint']['label']} ({'/'.join(Path(path).parts[-2:])}): fusions side by side "
                   "(zero-shot top-1, retrieval I2T/T2I R@1, in %)\n" + table)
    return "\n\n".join(out)


def _branch_column(branch: int, text_id: str | None) -> str:
    return f"branch {branch}" + (f" ({text_id})" if text_id else "")


def _ident(record: dict[str, Any]) -> list[str]:
    path = Path(record["checkpoint"]["path"])
    return ["/".join(path.parts[-2:]), record["checkpoint"]["label"],
            str(record["data"].get("dataset_id") or Path(record["data"]["path"]).name), record["fusion"]["label"]]


# ----------------------------------------------------------------------------- files


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,\[\]-]+", "_", text)


def file_stem(record: dict[str, Any]) -> str:
    """'retrieval-<dataset id>-<fusion>': one file per kind of result, rewritten by a re-run."""
    data = record["data"].get("dataset_id") or Path(record["data"]["path"]).name
    return safe_name(f"{record['task']}-{data}-{record['fusion']['label']}")


def write_json(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)  # a re-run rewrites it: never leave half of one


def append_results(record: dict[str, Any], path: Path) -> None:
    """One line per record; appending never rewrites earlier lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_results(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ValueError(f"{path}:{number}: not an evaluation record (format {FORMAT!r})")
            if record.get("task") == "retrieval" and "positives" not in record:
                # Written before CLIP_benchmark's rule became the default: computed with the same-string rule.
                record["task"], record["positives"] = "retrieval-same-string", "same-string"
            records.append(record)
    return records


def plot_branch_heatmap(analysis: dict[str, Any], path: Path, title: str) -> None:
    """Two panels, branches x text ids: the margin (diverging colours, centred on 0) and the matched cosine."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas, not pyplot: no global state, no display needed.
    text_ids, branches = analysis["text_ids"], analysis["branches"]
    h, t = len(branches), len(text_ids)
    fig = Figure(figsize=(2.2 + 2 * 1.1 * max(t, 2), 1.6 + 0.55 * max(h, 2)))
    FigureCanvasAgg(fig)
    panels = (("margin: own text - other images' texts", np.array(analysis["margin"], dtype=float), "RdBu_r", True),
              ("matched: cosine with own text", np.array(analysis["matched"], dtype=float), "viridis", False))
    for k, (name, values, cmap, centred) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if centred:
            low, high = -max(abs(low), abs(high), 1e-9), max(abs(low), abs(high), 1e-9)
        image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=low, vmax=high)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(t), text_ids, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(h), branches if k == 0 else [""] * h, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("text id")
        for i in range(h):
            for j in range(t):
                # Light text on the dark ends of each colour map, dark text elsewhere.
                share = (values[i, j] - low) / max(high - low, 1e-9)
                dark = abs(share - 0.5) > 0.3 if centred else share < 0.5
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.axes[0].set_ylabel("branch (trained on)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
