"""python -m eval: zero-shot classification, image-text retrieval and branch analysis of an exported checkpoint.

    python -m eval zeroshot  --checkpoint RUN/export --data DIR [--classnames FILE] [--templates FILE]
    python -m eval retrieval --checkpoint RUN/export --data DIR [--text-ids raw detail ...]
    python -m eval compare   RUN_A/results.jsonl RUN_B/results.jsonl ...   (+ each run's fusions side by side)

Both evaluations take --fusion average|max|norm-max|adaptive|each-branch (several,
comma-separated, share one embedding pass; adaptive needs the export's branch profile) and
--branches (a subset of branches, by index or by the text id that trained them). Tables go to
stdout; each result is written as OUT/<task>-<data>-<fusion>.json and appended to
RUN/results.jsonl (RUN: the checkpoint's run directory). docs/evaluation.md has the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from data_manifests import now_iso

from .branches import branch_text_similarity
from .checkpoint import Checkpoint, load_checkpoint
from .data import EvalError, EvalSet, open_classification_set, open_retrieval_set
from .embed import PRECISIONS, EmbedOptions, embed_images, embed_texts
from .fusion import METHODS, Fusion, FusionError, parse_branches
from .report import (
    FORMAT,
    append_results,
    branch_table,
    compare_table,
    file_stem,
    fusion_table,
    plot_branch_heatmap,
    read_results,
    retrieval_table,
    safe_name,
    write_json,
    zeroshot_table,
)
from .retrieval import POSITIVES, Captions, evaluate_retrieval, retrieval_task
from .zeroshot import LabelMap, build_classifier, load_templates, zeroshot_accuracy

MAX_PROBLEMS_KEPT = 20
EACH_BRANCH = "each-branch"


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{zeroshot,retrieval,compare}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="export directory (config.json + model.safetensors), or a run directory holding export/")
    common.add_argument("--fusion", default="average", metavar="METHOD[,METHOD]",
                        help=f"branch fusion: {', '.join(METHODS)}, or {EACH_BRANCH} (every branch alone); "
                             "several comma-separated share one embedding pass (default: average)")
    common.add_argument("--branches", metavar="LIST",
                        help="branch subset (embedding customisation): indices '0,2' or the text ids that trained them "
                             "'main_object,style' (default: all)")
    common.add_argument("--out", type=Path, metavar="DIR",
                        help="where the JSON results and the heatmap go (default: RUN/eval)")
    common.add_argument("--results", type=Path, metavar="FILE",
                        help="results file to append one line per result to (default: RUN/results.jsonl)")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    common.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="autocast precision (default: fp32)")
    common.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding threads")
    common.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (quick checks)")
    common.add_argument("--json", action="store_true", help="print the result records as JSON lines instead of tables")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--split", default="test",
                        help="the split to read in CLIP_benchmark's WebDataset layout (DIR/<split>/nshards.txt; "
                             "default: test)")

    z = sub.add_parser("zeroshot", parents=[common], help="top-1/top-5 zero-shot accuracy on labelled images",
                       description="Zero-shot classification: top-1 and top-5 accuracy on labelled images (WebDataset "
                                   "shards with a .cls member or a label field, or an image folder per class).")
    z.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="labelled WebDataset shards, DIR/<class>/<image>, or a CLIP_benchmark WebDataset benchmark "
                        "(its classnames.txt and zeroshot_classification_templates.txt are the defaults)")
    z.add_argument("--classnames", type=Path, metavar="FILE",
                   help="class names, one per line, in label-index order (default: ImageNet-1k's for integer labels)")
    z.add_argument("--templates", type=Path, metavar="FILE",
                   help="prompt templates, one per line with {} for the class name "
                        "(default: the 80 OpenAI CLIP templates)")

    r = sub.add_parser("retrieval", parents=[common], help="image-text retrieval recall at 1/5/10, per text id",
                       description="Image-text retrieval: recall at 1, 5 and 10 in both directions, per text id and "
                                   "pooled, and the per-branch analysis (table and heatmap).")
    r.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="a dataset in the project's format (shards + manifest.json), or a CLIP_benchmark WebDataset "
                        "retrieval benchmark (captions c0, c1, ... from each .txt)")
    r.add_argument("--text-ids", nargs="+", metavar="ID",
                   help="text ids to evaluate (default: every text id of the dataset)")
    r.add_argument("--positives", choices=POSITIVES, default="own",
                   help="which captions are an image's: 'own' (default, CLIP_benchmark's rule: the captions it has) "
                        "or 'same-string' (also every caption identical to one of them; task "
                        "retrieval-same-string)")

    c = sub.add_parser("compare", help="print results files side by side",
                       description="Print the records of results.jsonl files side by side, one row per evaluation.")
    c.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="results.jsonl files (or run directories holding one)")
    return parser


def _options(args: argparse.Namespace) -> EmbedOptions:
    for name in ("batch_size", "workers", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise EvalError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: no CUDA device here; use --device cpu")
    return EmbedOptions(batch_size=args.batch_size, device=args.device, precision=args.precision, workers=args.workers,
                        progress=not args.no_progress, limit=args.limit)


def _fusions(args: argparse.Namespace, checkpoint: Checkpoint) -> list[Fusion]:
    branches = parse_branches(args.branches, checkpoint.branch_text_ids)
    methods = [m.strip() for m in args.fusion.split(",") if m.strip()]
    if not methods:
        raise FusionError("--fusion: no method given")
    h = checkpoint.model.num_branches
    out = []
    for method in dict.fromkeys(methods):
        if method == EACH_BRANCH:  # each branch alone, as Fusion("average", (m,)) (average[m])
            out += [Fusion("average", (m,)) for m in (branches or range(h))] if h > 1 else [Fusion("average")]
            continue
        fusion = Fusion(method, branches)
        if method == "adaptive" and len(fusion.chosen(h)) > 1:
            fusion = Fusion(method, branches, checkpoint.branch_profile())
        out.append(fusion)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- shared steps


def _embed(checkpoint: Checkpoint, items, eval_set: EvalSet, options: EmbedOptions):
    undecodable: list[str] = []
    image, kept = embed_images(checkpoint.model, items, options, total=eval_set.expected, problems=undecodable)
    eval_set.problems.extend(undecodable)
    eval_set.skipped += len(undecodable)
    if eval_set.skipped:
        print(f"warning: {eval_set.skipped} samples skipped (first: {eval_set.problems[0]})", file=sys.stderr)
    if not kept:
        why = (f"all {eval_set.skipped} samples were unusable (first: {eval_set.problems[0]})"
               if eval_set.problems else "it holds no samples")
        raise EvalError(f"{eval_set.path}: the evaluation set is empty: {why}; point --data at a dataset with images")
    return image, kept


def _record(task: str, checkpoint: Checkpoint, eval_set: EvalSet, images: int, fusion: Fusion,
            metrics: dict[str, Any], options: EmbedOptions, **extra: Any) -> dict[str, Any]:
    chosen = fusion.chosen(checkpoint.model.num_branches)
    return {
        "format": FORMAT,
        "task": task,
        "created": now_iso(),
        "checkpoint": checkpoint.describe(),
        "data": {**eval_set.describe(), "images": images, "skipped": eval_set.skipped,
                 "problems": eval_set.problems[:MAX_PROBLEMS_KEPT], **extra.pop("data", {})},
        "fusion": {"method": fusion.method, "label": fusion.label, "branches": chosen,
                   "branch_text_ids": [checkpoint.branch_text_ids[m] for m in chosen]},
        "metrics": metrics,
        **extra,
        "settings": {"batch_size": options.batch_size, "device": options.device, "precision": options.precision,
                     "limit": options.limit},
        "software": {"torch": torch.__version__},
    }


def _save(records: list[dict[str, Any]], out_dir: Path, results: Path, as_json: bool, tables: list[str]) -> None:
    if not as_json:
        print("\n\n".join(tables), flush=True)  # before writing: the numbers are not lost if a write fails
    written = []
    try:
        for record in records:
            path = out_dir / f"{file_stem(record)}.json"
            record["files"] = {**record.get("files", {}), "json": str(path), "results": str(results)}
            write_json(record, path)
            append_results(record, results)
            written.append(str(path))
    except OSError as e:
        raise EvalError(f"cannot write the results ({e.strerror or e}: {e.filename}); "
                        "choose other places with --out and --results") from None
    if as_json:
        for record in records:
            print(json.dumps(record))
    else:
        print(f"\nwrote {', '.join(written)}; appended {len(records)} line(s) to {results}")


# ----------------------------------------------------------------------------- commands


def run_retrieval(args: argparse.Namespace) -> None:
    options = _options(args)
    checkpoint = load_checkpoint(args.checkpoint, options.device)
    fusions = _fusions(args, checkpoint)
    eval_set = open_retrieval_set(args.data, args.split)
    requested = list(dict.fromkeys(args.text_ids)) if args.text_ids else None
    if requested and eval_set.text_ids:
        unknown = [t for t in requested if t not in eval_set.text_ids]
        if unknown:
            raise EvalError(f"{args.data / 'manifest.json'}: no text id {', '.join(map(repr, unknown))} "
                            f"in this dataset; it has {', '.join(eval_set.text_ids)}")

    image, items = _embed(checkpoint, iter(eval_set), eval_set, options)
    available = list(dict.fromkeys([*eval_set.text_ids, *(t for item in items for t in item.texts)]))
    text_ids = requested or available
    captions = Captions.collect([item.texts for item in items], text_ids)
    empty = [t for t in text_ids if not len(captions.pairs[t][0])]
    if requested and empty:
        raise EvalError(f"{args.data}: no caption of text id {', '.join(map(repr, empty))} in the evaluated images")
    text_ids = [t for t in text_ids if t not in empty]
    if not text_ids:
        raise EvalError(f"{args.data}: the evaluated images have no texts to retrieve")
    string_emb = embed_texts(checkpoint.model, checkpoint.tokenizer, captions.strings, options)

    out_dir = args.out or checkpoint.run_dir / "eval"
    results = args.results or checkpoint.run_dir / "results.jsonl"
    analysis = branch_text_similarity(image, string_emb, captions, text_ids, checkpoint.branch_text_ids)
    data_name = eval_set.dataset_id or eval_set.path.name
    heatmap = out_dir / f"branches-{safe_name(data_name)}.png"
    try:
        plot_branch_heatmap(analysis, heatmap, f"{checkpoint.label()} on {data_name} ({len(items)} images)")
    except OSError as e:
        raise EvalError(f"cannot write {heatmap} ({e.strerror or e}); choose another place with --out") from None
    analysis["heatmap"] = str(heatmap)

    records, tables = [], []
    for fusion in fusions:
        metrics = evaluate_retrieval(image, string_emb, captions, text_ids, fusion, device=options.device,
                                     positives=args.positives)
        record = _record(retrieval_task(args.positives), checkpoint, eval_set, len(items), fusion, metrics, options,
                         data={"text_ids": text_ids}, positives=args.positives, branch_analysis=analysis)
        records.append(record)
        tables.append(retrieval_table(record))
    tables.append(branch_table(analysis) + f"\nheatmap: {heatmap}")
    _save(records, out_dir, results, args.json, tables)


def run_zeroshot(args: argparse.Namespace) -> None:
    options = _options(args)
    checkpoint = load_checkpoint(args.checkpoint, options.device)
    fusions = _fusions(args, checkpoint)
    eval_set = open_classification_set(args.data, args.split)
    templates, templates_file = load_templates(args.templates or eval_set.templates_file)
    labels_map = LabelMap(eval_set, args.classnames or eval_set.classnames_file)

    image, items = _embed(checkpoint, labels_map.checked(iter(eval_set)), eval_set, options)
    classnames = labels_map.finish()
    labels = torch.tensor([labels_map.index(item) for item in items], dtype=torch.long)
    classifier = build_classifier(checkpoint.model, checkpoint.tokenizer, classnames, templates, options)

    h = checkpoint.model.num_branches
    per_branch = []
    if h > 1:  # each branch alone: which one carries the class information (Table 8 of the paper)
        for m in range(h):
            accuracy = zeroshot_accuracy(image, classifier, labels, Fusion("average", (m,)), device=options.device)
            per_branch.append({"branch": m, "text_id": checkpoint.branch_text_ids[m], **accuracy})
    info = {"classes": len(classnames), "classnames": labels_map.file_label, "templates": len(templates),
            "templates_file": str(templates_file)}
    records, tables = [], []
    for fusion in fusions:
        metrics = {**zeroshot_accuracy(image, classifier, labels, fusion, device=options.device), **info,
                   "per_branch": per_branch}
        record = _record("zeroshot", checkpoint, eval_set, len(items), fusion, metrics, options)
        records.append(record)
        tables.append(zeroshot_table(record))
    _save(records, args.out or checkpoint.run_dir / "eval", args.results or checkpoint.run_dir / "results.jsonl",
          args.json, tables)


def run_compare(args: argparse.Namespace) -> None:
    records = []
    for path in args.files:
        path = path / "results.jsonl" if path.is_dir() else path
        try:
            records.extend(read_results(path))
        except FileNotFoundError:
            raise EvalError(f"{path}: no such results file") from None
        except ValueError as e:
            raise EvalError(str(e)) from None
    if not records:
        raise EvalError(f"{', '.join(map(str, args.files))}: no evaluation records")
    print(compare_table(records))
    side_by_side = fusion_table(records)
    if side_by_side:
        print("\n" + side_by_side)


COMMANDS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "compare": run_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (EvalError, FusionError) as e:
        print(f"eval {args.command}: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
    except KeyboardInterrupt:
        print(f"eval {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
