"""Batched embedding of evaluation sets with bounded memory.

Images stream in from the set, are decoded and transformed (train.transform.eval_transform) by a
small thread pool while the previous batch runs through the model, and only their embeddings
are kept: memory is two batches of pixels plus N x H x D floats, whatever the size of the set.
Texts are embedded once per distinct string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from train.model import HolisticCLIP
from train.tokenizer import Tokenizer
from train.transform import eval_transform

from .data import EvalItem

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL raises all of these


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 4
    progress: bool = True
    limit: int | None = None  # embed only the first N images (quick checks)


def autocast(options: EmbedOptions):
    dtype = PRECISIONS[options.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(options.device).type, dtype=dtype)


def load_image(data: bytes | Path, size: int) -> torch.Tensor:
    """Encoded bytes or a file -> (3, size, size), exactly as the model is evaluated."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return eval_transform(image, size)


def _decode(item: EvalItem, size: int) -> torch.Tensor | str:
    try:
        return load_image(item.image, size)
    except DECODE_ERRORS as e:
        return f"{item.key}: image does not decode ({type(e).__name__}: {e})"


def _batches(items: Iterable[EvalItem], size: int, limit: int | None) -> Iterator[list[EvalItem]]:
    batch: list[EvalItem] = []
    for item in itertools.islice(items, limit):  # islice pulls nothing past the limit
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def embed_images(model: HolisticCLIP, items: Iterable[EvalItem], options: EmbedOptions, *, total: int | None = None,
                 problems: list[str] | None = None, desc: str = "images") -> tuple[torch.Tensor, list[EvalItem]]:
    """(N, H, D) float32 CPU embeddings and the N items that gave them, without their image bytes.

    An image that does not decode is skipped and reported in `problems`.
    """
    size = model.config.image_size
    if options.limit is not None:
        total = options.limit if total is None else min(total, options.limit)
    chunks: list[torch.Tensor] = []
    kept: list[EvalItem] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not options.progress, dynamic_ncols=True)

    def encode(batch: list[EvalItem], decoded: list[Future]) -> None:
        pixels = []
        for item, future in zip(batch, decoded, strict=True):
            result = future.result()
            if isinstance(result, str):
                if problems is not None:
                    problems.append(result)
                continue
            pixels.append(result)
            kept.append(dataclasses.replace(item, image=None))
        if pixels:
            with autocast(options):
                out = model.encode_image(torch.stack(pixels).to(options.device))
            chunks.append(out.float().cpu())
        bar.update(len(batch))

    with ThreadPoolExecutor(max(1, options.workers)) as pool, bar:
        pending = None
        for batch in _batches(items, options.batch_size, options.limit):
            decoding = [pool.submit(_decode, item, size) for item in batch]  # overlaps the previous batch's forward
            if pending is not None:
                encode(*pending)
            pending = (batch, decoding)
        if pending is not None:
            encode(*pending)
    h, d = model.config.num_branches, model.config.embed_dim
    return (torch.cat(chunks) if chunks else torch.empty(0, h, d)), kept


@torch.no_grad()
def embed_texts(model: HolisticCLIP, tokenizer: Tokenizer, texts: Sequence[str], options: EmbedOptions,
                desc: str = "texts") -> torch.Tensor:
    """(len(texts), D) float32 CPU embeddings, L2-normalised."""
    out = []
    batch_size = max(options.batch_size, 256)  # texts are cheap next to images
    pad = getattr(tokenizer, "pad_token_id", 0)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch",
                      disable=not options.progress or len(texts) <= batch_size, dynamic_ncols=True):
        tokens = tokenizer(list(texts[start:start + batch_size]))
        # The text tower is causal, so cutting the padding after the last non-pad token of the
        # batch changes nothing but the cost (positions are indexed from 0 either way, and the
        # pooled token is at or before that position for both pooling rules).
        positions = torch.arange(1, tokens.shape[1] + 1)
        length = int(((tokens != pad) * positions).amax().clamp(min=1))
        with autocast(options):
            emb = model.encode_text(tokens[:, :length].to(options.device))
        out.append(emb.float().cpu())
    d = model.config.embed_dim
    return torch.cat(out) if out else torch.empty(0, d)
