"""Text tokenizers: CLIP's byte-level BPE in plain Python, or a local Hugging Face tokenizer.

Both share one interface: tokenizer(list_of_str) -> LongTensor (N, context_length), padded with
.pad_token_id, plus .name (reload it with load_tokenizer(name)), .vocab_size, .context_length and
.text_pool: where the text tower must read its embedding (ModelConfig.text_pool), "argmax" for
CLIP's BPE and "last" (last non-pad token) for any other tokenizer. The trainer copies
vocab_size, text_pool and pad_token_id into the model config, so model and tokenizer agree.

The vocabulary file bpe_simple_vocab_16e6.txt.gz next to this module is OpenAI CLIP's
(https://github.com/openai/CLIP, MIT License, Copyright (c) 2021 OpenAI), taken unchanged from
the open-clip-torch 2.24.0 wheel on PyPI (MIT License); sha256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a.
The BPE procedure follows CLIP's simple_tokenizer.py (same licence).
"""

from __future__ import annotations

import functools
import gzip
import html
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

try:
    import regex as re

    _HAS_REGEX = True
except ImportError:  # the standard library cannot match \p{L} / \p{N}, so approximate below
    import re

    _HAS_REGEX = False

DEFAULT_BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's pre-tokenisation: contractions, runs of letters, single digits, runs of other symbols.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same with `re`: a letter is a word character that is neither a digit nor '_'. It differs
# from WORD_PATTERN only on rare numerals outside \d (e.g. superscripts), read as letters here.
WORD_PATTERN_STDLIB = r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""


class Tokenizer:
    """Interface of every tokenizer: texts -> LongTensor (N, context_length)."""

    name: str
    vocab_size: int
    context_length: int
    pad_token_id: int = 0
    text_pool: str = "argmax"

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


def trim_padding(tokens: torch.Tensor, pad_token_id: int, multiple: int = 8) -> torch.Tensor:
    """tokens (N, T) -> (N, T'): the trailing columns that are padding in every row dropped, T'
    rounded up to a multiple of `multiple` (kernels like aligned shapes) and at most T.

    Exact for the text tower: it is causal, so the embedding read at a text's end token depends
    only on the positions up to it, and a column that is padding in every row comes after every
    row's end token.
    """
    used = (tokens != pad_token_id).any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return tokens[:, : min(tokens.shape[1], -(-length // multiple) * multiple)]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 bytes to a printable character, so BPE works on strings without UNKs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


# Curly quotes -> straight ones, the same characters as ftfy's uncurl_quotes.
_STRAIGHT_QUOTES = str.maketrans(
    {**dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'"), **dict.fromkeys("\u201c\u201d\u201e\u201f", '"')}
)


def clean_text(text: str) -> str:
    """HTML-unescape, NFC-normalise, straighten quotes, collapse whitespace, lowercase.

    CLIP runs ftfy.fix_text instead of the first three steps; ftfy also repairs mojibake. We do
    not use ftfy even when installed: an optional dependency would make the tokens depend on the
    machine, and training and evaluation must tokenise identically.
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text).translate(_STRAIGHT_QUOTES)
    return " ".join(text.split()).lower()


class ClipTokenizer(Tokenizer):
    """CLIP's BPE: vocab 49408, <start_of_text> = 49406, <end_of_text> = 49407.

    Texts longer than the context are truncated with <end_of_text> kept as the last token, as in
    open_clip. Literal "<end_of_text>" strings inside a caption stay plain text: captions are data.
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self._bpe_path_arg = bpe_path
        self.name = "clip" if bpe_path is None else str(bpe_path)
        self.context_length = context_length
        path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError) as e:
            raise ValueError(f"tokenizer: cannot read BPE vocabulary {path} ({e})") from None
        # CLIP uses the first 49152 - 256 - 2 merges (line 0 is a version header), which with
        # 2 * 256 byte symbols and 2 special tokens makes the 49408-entry vocabulary.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.pattern = re.compile(WORD_PATTERN if _HAS_REGEX else WORD_PATTERN_STDLIB, re.IGNORECASE)
        # Captions repeat the same words endlessly; caching per word makes BPE nearly free.
        self._bpe = functools.lru_cache(maxsize=1 << 18)(self._bpe_uncached)

    def __reduce__(self):
        # Dataloader workers may receive the tokenizer by pickle; rebuild it (and its cache) there.
        return (type(self), (self._bpe_path_arg, self.context_length))

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """Merge the symbols of one word (bytes as characters), lowest-ranked pair first."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:], strict=False), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <start_of_text>, <end_of_text> or padding."""
        ids: list[int] = []
        for word in self.pattern.findall(clean_text(text)):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a row of ids, up to its <end_of_text>; for debugging and logging."""
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.sot_token_id)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in zip(result, texts, strict=True):
            ids = [self.sot_token_id, *self.encode(text)[: self.context_length - 2], self.eot_token_id]
            row[: len(ids)] = torch.tensor(ids)
        return result


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory, truncated to context_length and right-padded.

    Its end token is rarely its largest id, so the text tower pools at the last non-pad token
    (text_pool "last"). Padding uses the tokenizer's pad token, else its end-of-sequence token,
    else id 0 (GPT-2-like tokenizers have no pad token).
    """

    text_pool = "last"

    def __init__(self, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        try:
            from transformers import AutoTokenizer  # heavy and optional: only this branch needs it
        except ImportError:
            raise ImportError(f"tokenizer {path}: a Hugging Face tokenizer needs the 'transformers' package") from None
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name = str(path)
        self.context_length = context_length
        self.vocab_size = len(self._tokenizer)
        pad = self._tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self._tokenizer.eos_token_id or 0)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = self._tokenizer(texts, truncation=True, max_length=self.context_length)["input_ids"]
        result = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for out, ids in zip(result, rows, strict=True):
            out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result


def load_tokenizer(name_or_path: str | Path | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """"clip" or None: the vendored CLIP BPE; a .txt.gz file: CLIP BPE with that vocabulary;
    a directory: a Hugging Face tokenizer saved there."""
    if name_or_path is None or str(name_or_path) == "clip":
        return ClipTokenizer(context_length=context_length)
    path = Path(name_or_path)
    if path.is_dir():
        return HFTokenizer(path, context_length)
    if path.is_file():
        return ClipTokenizer(path, context_length)
    raise ValueError(
        f"tokenizer {name_or_path}: not found; use 'clip', a BPE vocabulary .txt.gz file "
        "or a Hugging Face tokenizer directory"
    )
