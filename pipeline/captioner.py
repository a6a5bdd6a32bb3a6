"""Captioning one shard: read its images, ask an engine for every (image, prompt), collect texts.

Two backends share everything but the request itself:
- `VLLMBackend`: a vLLM `AsyncLLM` engine in this process (started once, serving many shards).
- `OpenAIBackend`: one or more OpenAI-compatible servers (e.g. a fleet of `vllm serve`).

`ShardCaptioner.caption_shard` is a plain async function of (shard, text jobs): Ray only decides
where it runs (pipeline/caption.py). Inside, a reader thread streams the shard and decodes images
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
import base64
import dataclasses
import hashlib
import itertools
import os
import random
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from data_manifests import ShardReader, quality_flags

from .caption_config import CaptionerConfig, TextJob
from .images import Decoded, ImageDecodeError, bytes_to_send, decode


class RequestRejected(Exception):
    """The engine refused this one request (prompt too long, bad image...): a per-sample error.

    Anything else a backend raises (engine dead, server unreachable after retries) fails the
    whole shard, which the driver then retries elsewhere: a sick engine must not quietly turn
    a shard into a shard of errors.
    """


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class ShardResult:
    """Texts made for one shard by one captioner, keyed by sample key (sent to the writer)."""

    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    flags: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)


def chat_messages(prompt_text: str) -> list[dict[str, Any]]:
    # Image first: the part shared by all prompts of an image comes before the prompt text.
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]


def _model_in_engine_process(engine: dict) -> None:
    """On a CPU-only machine, run the model in vLLM's engine process, as vLLM does on a GPU.

    vLLM's CPU backend otherwise puts the model in a third process that busy-waits for each step
    of the scheduler while the scheduler busy-waits for it: one core goes to waiting. With the
    model in the engine process, it runs on the actor's reserved CPUs (Ray sets OMP_NUM_THREADS
    to them) and nothing spins (measured: BENCHMARKS.md). Only for one-process engines (no tensor
    or pipeline parallelism); a captioner's `env` can set VLLM_ENABLE_V1_MULTIPROCESSING: "1" to
    get vLLM's own layout, with its thread binding, back.
    """
    from vllm.platforms import current_platform

    single = engine.get("tensor_parallel_size", 1) == 1 and engine.get("pipeline_parallel_size", 1) == 1
    if current_platform.is_cpu() and single:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMBackend:
    """A vLLM AsyncLLM engine; continuous batching across every request of every shard in flight."""

    def __init__(self, cfg: CaptionerConfig):
        from transformers import AutoProcessor
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # Images go to vLLM as read-only arrays, which its processors only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        engine = dict(cfg.engine)
        _model_in_engine_process(engine)
        engine.setdefault("limit_mm_per_prompt", {"image": 1})
        # Per-step statistics cost the engine and the front end CPU on every step; the figures we
        # report come from the request outputs. (vLLM's offline `LLM` turns them off too.)
        engine.setdefault("disable_log_stats", True)
        # This is an offline batch job: take vLLM's defaults for one (`LLM`'s: a larger token budget
        # per step, e.g. 4096 instead of 2048 on a CPU), not those of an online server.
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=cfg.model, revision=cfg.revision, **engine),
                                                usage_context=UsageContext.LLM_CLASS)
        # The model's own chat template places the image placeholder(s) the way it was trained.
        self.processor = AutoProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        try:  # the engine's own tokenizer (engine settings may name another than the model's)
            self.tokenizer = self.engine.get_tokenizer()
        except Exception:  # noqa: BLE001 (skip_tokenizer_init and the like: vLLM gets text prompts)
            self.tokenizer = None
        self._templates: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:12]

    def _prompt(self, text: str) -> dict[str, Any]:
        """The chat-templated prompt, with its token ids: tokenized once, not once per request."""
        if text not in self._templates:
            templated = self.processor.apply_chat_template(chat_messages(text), tokenize=False,
                                                           add_generation_prompt=True)
            prompt: dict[str, Any] = {"prompt": templated}
            if self.tokenizer is not None:
                # As vLLM tokenizes a text prompt, except that a template which writes the BOS
                # token itself does not get a second one.
                bos = getattr(self.tokenizer, "bos_token", None)
                special = not (bos and templated.startswith(bos))
                prompt["prompt_token_ids"] = list(self.tokenizer(templated, add_special_tokens=special)["input_ids"])
            self._templates[text] = prompt
        return self._templates[text]

    def prepare(self, decoded: Decoded, data: bytes, content_id: str) -> dict[str, Any]:
        """Once per image: its pixels as an array (no per-request conversion or copy in vLLM) and
        its content id as vLLM's cache key for it (no per-request hashing of the pixels)."""
        import numpy as np

        return {"multi_modal_data": {"image": np.asarray(decoded.image)},
                "multi_modal_uuids": {"image": [content_id]}}

    async def generate(self, image: dict[str, Any], job: TextJob) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: a caption is only useful whole; streaming every token of thousands of
        # requests through asyncio would cost the front-end more than the tiny engine's step.
        params = SamplingParams(**job.sampling, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        try:
            async for out in self.engine.generate({**self._prompt(job.prompt.text), **image},
                                                  params, request_id=f"{self._id_prefix}-{next(self._ids)}"):
                final = out
        except ValueError as e:  # input validation: e.g. the image needs more tokens than max_model_len
            raise RequestRejected(str(e)) from e
        completion = final.outputs[0]
        return Generation(completion.text, completion.finish_reason, len(final.prompt_token_ids or ()),
                          final.num_cached_tokens or 0, len(completion.token_ids))

    async def warm_up(self, job: TextJob) -> None:
        """One short request on a small blank image before any shard: the engine's first steps
        (allocations, kernels chosen for new shapes) are paid here, and an engine that cannot
        caption at all fails at start instead of on every sample."""
        from PIL import Image

        await self.generate(self.prepare(Decoded(Image.new("RGB", (64, 64), (127, 127, 127))), b"", "holiclip-warm-up"),
                            dataclasses.replace(job, sampling={**job.sampling, "max_tokens": 2}))

    def shutdown(self) -> None:
        self.engine.shutdown()


class OpenAIBackend:
    """OpenAI-compatible chat completions, spread round-robin over endpoints, with retries."""

    def __init__(self, cfg: CaptionerConfig):
        import httpx

        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(timeout=cfg.timeout_s, headers=headers,
                                        limits=httpx.Limits(max_connections=cfg.concurrency))
        self.endpoints = itertools.cycle([e.rstrip("/") for e in cfg.endpoints])
        self.limit = asyncio.Semaphore(cfg.concurrency)

    def prepare(self, decoded: Decoded, data: bytes, content_id: str) -> str:
        """Once per image: the data URL that every prompt of it sends (the original bytes when
        they are the image as decoded here, else a JPEG of it)."""
        payload, mime = bytes_to_send(data, decoded)
        return f"data:{mime};base64," + base64.b64encode(payload).decode()

    async def generate(self, data_url: str, job: TextJob) -> Generation:
        import httpx

        sampling = dict(job.sampling)
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": job.prompt.text}]}],
            "max_tokens": sampling.pop("max_tokens"),
            **sampling,
        }
        last_error = ""
        for attempt in range(self.cfg.max_retries + 1):
            endpoint = next(self.endpoints)
            try:
                async with self.limit:
                    r = await self.client.post(f"{endpoint}/chat/completions", json=body)
                if r.status_code == 200:
                    out = r.json()
                    choice = out["choices"][0]
                    usage = out.get("usage") or {}
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    return Generation(choice["message"].get("content") or "", choice.get("finish_reason"),
                                      usage.get("prompt_tokens", 0), cached, usage.get("completion_tokens", 0))
                last_error = f"HTTP {r.status_code} from {endpoint}: {r.text[:200]}"
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    raise RequestRejected(last_error)  # the request itself is wrong: retrying will not help
            except (httpx.HTTPError, ValueError, KeyError) as e:
                last_error = f"{type(e).__name__} from {endpoint}: {e}"
            # Exponential backoff with jitter, so a fleet of clients does not retry in lockstep.
            await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
        raise RuntimeError(f"request failed after {self.cfg.max_retries + 1} attempts: {last_error}")

    async def warm_up(self, job: TextJob) -> None:
        """Nothing: the servers are not ours to warm up or load."""

    def shutdown(self) -> None:
        pass


BACKENDS = {"vllm": VLLMBackend, "openai": OpenAIBackend}


class ShardCaptioner:
    """Captions shards with one backend. One instance per engine replica (a Ray actor holds it)."""

    def __init__(self, cfg: CaptionerConfig, image_max_side: int, decode_threads: int = 4):
        self.cfg = cfg
        self.image_max_side = image_max_side
        self.backend = BACKENDS[cfg.type](cfg)
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self.in_flight = asyncio.Semaphore(cfg.max_images_in_flight)  # shared by every shard in flight

    async def warm_up(self) -> None:
        await self.backend.warm_up(self.cfg.jobs()[0])

    def _load(self, data: bytes):
        """On a decode thread: the image as the backend takes it, named by its content (the same
        bytes decoded with the same settings are the same pixels, whichever sample holds them)."""
        content_id = f"{hashlib.sha256(data).hexdigest()}-{self.image_max_side}"
        return self.backend.prepare(decode(data, self.image_max_side), data, content_id)

    async def caption_shard(self, shard_path: str, jobs: list[TextJob], recompute: list[str]) -> tuple[dict, ShardResult]:
        """Make every job's text for every sample of a shard that lacks it (or all, for `recompute`)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.cfg.max_images_in_flight)
        result = ShardResult()
        figures = {"images": 0, "captions": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                   "decode_errors": 0, "caption_errors": 0}
        started = time.monotonic()
        reader_error: list[BaseException] = []
        stop = threading.Event()
        recompute_set = set(recompute)

        def read() -> None:
            # Runs in a thread: streams the shard, hands each sample's decode to the pool.
            try:
                for sample in ShardReader(shard_path):
                    if stop.is_set():
                        break
                    todo = [j for j in jobs if j.text_id in recompute_set or j.text_id not in sample.texts]
                    if not todo:
                        continue
                    future = self.decode_pool.submit(self._load, sample.image)
                    asyncio.run_coroutine_threadsafe(queue.put((sample.key, todo, future)), loop).result()
            except BaseException as e:  # reported to the caller below, which retries the shard
                reader_error.append(e)
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

        async def caption_image(key: str, todo: list[TextJob], future) -> None:
            try:
                try:
                    image = await asyncio.wrap_future(future)  # as the backend takes it
                except ImageDecodeError as e:
                    figures["decode_errors"] += 1
                    result.errors[key] = {j.text_id: str(e) for j in todo}
                    return
                figures["images"] += 1
                gens = await asyncio.gather(*(self.backend.generate(image, j) for j in todo), return_exceptions=True)
                for job, gen in zip(todo, gens):
                    if isinstance(gen, RequestRejected):
                        figures["caption_errors"] += 1
                        result.errors.setdefault(key, {})[job.text_id] = f"request rejected: {gen}"
                        continue
                    if isinstance(gen, BaseException):
                        raise gen
                    text = gen.text.strip()
                    result.texts.setdefault(key, {})[job.text_id] = text
                    flags = quality_flags(text, gen.finish_reason)
                    if flags:
                        result.flags.setdefault(key, {})[job.text_id] = flags
                    figures["captions"] += 1
                    figures["prompt_tokens"] += gen.prompt_tokens
                    figures["cached_tokens"] += gen.cached_tokens
                    figures["generated_tokens"] += gen.generated_tokens
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
            # Stop the reader, abandon this shard's requests (vLLM aborts cancelled ones), and
            # drain the queue so the reader thread is never left blocked on it.
            stop.set()
            for t in tasks:
                t.cancel()
            while (await queue.get()) is not None:
                pass
            raise
        finally:
            reader.join(timeout=60)
        if reader_error:
            raise reader_error[0]
        figures["seconds"] = time.monotonic() - started
        return figures, result

    def shutdown(self) -> None:
        self.backend.shutdown()
        self.decode_pool.shutdown(wait=False)
