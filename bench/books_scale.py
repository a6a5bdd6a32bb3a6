"""The books of a dataset at 1k, 10k and 100k shards: does committing a shard stay flat?

    .venv/bin/python bench/books_scale.py [--sizes 1000 10000 100000] [--commits 200] [--dir /dev/shm]

For each size, a dataset with that many shard records (5 text ids each, as a captioned shard
with alt-text and four prompts has) is set up, then the real `DatasetWriter` measures:
- commit, new shard: one record written, running totals updated;
- commit, redone shard: what an incremental run ("add a prompt") does to every shard;
- flush, committing thread: what `maybe_flush` costs the thread that commits (a snapshot);
- flush, written: the whole manifest.json encoded and written (on the writer thread).
The obvious alternative is the books as they were before (a redone shard rebuilt the totals
from every record; the manifest was encoded with `dataclasses.asdict` and the indented
pure-Python JSON encoder, on the committing thread); it is measured in the same run and the
ratio printed. Records go to --dir (tmpfs by default, so that fsync, a constant per commit on a
real disk, does not hide what grows with the number of shards).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_manifests import DatasetWriter, ShardInfo, TextStats  # noqa: E402
from data_manifests.files import atomic_write_json  # noqa: E402
from data_manifests.manifest import COMPLETE, MANIFEST_NAME, RECORDS_DIR, ShardEntry  # noqa: E402

TEXT_IDS = ("raw", "qwen/detail", "qwen/background", "qwen/main_object", "qwen/style")


def shard_stats(i: int) -> TextStats:
    """Counters of a 1,000-sample shard: a word-count histogram of ~40 bins per text id."""
    raw = {}
    for t, text_id in enumerate(TEXT_IDS):
        hist = {str(5 + (i + t + b) % 60): 25 for b in range(40)}
        raw[text_id] = {"count": 1000, "errors": i % 3, "chars": 60_000 + i % 997,
                        "flags": {"truncated": i % 7}, "words_hist": hist}
    return TextStats(raw)


def info(i: int) -> ShardInfo:
    return ShardInfo(name=f"{i:06d}.tar", samples=1000, bytes=40_000_000 + i, sha256=f"{i:064x}")


def extra(i: int) -> dict:
    return {"text_identities": {t: f"sha256:{i:016x}" for t in TEXT_IDS}}


def make_books(root: Path, n: int) -> DatasetWriter:
    """A dataset of n completed shard records, set up directly (records without fsync): the
    bench times the commits after it, not the set-up."""
    writer = DatasetWriter(root, stage="bench", flush_every_s=float("inf"))
    for i in range(n):
        inf, stats = info(i), shard_stats(i)
        entry = ShardEntry(name=inf.name, status=COMPLETE, samples=inf.samples, bytes=inf.bytes, sha256=inf.sha256,
                           completed="2026-12-02T00:00:00+00:00", info=extra(i))
        with open(root / RECORDS_DIR / f"{inf.name}.json", "w") as f:
            json.dump({**entry.to_json(), "text_stats": stats.to_json()}, f)
        writer.manifest.shards[inf.name] = entry
        writer.manifest.text_stats.merge(stats)
    return writer


def per_call(fn, reps: int) -> float:
    t = time.perf_counter()
    for r in range(reps):
        fn(r)
    return (time.perf_counter() - t) / reps


def old_flush(writer: DatasetWriter) -> None:
    """The manifest rewrite as it was: asdict, indented pure-Python encoder, committing thread."""
    m = writer.manifest
    obj = {**m.header_json(), "counts": m.counts(), "shards": [asdict(m.shards[k]) for k in sorted(m.shards)]}
    atomic_write_json(writer.root / MANIFEST_NAME, obj)


def measure(base: Path, n: int, commits: int) -> dict:
    root = base / f"books-{n}"
    shutil.rmtree(root, ignore_errors=True)
    writer = make_books(root, n)
    writer.flush()
    new = per_call(lambda r: writer.commit(info(n + r), shard_stats(n + r), extra=extra(n + r)), commits)
    redo = per_call(lambda r: writer.commit(info(r), shard_stats(r + 1), extra=extra(r)), commits)
    reps = 5
    snapshot = per_call(lambda r: writer._snapshot(background=True), reps)
    written = per_call(lambda r: writer.flush(), reps)
    # The old books: a redone shard rebuilt the totals from every record (a few, they are slow).
    old_reps = max(1, min(commits, 200_000 // n))
    old_redo = per_call(lambda r: writer._rebuild_stats(), old_reps) + new
    old_written = per_call(lambda r: old_flush(writer), 2 if n >= 100_000 else reps)
    writer.finish()
    size = (root / MANIFEST_NAME).stat().st_size
    shutil.rmtree(root)
    return {"shards": n, "commit_new_ms": new * 1e3, "commit_redo_ms": redo * 1e3,
            "flush_committing_thread_ms": snapshot * 1e3, "flush_written_ms": written * 1e3,
            "old_commit_redo_ms": old_redo * 1e3, "old_flush_ms": old_written * 1e3, "manifest_mb": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--commits", type=int, default=200, help="commits timed per kind and size")
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where the datasets are made (default: /dev/shm)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="holiclip-books-", dir=args.dir))
    try:
        rows = [measure(base, n, args.commits) for n in args.sizes]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'shards':>8} {'commit new':>11} {'commit redo':>12} {'flush: committer':>17} {'flush: written':>15}"
          f" {'manifest':>9} | {'old redo':>10} {'old flush':>10} | {'redo old/new':>12} {'flush old/new':>13}")
    for r in rows:
        print(f"{r['shards']:>8} {r['commit_new_ms']:>9.2f}ms {r['commit_redo_ms']:>10.2f}ms"
              f" {r['flush_committing_thread_ms']:>15.2f}ms {r['flush_written_ms']:>13.1f}ms"
              f" {r['manifest_mb']:>7.1f}MB |"
              f" {r['old_commit_redo_ms']:>8.1f}ms {r['old_flush_ms']:>8.1f}ms |"
              f" {r['old_commit_redo_ms'] / r['commit_redo_ms']:>11.0f}x"
              f" {r['old_flush_ms'] / r['flush_committing_thread_ms']:>12.0f}x")
    first, last = rows[0], rows[-1]
    print(f"commit (redone shard) at {last['shards']} vs {first['shards']} shards: "
          f"{last['commit_redo_ms'] / first['commit_redo_ms']:.2f}x (flat is 1); median commit "
          f"{statistics.median(r['commit_new_ms'] for r in rows):.2f} ms")


if __name__ == "__main__":
    main()
