"""holiclip-manifest: show, verify, compare and index multi-text datasets.

Every command reads only, except `index`, which writes a manifest for shards that have none, and
`txt`, which rewrites the shards' `.txt` member (the caption stock WebDataset loaders read).
Exit status: 0 fine, 1 problems found (verify, diff with --fail-on-diff), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from .manifest import ManifestError, load_manifest
from .shard import ShardReader, ShardReadError

EPILOG = """\
A dataset is a directory of WebDataset .tar shards plus manifest.json (see docs/data-format.md).
Examples:
  holiclip-manifest summary data/captioned
  holiclip-manifest verify data/captioned --decode-images
  holiclip-manifest show data/captioned --n 3
  holiclip-manifest stats data/captioned --plot stats.png
  holiclip-manifest diff data/run1 data/run2 --samples
  holiclip-manifest index data/img2dataset_output
  holiclip-manifest txt data/captioned --text-id detail
"""


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _describe_provenance(p: dict[str, Any]) -> str:
    if p.get("kind") == "caption":
        cap, prompt = p.get("captioner", {}), p.get("prompt", {})
        return (f"caption by {cap.get('model', '?')} ({cap.get('name', '?')}), "
                f"prompt {prompt.get('set', '?')}/{prompt.get('id', '?')}")
    if p.get("kind") == "alt_text":
        return p.get("note") or f"alt-text from {p.get('source', 'the source list')}"
    return p.get("note", p.get("kind", "unknown"))


# --- commands ----------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    m = load_manifest(args.dir)
    if args.json:
        summary = m.to_json()
        summary.pop("shards")
        summary["text_stats"] = {t: {k: v for k, v in s.items() if k != "words_hist"}
                                 for t, s in summary["text_stats"].items()}
        _print_json(summary)
        return 0
    counts = m.counts()
    print(f"dataset  {m.dataset_id}   ({m.stage}, {m.status})")
    print(f"path     {Path(args.dir).resolve()}")
    if m.parent:
        print(f"parent   {m.parent.get('dataset_id')}  at {m.parent.get('path')}")
    shard_states = ", ".join(f"{v} {k.removeprefix('shards_')}" for k, v in counts.items() if k.startswith("shards_"))
    print(f"samples  {counts['samples']}  in {counts['shards']} shards ({shard_states or 'none'})")
    print(f"updated  {m.updated}")
    stats = m.text_stats.to_json()
    rows = []
    for t in sorted(set(m.texts) | set(stats)):
        s = stats.get(t, {})
        w = s.get("words", {})
        flagged = sum(s.get("flags", {}).values()) if s else 0
        rows.append([t, s.get("count", 0), s.get("errors", 0), w.get("p50", "-"), w.get("p95", "-"),
                     f"{100 * flagged / s['count']:.1f}%" if s.get("count") else "-",
                     _describe_provenance(m.texts.get(t, {}))])
    print()
    print(_table(rows, ["text id", "texts", "errors", "median words", "p95 words", "flagged", "made by"]))
    for key, value in m.run.items():
        if isinstance(value, dict) and value.get("summary"):
            print(f"\n{key}: {value['summary']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_dataset

    report = verify_dataset(args.dir, workers=args.workers, decode_images=args.decode_images,
                            progress=not args.json and sys.stderr.isatty())
    if args.json:
        _print_json(report.to_json())
    else:
        for w in report.warnings:
            print(f"warning: {w}")
        for p in report.problems:
            print(f"PROBLEM: {p}")
        verdict = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        print(f"{verdict}: {report.shards_checked} shards, {report.samples} samples checked in {args.dir}")
    return 0 if report.ok else 1


def _iter_dataset(root: Path, shard: str | None):
    """(reader, sample) over a dataset's shards in order, tolerating unreadable shards."""
    try:
        names = sorted(load_manifest(root).shards)
    except ManifestError:
        from .manifest import list_shard_files

        names = list_shard_files(root)
    if shard:
        names = [shard]
    for name in names:
        path = root / name
        if not path.exists():
            continue
        reader = ShardReader(path)
        try:
            for sample in reader:
                yield reader, sample
        except ShardReadError as e:
            print(f"warning: {e}", file=sys.stderr)


def cmd_show(args: argparse.Namespace) -> int:
    shown = []
    for reader, sample in _iter_dataset(Path(args.dir), args.shard):
        if args.key and sample.key != args.key:
            continue
        shown.append((reader.name, sample))
        if len(shown) >= (1 if args.key else args.n):
            break
    if args.key and not shown:
        print(f"error: no sample with key {args.key!r} in {args.dir}", file=sys.stderr)
        return 2
    if args.json:
        _print_json([{"shard": name, "key": s.key, "image": f"{s.key}.{s.image_ext}",
                      "image_bytes": len(s.image or b""), "texts": s.texts, "flags": s.flags, "errors": s.errors,
                      "source": s.source} for name, s in shown])
        return 0
    for name, s in shown:
        src = s.source
        print(f"== {s.key}  ({name}, {s.image_ext}, {len(s.image or b'')} bytes, "
              f"{src.get('width', '?')}x{src.get('height', '?')}) {src.get('url', '')}")
        for t, text in s.texts.items():
            flags = f"  [{', '.join(s.flags[t])}]" if s.flags.get(t) else ""
            body = textwrap.fill(text, 100, initial_indent="    ", subsequent_indent="    ") or "    (empty)"
            print(f"  {t}{flags}:\n{body}")
        for t, err in s.errors.items():
            print(f"  {t}: ERROR {err}")
        print()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .textstats import Diversity

    root = Path(args.dir)
    m = load_manifest(root)
    stats = m.text_stats.to_json()
    diversity = Diversity()
    seen = 0
    for _, sample in _iter_dataset(root, None):
        diversity.add(sample)
        seen += 1
        if seen >= args.max_samples:
            break
    div = diversity.to_json()
    if args.plot:
        from .plots import plot_stats

        plot_stats(stats, div, args.plot, f"{m.dataset_id}: {m.num_samples} samples (diversity over {seen})")
    if args.json:
        _print_json({"dataset_id": m.dataset_id, "samples": m.num_samples, "text_stats": stats,
                     "diversity": {**div, "samples_read": seen}, "plot": args.plot})
        return 0
    rows = []
    for t, s in stats.items():
        w, fr, d = s["words"], s["flag_rates"], div["distinct_n"].get(t, {})
        rows.append([t, s["count"], w.get("mean", "-"), w.get("p5", "-"), w.get("p50", "-"), w.get("p95", "-"),
                     f"{100 * fr['empty']:.1f}", f"{100 * fr['truncated']:.1f}", f"{100 * fr['refusal']:.1f}",
                     f"{100 * fr['repetition']:.1f}", d.get("distinct_1", "-"), d.get("distinct_2", "-")])
    print(_table(rows, ["text id", "texts", "mean words", "p5", "p50", "p95", "%empty", "%trunc", "%refusal",
                        "%repeat", "distinct-1", "distinct-2"]))
    sim = div["within_sample_similarity"]
    print(f"\nwithin-sample text similarity: {sim['mean']} ({sim['measure']}; {sim['samples']} samples)")
    for pair, value in sim["pairs"].items():
        print(f"  {pair}: {value}")
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_datasets

    d = diff_datasets(args.a, args.b, samples=args.samples)
    if args.json:
        _print_json(d)
    else:
        print(f"a: {d['a']['dataset_id']} ({d['a']['samples']} samples, {d['a']['shards']} shards)")
        print(f"b: {d['b']['dataset_id']} ({d['b']['samples']} samples, {d['b']['shards']} shards)")
        if d["identical"]:
            print("same shards, texts and provenance")
        for key in ("texts_only_in_a", "texts_only_in_b", "shards_only_in_a", "shards_only_in_b",
                    "shards_content_differs"):
            if d[key]:
                print(f"{key.replace('_', ' ')}: {', '.join(d[key][:20])}" + (" ..." if len(d[key]) > 20 else ""))
        for t, changes in d["provenance_changed"].items():
            for field, (va, vb) in changes.items():
                print(f"provenance of {t}: {field}: {va!r} -> {vb!r}")
        for t, (ca, cb) in d["text_counts"].items():
            print(f"text {t}: {ca} texts in a, {cb} in b")
        if "samples" in d:
            s = d["samples"]
            print(f"samples: {s['only_in_a']} only in a, {s['only_in_b']} only in b, "
                  f"{s['image_differs']} images differ, texts differ: {s['texts_differ'] or 'none'}")
            for ex in s["examples"]:
                print(f"  {ex}")
            for err in s["errors"]:
                print(f"  unreadable: {err}")
    return 1 if args.fail_on_diff and not d["identical"] else 0


def cmd_index(args: argparse.Namespace) -> int:
    from .index import index_dataset

    writer = index_dataset(args.dir, progress=not args.json and sys.stderr.isatty(), force=args.force)
    m = writer.manifest
    if args.json:
        _print_json({"dataset_id": m.dataset_id, **m.counts(), "status": m.status, "run": m.run})
    else:
        print(f"indexed {m.counts()['shards']} shards, {m.num_samples} samples into {Path(args.dir) / 'manifest.json'} "
              f"(status {m.status})")
        for p in m.run["index"]["problems"][:20]:
            print(f"  problem: {p}")
    return 0 if m.status == "complete" else 1


def cmd_txt(args: argparse.Namespace) -> int:
    from .txt import set_txt_member

    summary = set_txt_member(args.dir, args.text_id, progress=not args.json and sys.stderr.isatty())
    if args.json:
        _print_json(summary)
    else:
        print(f"{args.dir}: .txt holds {summary['text_id']!r} in all {summary['shards']} complete shards "
              f"({summary['rewritten']} rewritten, {summary['skipped']} already did)")
        if summary["samples_without_text"]:
            print(f"  {summary['samples_without_text']} samples have no {summary['text_id']!r} text and no .txt "
                  "(stock loaders skip them)")
        if summary["samples_refused"]:
            print(f"  {summary['samples_refused']} samples the format refuses were left out (see verify)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holiclip-manifest", description=__doc__.splitlines()[0] + "\n\n" + "\n".join(__doc__.splitlines()[2:]),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
        p.set_defaults(func=func)
        return p

    p = add("summary", cmd_summary, "Samples, shards, status, and every text id with its provenance and statistics.")
    p.add_argument("dir", help="dataset directory")
    p = add("verify", cmd_verify, "Recount samples and recompute checksums; report missing, extra, unfinished, "
            "truncated or corrupt shards, bad samples and duplicate keys. Exit 1 if anything is wrong.")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--workers", type=int, default=4, help="shards checked in parallel (default 4)")
    p.add_argument("--decode-images", action="store_true", help="also decode every image (slower)")
    p = add("show", cmd_show, "Print samples with all their texts, flags, errors and source metadata.")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--n", type=int, default=5, help="how many samples (default 5)")
    p.add_argument("--key", help="show the sample with this key")
    p.add_argument("--shard", help="look only in this shard (e.g. 00003.tar)")
    p = add("stats", cmd_stats, "Per-text-id lengths and flag rates (exact, from the manifest) and text diversity "
            "(distinct-n, within-sample similarity; from up to --max-samples samples).")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the figures into a PNG")
    p.add_argument("--max-samples", type=int, default=2000, help="samples read for diversity (default 2000)")
    p = add("diff", cmd_diff, "What differs between two datasets: shards, text ids, provenance, counts; "
            "with --samples, the samples and texts inside shards whose checksums differ.")
    p.add_argument("a", help="first dataset directory")
    p.add_argument("b", help="second dataset directory")
    p.add_argument("--samples", action="store_true", help="compare samples inside differing shards")
    p.add_argument("--fail-on-diff", action="store_true", help="exit 1 when the datasets differ")
    p = add("index", cmd_index, "Build manifest.json for a directory of shards that has none (img2dataset output, "
            "hand-made shards). Reads the shards, writes only manifest.json and _shards/.")
    p.add_argument("dir", help="directory of .tar shards")
    p.add_argument("--force", action="store_true", help="replace an existing manifest")
    p = add("txt", cmd_txt, "Put text TEXT_ID in every sample's .txt member (the caption OpenCLIP's and other stock "
            "WebDataset loaders read; `raw` as the stages write it). Rewrites each shard atomically, without "
            "re-captioning, and records the choice in the manifest; rerun the same command after a kill.")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--text-id", required=True, help="the text id to put in .txt (raw, detail, qwen2vl/style, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `holiclip-manifest show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
