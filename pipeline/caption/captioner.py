"""Captioning one shard: read its images, ask an engine for every (image, prompt), collect texts.

`ShardCaptioner.caption_shard` is a plain async function of (shard, text jobs): Ray only decides
where it runs (distributor.py). Inside, a reader thread streams the shard and decodes images
on a small thread pool while earlier images are being generated, so the engine always has
queued work; a bound on images in flight keeps memory flat whatever the shard size. All prompts
of one image are submitted together with the image first in the prompt, so the engine's
multimodal cache and prefix cache reuse the image's vision encoding and KV across its prompts.

Per-image work is done once per image, not once per prompt: the image is decoded, turned upright
and converted for the backend (an array for vLLM, a JPEG data URL for a server) once, and it is
named by a digest of its bytes, which vLLM takes as the image's cache key instead of hashing its
pixels for every request. Prompt templates are tokenized once per captioner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from data_manifests import ShardReader, quality_flags

from .backends import BACKENDS, RequestRejected
from .config import CaptionerConfig, TextJob
from .engine_guard import kill_children
from .images import ImageDecodeError, decode
from .plan import WHOLE, Part

# A test hook (tests/test_caption.py, the hung-engine test): the first replica to find this file
# deletes it and stops answering, as a hung engine does. Unset, nothing is checked.
HANG_FILE_VAR = "HOLICLIP_TEST_HANG_FILE"
# A test hook (the poison-image test): the sample with this key kills its engine's process, as
# an image that crashes the engine does (with the engine in a child process). Unset, nothing is checked.
POISON_KEY_VAR = "HOLICLIP_TEST_POISON_KEY"


def _hang_now(path: str | None) -> bool:
    if not path:
        return False
    try:
        os.unlink(path)  # one unlink succeeds: one replica hangs, once
        return True
    except FileNotFoundError:
        return False


def _kill_engine() -> None:
    """The poison test hook: SIGKILL this replica's engine process (vLLM's EngineCore), as a crash
    would, leaving its reaping to vLLM."""
    kill_children("EngineCore", wait=False)


@dataclass
class ShardResult:
    """Texts made for one shard by one captioner, keyed by sample key (sent to the writer)."""

    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    flags: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Progress:
    """How far a shard (part) got: what the actor reports if its engine dies half-way."""

    figures: dict[str, Any] = field(default_factory=lambda: {
        "images": 0, "captions": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
        "decode_errors": 0, "caption_errors": 0, "poison_images": 0})
    result: ShardResult = field(default_factory=ShardResult)
    done: set[str] = field(default_factory=set)  # samples with every text (or error) made
    in_flight: dict[str, list[TextJob]] = field(default_factory=dict)  # samples in the engine now
    # Samples read to be captioned; `read_all` once the reader reached the shard's end (then what
    # is left of the part is known exactly, and no call need read the shard to find it).
    seen: set[str] = field(default_factory=set)
    read_all: bool = False

    def died(self, part: Part, reason: str) -> tuple[dict[str, Any], ShardResult]:
        """The answer for a part whose engine died: texts made so far, and which samples were in the
        engine. A sample alone in its engine (an isolated part: the driver gives such a part a
        replica of its own) that kills it again is the poison: it gets an error for each text."""
        figures = dict(self.figures)
        if part.isolated and self.in_flight:
            (key, todo), = self.in_flight.items()
            why = (f"the engine died while captioning this image alone, after dying with it in flight once before: "
                   f"left without text ({reason})")
            self.result.errors[key] = {j.text_id: why for j in todo}
            figures["poison_images"] += 1
            figures["caption_errors"] += len(todo)
            figures["poison_key"] = key
            self.done.add(key)
            self.in_flight.clear()
        figures["engine_died"] = reason
        figures["done"] = sorted(self.done)
        figures["in_flight"] = sorted(self.in_flight)
        figures["left"] = sorted(self.seen - self.done - set(self.in_flight)) if self.read_all else None
        return figures, self.result


class ShardCaptioner:
    """Captions shards with one backend. One instance per engine replica (a Ray actor holds it)."""

    def __init__(self, cfg: CaptionerConfig, image_max_side: int, decode_threads: int = 4):
        self.cfg = cfg
        self.image_max_side = image_max_side
        self.backend = BACKENDS[cfg.type](cfg)
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self.in_flight = asyncio.Semaphore(cfg.max_images_in_flight)  # shared by every shard in flight
        self._hang_file = os.environ.get(HANG_FILE_VAR)
        self._poison_key = os.environ.get(POISON_KEY_VAR)

    async def warm_up(self) -> None:
        await self.backend.warm_up(self.cfg.jobs()[0])

    def _load(self, data: bytes):
        """On a decode thread: the image as the backend takes it, named by its content (the same
        bytes decoded with the same settings are the same pixels, whichever sample holds them)."""
        content_id = f"{hashlib.sha256(data).hexdigest()}-{self.image_max_side}"
        return self.backend.prepare(decode(data, self.image_max_side), data, content_id)

    async def caption_shard(self, shard_path: str, jobs: list[TextJob], recompute: list[str],
                            part: Part = WHOLE, progress: Progress | None = None) -> tuple[dict, ShardResult]:
        """Make every job's text for every sample of a shard (those of `part`) that lacks it (or all,
        for `recompute`). `progress` says how far it got, should the engine die."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.cfg.max_images_in_flight)
        progress = progress if progress is not None else Progress()
        result, figures = progress.result, progress.figures
        started = time.monotonic()
        reader_error: list[BaseException] = []
        stop = threading.Event()
        recompute_set = set(recompute)

        def put(item) -> bool:
            # Hand an item to the event loop; give up once the shard is abandoned (nobody may be
            # taking items any more, and a reader blocked here would hold the shard forever).
            done = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while True:
                try:
                    done.result(timeout=0.5)
                    return True
                except concurrent.futures.TimeoutError:
                    if stop.is_set():
                        done.cancel()
                        return False

        def read() -> None:
            # Runs in a thread: streams the shard, hands each sample's decode to the pool.
            try:
                for sample in ShardReader(shard_path):
                    if stop.is_set():
                        break
                    if not part.wants(sample.key):
                        continue
                    todo = [j for j in jobs if j.text_id in recompute_set or j.text_id not in sample.texts]
                    if not todo:
                        continue
                    progress.seen.add(sample.key)
                    if not put((sample.key, todo, self.decode_pool.submit(self._load, sample.image))):
                        break
                else:
                    progress.read_all = True
            except BaseException as e:  # reported to the caller below, which retries the shard
                reader_error.append(e)
            finally:
                put(None)

        async def caption_image(key: str, todo: list[TextJob], future) -> None:
            try:
                try:
                    image = await asyncio.wrap_future(future)  # as the backend takes it
                except ImageDecodeError as e:
                    figures["decode_errors"] += 1
                    result.errors[key] = {j.text_id: str(e) for j in todo}
                    progress.done.add(key)
                    return
                progress.in_flight[key] = todo
                if _hang_now(self._hang_file):
                    await asyncio.Event().wait()  # forever
                if key == self._poison_key:
                    _kill_engine()
                gens = await asyncio.gather(*(self.backend.generate(image, j) for j in todo), return_exceptions=True)
                # All of an image's texts or none: one that failed is made again with the others.
                failed = next((g for g in gens if isinstance(g, BaseException) and not isinstance(g, RequestRejected)),
                              None)
                if failed is not None:
                    raise failed
                figures["images"] += 1
                for job, gen in zip(todo, gens, strict=True):
                    if isinstance(gen, RequestRejected):
                        figures["caption_errors"] += 1
                        result.errors.setdefault(key, {})[job.text_id] = f"request rejected: {gen}"
                        continue
                    text = gen.text.strip()
                    result.texts.setdefault(key, {})[job.text_id] = text
                    flags = quality_flags(text, gen.finish_reason)
                    if flags:
                        result.flags.setdefault(key, {})[job.text_id] = flags
                    figures["captions"] += 1
                    figures["prompt_tokens"] += gen.prompt_tokens
                    figures["cached_tokens"] += gen.cached_tokens
                    figures["generated_tokens"] += gen.generated_tokens
                del progress.in_flight[key]
                progress.done.add(key)
            finally:
                self.in_flight.release()

        reader = threading.Thread(target=read, name="shard-reader", daemon=True)
        reader.start()
        tasks: list[asyncio.Task] = []
        try:
            while (item := await queue.get()) is not None:
                await self.in_flight.acquire()
                tasks.append(asyncio.ensure_future(caption_image(*item)))
                failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
                if failed is not None:
                    raise failed.exception()
            await asyncio.gather(*tasks)
        except BaseException:
            # Stop the reader and abandon this shard's requests (vLLM aborts cancelled ones). The
            # reader gives up a hand-over that nobody takes once `stop` is set.
            stop.set()
            for t in tasks:
                t.cancel()
            raise
        finally:
            # Never block the event loop on the reader: it may be waiting for the loop (a join
            # here once held a replica whose engine had died, deadlocked, for good).
            await loop.run_in_executor(None, reader.join, 60)
        if reader_error:
            raise reader_error[0]
        figures["seconds"] = time.monotonic() - started
        return figures, result

    def shutdown(self) -> None:
        self.backend.shutdown()
        self.decode_pool.shutdown(wait=False)
