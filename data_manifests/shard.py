"""Reading and writing WebDataset shards of the multi-text format.

Writing is atomic: a shard is written aside under a hidden name and renamed into place only
once it is complete and flushed to disk, so a crash never leaves a half-written `.tar` where a
reader or a resuming job could mistake it for a finished one.

Reading never extracts to disk: members are read into memory one sample at a time, so member
names that try to escape the directory (`../x`, `/etc/x`) are reported and skipped, never
followed. Problems that concern one sample are collected and the read goes on; a shard that is
truncated or not a tar at all raises `ShardReadError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .sample import Sample, SampleFormatError, check_key

TAR_END_BYTES = 1024  # a tar ends with two zero blocks of 512 bytes


@dataclass(frozen=True)
class Problem:
    """Something wrong inside a shard that did not stop the read."""

    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}" + (f" sample {self.key}" if self.key else "")
        return f"{where}: {self.message}"


class ShardReadError(Exception):
    """The shard as a whole cannot be read (truncated, corrupt, not a tar)."""

    def __init__(self, shard: str, message: str, samples_read: int = 0):
        super().__init__(f"{shard}: {message} (after {samples_read} good samples)")
        self.shard = shard
        self.reason = message
        self.samples_read = samples_read


class ShardWriteError(Exception):
    """The shard could not be written (disk full, no permission, ...); nothing was published."""


@dataclass(frozen=True)
class ShardInfo:
    """What a manifest records about a finished shard file."""

    name: str
    samples: int
    bytes: int
    sha256: str


class _HashingFile(io.RawIOBase):
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


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same samples always give the same bytes (and sha256): an
    # interrupted-then-resumed run can then be compared with an uninterrupted one byte for byte.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def _fsync_dir(path: Path) -> None:
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


def partial_name(final_name: str) -> str:
    return f".{final_name}.partial-{uuid.uuid4().hex[:12]}"


class ShardWriter:
    """Write samples to `<dir>/.<name>.partial-*`, publish as `<dir>/<name>` on `close()`.

    Use as a context manager: an exception inside the block removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(partial_name(self.path.name))
        self._keys: set[str] = set()
        try:
            self._file = open(self.tmp_path, "wb")
        except OSError as e:
            raise ShardWriteError(f"cannot create {self.tmp_path}: {e.strerror}") from e
        self._hashing = _HashingFile(self._file, "w")
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def write(self, sample: Sample) -> None:
        sample.validate()
        if sample.image is None:
            raise SampleFormatError(f"sample {sample.key}: no image bytes to write")
        if sample.key in self._keys:
            raise SampleFormatError(f"sample {sample.key}: key written twice in {self.path.name}")
        self._keys.add(sample.key)
        record = sample.to_json_bytes()
        try:
            self._tar.addfile(_tarinfo(f"{sample.key}.{sample.image_ext}", len(sample.image)),
                              io.BytesIO(sample.image))
            self._tar.addfile(_tarinfo(f"{sample.key}.json", len(record)), io.BytesIO(record))
        except OSError as e:
            self.abort()
            raise ShardWriteError(f"cannot write {self.tmp_path}: {e.strerror or e}") from e
        self.samples += 1

    def close(self) -> ShardInfo:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except OSError as e:
            self.abort()
            raise ShardWriteError(f"cannot finish {self.path}: {e.strerror or e}") from e
        _fsync_dir(self.path.parent)
        return ShardInfo(self.path.name, self.samples, self._hashing.count, self._hashing.sha.hexdigest())

    def abort(self) -> None:
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError, tarfile.TarError):
                pass
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _safe_member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) for a member name, or None when the name is unsafe."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return None
    base = path.name
    if "." not in base:
        return base, ""
    key, ext = base.split(".", 1)
    return key, ext.lower()


def _open_read(path: str) -> BinaryIO:
    if "://" in path:
        import fsspec  # only for remote URLs

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


class ShardReader:
    """Iterate over the samples of one shard, collecting per-sample problems.

        reader = ShardReader(path)
        for sample in reader: ...
        reader.problems, reader.bytes, reader.sha256   # after the loop

    Raises ShardReadError for a shard that cannot be read to its end.
    """

    def __init__(self, path: str | os.PathLike, with_images: bool = True):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self.with_images = with_images
        self.problems: list[Problem] = []
        self.samples = 0
        self.bytes = 0
        self.sha256 = ""
        self.keys_seen: set[str] = set()

    def _problem(self, key: str | None, message: str) -> None:
        self.problems.append(Problem(self.name, key, message))

    def _finish_group(self, key: str, members: dict[str, bytes]) -> Sample | None:
        try:
            check_key(key)
            if key in self.keys_seen:
                self._problem(key, "key appears more than once in the shard")
                return None
            self.keys_seen.add(key)
            sample = Sample.from_members(key, members)
        except SampleFormatError as e:
            self._problem(key, str(e).removeprefix(f"sample {key}: "))
            return None
        if not self.with_images:
            sample.image = None
        return sample

    def __iter__(self) -> Iterator[Sample]:
        try:
            raw = _open_read(self.path)
        except OSError as e:
            raise ShardReadError(self.name, f"cannot open: {e.strerror or e}") from e
        hashing = _HashingFile(raw, "r")
        stream = io.BufferedReader(hashing, buffer_size=1 << 20)
        try:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|")
            except tarfile.ReadError as e:
                raise ShardReadError(self.name, f"not a readable tar file ({e})") from None
            key: str | None = None
            members: dict[str, bytes] = {}
            try:
                for info in tar:
                    if info.isdir():
                        continue
                    parsed = _safe_member_key(info.name)
                    if parsed is None:
                        self._problem(None, f"member {info.name!r} has an unsafe path; skipped")
                        continue
                    if not info.isfile():
                        self._problem(parsed[0], f"member {info.name!r} is not a regular file; skipped")
                        continue
                    member_key, ext = parsed
                    if member_key != key:
                        if key is not None and (sample := self._finish_group(key, members)):
                            self.samples += 1
                            yield sample
                        key, members = member_key, {}
                    if ext in members:
                        self._problem(key, f"member {info.name!r} appears twice; kept the first")
                        continue
                    if self.with_images or ext in ("json", "txt"):
                        members[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
                    else:
                        members[ext] = b""  # stream mode skips the unread bytes (still hashed)
                if key is not None and (sample := self._finish_group(key, members)):
                    self.samples += 1
                    yield sample
                end_offset = tar.offset
            except (tarfile.ReadError, EOFError, OSError, ValueError) as e:
                raise ShardReadError(self.name, f"truncated or corrupt tar ({e})", self.samples) from None
            # tarfile stops quietly when a file ends at a member boundary or inside a header:
            # only the missing end-of-archive blocks tell such a cut shard from a whole one.
            stream.read()
            self.bytes = hashing.count
            self.sha256 = hashing.sha.hexdigest()
            if self.bytes - end_offset < TAR_END_BYTES:
                raise ShardReadError(self.name, "truncated tar (no end-of-archive marker)", self.samples)
        finally:
            raw.close()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256) of a file, streamed."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()
