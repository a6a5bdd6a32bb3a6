"""A caption job's books: what to do (from the manifests), what was done, and the summary.

Everything here is plain Python: the driver's bookkeeping whatever schedules the shards
(distributor.py runs them on Ray). One completion record per shard (data_manifests), so
re-submitting the same config after a crash finishes only what is missing.
"""

from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path
from typing import Any

from data_manifests import (
    COMPLETE,
    DatasetLocked,
    DatasetWriter,
    ManifestError,
    ShardInfo,
    TextStats,
    hold_lock,
    load_manifest,
    now_iso,
)

from .config import CaptionConfig
from .plan import ShardPlan, plan_job
from .provenance import conflicts, resolve_model, software_versions, text_provenance
from .writer import record_extra


class JobError(Exception):
    """A problem with the job's inputs that stops it before any work (message for the user)."""


class CaptionJob:
    def __init__(self, cfg: CaptionConfig, progress: bool = True, holder: str = ""):
        self.cfg = cfg
        self.progress = progress
        self.holder = holder  # who this job is, for the output's lock (a Ray submission id)
        self.figures = collections.Counter()
        self.images_written = 0  # captioned images of the shards written in this run
        self.failed: dict[str, str] = {}
        self.disk_full = False
        self.nodes: set[str] = set()
        self.poison: list[str] = []  # "shard/key" of the images that killed an engine twice
        self.input_samples = 0

    def prepare(self) -> list[ShardPlan]:
        cfg = self.cfg
        try:
            input_manifest = load_manifest(cfg.input)
        except ManifestError as e:
            raise JobError(f"input dataset: {e} (make it with `python -m pipeline.ingest`, or "
                           f"`holiclip-manifest index {cfg.input}` for shards that have no manifest)") from None
        software = software_versions()
        provenance: dict[str, dict[str, Any]] = {}
        for cap in cfg.captioners:
            try:
                model = resolve_model(cap)
            except FileNotFoundError as e:
                raise JobError(str(e)) from None
            for job in cap.jobs():
                provenance[job.text_id] = text_provenance(model, cap.prompt_set.name, cap.prompt_set.content_hash,
                                                          job, software)
        try:
            # Held until the driver exits: a second job on this output would commit shards twice.
            self.lock = hold_lock(cfg.output, "caption", self.holder)
        except (DatasetLocked, ManifestError) as e:
            raise JobError(str(e)) from None
        try:
            self.writer = DatasetWriter(cfg.output, stage="caption",
                                        parent={"dataset_id": input_manifest.dataset_id, "path": str(cfg.input)})
        except ManifestError as e:
            raise JobError(str(e)) from None
        if self.writer.resumed and (self.writer.manifest.parent or {}).get("dataset_id") != input_manifest.dataset_id:
            raise JobError(f"{cfg.output} was captioned from dataset "
                           f"{(self.writer.manifest.parent or {}).get('dataset_id')!r}, not from {cfg.input} "
                           f"({input_manifest.dataset_id!r}); choose another output directory")
        for name in self.writer.recover_intents():
            print(f"shard {name}: published by a job that stopped before recording it; recorded now", flush=True)
        problems = conflicts({**input_manifest.texts, **self.writer.manifest.texts}, provenance, cfg.overwrite)
        if problems:
            raise JobError("\n".join(problems))
        self.writer.set_texts({**{t: r for t, r in input_manifest.texts.items() if t not in provenance},
                               **provenance})
        plans, skipped = plan_job(cfg, provenance, self.writer, input_manifest)
        for name in skipped:
            print(f"warning: input shard {name} is not complete in {cfg.input}; skipped", flush=True)
        # Shards already complete (and those still to do) are listed so that status is truthful.
        self.writer.expect([n for n in sorted(input_manifest.shards) if n not in skipped][: cfg.num_shards or None])
        self.input_samples = sum(input_manifest.shards[p.name].samples for p in plans)
        self.writer.flush()
        return plans

    # --- while it runs ------------------------------------------------------------------------
    def record_captions(self, plan: ShardPlan, captioner: str, figures: dict[str, Any]) -> None:
        """One captioner's figures for one shard (or one part of it)."""
        self.nodes.add(figures.pop("node", "?"))
        self.figures.update({k: v for k, v in figures.items() if isinstance(v, (int, float))})
        plan.captioned[captioner] = plan.captioned.get(captioner, 0) + figures["images"]

    def commit(self, plan: ShardPlan, out: dict[str, Any], bar) -> None:
        """A written output shard (what writer.write_captioned_shard returned) into the books."""
        self.writer.commit(ShardInfo(**out["info"]), TextStats(out["stats"]),
                           failed_samples=sum(out["refused"].values()), extra=record_extra(out, plan.identities))
        # The run's images: those of written shards, once each (not once per captioner, nor again
        # when texts lost with a node were made again: image_passes counts that work).
        self.images_written += max(plan.captioned.values(), default=0)
        if bar:
            bar.update(out["info"]["samples"])  # every sample of the shard went through (decode errors too)
            self._postfix(bar)

    def fail(self, plan: ShardPlan | None, reason: str, disk_full: bool = False) -> None:
        if plan is None:
            return
        self.failed[plan.name] = reason
        self.disk_full = self.disk_full or disk_full
        self.writer.fail(plan.name, reason)
        print(f"shard {plan.name} FAILED: {reason}", flush=True)

    def bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=self.input_samples, unit="img", desc="caption", mininterval=0.5 if interactive else 10,
                    dynamic_ncols=interactive, file=sys.stderr)

    def _postfix(self, bar) -> None:
        elapsed = max(bar.format_dict.get("elapsed", 0) or 0, 1e-6)
        bar.set_postfix_str(f"captions {self.figures['captions']} ({self.figures['captions'] / elapsed:.1f}/s)")

    def finish(self, seconds: float) -> int:
        """Record the run's figures and failures in the manifest, print the summary; the exit status."""
        f = self.figures
        figures = {
            "images": self.images_written, "image_passes": f["images"], "captions": f["captions"],
            "seconds": round(seconds, 2),
            "images_per_s": round(self.images_written / seconds, 3) if seconds else None,
            "captions_per_s": round(f["captions"] / seconds, 3) if seconds else None,
            "generated_tokens_per_s": round(f["generated_tokens"] / seconds, 1) if seconds else None,
            "prefix_cache_hit_rate": round(f["cached_tokens"] / f["prompt_tokens"], 4) if f["prompt_tokens"] else None,
            "decode_errors": f["decode_errors"], "caption_errors": f["caption_errors"],
            "poison_images": f["poison_images"], "poison_samples": self.poison[:100],
            "nodes": sorted(self.nodes),
        }
        summary = (f"{figures['images']} images, {figures['captions']} captions in {seconds:.1f}s: "
                   f"{figures['images_per_s']} images/s, {figures['captions_per_s']} captions/s, "
                   f"{figures['generated_tokens_per_s']} generated tokens/s, prefix-cache hit rate "
                   f"{figures['prefix_cache_hit_rate']}")
        if f["poison_images"]:
            named = ", ".join(self.poison[:5]) + (" ..." if len(self.poison) > 5 else "")
            summary += (f"; {f['poison_images']} images killed the engine and were left without texts "
                        f"(a per-sample error each: {named})")
        if not (f["images"] or f["decode_errors"] or self.failed):
            # Nothing was captioned (a finished job resubmitted, or no engine started): keep the
            # figures of the runs that did the work.
            summary = "no images captioned in this run"
        else:
            self._record_run(figures, summary)
        manifest = self.writer.finish()
        print(summary, flush=True)
        if self.disk_full:
            print(disk_full_message(self.cfg.output), flush=True)
        if self.failed:
            print(f"{len(self.failed)} shards failed after retries: {', '.join(sorted(self.failed)[:10])}"
                  f"{' ...' if len(self.failed) > 10 else ''}. Rerun the same command to retry them.", flush=True)
            return 1
        print(f"done: {manifest.num_samples} samples in {len(manifest.shards)} shards, status {manifest.status}; "
              f"see `holiclip-manifest summary {self.cfg.output}`", flush=True)
        return 0 if manifest.status == COMPLETE else 1

    def _record_run(self, figures: dict[str, Any], summary: str) -> None:
        runs = self.writer.manifest.run.setdefault("caption", {"runs": []})
        runs["runs"].append({"finished": now_iso(), **figures,
                             "failed_shards": dict(list(self.failed.items())[:100])})
        runs["runs"] = runs["runs"][-20:]
        runs["summary"] = summary



def disk_full_message(output: Path) -> str:
    free = shutil.disk_usage(output).free if output.exists() else 0
    return (f"{output}: the filesystem is full ({free / 2**20:.1f} MiB free): free space there (or choose another "
            "output) and rerun; the finished shards are kept")
