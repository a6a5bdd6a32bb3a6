"""Caption image shards with vision-language models on a Ray cluster: shard in, shard out.

    # on a cluster (the driver runs on the head; engines wherever the resources are)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipeline.caption --config pipeline/configs/qwen2vl_7b_default_8gpu.yaml
    # on one machine (starts an embedded local Ray when no cluster address is given)
    python -m pipeline.caption --config pipeline/configs/tiny_cpu.yaml

Every image gets one text per (captioner, prompt). Engines live in Ray actors that start once and
serve many shards; the driver only schedules shards and keeps the books (one completion record
per shard, see docs/data-format.md), so re-submitting the same config after a crash finishes
only what is missing, and adding a prompt or a captioner computes only the new texts.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_manifests import DatasetWriter, ManifestError, ShardInfo, TextStats, load_manifest
from data_manifests.manifest import COMPLETE

from .caption_config import CaptionConfig, CaptionerConfig, ConfigError, TextJob, load_config
from .provenance import conflicts, resolve_model, software_versions, text_provenance

MAX_REPLACEMENTS_PER_REPLICA = 2


class JobError(Exception):
    """A problem with the job's inputs that stops it before any work (message for the user)."""


# --- planning: what each shard needs -------------------------------------------------------
@dataclass
class ShardPlan:
    name: str
    source: str  # the shard the images and existing texts are read from
    work: dict[str, list[str]]  # captioner -> text ids to recompute for every sample (others: if missing)
    identities: dict[str, str]  # text id -> identity the output shard will hold
    attempts: dict[str, int] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # captioner -> ObjectRef of its ShardResult
    images: int = 0


def plan_job(cfg: CaptionConfig, provenance: dict[str, dict[str, Any]], writer: DatasetWriter,
             input_manifest) -> tuple[list[ShardPlan], list[str]]:
    """Shards that need work (in order) and shards skipped because their input is not complete."""
    jobs = cfg.jobs()
    owner = {j.text_id: c for c, js in jobs.items() for j in js}
    new_ident = {tid: rec["identity"] for tid, rec in provenance.items()}
    input_ident = {tid: rec.get("identity") for tid, rec in input_manifest.texts.items()}
    plans, skipped = [], []
    names = sorted(input_manifest.shards)
    if cfg.num_shards:
        names = names[: cfg.num_shards]
    for name in names:
        if input_manifest.shards[name].status != COMPLETE:
            skipped.append(name)
            continue
        done = writer.manifest.shards.get(name)
        if writer.is_complete(name):
            have = dict(done.info.get("text_identities", {}))
            source = str(writer.shard_path(name))
        else:
            have = {tid: input_ident.get(tid) for tid in new_ident if tid in input_ident}
            source = str(cfg.input / name)
        need = [tid for tid in new_ident if have.get(tid) != new_ident[tid]]
        if not need:
            continue
        work: dict[str, list[str]] = {}
        for tid in need:
            # An id the source has with another identity (overwrite): redo it for every sample.
            work.setdefault(owner[tid], [])
            if tid in have:
                work[owner[tid]].append(tid)
        plans.append(ShardPlan(name, source, work, {**have, **new_ident}))
    return plans, skipped


# --- Ray side --------------------------------------------------------------------------------
def _remote_classes():
    """Ray-decorated actors, built on first use so importing this module needs no Ray."""
    import ray

    from .caption_writer import write_captioned_shard
    from .captioner import ShardCaptioner

    class CaptionActor:
        def __init__(self, cfg: CaptionerConfig, image_max_side: int):
            self.captioner = ShardCaptioner(cfg, image_max_side)
            self.node = ray.util.get_node_ip_address()
            self.node_id = ray.get_runtime_context().get_node_id()

        async def ready(self) -> tuple[str, str]:
            await self.captioner.warm_up()
            return self.node, self.node_id

        @ray.method(num_returns=2)
        async def caption_shard(self, shard_path: str, jobs: list[TextJob], recompute: list[str]):
            figures, result = await self.captioner.caption_shard(shard_path, jobs, recompute)
            figures["node"] = self.node
            return figures, result

    class WriterActor:
        """Writes output shards on one node. Long-lived, so no Ray worker process is started per
        shard: on a node whose cores the engines use, every such start (~0.5 s of CPU) is taken
        from them."""

        def write(self, source: str, output: str, *results):
            return write_captioned_shard(source, output, list(results))

    return ray.remote(CaptionActor), ray.remote(WriterActor)


class Writers:
    """One writer actor per node that hosts captioners, made when first needed.

    num_cpus=0: writing is light I/O, and engines may hold every CPU of a node. A writer that
    dies is restarted and its call retried (writes are atomic and idempotent); a node that is gone
    gets its writes elsewhere (soft affinity).
    """

    def __init__(self, actor_cls):
        self.actor_cls = actor_cls
        self.by_node: dict[str, Any] = {}

    def on(self, node_id: str | None):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        key = node_id or "any"
        if key not in self.by_node:
            opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 3, "max_task_retries": 2}
            if node_id:
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
            self.by_node[key] = self.actor_cls.options(**opts).remote()
        return self.by_node[key]


@dataclass
class Slot:
    handle: Any
    index: int
    in_flight: int = 0
    node: str = "?"
    node_id: str | None = None


class Pool:
    """The replicas of one captioner, and the shards waiting for them."""

    def __init__(self, cfg: CaptionerConfig, actor_cls, image_max_side: int):
        self.cfg = cfg
        self.actor_cls = actor_cls
        self.image_max_side = image_max_side
        self.queue: collections.deque[str] = collections.deque()
        self.slots: list[Slot] = []
        self.replacements = 0

    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cfg.num_cpus, "num_gpus": self.cfg.num_gpus,
                                "max_concurrency": self.cfg.max_shards_in_flight + 4}
        if self.cfg.custom_resources:
            opts["resources"] = self.cfg.custom_resources
        if self.cfg.scheduling == "spread":
            opts["scheduling_strategy"] = "SPREAD"
        if self.cfg.env:
            opts["runtime_env"] = {"env_vars": self.cfg.env}
        return opts

    def _new_actor(self):
        return self.actor_cls.options(**self._options()).remote(self.cfg, self.image_max_side)

    def start(self) -> None:
        self.slots = [Slot(self._new_actor(), i) for i in range(self.cfg.replicas)]

    def wait_ready(self) -> None:
        import ray

        for slot in self.slots:
            for attempt in (1, 2):
                try:
                    slot.node, slot.node_id = ray.get(slot.handle.ready.remote())
                    break
                except ray.exceptions.RayActorError as e:
                    # An error raised by the engine's set-up (bad model, bad engine argument) will
                    # recur: stop. A worker process that died under it (killed, out of memory) may
                    # not: try once more.
                    if attempt == 2 or "error raised in its creation task" in str(e):
                        raise JobError(f"captioner {self.cfg.name!r}: the engine did not start: {_actor_cause(e)}") from None
                    print(f"captioner {self.cfg.name!r}: the process of replica {slot.index} died while its engine "
                          f"started ({_actor_cause(e)}); starting it again", flush=True)
                    slot.handle = self._new_actor()
                except ray.exceptions.RayTaskError as e:  # started, but could not answer a first request
                    raise JobError(f"captioner {self.cfg.name!r}: the engine started but failed a first request on a "
                                   f"64x64 image: {_actor_cause(e)}") from None

    def replace(self, slot: Slot, reason: str) -> None:
        import ray

        if self.replacements >= MAX_REPLACEMENTS_PER_REPLICA * self.cfg.replicas:
            self.slots.remove(slot)
            print(f"captioner {self.cfg.name!r}: replica {slot.index} on {slot.node} died ({reason}); "
                  "no replacements left", flush=True)
            return
        self.replacements += 1
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self._new_actor()
        slot.in_flight = 0
        print(f"captioner {self.cfg.name!r}: replica {slot.index} on {slot.node} died ({reason}); "
              f"started a replacement ({self.replacements} so far)", flush=True)

    def free_slot(self) -> Slot | None:
        candidates = [s for s in self.slots if s.in_flight < self.cfg.max_shards_in_flight]
        return min(candidates, key=lambda s: s.in_flight) if candidates else None


def _actor_cause(e: Exception) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):
        if line.strip() and ("Error" in line or "error" in line):
            return line.strip()[:500]
    return text.strip().splitlines()[-1][:500] if text.strip() else type(e).__name__


# --- the job ----------------------------------------------------------------------------------
class CaptionJob:
    def __init__(self, cfg: CaptionConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.figures = collections.Counter()
        self.failed: dict[str, str] = {}
        self.nodes: set[str] = set()

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
            self.writer = DatasetWriter(cfg.output, stage="caption",
                                        parent={"dataset_id": input_manifest.dataset_id, "path": str(cfg.input)})
        except ManifestError as e:
            raise JobError(str(e)) from None
        if self.writer.resumed and (self.writer.manifest.parent or {}).get("dataset_id") != input_manifest.dataset_id:
            raise JobError(f"{cfg.output} was captioned from dataset "
                           f"{(self.writer.manifest.parent or {}).get('dataset_id')!r}, not from {cfg.input} "
                           f"({input_manifest.dataset_id!r}); choose another output directory")
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

    def run(self, plans: list[ShardPlan]) -> int:
        import ray

        actor_cls, writer_cls = _remote_classes()
        jobs = self.cfg.jobs()
        pools = {c.name: Pool(c, actor_cls, self.cfg.image_max_side) for c in self.cfg.captioners
                 if any(c.name in p.work for p in plans)}
        if not plans:
            print("nothing to do: every shard already has every text of this config", flush=True)
            return self.finish(0.0)
        print(f"{len(plans)} shards to caption ({self.input_samples} images); starting "
              + ", ".join(f"{p.cfg.replicas} x {p.cfg.name}" for p in pools.values()), flush=True)
        t_start = time.monotonic()
        for pool in pools.values():
            pool.start()
        writers = Writers(writer_cls)
        for pool in pools.values():
            pool.wait_ready()
            self.nodes.update(s.node for s in pool.slots)
            for slot in pool.slots:  # started now, while nothing is timed or waiting for them
                writers.on(slot.node_id)
        print(f"engines ready in {time.monotonic() - t_start:.0f}s on nodes {', '.join(sorted(self.nodes))}", flush=True)

        bar = self._bar()
        waiting = collections.deque(plans)
        open_plans: dict[str, ShardPlan] = {}
        max_open = 2 * max(len(p.slots) * p.cfg.max_shards_in_flight for p in pools.values()) + 1
        calls: dict[Any, tuple[Pool, Slot, Any, ShardPlan]] = {}  # figures ref -> (pool, slot, actor, shard)
        writes: dict[Any, ShardPlan] = {}
        t_work = time.monotonic()

        while waiting or open_plans:
            while waiting and len(open_plans) < max_open:
                plan = waiting.popleft()
                open_plans[plan.name] = plan
                for cap in plan.work:
                    pools[cap].queue.append(plan.name)
            for pool in pools.values():
                while pool.queue and (slot := pool.free_slot()) is not None:
                    plan = open_plans.get(pool.queue.popleft())
                    if plan is None:  # failed meanwhile
                        continue
                    fig_ref, res_ref = slot.handle.caption_shard.remote(plan.source, jobs[pool.cfg.name],
                                                                        plan.work[pool.cfg.name])
                    slot.in_flight += 1
                    plan.results[pool.cfg.name] = res_ref
                    calls[fig_ref] = (pool, slot, slot.handle, plan)
                if pool.queue and not pool.slots:
                    for name in list(pool.queue):
                        self._fail(open_plans.pop(name, None), f"every replica of {pool.cfg.name!r} died")
                    pool.queue.clear()
            if not calls and not writes:
                continue
            ready, _ = ray.wait(list(calls) + list(writes), num_returns=1, timeout=2.0)
            for ref in ready:
                if ref in calls:
                    self._caption_done(ref, calls.pop(ref), open_plans, writes, writers)
                else:
                    plan = writes.pop(ref)
                    open_plans.pop(plan.name, None)
                    self._write_done(ref, plan, bar)
        if bar:
            bar.close()
        return self.finish(time.monotonic() - t_work)

    def _caption_done(self, ref, call, open_plans, writes, writers: Writers) -> None:
        import ray

        pool, slot, handle, plan = call
        name = pool.cfg.name
        if slot.handle is handle:
            slot.in_flight = max(0, slot.in_flight - 1)
        try:
            figures = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if slot in pool.slots and slot.handle is handle:  # not yet replaced by another failed call
                pool.replace(slot, _actor_cause(e))
            self._retry(plan, pool, f"replica died: {_actor_cause(e)}", open_plans)
            return
        except ray.exceptions.RayTaskError as e:
            self._retry(plan, pool, _actor_cause(e), open_plans)
            return
        if plan.name not in open_plans:  # the shard failed on another captioner meanwhile
            return
        self.nodes.add(figures.pop("node", "?"))
        self.figures.update({k: v for k, v in figures.items() if isinstance(v, (int, float))})
        plan.images = max(plan.images, figures["images"] + figures["decode_errors"])
        del plan.work[name]
        if not plan.work:
            output = str(self.writer.shard_path(plan.name))
            # Written on the node that made the last texts, where its results already are.
            writes[writers.on(slot.node_id).write.remote(plan.source, output, *plan.results.values())] = plan

    def _retry(self, plan: ShardPlan, pool: Pool, reason: str, open_plans) -> None:
        name = pool.cfg.name
        plan.attempts[name] = plan.attempts.get(name, 0) + 1
        if plan.attempts[name] > self.cfg.shard_retries:
            self._fail(open_plans.pop(plan.name, None), f"{name}: {reason} (after {plan.attempts[name]} attempts)")
            return
        print(f"shard {plan.name}: {name} failed ({reason}); retrying ({plan.attempts[name]}/{self.cfg.shard_retries})",
              flush=True)
        pool.queue.appendleft(plan.name)

    def _fail(self, plan: ShardPlan | None, reason: str) -> None:
        if plan is None:
            return
        self.failed[plan.name] = reason
        self.writer.fail(plan.name, reason)
        print(f"shard {plan.name} FAILED: {reason}", flush=True)

    def _write_done(self, ref, plan: ShardPlan, bar) -> None:
        import ray

        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as e:
            self._fail(plan, f"writing the output shard failed: {_actor_cause(e)}")
            return
        extra = {"text_identities": plan.identities}
        if out["problems"]:
            extra["problems"] = out["problems"][:50]
        if out["samples_with_errors"]:
            extra["samples_with_errors"] = out["samples_with_errors"]
        self.writer.commit(ShardInfo(**out["info"]), TextStats(out["stats"]), failed_samples=len(out["problems"]),
                           extra=extra)
        if bar:
            bar.update(plan.images or out["info"]["samples"])
            self._postfix(bar)

    def _bar(self):
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
            "images": f["images"], "captions": f["captions"], "seconds": round(seconds, 2),
            "images_per_s": round(f["images"] / seconds, 3) if seconds else None,
            "captions_per_s": round(f["captions"] / seconds, 3) if seconds else None,
            "generated_tokens_per_s": round(f["generated_tokens"] / seconds, 1) if seconds else None,
            "prefix_cache_hit_rate": round(f["cached_tokens"] / f["prompt_tokens"], 4) if f["prompt_tokens"] else None,
            "decode_errors": f["decode_errors"], "caption_errors": f["caption_errors"],
            "nodes": sorted(self.nodes),
        }
        summary = (f"{figures['images']} images, {figures['captions']} captions in {seconds:.1f}s: "
                   f"{figures['images_per_s']} images/s, {figures['captions_per_s']} captions/s, "
                   f"{figures['generated_tokens_per_s']} generated tokens/s, prefix-cache hit rate "
                   f"{figures['prefix_cache_hit_rate']}")
        if not (f["images"] or f["decode_errors"] or self.failed):
            # Nothing was captioned (a finished job resubmitted, or no engine started): keep the
            # figures of the runs that did the work.
            summary = "no images captioned in this run"
        else:
            self._record_run(figures, summary)
        manifest = self.writer.finish()
        print(summary, flush=True)
        if any("No space left on device" in reason for reason in self.failed.values()):
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
        runs["runs"].append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures,
                             "failed_shards": dict(list(self.failed.items())[:100])})
        runs["runs"] = runs["runs"][-20:]
        runs["summary"] = summary


def connect_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # An embedded single-machine Ray needs no network address: keep it on loopback
        # (read by Ray at import, hence before importing it).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # No cluster given: an embedded local Ray with this machine's resources.
        ray.init(include_dashboard=False, logging_level="WARNING")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job configuration (see pipeline/configs/)")
    p.add_argument("--input", help="override the config's input dataset directory")
    p.add_argument("--output", help="override the config's output dataset directory")
    p.add_argument("--overwrite", action="append", default=[], metavar="TEXT_ID",
                   help="recompute this text id for every sample even though it exists with another "
                        "provenance (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def disk_full_message(output: Path) -> str:
    free = shutil.disk_usage(output).free if output.exists() else 0
    return (f"{output}: the filesystem is full ({free / 2**20:.1f} MiB free): free space there (or choose another "
            "output) and rerun; the finished shards are kept")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.input:
            cfg.input = Path(args.input).resolve()
        if args.output:
            cfg.output = Path(args.output).resolve()
        cfg.overwrite = sorted(set(cfg.overwrite) | set(args.overwrite))
        job = CaptionJob(cfg, progress=not args.no_progress)
        plans = job.prepare()
    except (ConfigError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect_ray(args.address or cfg.ray_address)
    try:
        return job.run(plans)
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


if __name__ == "__main__":
    sys.exit(main())
