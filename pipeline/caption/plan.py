"""Planning a caption job: which texts each shard still needs.

A shard is planned from the input dataset's manifest and the output's completion records only
(no shard is opened): the texts it has are recorded by identity (provenance.py), so a resumed job
skips finished shards and an extended one (a new prompt, a new captioner) computes only the new
texts, and recomputes a text id for every sample only when asked to overwrite it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_manifests import COMPLETE, DatasetWriter

from .config import CaptionConfig


@dataclass(frozen=True)
class Part:
    """Which samples of a shard one call captions: every sample but `skip`, or only `only`.

    A shard is one part until an engine dies while captioning it. Then the texts made before the
    death are kept, the images that were in the engine at that moment (the suspects) are tried
    again one at a time, each alone on its replica (`isolated`), and the rest of the shard is one
    more part. A suspect whose engine dies again, alone, is the poison: it gets a per-sample error.
    """

    skip: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    isolated: bool = False  # one suspect image, on a replica given nothing else while it works

    def wants(self, key: str) -> bool:
        return key in self.only if self.only is not None else key not in self.skip

    def after_death(self, done: list[str], in_flight: list[str],
                    left: list[str] | None = None) -> tuple[Part | None, list[Part]]:
        """What is left of this part once its engine died: the rest (None if nothing), and a part
        per suspect image. `left`: the rest exactly, when the replica had read the whole part."""
        gone = set(done) | set(in_flight)
        if left is not None:
            rest: Part | None = Part(only=frozenset(left)) if left else None
        elif self.only is None:
            rest = Part(skip=self.skip | gone)
        else:
            rest = Part(only=self.only - gone) if self.only - gone else None
        return rest, [Part(only=frozenset([k]), isolated=True) for k in sorted(in_flight)]


WHOLE = Part()


@dataclass
class ShardPlan:
    name: str
    source: str  # the shard the images and existing texts are read from
    work: dict[str, list[str]]  # captioner -> text ids to recompute for every sample (others: if missing)
    identities: dict[str, str]  # text id -> identity the output shard will hold
    attempts: dict[str, int] = field(default_factory=dict)
    # captioner -> ObjectRefs of its ShardResults (one per part of the shard it captioned)
    results: dict[str, list[Any]] = field(default_factory=dict)
    open_parts: dict[str, int] = field(default_factory=dict)  # captioner -> parts queued or in flight
    captioned: dict[str, int] = field(default_factory=dict)  # captioner -> images it captioned
    planned: dict[str, list[str]] = field(default_factory=dict)  # `work` as planned (to redo it all)

    def __post_init__(self) -> None:
        self.planned = {cap: list(ids) for cap, ids in self.work.items()}


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

