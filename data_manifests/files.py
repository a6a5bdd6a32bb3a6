"""Files as every stage writes them: aside under a hidden partial name, then renamed into place.

A reader or a resuming job therefore sees a file whole or not at all, never half-written; the
partial names (`.<name>.partial-<random>`) are hidden from shard listings and are what a job
deletes as leftovers of a killed run (`PARTIAL_GLOB`). Also the one clock every record uses.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

PARTIAL_GLOB = ".*.partial-*"


def now_iso() -> str:
    """The time now, in UTC, as ISO 8601 to the second: the stamp of every record we write."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def partial_name(final_name: str) -> str:
    # Random, so that two writers of the same file never share a partial file.
    return f".{final_name}.partial-{uuid.uuid4().hex[:12]}"


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(partial_name(path.name))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable; a no-op where directories cannot be synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(partial: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished partial file (already flushed to disk) into place, durably."""
    os.replace(partial, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", errors: str | None = None) -> Iterator[IO]:
    """Write `path` through a partial file: published when the block ends, removed if it raises.
    Text is UTF-8."""
    path = Path(path)
    partial = partial_path(path)
    text = {} if "b" in mode else {"encoding": "utf-8", "errors": errors}
    try:
        with open(partial, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON, indented, non-ASCII as it is. Any str can be written, even one with a lone surrogate
    (a tar member name that was not UTF-8, quoted in a problem): UTF-8 cannot store that
    character, and backslashreplace writes it as `\\udcff`, which is how JSON escapes it."""
    with atomic_open(path, "w", errors="backslashreplace") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def readable_name(name: str) -> str:
    """A file or member name as text any writer accepts: bytes that were not UTF-8 as `\\xNN`."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # how Python decoded the bytes it was given
    except UnicodeEncodeError:  # a surrogate that did not come from a byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def open_binary(url: str) -> BinaryIO:
    """A local path with open(); anything with a scheme (s3://, gs://, http://) through fsspec."""
    if "://" in url:
        import fsspec  # only for remote URLs

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


class HashingFile(io.RawIOBase):
    """A pass-through file object that hashes and counts the bytes going through it."""

    def __init__(self, raw: BinaryIO, mode: str):
        self.raw = raw
        self.mode_ = mode
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return self.mode_ == "r"

    def writable(self) -> bool:
        return self.mode_ == "w"

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.count += n
        return n

    def write(self, b) -> int:  # type: ignore[override]
        self.raw.write(b)
        self.sha.update(b)
        self.count += len(b)
        return len(b)
