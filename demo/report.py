"""The demo's report: the runs' evaluation results side by side, the captioners' accuracy, and
where everything is.

Reads OUT/eval/<run>/results.jsonl (the records `python -m eval` appends), the captioned
dataset's provenance and the held-out shards, and writes OUT/report.md, OUT/report_zeroshot.png
(zero-shot top-1 per drawn attribute, one bar per run) and OUT/report_captions.png (held-out
pictures with every caption under them).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from data_manifests import ShardReader, atomic_write_text, list_shard_files, load_manifest
from demo import scenes as sc

AVERAGE, ADAPTIVE = "average", "adaptive"
# The perspective whose texts name an attribute: the branch trained on it is the attribute's
# "matched" branch (the paper's embedding customisation picks branches this way by hand).
MATCHED_PROMPT = {"shape": "main_object", "colour": "main_object", "count": "main_object", "position": "detail",
                  "background": "background"}
CHANCE = {a: 1 / len(v) for a, v in {"shape": sc.SHAPES, "colour": sc.COLOURS, "count": sc.COUNTS,
                                     "position": sc.POSITIONS, "background": sc.BACKGROUNDS}.items()}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def load_results(out: Path, runs: list[str]) -> dict[str, dict[str, Any]]:
    """run -> {"zeroshot": {fusion label: {attribute: record}}, "retrieval": {fusion label: record}}."""
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        got: dict[str, Any] = {"zeroshot": {}, "retrieval": {}}
        for line in (out / "eval" / run / "results.jsonl").read_text().splitlines():
            record = json.loads(line)
            label = record.get("fusion", {}).get("label", AVERAGE)
            if record["task"] == "zeroshot":
                got["zeroshot"].setdefault(label, {})[Path(record["data"]["path"]).name] = record
            elif record["task"] == "retrieval":
                got["retrieval"][label] = record
        results[run] = got
    return results


def top1(results: dict[str, Any], run: str, attribute: str, fusion: str = AVERAGE) -> float | None:
    record = results[run]["zeroshot"].get(fusion, {}).get(attribute)
    return record["metrics"]["top1"] if record else None


def branch_top1(results: dict[str, Any], run: str, attribute: str) -> dict[str, float]:
    """text id of each branch -> its zero-shot top-1 alone (multi-branch runs)."""
    record = results[run]["zeroshot"].get(AVERAGE, {}).get(attribute)
    return {b["text_id"]: b["top1"] for b in (record or {}).get("metrics", {}).get("per_branch", [])}


# ----------------------------------------------------------------------------- captioners


def captioners(manifest) -> dict[str, dict[str, Any]]:
    """captioner name -> {"model", "card", "text_ids": {text id: prompt id}} from the provenance."""
    out: dict[str, dict[str, Any]] = {}
    for text_id, record in manifest.texts.items():
        if record.get("kind") != "caption":
            continue
        cap = record["captioner"]
        entry = out.setdefault(cap["name"], {"model": cap.get("model"), "card": cap.get("card"), "text_ids": {}})
        entry["text_ids"][text_id] = record["prompt"]["id"]
    return out


def heldout_samples(test: Path):
    for name in list_shard_files(test):
        yield from ShardReader(test / name)


def caption_accuracy(test: Path, text_ids: list[str]) -> dict[str, dict[str, list[int]]]:
    """text id -> attribute -> [captions naming it right, captions naming it], on the held-out pictures."""
    score = {t: {a: [0, 0] for a in sc.ATTRIBUTES} for t in text_ids}
    for sample in heldout_samples(test):
        labels = {a: str(sample.source[a]) for a in sc.ATTRIBUTES}
        for t in text_ids:
            for attribute, right in sc.score_caption(sample.texts.get(t, ""), labels).items():
                score[t][attribute][0] += right
                score[t][attribute][1] += 1
    return score


def _stages(card: dict[str, Any]) -> str:
    """'17000 steps in all: 6000 steps (seed 101, data sha256 654253e3...) then ...': each stage of training."""
    stages, total = [], 0
    while card:
        stages.append(f"{card.get('steps')} steps (seed {card.get('seed')}, data sha256 "
                      f"{str(card.get('data_sha256'))[:8]}...)")
        total += int(card.get("steps") or 0)
        card = card.get("init")
    return f"{total} steps in all: " + " then ".join(reversed(stages))


def about_captioners(caps: dict[str, dict[str, Any]], accuracy: dict[str, dict[str, list[int]]]) -> list[str]:
    """The paragraph that says how the captions were made, and how often they are wrong."""
    trained = {n: c for n, c in caps.items() if (c["card"] or {}).get("trained_by")}
    random = [n for n, c in caps.items() if (c["card"] or {}).get("random_weights")]
    parts = []
    if trained:
        named = "; ".join(f"`{n}` ({c['card'].get('style')} phrasing, {_stages(c['card'])})"
                          for n, c in trained.items())
        wrong = []
        for c in trained.values():
            for t in c["text_ids"]:
                right = sum(v[0] for v in accuracy[t].values())
                said = sum(v[1] for v in accuracy[t].values())
                if said:
                    wrong.append(f"`{t}` {100 * (said - right) / said:.1f}%")
        parts.append(
            f"**How the captions were made.** The captioners are tiny Qwen2-VL models (about "
            f"{next(iter(trained.values()))['card'].get('parameters', 0) / 1e6:.1f} M parameters) trained on this "
            "machine by `python -m demo.train_captioner` on generated scenes of this same world and texts written "
            f"from what was drawn: {named}. They know only this world: shapes, colours, counts, corners and plain "
            f"backgrounds, and describe nothing else. vLLM serves them exactly as it serves a real VLM. Their error "
            f"rate on the held-out pictures (share of the attribute mentions that are wrong; table below): "
            f"{', '.join(wrong)}. With a real VLM (`python -m demo --captioner HF_ID_OR_DIR`) the same commands "
            "run unchanged.")
    if random:
        parts.append(f"**Captioners {', '.join(random)} have random weights** (demo.tiny_vlm): their captions are "
                     "placeholders, not descriptions.")
    others = [n for n in caps if n not in trained and n not in random]
    if others:
        parts.append("Captioners: " + ", ".join(f"`{n}` ({caps[n]['model']})" for n in others) + ".")
    return parts


# ----------------------------------------------------------------------------- report


def write_report(out: Path, runs: list[str], run_info: dict[str, tuple]) -> Path:
    results = load_results(out, runs)
    captioned = load_manifest(out / "captioned")
    train, test = load_manifest(out / "train"), load_manifest(out / "test")
    figures = (captioned.run.get("caption", {}).get("runs") or [{}])[-1]
    caps = captioners(captioned)
    caption_ids = [t for c in caps.values() for t in c["text_ids"]]
    accuracy = caption_accuracy(out / "test", caption_ids)

    parts = ["# holiclip demo report", "", *about_captioners(caps, accuracy), ""]
    parts += [f"Data: {captioned.num_samples} pictures of shapes; {train.num_samples} for training, "
              f"{test.num_samples} held out. Texts per picture: {', '.join(captioned.texts)} "
              f"(+ {', '.join(sc.REFERENCE_TEXTS)}, the generator's reference texts)."]
    if figures.get("images"):
        parts += [f"Captioning (its last run): {figures['images']} images, {figures['images_per_s']} images/s, "
                  f"{figures['captions_per_s']} captions/s"
                  + (f", prefix-cache hit rate {figures['prefix_cache_hit_rate']:.2f}"
                     if figures.get("prefix_cache_hit_rate") is not None else "")
                  + "."]

    rows = []
    for t in caption_ids:
        row = [t]
        for a in sc.ATTRIBUTES:
            right, said = accuracy[t][a]
            row.append(f"{100 * right / said:.1f} ({said})" if said else "-")
        rows.append(row)
    parts += ["", f"## Caption accuracy on the {test.num_samples} held-out pictures", "",
              "Per caption text id and attribute: % of the captions naming the attribute that name the drawn value "
              "and nothing else (how many captions name it), scored against the scene generator's truth "
              "(demo.scenes.score_caption).", "", _table(["text id", *sc.ATTRIBUTES], rows)]

    parts += ["", "Runs (same steps, same data, same model size):", ""]
    parts += [f"- `{r}`: {run_info[r][2]}" for r in runs]
    parts += zeroshot_section(results, runs, test.num_samples)
    parts += retrieval_section(results, runs, test.num_samples)

    plot = plot_zeroshot(results, runs, out / "report_zeroshot.png")
    grid = plot_captions(out / "test", caption_ids, out / "report_captions.png")
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
    artefacts += [("zero-shot bar chart", plot), ("held-out pictures with their captions", grid),
                  ("stage logs", out / "logs")]
    parts += ["", "## Artefacts", "", *(f"- {what}: `{where}`" for what, where in artefacts),
              "", ("Compare the runs yourself: `python -m eval compare "
                   + " ".join(str(out / "eval" / r) for r in runs) + "`"),
              f"Look at the training curves: `tensorboard --logdir {out / 'runs'}`", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def zeroshot_section(results: dict[str, Any], runs: list[str], heldout: int) -> list[str]:
    columns = [(r, AVERAGE) for r in runs]
    columns += [(r, ADAPTIVE) for r in runs if results[r]["zeroshot"].get(ADAPTIVE)]
    names = [r if f == AVERAGE else f"{r} ({f})" for r, f in columns]
    rows, means = [], {c: [] for c in columns}
    for a in sc.ATTRIBUTES:
        row = [a, _pct(CHANCE[a])]
        for c in columns:
            value = top1(results, c[0], a, c[1])
            if value is not None:
                means[c].append(value)
            row.append(_pct(value))
        rows.append(row)
    rows.append(["**mean**", _pct(_mean(list(CHANCE.values()))), *(f"**{_pct(_mean(v))}**" for v in means.values())])
    parts = ["", f"## Zero-shot top-1 (%) on the {heldout} held-out pictures, per drawn attribute", "",
             "Class prompts from demo/scenes.py (TEMPLATES). Branch fusion: average, unless the column says adaptive "
             "(weights over the branches from each class prompt alone, docs/evaluation.md). The alt-texts never "
             "mention the position and seldom the background.", "", _table(["attribute", "chance", *names], rows)]
    parts += verdicts(results, runs)
    for r in runs:
        branches = {a: branch_top1(results, r, a) for a in sc.ATTRIBUTES}
        ids = list(next(iter(branches.values()), {}))
        if len(ids) < 2:
            continue
        rows = [[a, _pct(top1(results, r, a)), _pct(top1(results, r, a, ADAPTIVE)),
                 *(_pct(branches[a].get(t)) for t in ids)] for a in sc.ATTRIBUTES]
        parts += ["", f"### `{r}`: each fusion and each branch alone (zero-shot top-1 %)", "",
                  _table(["attribute", AVERAGE, ADAPTIVE, *(f"branch `{t}`" for t in ids)], rows)]
    return parts


def verdicts(results: dict[str, Any], runs: list[str]) -> list[str]:
    """The demo's two claims, measured: holistic vs o2o on the mean, matched branch vs o2m."""
    lines = []
    mean = {r: _mean([v for a in sc.ATTRIBUTES if (v := top1(results, r, a)) is not None]) for r in runs}
    if mean.get("holistic") is not None and mean.get("o2o") is not None:
        gap = 100 * (mean["holistic"] - mean["o2o"])
        lines.append(f"- holistic vs o2o, mean over attributes: {gap:+.1f} points (target: at least +20)"
                     + ("" if gap >= 20 else " - **short of the target**"))
    if "holistic" in runs and "o2m" in runs:
        wins, diffs = [], []
        for a in sc.ATTRIBUTES:
            branches = branch_top1(results, "holistic", a)
            matched = next((v for t, v in branches.items() if t.split("/")[-1] == MATCHED_PROMPT[a]), None)
            baseline = top1(results, "o2m", a)
            if matched is None or baseline is None:
                continue
            diffs.append(matched - baseline)
            wins.append(f"{a} {100 * matched:.1f} vs {100 * baseline:.1f}")
        if diffs:
            avg = 100 * sum(diffs) / len(diffs)
            lines.append(f"- holistic's matched branch (shape, colour, count: main_object; position: detail; "
                         f"background: background) vs o2m: {'; '.join(wins)}; on average {avg:+.1f} points"
                         + ("" if avg > 0 else " - **it does not beat o2m**"))
    if "holistic" in runs and results["holistic"]["zeroshot"].get(ADAPTIVE):
        adaptive = _mean([v for a in sc.ATTRIBUTES if (v := top1(results, "holistic", a, ADAPTIVE)) is not None])
        gaps = []
        for a in sc.ATTRIBUTES:
            best = max(branch_top1(results, "holistic", a).values(), default=None)
            value = top1(results, "holistic", a, ADAPTIVE)
            if best is not None and value is not None:
                gaps.append(f"{a} {100 * (value - best):+.1f}")
        line = f"- holistic with adaptive fusion: mean {_pct(adaptive)}"
        if mean.get("o2m") is not None:
            line += f" (o2m {_pct(mean['o2m'])})"
        lines.append(line + "; against the best single branch per attribute: " + ", ".join(gaps))
    return ["", *lines] if lines else []


def retrieval_section(results: dict[str, Any], runs: list[str], heldout: int) -> list[str]:
    text_ids: list[str] = []
    for r in runs:
        rec = results[r]["retrieval"].get(AVERAGE)
        for t in (rec["metrics"] if rec else {}):
            if t not in text_ids:
                text_ids.append(t)
    rows = []
    for t in text_ids:
        row = [t]
        for r in runs:
            m = (results[r]["retrieval"].get(AVERAGE) or {}).get("metrics", {}).get(t)
            row.append(f"{_pct(m['i2t'].get('R@1'))} / {_pct(m['t2i'].get('R@1'))}" if m else "-")
        rows.append(row)
    return ["", "## Retrieval on the held-out pictures, per text id: image->text R@1 / text->image R@1 (%)", "",
            f"Average fusion. CLIP_benchmark's rule: a caption is right only for its own image. Chance is about "
            f"{100 / max(heldout, 1):.1f}%; many pictures share a text (\"red circle\"), its copies "
            "tie and a tie counts against the model, so coarse text ids score near 0 by construction.", "",
            _table(["text id", *runs], rows)]


# ----------------------------------------------------------------------------- pictures


def plot_zeroshot(results: dict[str, dict[str, Any]], runs: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        values = [100 * (top1(results, r, a) or 0) for a in sc.ATTRIBUTES]
        ax.bar([x + i * width for x in range(len(sc.ATTRIBUTES))], values, width, label=r)
    for x, a in enumerate(sc.ATTRIBUTES):
        ax.hlines(100 * CHANCE[a], x - width / 2, x + width * (len(runs) - 0.5), colors="black", linestyles="dotted")
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(sc.ATTRIBUTES))], sc.ATTRIBUTES)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out pictures, average fusion; dotted: chance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_captions(test: Path, text_ids: list[str], path: Path, pictures: int = 6) -> Path:
    """A few held-out pictures in a row, every caption under each (text id: caption)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    samples = []
    for sample in heldout_samples(test):
        samples.append(sample)
        if len(samples) == pictures:
            break
    below = 0.4 * len(text_ids)  # inches of caption text under each picture
    fig, axes = plt.subplots(1, max(1, len(samples)), figsize=(2.6 * max(1, len(samples)), 2.5 + below),
                             squeeze=False)
    for ax, sample in zip(axes[0], samples, strict=False):
        ax.imshow(Image.open(io.BytesIO(sample.image)).convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"alt-text: {sample.texts.get('raw', '')}", fontsize=7)
        lines = [textwrap.fill(f"{t}: {sample.texts.get(t, '-')}", 34) for t in text_ids]
        ax.text(0, -0.04, "\n".join(lines), transform=ax.transAxes, fontsize=6, va="top", ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / (2.5 + below), bottom=(below + 0.05) / (2.5 + below),
                        wspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
