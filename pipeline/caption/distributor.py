"""Runs a caption job's shards on a Ray cluster: the only module of the stage that imports Ray.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipeline.caption --config pipeline/caption/configs/qwen2vl_7b_default_8gpu.yaml

Engines live in Ray actors that start once and serve many shards (each holds a
captioner.ShardCaptioner); one long-lived writer actor per node merges the texts into the output
shard; the driver (this module, with job.CaptionJob for the books) only schedules shards and
passes object references, so neither images nor texts go through it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import time
from dataclasses import dataclass
from typing import Any

from data_manifests import ShardWriteError

# Imported with this module, before the driver joins Ray. Imported lazily after joining, a new module
# of the package was once not found ("No module named pipeline.caption.backends") in the two-node
# test, whose two nodes on one machine share one folder of unpacked working directories.
from .captioner import Progress, ShardCaptioner
from .config import CaptionerConfig, TextJob
from .engine_guard import Reaper, exit_replica
from .job import CaptionJob, JobError
from .plan import WHOLE, Part, ShardPlan
from .writer import write_captioned_shard

MAX_REPLACEMENTS_PER_REPLICA = 2
# A replica whose engine died answers its shards (texts made so far, images in flight), then exits
# this long after, unless the driver has replaced it already.
EXIT_AFTER_DEATH_S = 10.0


class EngineDied(Exception):
    """The replica's engine is dead: every later request would fail."""


def _remote_classes():
    """Ray-decorated actors, built on first use so importing this module needs no Ray."""
    import ray

    class CaptionActor:
        def __init__(self, cfg: CaptionerConfig, image_max_side: int):
            # The engine's processes (on a GPU, or with VLLM_ENABLE_V1_MULTIPROCESSING=1) die with
            # this actor, however it dies, even while they start (engine_guard.py).
            self.reaper = Reaper()
            self.captioner = ShardCaptioner(cfg, image_max_side)
            self.node = ray.util.get_node_ip_address()
            self.node_id = ray.get_runtime_context().get_node_id()

        @ray.method(num_returns=2)
        async def caption_shard(self, shard_path: str, jobs: list[TextJob], recompute: list[str], part: Part = WHOLE):
            progress = Progress()
            try:
                figures, result = await self._guarded(
                    self.captioner.caption_shard(shard_path, jobs, recompute, part, progress))
            except EngineDied as e:
                # Answer with what was made and which images were in the engine (the driver keeps
                # the texts, tries those images alone, and replaces this replica), then leave, in
                # case nobody does it for us (every later request would fail at once).
                figures, result = progress.died(part, str(e))
                asyncio.get_running_loop().call_later(EXIT_AFTER_DEATH_S, exit_replica, f"the engine died ({e})")
            figures["node"] = self.node
            return figures, result

        async def _guarded(self, work):
            """Run `work`; EngineDied if the engine dies meanwhile. Checked every second as well as
            on an error: a request that vLLM was still preparing when its engine died is never
            answered (the error goes only to requests it had registered), so waiting for the work
            alone can wait forever."""
            task = asyncio.ensure_future(work)
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                if self.captioner.backend.is_dead():
                    task.cancel()  # stops the shard's reader and its requests
                    await asyncio.wait({task}, timeout=5.0)
                    raise EngineDied("found while waiting for its answers")
            try:
                return task.result()
            except Exception as e:
                if self.captioner.backend.is_dead():
                    raise EngineDied(f"{type(e).__name__}: {e}") from e
                raise

        async def ready(self) -> tuple[str, str]:
            try:
                await self._guarded(self.captioner.warm_up())
            except EngineDied as e:
                exit_replica(f"the engine died while starting ({e})")
            return self.node, self.node_id

    class WriterActor:
        """Writes output shards on one node. Long-lived, so no Ray worker process is started per
        shard: on a node whose cores the engines use, every such start (~0.5 s of CPU) is taken
        from them."""

        def write(self, source: str, output: str, identities: dict[str, str], txt: str | None, *results):
            return write_captioned_shard(source, output, list(results), identities, txt)

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
    # When the replica was ready to work (shards go only to ready replicas); its `ready` call
    # while it starts.
    ready_at: float | None = None
    ready_ref: Any = None
    started_at: float = 0.0  # when this replica (or its latest replacement) was started
    exclusive: bool = False  # holds a suspect image alone (Part.isolated): nothing else is sent to it
    draining: bool = False  # gets no new shard, so that a suspect image can have it alone


@dataclass
class Call:
    """One shard part sent to one replica."""

    pool: Pool
    slot: Slot
    handle: Any  # the actor it went to (the slot may hold a replacement by the time it answers)
    plan: ShardPlan
    part: Part
    result: Any  # ObjectRef of its ShardResult
    sent: float


class Pool:
    """The replicas of one captioner, and the shards waiting for them."""

    def __init__(self, cfg: CaptionerConfig, actor_cls, image_max_side: int):
        self.cfg = cfg
        self.actor_cls = actor_cls
        self.image_max_side = image_max_side
        self.queue: collections.deque[tuple[str, Part]] = collections.deque()  # (shard, part)
        self.isolated: collections.deque[tuple[str, Part]] = collections.deque()  # suspect images, one each
        self.slots: list[Slot] = []
        self.replacements = 0

    def options(self) -> dict[str, Any]:
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
        return self.actor_cls.options(**self.options()).remote(self.cfg, self.image_max_side)

    def start(self) -> None:
        self.slots = [Slot(self._new_actor(), i) for i in range(self.cfg.replicas)]

    def wait_ready(self, started: float) -> None:
        """Wait until `min_replicas` replicas are ready (default 1: work starts with the first
        engine up, as with Ray Data's `concurrency=(min, max)`), waiting for every replica
        together. Those still starting join when ready (`RayRun._watch_replicas`), or are given up
        `start_timeout_s` after `started`. Fewer than `min_replicas` ready by then: the job stops,
        naming what the rest lack."""
        import ray

        name = self.cfg.name
        pending = {slot.handle.ready.remote(): slot for slot in self.slots}
        restarted: set[int] = set()
        errors: dict[int, str] = {}  # replica -> why it will not start

        def ready() -> int:
            return sum(s.ready_at is not None for s in self.slots)

        while pending and ready() < self.cfg.min_replicas <= ready() + len(pending):
            left = started + self.cfg.start_timeout_s - time.monotonic()
            if left <= 0:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in done:
                slot = pending.pop(ref)
                try:
                    slot.node, slot.node_id = ray.get(ref)
                    slot.ready_at = time.monotonic()
                    print(f"captioner {name!r}: replica {slot.index} ready on {slot.node} "
                          f"({slot.ready_at - started:.0f} s)", flush=True)
                except ray.exceptions.RayActorError as e:
                    # An error raised by the engine's set-up (bad model, bad engine argument) will
                    # recur: give the replica up. A worker process that died under it (killed, out
                    # of memory) may not: try once more.
                    if slot.index in restarted or e.actor_init_failed:
                        errors[slot.index] = f"the engine did not start: {_actor_cause(e)}"
                        continue
                    print(f"captioner {name!r}: the process of replica {slot.index} died while its engine "
                          f"started ({_actor_cause(e)}); starting it again", flush=True)
                    restarted.add(slot.index)
                    slot.handle = self._new_actor()
                    pending[slot.handle.ready.remote()] = slot
                except ray.exceptions.RayTaskError as e:  # started, but could not answer a first request
                    errors[slot.index] = (f"the engine started but failed a first request on a 64x64 image: "
                                          f"{_actor_cause(e)}")
                    ray.kill(slot.handle, no_restart=True)  # it would hold its GPU until the job ends
        capacity = _capacity(self.options()) if pending else ""
        if ready() < self.cfg.min_replicas:
            for slot in pending.values():
                ray.kill(slot.handle, no_restart=True)
                errors[slot.index] = f"not ready within start_timeout_s ({self.cfg.start_timeout_s:g} s): {capacity}"
            raise JobError(f"captioner {name!r}: {ready()} of {self.cfg.replicas} replicas started, fewer than "
                           f"min_replicas ({self.cfg.min_replicas}); {_summary(errors)}")
        for ref, slot in pending.items():  # still starting: watched by the driver's loop from now on
            slot.ready_ref, slot.started_at = ref, started
        self.slots = [s for s in self.slots if s.index not in errors]
        if pending or errors:
            waiting = (f"{len(pending)} still starting ({capacity}): they join when ready, or are given up "
                       f"{self.cfg.start_timeout_s:g} s after the start (start_timeout_s)" if pending else "")
            print(f"captioner {name!r}: going on with {ready()} of {self.cfg.replicas} replicas ready; "
                  + "; ".join(x for x in (waiting, _summary(errors)) if x), flush=True)

    def replace(self, slot: Slot, reason: str, counted: bool = True) -> None:
        """Kill the replica and start another in its place; `counted` against the pool's
        replacements (not for a death the poison image found explains)."""
        import ray

        if counted and self.replacements >= MAX_REPLACEMENTS_PER_REPLICA * self.cfg.replicas:
            self.slots.remove(slot)
            print(f"captioner {self.cfg.name!r}: replica {slot.index} on {slot.node} died ({reason}); "
                  "no replacements left", flush=True)
            return
        self.replacements += counted
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self._new_actor()
        slot.in_flight, slot.exclusive, slot.draining = 0, False, False
        slot.ready_at, slot.ready_ref, slot.started_at = None, slot.handle.ready.remote(), time.monotonic()
        counts = f"{self.replacements} so far" if counted else "not counted: a poison image explains the death"
        print(f"captioner {self.cfg.name!r}: replica {slot.index} on {slot.node} died ({reason}); "
              f"started a replacement ({counts})", flush=True)

    def free_slot(self) -> Slot | None:
        # Only replicas ready to work: a replacement still starting (or never scheduled) gets no shard.
        candidates = [s for s in self.slots if s.ready_at is not None and not (s.exclusive or s.draining)
                      and s.in_flight < self.cfg.max_shards_in_flight]
        return min(candidates, key=lambda s: s.in_flight) if candidates else None

    def idle_slot(self) -> Slot | None:
        """A ready replica with nothing in flight, for a suspect image to have alone."""
        return next((s for s in self.slots if s.ready_at is not None and not s.exclusive and s.in_flight == 0), None)

    def make_room(self) -> None:
        """While suspect images wait and no replica is idle, the least busy one takes no more
        shards until it is (one replica at a time); with none waiting, every replica takes shards."""
        ready = [s for s in self.slots if s.ready_at is not None and not s.exclusive]
        if not self.isolated or any(s.in_flight == 0 for s in ready):
            for s in self.slots:
                s.draining = False
        elif ready and not any(s.draining for s in ready):
            min(ready, key=lambda s: s.in_flight).draining = True


def _summary(errors: dict[int, str]) -> str:
    """Why replicas did not start, one line (the same reason for all of them said once)."""
    if not errors:
        return ""
    if len(set(errors.values())) == 1:
        return f"{len(errors)} replica(s) not started: {next(iter(errors.values()))}"
    return "; ".join(f"replica {i}: {why}" for i, why in sorted(errors.items()))


def _capacity(options: dict[str, Any]) -> str:
    """What one replica asks of Ray against what the cluster has, for a replica that never started."""
    import ray

    need = {"CPU": options.get("num_cpus") or 0, "GPU": options.get("num_gpus") or 0, **options.get("resources", {})}
    total, free = ray.cluster_resources(), ray.available_resources()
    asked = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
    have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k, v in need.items() if v)
    return (f"each replica asks for {asked or 'nothing'}; the cluster has {have or 'no such resources'}; "
            "or its engine is still loading: raise start_timeout_s")


def _actor_cause(e: Exception) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):
        if line.strip() and ("Error" in line or "error" in line):
            return line.strip()[:500]
    return text.strip().splitlines()[-1][:500] if text.strip() else type(e).__name__


# --- the driver's loop ---------------------------------------------------------------------------
class RayRun:
    """Schedules the planned shards over every captioner's replicas until each is written or failed."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.cfg = job.cfg
        self.hung: list[tuple[Any, str]] = []  # replicas replaced for a hung engine, and why
        self.watched = 0.0  # when _watch_replicas last looked

    def run(self, plans: list[ShardPlan]) -> int:
        import ray

        job = self.job
        actor_cls, writer_cls = _remote_classes()
        jobs = self.cfg.jobs()
        pools = {c.name: Pool(c, actor_cls, self.cfg.image_max_side) for c in self.cfg.captioners
                 if any(c.name in p.work for p in plans)}
        print(f"{len(plans)} shards to caption ({job.input_samples} images); starting "
              + ", ".join(f"{p.cfg.replicas} x {p.cfg.name}" for p in pools.values()), flush=True)
        t_start = time.monotonic()
        for pool in pools.values():
            pool.start()
        writers = Writers(writer_cls)
        for pool in pools.values():
            pool.wait_ready(t_start)
            for slot in pool.slots:
                if slot.ready_at is not None:
                    job.nodes.add(slot.node)
                    writers.on(slot.node_id)  # started now, while nothing is timed or waiting for them
        print(f"engines ready in {time.monotonic() - t_start:.0f}s on nodes {', '.join(sorted(job.nodes))}", flush=True)

        bar = job.bar()
        waiting = collections.deque(plans)
        open_plans: dict[str, ShardPlan] = {}
        max_open = 2 * max(len(p.slots) * p.cfg.max_shards_in_flight for p in pools.values()) + 1
        calls: dict[Any, Call] = {}  # figures ref -> the call
        writes: dict[Any, ShardPlan] = {}
        t_work = time.monotonic()

        while waiting or open_plans:
            while waiting and len(open_plans) < max_open:
                plan = waiting.popleft()
                open_plans[plan.name] = plan
                _enqueue(plan, pools)
            for pool in pools.values():
                # Suspect images first, each to an idle replica; then shards to the free ones.
                for queue, free in ((pool.isolated, pool.idle_slot), (pool.queue, pool.free_slot)):
                    while queue and (slot := free()) is not None:
                        name, part = queue.popleft()
                        plan = open_plans.get(name)
                        if plan is None:  # failed meanwhile
                            continue
                        fig_ref, res_ref = slot.handle.caption_shard.remote(plan.source, jobs[pool.cfg.name],
                                                                            plan.work[pool.cfg.name], part)
                        slot.in_flight += 1
                        slot.exclusive = part.isolated
                        calls[fig_ref] = Call(pool, slot, slot.handle, plan, part, res_ref, time.monotonic())
                    if queue is pool.isolated:
                        pool.make_room()
                if (pool.queue or pool.isolated) and not pool.slots:
                    for name, _ in [*pool.queue, *pool.isolated]:
                        job.fail(open_plans.pop(name, None), f"every replica of {pool.cfg.name!r} died")
                    pool.queue.clear()
                    pool.isolated.clear()
            if not calls and not writes:  # waiting for a replacement to start
                time.sleep(0.5)
                self._watch_replicas(pools, calls)
                continue
            ready, _ = ray.wait(list(calls) + list(writes), num_returns=1, timeout=2.0)
            for ref in ready:
                if ref in calls:
                    self._caption_done(ref, calls.pop(ref), open_plans, writes, writers)
                else:
                    plan = writes.pop(ref)
                    open_plans.pop(plan.name, None)
                    if self._write_done(ref, plan, bar):  # its texts were lost with a node: caption it again
                        open_plans[plan.name] = plan
                        _enqueue(plan, pools)
            self._watch_replicas(pools, calls)
        if bar:
            bar.close()
        return job.finish(time.monotonic() - t_work)

    def _watch_replicas(self, pools: dict[str, Pool], calls) -> None:
        """Replacements: ready, or given up after `start_timeout_s` (no room for them any more, a
        lost node). Replicas that have held a shard for longer than `shard_timeout_s` since they
        were ready: their engine is hung (nothing else ends such a wait), so they are replaced, and
        their shards, failing with the killed actor, are retried elsewhere."""
        import ray

        now = time.monotonic()
        if now - self.watched < 1.0:  # a pass costs one step per replica and call: at most once a second
            return
        self.watched = now
        for pool in pools.values():
            for slot in list(pool.slots):
                if slot.ready_ref is None:
                    continue
                if ray.wait([slot.ready_ref], timeout=0)[0]:
                    ref, slot.ready_ref = slot.ready_ref, None
                    try:
                        slot.node, slot.node_id = ray.get(ref)  # a replacement may be on another node
                        slot.ready_at = now
                        self.job.nodes.add(slot.node)
                        print(f"captioner {pool.cfg.name!r}: replica {slot.index} ready on {slot.node} "
                              f"({now - slot.started_at:.0f} s); {sum(s.ready_at is not None for s in pool.slots)} "
                              "working", flush=True)
                    except ray.exceptions.RayError as e:  # it holds no shard yet: replace it, or give up
                        pool.replace(slot, f"its replacement did not start: {_actor_cause(e)}")
                elif now - slot.started_at > pool.cfg.start_timeout_s:
                    capacity = _capacity(pool.options())
                    ray.kill(slot.handle, no_restart=True)
                    pool.slots.remove(slot)
                    print(f"captioner {pool.cfg.name!r}: replica {slot.index} did not start within "
                          f"start_timeout_s ({pool.cfg.start_timeout_s:g} s): {capacity}; going on with "
                          f"{len(pool.slots)} replicas", flush=True)
        for call in list(calls.values()):
            pool, slot = call.pool, call.slot
            if slot.handle is not call.handle or slot not in pool.slots:
                continue  # replaced already
            waited = now - call.sent  # sent only once the replica was ready: engine start-up not counted
            if waited > pool.cfg.shard_timeout_s:
                reason = (f"shard {call.plan.name} unanswered for {waited:.0f} s, over shard_timeout_s "
                          f"({pool.cfg.shard_timeout_s:g}): the engine is hung")
                self.hung.append((call.handle, reason))
                pool.replace(slot, reason)

    def _caption_done(self, ref, call: Call, open_plans, writes, writers: Writers) -> None:
        import ray

        pool, slot, handle, plan, part = call.pool, call.slot, call.handle, call.plan, call.part
        name = pool.cfg.name
        if slot.handle is handle:
            slot.in_flight = max(0, slot.in_flight - 1)
            slot.exclusive = slot.exclusive and not part.isolated
        try:
            figures = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            hung = next((reason for h, reason in self.hung if h is handle), None)
            if slot in pool.slots and slot.handle is handle:  # not yet replaced by another failed call
                pool.replace(slot, _actor_cause(e))
            self._retry(plan, pool, part, f"replica replaced: {hung}" if hung else f"replica died: {_actor_cause(e)}",
                        open_plans)
            return
        except ray.exceptions.RayTaskError as e:
            self._retry(plan, pool, part, _actor_cause(e), open_plans)
            return
        if plan.name not in open_plans:  # the shard failed on another captioner meanwhile
            return
        died = figures.pop("engine_died", None)
        done, in_flight, left = figures.pop("done", []), figures.pop("in_flight", []), figures.pop("left", None)
        poison = figures.pop("poison_key", None)
        self.job.record_captions(plan, name, figures)
        plan.results[name].append(call.result)  # what it made, all of it or up to its engine's death
        plan.open_parts[name] -= 1
        if died is not None:
            self._engine_died(pool, slot, handle, plan, part, died, (done, in_flight, left), poison, open_plans)
        if plan.open_parts[name] == 0:
            del plan.work[name]
        if plan.name in open_plans and not plan.work:
            output = str(self.job.writer.shard_path(plan.name))
            refs = [r for results in plan.results.values() for r in results]
            # Written on the node that made the last texts, where its results already are.
            writes[writers.on(slot.node_id).write.remote(plan.source, output, plan.identities, self.job.writer.txt,
                                                         *refs)] = plan

    def _engine_died(self, pool: Pool, slot: Slot, handle, plan: ShardPlan, part: Part, reason: str,
                     progress: tuple[list[str], list[str], list[str] | None], poison: str | None,
                     open_plans) -> None:
        """A part answered that its engine died: replace the replica; keep the texts it made; try
        the images that were in the engine alone, and the rest of the part as before. An image that
        kills its engine alone has its error already (captioner.Progress.died)."""
        name = pool.cfg.name
        if poison is not None:
            self.job.poison.append(f"{plan.name}/{poison}")
            print(f"shard {plan.name}: sample {poison} killed {name}'s engine twice, the second time alone: "
                  "left without its texts (a per-sample error); the rest of the shard is captioned", flush=True)
            # Both deaths are explained: neither counts against the replacements.
            pool.replacements = max(0, pool.replacements - 1)
        if slot in pool.slots and slot.handle is handle:
            pool.replace(slot, f"its engine died: {reason}", counted=poison is None)
        if poison is not None:
            return
        done, in_flight, left = progress
        if not done and not in_flight:  # it died before this part got anywhere: try it again
            plan.open_parts[name] += 1
            self._retry(plan, pool, part, f"the engine died: {reason}", open_plans)
            return
        rest, suspects = part.after_death(done, in_flight, left)
        if rest is not None:
            pool.queue.appendleft((plan.name, rest))
        pool.isolated.extend((plan.name, p) for p in suspects)
        plan.open_parts[name] += (rest is not None) + len(suspects)
        print(f"shard {plan.name}: {name}'s engine died ({reason}) with {len(in_flight)} images in it; "
              f"{len(done)} images' texts kept, the {len(in_flight)} tried again one at a time, the rest as before",
              flush=True)

    def _retry(self, plan: ShardPlan, pool: Pool, part: Part, reason: str, open_plans) -> None:
        name = pool.cfg.name
        plan.attempts[name] = plan.attempts.get(name, 0) + 1
        if plan.attempts[name] > self.cfg.shard_retries:
            self.job.fail(open_plans.pop(plan.name, None), f"{name}: {reason} (after {plan.attempts[name]} attempts)")
            return
        print(f"shard {plan.name}: {name} failed ({reason}); retrying ({plan.attempts[name]}/{self.cfg.shard_retries})",
              flush=True)
        if part.isolated:
            pool.isolated.appendleft((plan.name, part))
        else:
            pool.queue.appendleft((plan.name, part))

    def _write_done(self, ref, plan: ShardPlan, bar) -> bool:
        """Commit a written shard; True if its texts must be made again (lost with a node)."""
        import ray

        try:
            out = ray.get(ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError) as e:
            # The writer, or a captioner's results it was to read, went with a node (or a killed
            # worker): nothing of this shard was published. Make its texts again, elsewhere.
            plan.attempts["write"] = plan.attempts.get("write", 0) + 1
            if plan.attempts["write"] > self.cfg.shard_retries:
                self.job.fail(plan, f"writing the output shard failed: {_actor_cause(e)} "
                                    f"(after {plan.attempts['write']} attempts)")
                return False
            print(f"shard {plan.name}: its texts were lost before they were written ({_actor_cause(e)}); "
                  f"captioning it again ({plan.attempts['write']}/{self.cfg.shard_retries})", flush=True)
            plan.work = {cap: list(ids) for cap, ids in plan.planned.items()}
            return True
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            full = isinstance(cause, ShardWriteError) and cause.errno == errno.ENOSPC
            self.job.fail(plan, f"writing the output shard failed: {_actor_cause(e)}", disk_full=full)
            return False
        self.job.commit(plan, out, bar)
        return False


def _enqueue(plan: ShardPlan, pools: dict[str, Pool]) -> None:
    """Queue the whole shard for each captioner it needs, forgetting earlier results."""
    plan.results = {cap: [] for cap in plan.work}
    plan.open_parts = {cap: 1 for cap in plan.work}
    plan.captioned = {}
    for cap in plan.work:
        pools[cap].queue.append((plan.name, WHOLE))


def run(job: CaptionJob, plans: list[ShardPlan], address: str | None) -> int:
    """Join (or start) Ray and run the planned shards; the exit status."""
    from pipeline.cluster import connect

    if not plans:  # without starting Ray (seconds, for an embedded one) for nothing
        print("nothing to do: every shard already has every text of this config", flush=True)
        return job.finish(0.0)
    connect(address, embedded=True)
    return RayRun(job).run(plans)
