"""The engines a captioner can use, behind one small interface.

- `VLLMBackend`: a vLLM `AsyncLLM` engine in this process (started once, serving many shards).
- `OpenAIBackend`: one or more OpenAI-compatible servers (e.g. a fleet of `vllm serve`).

A backend prepares an image once (`prepare`: decoded pixels to what it sends) and generates one
text per (image, prompt) (`generate`); `RequestRejected` marks a request the engine refused,
anything else it raises fails the shard.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import os
import random
import re
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from .config import CaptionerConfig, TextJob
from .images import Decoded, bytes_to_send


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


class EngineStartError(RuntimeError):
    """vLLM's engine process failed to start; the message carries its own error."""


# An exception line inside a vLLM log record: "... ERROR 12-03 14:52:19 [file.py:953] pkg.SomeError: why".
_LOGGED_EXCEPTION = re.compile(r" ERROR .*?\] ([A-Za-z_][\w.]*(?:Error|Exception|Exit)\w*): (.+)$")


class _EngineLog:
    """This process's stdout and stderr, where vLLM's engine processes (which inherit them) log why
    they failed (vLLM logs to stdout).

    With the engine in a child process (on every GPU), vLLM raises only "Engine core initialization
    failed. See root cause above": the cause is in the log, which under Ray is the actor's log
    files, not in the error the driver gets. Read back from where the files stood when the engine
    was started, bounded; nothing where they are not files."""

    LIMIT = 512 * 1024

    def __init__(self):
        self.files: dict[str, int] = {}  # path -> size when the engine was started
        for fd in (1, 2):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                if os.path.isfile(path):
                    self.files.setdefault(path, os.path.getsize(path))
            except OSError:
                continue

    def engine_error(self) -> str | None:
        """The first exception vLLM logged since, skipping its wrappers that point elsewhere
        ("see stack trace for root cause"): e.g. "SafetensorError: Error while deserializing header"."""
        sys.stdout.flush()
        sys.stderr.flush()
        found = []
        for path, start in self.files.items():
            try:
                with open(path, "rb") as f:
                    f.seek(max(start, os.path.getsize(path) - self.LIMIT))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            found += [m for m in map(_LOGGED_EXCEPTION.search, text.splitlines()) if m]
        real = [m for m in found if "root cause" not in m.group(2)] or found
        if not real:
            return None
        name, why = real[0].groups()
        return f"{name.rsplit('.', 1)[-1]}: {why.strip()}"[:500]


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
        log = _EngineLog()
        try:
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=cfg.model, revision=cfg.revision, **engine),
                                                    usage_context=UsageContext.LLM_CLASS)
        except RuntimeError as e:
            cause = log.engine_error() if "root cause above" in str(e) else None
            if cause is None:
                raise
            raise EngineStartError(f"the engine process failed to start: {cause}") from e
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

    def is_dead(self) -> bool:
        """The engine can serve no more requests (its process died, or it failed fatally)."""
        return bool(getattr(self.engine, "errored", False))

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

    def is_dead(self) -> bool:
        return False  # a server that fails is retried, then fails the shard; it is not ours to restart

    def shutdown(self) -> None:
        pass


BACKENDS = {"vllm": VLLMBackend, "openai": OpenAIBackend}
