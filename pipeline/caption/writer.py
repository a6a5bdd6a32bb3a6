"""Writing a captioned shard: the source shard's samples plus the texts the captioners made.

Shard in, shard out: the output holds the samples of its source, in the same order, with their
images untouched; a sample the format refuses is left out and counted (see write_captioned_shard).
Runs wherever Ray puts it (a light task): the driver only passes references, so neither images
nor texts go through it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_manifests import (
    RAW,
    SampleFormatError,
    ShardInfo,
    ShardReader,
    ShardReadError,
    ShardWriter,
    TextStats,
    top_reasons,
    write_intent,
)

from .captioner import ShardResult

MAX_PROBLEMS = 20  # problem lines kept per shard entry, as ingest and index keep


def merge_sample(sample, results: list[ShardResult]) -> None:
    """Add each captioner's texts (and flags, errors) for this sample, in place."""
    for res in results:
        for tid, text in res.texts.get(sample.key, {}).items():
            sample.texts[tid] = text
            sample.errors.pop(tid, None)
            if tid in res.flags.get(sample.key, {}):
                sample.flags[tid] = res.flags[sample.key][tid]
            else:
                sample.flags.pop(tid, None)
        for tid, err in res.errors.get(sample.key, {}).items():
            sample.texts.pop(tid, None)
            sample.flags.pop(tid, None)
            sample.errors[tid] = err


def record_extra(out: dict[str, Any], identities: dict[str, str]) -> dict[str, Any]:
    """The stage's part of a captioned shard's record: which texts it holds, what it left out."""
    extra: dict[str, Any] = {"text_identities": identities}
    if out["refused"]:
        extra["failures"] = top_reasons(out["refused"])
    if out["problems"]:
        extra["problems"] = out["problems"][:MAX_PROBLEMS]
    if out["samples_with_errors"]:
        extra["samples_with_errors"] = out["samples_with_errors"]
    return extra


def write_captioned_shard(source: str, output: str, results: list[ShardResult],
                          identities: dict[str, str] | None = None, txt: str | None = RAW) -> dict[str, Any]:
    """Read `source`, merge the results, write `output` atomically. Returns what the driver commits.

    `txt`: the text id each sample's `.txt` member holds (the output dataset's choice, `raw` by default).

    A sample the source holds but the format refuses (read) or that cannot be stored with its new
    texts (write) is left out, counted in `refused` by reason and named in `problems`. With
    `identities` (the texts the output will hold), the shard's record-to-be is written as an
    intent before the file is published, so that a driver that dies before recording it loses
    no text (data_manifests.write_intent).
    """
    reader = ShardReader(source)
    stats = TextStats()
    errors = 0
    refused: Counter[str] = Counter()
    problems: list[str] = []

    def intent(info: ShardInfo) -> None:
        out = finished(info)
        write_intent(Path(output).parent, info, stats, failed_samples=sum(out["refused"].values()),
                     extra=record_extra(out, identities))

    def finished(info: ShardInfo) -> dict[str, Any]:
        return {"info": asdict(info), "stats": stats.raw, "samples_with_errors": errors,
                "refused": dict(refused + reader.refused),
                "problems": [str(p) for p in reader.problems] + problems}

    try:
        with ShardWriter(output, txt=txt) as writer:
            for sample in reader:
                merge_sample(sample, results)
                if sample.errors:
                    errors += 1
                try:
                    writer.write(sample)
                except SampleFormatError as e:
                    refused["cannot be stored with its new texts"] += 1
                    problems.append(f"{reader.name} sample {sample.key}: {e}")
                    continue
                stats.add(sample)
            info = writer.close(before_publish=intent if identities is not None else None)
    except ShardReadError as e:
        raise RuntimeError(f"source shard {Path(source).name} became unreadable while writing: {e}") from e
    return finished(info)
