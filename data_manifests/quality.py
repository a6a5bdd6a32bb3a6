"""Per-text quality flags: cheap signals that a generated caption should not be trusted.

Flags are recorded, never acted on here: the trainer or a filter decides what to do with them.
"""

from __future__ import annotations

import re

EMPTY = "empty"
TRUNCATED = "truncated"  # generation stopped at the token limit (finish_reason == "length")
REFUSAL = "refusal"
REPETITION = "repetition"
ALL_FLAGS = (EMPTY, TRUNCATED, REFUSAL, REPETITION)

# Openings that VLMs use when they decline or cannot see the image. Anchored at the start of
# the text: a description that *contains* "I cannot" later on is usually fine.
_REFUSAL_RE = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i am unable|i'?m unable|"
    r"as an ai|i do not have the ability|there is no image|no image (is )?provided|"
    r"unable to (see|view|process))",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def is_repetitive(text: str, n: int = 4, min_words: int = 16, max_distinct_ratio: float = 0.5) -> bool:
    """A degenerate loop ("a dog, a dog, a dog, ..."): few distinct n-grams for the length.

    Greedy decoding of small VLMs falls into such loops; a normal description of 16+ words
    has nearly all of its 4-grams distinct.
    """
    tokens = words(text)
    if len(tokens) < min_words:
        return False
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) <= max_distinct_ratio


def quality_flags(text: str, finish_reason: str | None = None) -> list[str]:
    """Flags for one generated text. `finish_reason` is the engine's ("stop" or "length")."""
    flags: list[str] = []
    if not text.strip():
        flags.append(EMPTY)
    if finish_reason == "length":
        flags.append(TRUNCATED)
    if _REFUSAL_RE.match(text):
        flags.append(REFUSAL)
    if is_repetitive(text):
        flags.append(REPETITION)
    return flags
