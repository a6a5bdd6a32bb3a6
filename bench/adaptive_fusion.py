"""Query-adaptive branch fusion against average / max / norm-max / each branch (a measurement, not a test).

    python bench/adaptive_fusion.py [--steps 300] [--seed 0] [--out /tmp/adaptive] [--json out.json]

The miniature of issue 19 on the tests' synthetic data (tests/synthetic_data.py: one shape of
some colour at some position on a plain background; texts raw "red circle", detail (everything),
background, main_object, style "bright red tones"):
  1. trains the tiny model in-process as tests/test_eval_e2e.py does (plain PyTorch loop, the
     project's loss, seeded batches of 32), O2M (one embedding, the 5 texts) and M2M Psi_CLS
     (H = 5, branch m <- text m), the same steps each, and exports both;
  2. adds the branch profile from the training shards (train.export.add_branch_profile, what
     the trainer does at export time);
  3. evaluates both with `python -m eval` (in-process): zero-shot per attribute (shape, colour,
     background, position) on held-out images with two plain templates per attribute, and
     retrieval per text id, with --fusion average,max,norm-max,adaptive,each-branch;
  4. prints the summary table of docs/evaluation.md and `python -m eval compare`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from synthetic_data import TEXT_IDS, make_synthetic_dataset  # noqa: E402
from test_eval_e2e import train_and_export  # noqa: E402  (the tests' training loop, reused as is)

from data_manifests import DatasetWriter, Sample, ShardReader, list_shard_files  # noqa: E402
from eval.cli import main as eval_main  # noqa: E402
from train.export import add_branch_profile  # noqa: E402

# Two plain templates per attribute; neither is a training text's phrasing.
TEMPLATES = {
    "shape": ["a photo of a {}.", "a {} shape."],
    "colour": ["a photo of something {}.", "the colour {}."],
    "background": ["a photo with a {} background.", "something in front of {}."],
    "position": ["a shape at the {}.", "something in the {} corner."],
}
FUSIONS = "average,max,norm-max,adaptive,each-branch"


def attribute_sets(eval_data: Path, out: Path) -> dict[str, Path]:
    """One labelled zero-shot set per attribute, from the held-out images (label = the drawn value)."""
    samples = [s for name in list_shard_files(eval_data) for s in ShardReader(eval_data / name)]
    sets = {}
    for attribute in TEMPLATES:
        writer = DatasetWriter(out / attribute, stage="bench", dataset_id=f"zs-{attribute}", flush_every_s=0)
        writer.write_shard("00000.tar", [Sample(key=s.key, image=s.image, image_ext=s.image_ext,
                                                texts={"raw": s.texts["raw"]},
                                                source={"sha256": s.source["sha256"],
                                                        "label": s.source[attribute]}) for s in samples])
        writer.finish()
        (out / f"{attribute}.templates").write_text("\n".join(TEMPLATES[attribute]) + "\n")
        sets[attribute] = out / attribute
    return sets


def run_eval(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = eval_main([*map(str, argv), "--no-progress"])
    if code:
        raise SystemExit(f"eval {' '.join(map(str, argv))} failed ({code})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/holiclip-adaptive"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = args.out
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or give --out")
    train_data = make_synthetic_dataset(out / "train", shards=8, per_shard=128, seed=1 + args.seed)
    eval_data = make_synthetic_dataset(out / "heldout", shards=4, per_shard=64, seed=1000 + args.seed)
    sets = attribute_sets(eval_data, out / "zeroshot")

    runs = {"o2m": ("none", 1), "m2m_cls": ("cls", len(TEXT_IDS))}
    timings = {}
    for name, (branch, h) in runs.items():
        started = time.perf_counter()
        export = train_and_export(out / name / "export", train_data, branch=branch, h=h, text_ids=list(TEXT_IDS),
                                  steps=args.steps, seed=args.seed)
        timings[f"train {name}"] = time.perf_counter() - started
        section = add_branch_profile(export, [str(train_data)])
        fit = {k: section.get(k) for k in ("temperature", "own_branch_top", "own_branch_weight")}
        print(f"{name}: branch profile {json.dumps(fit)}", flush=True)
        started = time.perf_counter()
        for attribute, data in sets.items():
            run_eval("zeroshot", "--checkpoint", export, "--data", data, "--templates",
                     out / "zeroshot" / f"{attribute}.templates", "--fusion", FUSIONS)
        # The synthetic texts are coarse (one background string per colour): the same-string rule, as measured.
        run_eval("retrieval", "--checkpoint", export, "--data", eval_data, "--fusion", FUSIONS,
                 "--positives", "same-string")
        timings[f"eval {name}"] = time.perf_counter() - started
    records = {name: [json.loads(line) for line in (out / name / "results.jsonl").read_text().splitlines()]
               for name in runs}
    zs = {name: {r["data"]["dataset_id"].removeprefix("zs-"): r for r in recs if r["task"] == "zeroshot"
                 and len(r["fusion"]["branches"]) == r["checkpoint"]["config"]["num_branches"]
                 and r["fusion"]["method"] == "average"} for name, recs in records.items()}

    def top1(name: str, attribute: str, method: str) -> float:
        return 100 * next(r["metrics"]["top1"] for r in records[name] if r["task"] == "zeroshot"
                          and r["data"]["dataset_id"] == f"zs-{attribute}" and r["fusion"]["label"] == method)

    summary: dict = {"steps": args.steps, "seed": args.seed, "zeroshot": {}, "retrieval": {}, "timings_s": timings}
    rows = []
    for attribute in TEMPLATES:
        per_branch = {b["text_id"]: 100 * b["top1"] for b in zs["m2m_cls"][attribute]["metrics"]["per_branch"]}
        best = max(per_branch, key=per_branch.get)
        row = {"o2m": top1("o2m", attribute, "average"),
               **{m: top1("m2m_cls", attribute, m) for m in ("average", "max", "norm-max", "adaptive")},
               "best_branch": per_branch[best], "best_branch_id": best, "per_branch": per_branch}
        summary["zeroshot"][attribute] = row
        rows.append(row)
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("o2m", "average", "max", "norm-max", "adaptive",
                                                               "best_branch")}
    summary["zeroshot"]["mean"] = mean
    print("\nzero-shot top-1 % (chance 25)")
    print("| attribute | O2M | M2M average | max | norm-max | adaptive | best single branch |")
    print("|---|---|---|---|---|---|---|")
    for attribute, r in summary["zeroshot"].items():
        if attribute == "mean":
            continue
        print(f"| {attribute} | {r['o2m']:.1f} | {r['average']:.1f} | {r['max']:.1f} | {r['norm-max']:.1f} | "
              f"{r['adaptive']:.1f} | {r['best_branch']:.1f} ({r['best_branch_id']}) |")
    print(f"| mean | {mean['o2m']:.1f} | {mean['average']:.1f} | {mean['max']:.1f} | {mean['norm-max']:.1f} | "
          f"{mean['adaptive']:.1f} | {mean['best_branch']:.1f} |")

    retrieval = {r["fusion"]["label"]: r["metrics"] for r in records["m2m_cls"] if r["task"] == "retrieval-same-string"}
    o2m_retrieval = next(r["metrics"] for r in records["o2m"] if r["task"] == "retrieval-same-string")
    print("\nretrieval R@1 % on the held-out images, I2T / T2I")
    print("| text id | O2M | M2M average | max | norm-max | adaptive | adaptive - average |")
    print("|---|---|---|---|---|---|---|")
    for text_id in o2m_retrieval:
        cells = {m: (100 * retrieval[m][text_id]["i2t"]["R@1"], 100 * retrieval[m][text_id]["t2i"]["R@1"])
                 for m in ("average", "max", "norm-max", "adaptive")}
        o2m = (100 * o2m_retrieval[text_id]["i2t"]["R@1"], 100 * o2m_retrieval[text_id]["t2i"]["R@1"])
        diff = (cells["adaptive"][0] - cells["average"][0], cells["adaptive"][1] - cells["average"][1])
        summary["retrieval"][text_id] = {"o2m": o2m, **cells, "adaptive_minus_average": diff}
        print(f"| {text_id} | {o2m[0]:.1f} / {o2m[1]:.1f} | "
              + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in cells.values())
              + f" | {diff[0]:+.1f} / {diff[1]:+.1f} |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"\npython -m eval compare {out / 'o2m'} {out / 'm2m_cls'}\n")
    eval_main(["compare", str(out / "o2m"), str(out / "m2m_cls")])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
