"""One sample of a multi-text dataset: an image plus a JSON record of its texts.

In a shard, a sample is two tar members sharing a key: `<key>.<jpg|png|webp>` (the encoded
image bytes, never re-encoded by us) and `<key>.json`:

    {"key": "000000042",
     "texts":  {"raw": "a dog on a beach", "detail": "A brown dog ...", "qwen2vl/style": "..."},
     "flags":  {"detail": ["truncated"]},          # quality flags, only for flagged texts
     "errors": {"style": "image could not be decoded: ..."},   # texts that could not be made
     "source": {"url": "...", "width": 448, "height": 336, "sha256": "<of the image bytes>", ...}}

`texts` is a flat mapping from text id to text. The shard writer also stores one of them as
`<key>.txt` (shard.ShardWriter), the member stock WebDataset loaders such as OpenCLIP's read.
See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

IMAGE_EXTS = ("jpg", "png", "webp")
# webdataset splits a member name at the first dot of its basename, so keys may not hold dots;
# slashes would make members escape the shard's namespace when extracted.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
# A text id is a prompt id, optionally prefixed by the captioner that made it: "detail",
# "qwen2vl-7b/detail". "raw" is the alt-text of the source.
TEXT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
RAW = "raw"
MAX_JSON_DEPTH = 100  # deeper than any real record; Python's own JSON reader stops near 1000
_BIG_INT = 10**4000  # Python refuses to print an int of more than 4300 digits


class SampleFormatError(ValueError):
    """A sample that does not follow the format (the message says what is wrong)."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SampleFormatError(
            f"sample key {key!r} is not allowed: use 1-200 characters from A-Z a-z 0-9 _ -"
        )
    return key


def check_text_id(text_id: str) -> str:
    if not isinstance(text_id, str) or not TEXT_ID_RE.match(text_id):
        raise SampleFormatError(
            f"text id {text_id!r} is not allowed: use 'prompt' or 'captioner/prompt' made of "
            "letters, digits, '_', '-' and '.'"
        )
    return text_id


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only a lone surrogate: valid as a JSON escape ("\udcff"), not as text
        return "holds a lone UTF-16 surrogate, which UTF-8 cannot store"
    return None


def _json_problem(value: Any, depth: int = 0) -> str | None:
    """Why `value` cannot be written as JSON and read back equal, or None."""
    if isinstance(value, str):
        return _text_problem(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -_BIG_INT < value < _BIG_INT else "holds an integer too long for JSON readers"
    if isinstance(value, float):
        return None if math.isfinite(value) else "holds NaN or an infinity, which JSON cannot store"
    if isinstance(value, (list, dict)) and depth >= MAX_JSON_DEPTH:
        return f"is nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, list):
        return next((p for v in value if (p := _json_problem(v, depth + 1))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"has a key {k!r} that is not a string"
            if problem := _text_problem(k) or _json_problem(v, depth + 1):
                return problem
        return None
    return f"holds a {type(value).__name__}, which is not a JSON value"


@dataclass
class Sample:
    key: str
    image: bytes | None  # None only while a sample is read without its image (json_only)
    image_ext: str
    texts: dict[str, str] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> Sample:
        """Check that the sample can be written and read back equal; SampleFormatError names the field."""
        check_key(self.key)
        if self.image_ext not in IMAGE_EXTS:
            raise SampleFormatError(
                f"sample {self.key}: image extension {self.image_ext!r} is not one of {IMAGE_EXTS}"
            )
        for what, value in (("texts", self.texts), ("flags", self.flags), ("errors", self.errors),
                            ("source", self.source)):
            if not isinstance(value, dict):
                raise SampleFormatError(f"sample {self.key}: {what!r} is not an object")
        for text_id, text in self.texts.items():
            try:
                check_text_id(text_id)
            except SampleFormatError as e:
                raise SampleFormatError(f"sample {self.key}: {e}") from None
            if not isinstance(text, str):
                raise SampleFormatError(f"sample {self.key}: text {text_id!r} is not a string")
            if problem := _text_problem(text):
                raise SampleFormatError(f"sample {self.key}: text {text_id!r} {problem}")
        for text_id, flags in self.flags.items():
            if text_id not in self.texts:
                raise SampleFormatError(f"sample {self.key}: flags for missing text {text_id!r}")
            if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                raise SampleFormatError(f"sample {self.key}: flags of {text_id!r} must be strings")
            if problem := _json_problem(flags):
                raise SampleFormatError(f"sample {self.key}: flags of {text_id!r} {problem}")
        for text_id, error in self.errors.items():
            if not isinstance(text_id, str) or not isinstance(error, str):
                raise SampleFormatError(f"sample {self.key}: errors must map text ids to messages")
            if problem := _text_problem(text_id) or _text_problem(error):
                raise SampleFormatError(f"sample {self.key}: error of {text_id!r} {problem}")
        for name, value in self.source.items():
            if not isinstance(name, str):
                raise SampleFormatError(f"sample {self.key}: source key {name!r} is not a string")
            if problem := _text_problem(name) or _json_problem(value):
                raise SampleFormatError(f"sample {self.key}: source field {name!r} {problem}")
        return self

    def to_json_bytes(self) -> bytes:
        record: dict[str, Any] = {"key": self.key, "texts": self.texts}
        flags = {k: v for k, v in self.flags.items() if v}
        if flags:
            record["flags"] = flags
        if self.errors:
            record["errors"] = self.errors
        record["source"] = self.source
        # sort_keys keeps shards byte-identical between an interrupted and an uninterrupted run.
        return json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> Sample:
        """Build a sample from the tar members of one key (extension -> bytes).

        Also reads img2dataset's layout (`.txt` alt-text, JSON without `texts`), so that its
        shards can be indexed in place: the `.txt` becomes the `raw` text.
        """
        check_key(key)
        images = [ext for ext in IMAGE_EXTS if ext in members]
        if "jpeg" in members and not images:
            members = {**members, "jpg": members.pop("jpeg")}
            images = ["jpg"]
        if not images:
            raise SampleFormatError(f"sample {key}: no image member (.jpg, .png or .webp)")
        if len(images) > 1:
            raise SampleFormatError(f"sample {key}: several image members {images}")
        if "json" not in members:
            raise SampleFormatError(f"sample {key}: no .json member")
        try:
            record = json.loads(members["json"].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SampleFormatError(f"sample {key}: .json is not UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise SampleFormatError(f"sample {key}: .json is not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError):  # a number of over 4300 digits; nesting Python cannot follow
            raise SampleFormatError(
                f"sample {key}: .json is not valid JSON (a number too long or nesting too deep)") from None
        if not isinstance(record, dict):
            raise SampleFormatError(f"sample {key}: .json is not an object")
        texts = record.get("texts")
        source = record.get("source")
        if texts is None:
            if "txt" not in members:
                raise SampleFormatError(f"sample {key}: .json has no 'texts' and there is no .txt")
            try:
                texts = {RAW: members["txt"].decode("utf-8")}
            except UnicodeDecodeError as e:
                raise SampleFormatError(f"sample {key}: .txt is not UTF-8 ({e.reason})") from None
            # img2dataset keeps its per-sample metadata at the top level of the JSON.
            source = {k: v for k, v in record.items() if k not in ("key", "caption")}
        if not isinstance(texts, dict):
            raise SampleFormatError(f"sample {key}: 'texts' is not an object")
        sample = cls(
            key=key,
            image=members[images[0]],
            image_ext=images[0],
            texts=texts,
            flags=record.get("flags") or {},
            errors=record.get("errors") or {},
            source=source if isinstance(source, dict) else {},
        )
        return sample.validate()
