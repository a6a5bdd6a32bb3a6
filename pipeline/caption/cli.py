"""Caption image shards with vision-language models on a Ray cluster: shard in, shard out.

    # on a cluster (the driver runs on the head; engines wherever the resources are)
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m pipeline.caption --config pipeline/caption/configs/qwen2vl_7b_default_8gpu.yaml
    # on one machine (starts an embedded local Ray when no cluster address is given)
    python -m pipeline.caption --config pipeline/caption/configs/tiny_cpu.yaml

Every image gets one text per (captioner, prompt). Engines live in Ray actors that start once and
serve many shards; the driver only schedules shards and keeps the books (one completion record
per shard, see docs/data-format.md), so re-submitting the same config after a crash finishes
only what is missing, and adding a prompt or a captioner computes only the new texts.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from . import distributor
from .config import ConfigError, load_config
from .job import CaptionJob, JobError, disk_full_message


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job configuration (see pipeline/caption/configs/)")
    p.add_argument("--input", help="override the config's input dataset directory")
    p.add_argument("--output", help="override the config's output dataset directory")
    p.add_argument("--overwrite", action="append", default=[], metavar="TEXT_ID",
                   help="recompute this text id for every sample even though it exists with another "
                        "provenance (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def submission() -> str:
    """The Ray job this driver runs as (`ray job submit` tells its entrypoint in the environment)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        return ""
    return f"Ray job {meta['job_submission_id']}" if meta.get("job_submission_id") else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, input=args.input, output=args.output, overwrite=args.overwrite)
        job = CaptionJob(cfg, progress=not args.no_progress, holder=submission())
        plans = job.prepare()
    except (ConfigError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return distributor.run(job, plans, args.address or cfg.ray_address)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        job.finish(0.0)
        return 1
    except OSError as e:  # the driver's own bookkeeping (records, manifest) could not be written
        print(f"error: cannot write {e.filename or cfg.output}: {e.strerror or e}. The shards finished so far "
              "are kept; free space or fix the permissions there and rerun the same command", file=sys.stderr)
        if e.errno == errno.ENOSPC:  # the same words whichever write (a shard's or the books') found it full
            print(disk_full_message(cfg.output), file=sys.stderr)
        return 1
