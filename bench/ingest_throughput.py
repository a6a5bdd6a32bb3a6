"""Ingest throughput: `python -m pipeline.ingest` against plain img2dataset, same URLs, same settings.

    .venv/bin/python bench/ingest_throughput.py [--urls 4000] [--processes 2] [--threads 32] [--repeats 2]

Both download the same URL list from an HTTP server on 127.0.0.1 (tests/http_server.py, in this
process) serving 640x480 JPEGs, resize to 448 px on the long side, write WebDataset shards of
--shard-size; each run is a fresh process timed from start to exit (start-up included: that is
what a user waits for). Plain img2dataset is the obvious alternative; pipeline.ingest adds the
scheme filter, the conversion to the project's format (sha256, key order) and the manifest.
Runs alternate (A B A B ...) so that a machine shared with other work slows both alike; the
median of the repeats is reported. Figures depend on the machine: compare the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from http_server import ImageServer  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

POOL = 64  # distinct pictures; URLs are distinct, bytes repeat


def photo_pool(n: int) -> list[bytes]:
    """640x480 JPEGs with gradients and shapes (~20-40 KB, like small web photos)."""
    out = []
    for i in range(n):
        im = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        draw = ImageDraw.Draw(im)
        for j in range(6):
            x, y = (i * 97 + j * 131) % 560, (i * 53 + j * 71) % 400
            draw.ellipse([x, y, x + 80, y + 80], fill=((i * 40 + j * 30) % 256, (j * 90) % 256, (i * 7) % 256))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


PLAIN = """
import sys, img2dataset
if __name__ == "__main__":
    a = sys.argv
    img2dataset.download(url_list=a[1], input_format="parquet", url_col="url", caption_col="caption",
        output_folder=a[2], output_format="webdataset", image_size=448, resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True, encode_format="jpg", encode_quality=95, processes_count=int(a[3]),
        thread_count=int(a[4]), number_sample_per_shard=int(a[5]), timeout=10, retries=0, extract_exif=False,
        compute_hash="sha256", enable_wandb=False, distributor="multiprocessing")
"""


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    pool = photo_pool(POOL)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    times: dict[str, list[float]] = {"img2dataset": [], "pipeline.ingest": []}
    samples: dict[str, int] = {}
    try:
        with ImageServer(make_image=lambda name, ext: pool[int(name.rsplit("-", 1)[1]) % POOL]) as server:
            urls = tmp / "urls.parquet"
            pq.write_table(pa.table({"url": [server.image_url(f"photo-{i}") for i in range(args.urls)],
                                     "caption": [f"a photo number {i}" for i in range(args.urls)]}), urls)
            common = [str(args.processes), str(args.threads), str(args.shard_size)]
            for rep in range(args.repeats):
                out = tmp / f"plain{rep}"
                times["img2dataset"].append(run([sys.executable, "-c", PLAIN, str(urls), str(out), *common], env))
                samples["img2dataset"] = sum(json.loads(s.read_text())["successes"] for s in out.glob("*_stats.json"))
                shutil.rmtree(out)
                out = tmp / f"ingest{rep}"
                times["pipeline.ingest"].append(run(
                    [sys.executable, "-m", "pipeline.ingest", "--urls", str(urls), "--out", str(out),
                     "--image-size", "448", "--processes", str(args.processes), "--threads", str(args.threads),
                     "--shard-size", str(args.shard_size), "--timeout", "10", "--no-progress"], env))
                samples["pipeline.ingest"] = json.loads((out / "manifest.json").read_text())["counts"]["samples"]
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"ingest throughput: {args.urls} URLs (640x480 JPEG, ~{sum(map(len, pool)) // len(pool) // 1024} KB) "
          f"from a server on 127.0.0.1, resized to 448 px, shards of {args.shard_size}, "
          f"{args.processes} processes x {args.threads} threads, median of {args.repeats} runs each, "
          f"{os.cpu_count()} CPUs")
    rates = {}
    for name, secs in times.items():
        median = statistics.median(secs)
        rates[name] = samples[name] / median
        runs = ", ".join(f"{s:.1f}" for s in secs)
        print(f"  {name:16s} {samples[name]:6d} images  {median:6.1f} s ({runs})  {rates[name]:7.1f} images/s")
    print(f"  ratio pipeline.ingest / img2dataset: {rates['pipeline.ingest'] / rates['img2dataset']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
