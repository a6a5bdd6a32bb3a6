"""Streaming multi-text shards into training batches (WebDataset, docs/data-format.md).

    shard URLs --(per rank and worker slot, seeded)--> tar samples --shuffle buffer--> decode
    (data_manifests.Sample) --> pick the configured text ids --> crop + normalise --> batch + tokenize

Each rank builds a MultiTextStream; a DataLoader runs it in `num_workers` processes, each
yielding whole micro-batches. Resampled mode draws shards with replacement from every shard
(OpenCLIP's --dataset-resampled); otherwise shards are split by node (rank) and by worker and
each split is read in seeded passes.

Determinism, and with it exact resumption (docs/training.md): the stream of micro-batches is
cut into segments of `segment_batches`; inside a segment, batch i is produced by the "slot"
(i - segment start) mod workers, and everything a slot does (which shards, shuffle order,
crops) is seeded by (seed, salt, segment, rank, slot). The DataLoader hands out batches from its
workers in strict rotation, so the stream is a pure function of those seeds, and a stream
started at batch k (on resume) is the tail of the stream started at 0. A resume on a segment
boundary costs nothing; inside a segment the slot replays its segment up to k (decoding
without tokenising), at most one segment of data loading.

Bad input never stops training: an unreadable or truncated shard is skipped (its samples read
so far are kept), a sample that breaks the format (bad JSON, unsafe or repeated member names),
an image that does not decode and a sample lacking a required text are skipped; all are counted
and travel with the batches to the training process, which logs them. Shards are read by the
data contract's tar reader (data_manifests.TarReader), so a shard cut between two members is
found truncated here as everywhere else.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
import numpy as np
import torch
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_manifests import (
    Manifest,
    ManifestError,
    Sample,
    SampleFormatError,
    ShardReadError,
    TarReader,
    list_shard_files,
    load_manifest,
)

from .config import DataSection
from .tokenizer import Tokenizer, trim_padding
from .transform import train_transform

log = logging.getLogger(__name__)

# A stream that reads this many samples in a row without one usable sample is misconfigured.
MAX_CONSECUTIVE_REJECTS = 10_000
MAX_PROBLEMS_KEPT = 20
PEEK_SAMPLES = 100  # read to learn the text ids of a dataset that has no manifest


class DataError(ValueError):
    """Input the user must fix (no shards, missing text ids); the message says which and how."""


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One entry of data.shards, resolved."""

    spec: str  # as written in the config
    urls: list[str]
    samples: int | None  # from the manifest; None without one
    text_counts: dict[str, int] | None  # text id -> samples that have it; None: unknown


def _is_url(spec: str) -> bool:
    return "://" in spec


def _manifest_of(fs: fsspec.AbstractFileSystem, directory: str) -> Manifest | None:
    path = f"{directory.rstrip('/')}/manifest.json"
    if not fs.exists(path):
        return None
    if isinstance(fs, LocalFileSystem):
        return load_manifest(directory)  # also folds in shard records newer than manifest.json
    with fs.open(path, "rb") as f:
        return Manifest.from_json(json.load(f), fs.unstrip_protocol(path))


def resolve_source(spec: str) -> Source:
    """A shard directory, a glob, a brace pattern or a single file; local or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(spec)
    url = (lambda p: fs.unstrip_protocol(p)) if _is_url(spec) else (lambda p: p)
    manifests: list[Manifest] = []
    if fs.isdir(path):
        if isinstance(fs, LocalFileSystem):
            names = list_shard_files(path)
        else:  # the same rule as list_shard_files: published .tar files, never hidden partial ones
            names = sorted(n for n in (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
                           if n.endswith(".tar") and not n.startswith("."))
        urls = [url(f"{path.rstrip('/')}/{n}") for n in names]
        try:
            manifest = _manifest_of(fs, path)
        except ManifestError as e:
            raise DataError(f"data.shards: {spec}: {e}") from None
        manifests = [manifest] if manifest else []
    else:
        paths: list[str] = []
        for pattern in braceexpand.braceexpand(path):
            matched = fs.glob(pattern) if glob.has_magic(pattern) else ([pattern] if fs.isfile(pattern) else [])
            paths += sorted(matched)
        urls = [url(p) for p in paths]
        for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):
            try:
                manifest = _manifest_of(fs, parent)
            except ManifestError:
                manifest = None  # a glob may reach directories that are not datasets
            if manifest is None:
                manifests = []
                break
            manifests.append(manifest)
    if not urls:
        raise DataError(f"data.shards: {spec}: no .tar shards found there")
    if manifests:
        samples = sum(m.num_samples for m in manifests)
        counts: dict[str, int] = {}
        for m in manifests:
            for text_id, stats in m.text_stats.raw.items():
                counts[text_id] = counts.get(text_id, 0) + int(stats.get("count", 0))
        return Source(spec, urls, samples, counts)
    # No manifest (e.g. plain img2dataset output): the first samples tell which texts exist.
    texts: set[str] = set()
    try:
        for raw in itertools.islice(read_shard(urls[0]), PEEK_SAMPLES):
            with contextlib.suppress(SampleFormatError):
                texts.update(Sample.from_members(raw["__key__"], _members(raw)).texts)
    except ShardReadError:
        pass  # reported when the stream reads it
    return Source(spec, urls, None, dict.fromkeys(texts, 1) if texts else None)


def check_text_ids(sources: Sequence[Source], text_ids: Sequence[str], fallback: str | None) -> list[str]:
    """Fail (DataError) when a dataset lacks a configured text id; return warnings for partial ones."""
    warnings = []
    for source in sources:
        if source.text_counts is None:
            warnings.append(f"{source.spec}: no manifest and no readable sample in its first shard; "
                            "text ids not checked")
            continue
        have = sorted(t for t, n in source.text_counts.items() if n > 0)
        wanted = [("data.text_ids", t) for t in text_ids] + ([("data.fallback_text_id", fallback)] if fallback else [])
        for key, text_id in wanted:
            if source.text_counts.get(text_id, 0) == 0:
                raise DataError(
                    f"{key}: text id {text_id!r} is not in the dataset {source.spec} "
                    f"(it has: {', '.join(have) or 'no texts'}). "
                    "Caption the dataset with that prompt, or remove the id from the config."
                )
        if source.samples:
            for text_id in text_ids:
                share = source.text_counts[text_id] / source.samples
                if share < 1:
                    then = f"'{fallback}' is used instead" if fallback else "those samples are skipped"
                    warnings.append(f"{source.spec}: text {text_id!r} is in {share:.1%} of the samples; {then}")
    return warnings


# ----------------------------------------------------------------------------- reading


def read_shard(url: str, reader: TarReader | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard (local path or fsspec URL) in WebDataset's shape:
    {"__key__", "__url__", ext: bytes, ...}, streamed one at a time.

    Raises ShardReadError when the shard is unreadable or truncated (after the good samples).
    The samples the tar reader refuses (unsafe or repeated member names) are in `reader`.
    """
    for key, members in reader or TarReader(url):
        yield {**members, "__key__": key, "__url__": url}


def _members(raw: dict[str, Any]) -> dict[str, bytes]:
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


# ----------------------------------------------------------------------------- the stream


class MultiTextStream(IterableDataset):
    """Endless micro-batches {"images" (B,3,S,S) uint8, "tokens" [M x (B,T_m)], "keys", "index", "worker",
    "counts", "problems"}: the images are normalised by the trainer, on its device
    (train.transform.normalize), and each text type's tokens are cut to its longest text.

    `index` is the micro-batch's position in the rank's stream; `counts` and `problems` are the
    producing worker's running totals (skipped samples and shards), reported by the trainer.
    """

    def __init__(
        self,
        urls: Sequence[str],
        data: DataSection,
        tokenizer: Tokenizer,
        image_size: int,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        segment_batches: int = 1000,
        start_batch: int = 0,
        salt: int = 0,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.data = data
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.salt = seed, salt
        self.segment_batches = segment_batches
        self.start_batch = start_batch
        self.num_slots = max(1, data.num_workers)
        self.drop_flags = set(data.drop_flags)
        if not self.urls:
            raise DataError("data.shards: no shards to read")
        if not data.resampled and len(self.urls) < world_size * self.num_slots:
            raise DataError(
                f"data.resampled is false: {len(self.urls)} shards cannot be split over {world_size} ranks x "
                f"{self.num_slots} workers; use more shards, fewer data.num_workers, or data.resampled: true"
            )

    @property
    def count_keys(self) -> list[str]:
        keys = ["samples", "shards", "corrupt_shards", "bad_samples", "bad_images", "fallback_texts"]
        return keys + [f"missing/{t}" for t in self.data.text_ids]

    # --- per slot and segment ---------------------------------------------------------------

    def _shard_urls(self, rng: random.Random, slot: int) -> Iterator[str]:
        if self.data.resampled:
            while True:
                yield rng.choice(self.urls)
        mine = self.urls[self.rank :: self.world_size][slot :: self.num_slots]
        while True:  # seeded passes over this rank's and slot's shards
            order = list(mine)
            rng.shuffle(order)
            yield from order

    def _raw_samples(self, urls: Iterator[str], state: dict) -> Iterator[dict[str, Any]]:
        empty_in_a_row = 0
        for url in urls:
            n = 0
            reader = TarReader(url)
            try:
                for raw in read_shard(url, reader):
                    n += 1
                    yield raw
                state["counts"]["shards"] += 1
            except ShardReadError as e:
                state["counts"]["corrupt_shards"] += 1
                message = f"skipped unreadable shard {url} after {n} samples: {type(e).__name__}: {e}"
                self._problem(state, message)
            state["counts"]["bad_samples"] += sum(reader.refused.values())
            for p in reader.problems:
                self._problem(state, f"skipped sample {p.key!r} in {url}: {p.message}")
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(self.urls) + 10:
                raise DataError(f"data.shards: no readable samples in the last {empty_in_a_row} shards read "
                                f"({url}, ...)")

    def _problem(self, state: dict, message: str) -> None:
        if message not in state["problems"] and len(state["problems"]) < MAX_PROBLEMS_KEPT:
            state["problems"].append(message)
            log.warning("data (rank %d): %s", self.rank, message)

    def _texts(self, sample: Sample, counts: dict) -> list[str] | None:
        def usable(text_id: str) -> str | None:
            text = sample.texts.get(text_id)
            if text is None or not text.strip() or self.drop_flags.intersection(sample.flags.get(text_id, ())):
                return None
            return text

        texts = []
        for text_id in self.data.text_ids:
            text = usable(text_id)
            if text is None and self.data.fallback_text_id:
                text = usable(self.data.fallback_text_id)
                counts["fallback_texts"] += text is not None
            if text is None:
                counts[f"missing/{text_id}"] += 1
                return None
            texts.append(text)
        return texts

    def _samples(self, segment: int, slot: int, state: dict) -> Iterator[tuple[str, torch.Tensor, list[str]]]:
        """(key, image tensor, texts) of one slot in one segment: a pure function of the seeds."""
        parts = (self.seed, self.salt, segment, self.rank, slot)
        shard_rng, shuffle_rng, crop_rng = (random.Random(_seed(*parts, k)) for k in range(3))
        raw = self._raw_samples(self._shard_urls(shard_rng, slot), state)
        buffer = self.data.shuffle_buffer
        raw = wds.shuffle(buffer, max(1, buffer // 2), rng=shuffle_rng)(raw)
        counts, rejects = state["counts"], 0
        for item in raw:
            if rejects >= MAX_CONSECUTIVE_REJECTS:
                skipped = {k: v for k, v in counts.items() if v and k not in ("samples", "shards")}
                raise DataError(f"data: {rejects} samples in a row were unusable ({skipped}); "
                                "check data.text_ids and the shards")
            rejects += 1
            try:
                sample = Sample.from_members(item["__key__"], _members(item))
            except SampleFormatError as e:
                counts["bad_samples"] += 1
                self._problem(state, f"skipped sample in {item.get('__url__')}: {e}")
                continue
            texts = self._texts(sample, counts)
            if texts is None:
                continue
            try:
                with Image.open(io.BytesIO(sample.image)) as image:
                    image.load()
                    pixels = train_transform(image, self.image_size, tuple(self.data.crop_scale), crop_rng)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                counts["bad_images"] += 1
                self._problem(state, f"skipped sample {sample.key} in {item.get('__url__')}: "
                                     f"image does not decode ({e})")
                continue
            rejects = 0
            counts["samples"] += 1
            yield sample.key, pixels, texts

    def _batches(self, segment: int, slot: int, state: dict) -> Iterator[list[tuple[str, torch.Tensor, list[str]]]]:
        samples = self._samples(segment, slot, state)
        while True:
            yield [next(samples) for _ in range(self.batch_size)]

    # --- the worker's view ------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_slots:
            raise RuntimeError(f"stream built for {self.num_slots} workers runs in {workers}")
        state = {"counts": dict.fromkeys(self.count_keys, 0), "problems": []}
        current, batches = None, None
        index = self.start_batch + worker  # the DataLoader takes batches from workers in rotation
        while True:
            segment, offset = divmod(index, self.segment_batches)
            slot = offset % workers
            if current != (segment, slot):
                current, batches = (segment, slot), self._batches(segment, slot, state)
                for _ in range(offset // workers):  # resumed inside a segment: replay up to here
                    next(batches)
            samples = next(batches)
            tokens = self.tokenizer([t for _, _, texts in samples for t in texts])
            tokens = tokens.view(len(samples), len(self.data.text_ids), -1)
            yield {
                "images": torch.stack([pixels for _, pixels, _ in samples]),  # uint8
                # One (B, T_m) tensor per text type, cut to its longest text (trim_padding).
                "tokens": [trim_padding(tokens[:, m], self.tokenizer.pad_token_id) for m in range(tokens.shape[1])],
                "keys": [key for key, _, _ in samples],
                "index": index,
                "worker": worker,
                "counts": dict(state["counts"]),
                "problems": list(state["problems"]),
            }
            index += workers


def make_loader(stream: MultiTextStream, pin_memory: bool = False) -> DataLoader:
    """Workers yield whole batches (batch_size=None); in_order keeps the strict rotation."""
    workers = stream.data.num_workers
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        in_order=True,
    )


class DataCounts:
    """Running totals of skipped data in the training process, from the batches' worker totals."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._by_worker: dict[int, dict[str, int]] = {}
        self._problems: dict[int, list[str]] = {}

    def update(self, batch: dict[str, Any]) -> None:
        self._by_worker[batch["worker"]] = batch["counts"]
        self._problems[batch["worker"]] = batch["problems"]

    def vector(self) -> torch.Tensor:
        """Totals over this rank's workers in `keys` order (float64, for an all-reduce)."""
        return torch.tensor([sum(c.get(k, 0) for c in self._by_worker.values()) for k in self.keys],
                            dtype=torch.float64)

    def problems(self) -> list[str]:
        return sorted({p for ps in self._problems.values() for p in ps})


def describe_counts(totals: dict[str, float]) -> str:
    """One line for the end-of-run report."""
    skipped = {k: int(v) for k, v in totals.items() if v and k not in ("samples", "shards")}
    text = f"{int(totals.get('samples', 0))} samples used, {int(totals.get('shards', 0))} shards read"
    return text + (f"; skipped: {skipped}" if skipped else "; nothing skipped")


def resolve_sources(specs: Sequence[str]) -> list[Source]:
    return [resolve_source(spec) for spec in specs]
