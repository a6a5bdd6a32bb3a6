"""The demo's report: the runs' evaluation results side by side, and where everything is.

Reads OUT/eval/<run>/results.jsonl (the records `python -m eval` appends) and writes
OUT/report.md plus OUT/report_zeroshot.png (zero-shot top-1 per drawn attribute, one bar per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_manifests import atomic_write_text, load_manifest
from demo import scenes as sc


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def load_results(out: Path, runs: list[str]) -> dict[str, dict[str, Any]]:
    """run -> {"zeroshot": {attribute: record}, "retrieval": record}."""
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        got: dict[str, Any] = {"zeroshot": {}, "retrieval": None}
        for line in (out / "eval" / run / "results.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["task"] == "zeroshot":
                got["zeroshot"][Path(record["data"]["path"]).name] = record
            elif record["task"] == "retrieval":
                got["retrieval"] = record
        results[run] = got
    return results


def write_report(out: Path, runs: list[str], run_info: dict[str, tuple], note: str | None) -> Path:
    results = load_results(out, runs)
    captioned = load_manifest(out / "captioned")
    train, test = load_manifest(out / "train"), load_manifest(out / "test")
    figures = (captioned.run.get("caption", {}).get("runs") or [{}])[-1]
    parts = ["# holiclip demo report", ""]
    if note:
        parts += [f"**Captioner: {note}.** The pipeline, engines and bookkeeping ran for real; the caption *text* is "
                  "meaningless. `holistic-ref` trains on reference texts the scene generator wrote from what it drew "
                  "(provenance kind `reference`), to show what the method does with informative captions.", ""]
    else:
        parts += ["Captioner: " + ", ".join(f"{c.get('name')} ({c.get('model')})" for c in
                                            {json.dumps(p.get('captioner'), sort_keys=True): p.get('captioner')
                                             for p in captioned.texts.values() if p.get('captioner')}.values()), ""]
    parts += [f"Data: {captioned.num_samples} pictures of shapes; {train.num_samples} for training, "
              f"{test.num_samples} held out. Texts per picture: {', '.join(captioned.texts)} "
              f"(+ {', '.join(sc.REFERENCE_TEXTS)})."]
    if figures.get("images"):
        parts += [f"Captioning (its last run): {figures['images']} images, {figures['images_per_s']} images/s, "
                  f"{figures['captions_per_s']} captions/s"
                  + (f", prefix-cache hit rate {figures['prefix_cache_hit_rate']:.2f}"
                     if figures.get("prefix_cache_hit_rate") is not None else "")
                  + "."]
    parts += ["", "Runs (same steps, same data, same model size):", ""]
    parts += [f"- `{r}`: {run_info[r][2]}" for r in runs]

    chance = {a: 1 / len(values) for a, values in
              {"shape": sc.SHAPES, "colour": sc.COLOURS, "count": sc.COUNTS, "position": sc.POSITIONS,
               "background": sc.BACKGROUNDS}.items()}
    rows, means = [], {r: [] for r in runs}
    for a in sc.ATTRIBUTES:
        row = [a, _pct(chance[a])]
        for r in runs:
            rec = results[r]["zeroshot"].get(a)
            top1 = rec["metrics"]["top1"] if rec else None
            if top1 is not None:
                means[r].append(top1)
            row.append(_pct(top1))
        rows.append(row)
    rows.append(["**mean**", _pct(sum(chance.values()) / len(chance)),
                 *(f"**{_pct(sum(v) / len(v))}**" if v else "-" for v in means.values())])
    parts += ["", f"## Zero-shot top-1 (%) on the {test.num_samples} held-out pictures, per drawn attribute", "",
              "Class prompts from demo/scenes.py (TEMPLATES); branch fusion: average. The alt-texts never "
              "mention the position and seldom the background.", "",
              _table(["attribute", "chance", *runs], rows)]

    text_ids: list[str] = []
    for r in runs:
        rec = results[r]["retrieval"]
        for t in (rec["metrics"] if rec else {}):
            if t not in text_ids:
                text_ids.append(t)
    rows = []
    for t in text_ids:
        row = [t]
        for r in runs:
            m = (results[r]["retrieval"] or {}).get("metrics", {}).get(t)
            row.append(f"{_pct(m['i2t'].get('R@1'))} / {_pct(m['t2i'].get('R@1'))}" if m else "-")
        rows.append(row)
    parts += ["", "## Retrieval on the held-out pictures, per text id: image->text R@1 / text->image R@1 (%)", "",
              f"CLIP_benchmark's rule: a caption is right only for its own image. Chance is about "
              f"{100 / max(test.num_samples, 1):.1f}%; many pictures share a text (\"red circle\"), its copies "
              "tie and a tie counts against the model, so coarse text ids score near 0 by construction.", "",
              _table(["text id", *runs], rows)]

    plot = plot_zeroshot(results, runs, chance, out / "report_zeroshot.png")
    artefacts = [("URL list", out / "urls.csv"), ("image shards (ingest)", out / "images"),
                 ("captioned shards + manifest", out / "captioned"), ("caption job config", out / "caption.yaml"),
                 ("train / test splits", f"{out / 'train'}, {out / 'test'}"), ("zero-shot sets", out / "zeroshot")]
    for r in runs:
        artefacts += [(f"{r}: export (safetensors + config.json)", out / "runs" / r / "export"),
                      (f"{r}: TensorBoard", out / "runs" / r / "tensorboard"),
                      (f"{r}: evaluation (JSON, results.jsonl)", out / "eval" / r)]
        heat = sorted((out / "eval" / r / "retrieval").glob("branches-*.png"))
        if heat:
            artefacts.append((f"{r}: branch x text heatmap", heat[0]))
    artefacts += [("zero-shot bar chart", plot), ("stage logs", out / "logs")]
    parts += ["", "## Artefacts", "", *(f"- {what}: `{where}`" for what, where in artefacts),
              "", ("Compare the runs yourself: `python -m eval compare "
                   + " ".join(str(out / "eval" / r) for r in runs) + "`"),
              f"Look at the training curves: `tensorboard --logdir {out / 'runs'}`", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def plot_zeroshot(results: dict[str, dict[str, Any]], runs: list[str], chance: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        values = [100 * ((results[r]["zeroshot"].get(a) or {}).get("metrics", {}).get("top1") or 0)
                  for a in sc.ATTRIBUTES]
        ax.bar([x + i * width for x in range(len(sc.ATTRIBUTES))], values, width, label=r)
    for x, a in enumerate(sc.ATTRIBUTES):
        ax.hlines(100 * chance[a], x - width / 2, x + width * (len(runs) - 0.5), colors="black", linestyles="dotted")
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(sc.ATTRIBUTES))], sc.ATTRIBUTES)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out pictures; dotted: chance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
