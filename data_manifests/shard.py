"""Reading and writing WebDataset shards of the multi-text format.

Writing is atomic: a shard is written aside under a hidden name and renamed into place only
once it is complete and flushed to disk, so a crash never leaves a half-written `.tar` where a
reader or a resuming job could mistake it for a finished one.

Reading goes through tar.py's reader (never extracting to disk, one sample in memory); a sample
whose members or JSON break the format is recorded as a problem and the read goes on; a shard
that is truncated or not a tar at all raises `ShardReadError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import HashingFile, partial_path, publish
from .sample import RAW, Sample, SampleFormatError, check_text_id
from .tar import Problem, ShardReadError, TarReader


class ShardWriteError(Exception):
    """The shard could not be written (disk full, no permission, ...); nothing was published.

    `errno` is the OS error's number (errno.ENOSPC for a full disk), for callers that act on it.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class ShardInfo:
    """What a manifest records about a finished shard file."""

    name: str
    samples: int
    bytes: int
    sha256: str
    txt: str | None = None  # the text id every sample's `.txt` member holds (None: no `.txt` written)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same samples always give the same bytes (and sha256): an
    # interrupted-then-resumed run can then be compared with an uninterrupted one byte for byte.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples to `<dir>/.<name>.partial-*`, publish as `<dir>/<name>` on `close()`.

    Each sample is `<key>.<image ext>`, `<key>.json` and, unless `txt` is None, `<key>.txt` with
    its text `txt` (the alt-text `raw` by default): the member stock WebDataset loaders (OpenCLIP,
    img2dataset-based tools) take the caption from. A sample without that text gets no `.txt`.
    Use as a context manager: an exception inside the block removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, txt: str | None = RAW):
        self.path = Path(path)
        self.txt = None if txt is None else check_text_id(txt)
        self.tmp_path = partial_path(self.path)
        self._keys: set[str] = set()
        try:
            self._file = open(self.tmp_path, "wb")
        except OSError as e:
            raise ShardWriteError(f"cannot create {self.tmp_path}: {e.strerror}", e.errno) from e
        self._hashing = HashingFile(self._file, "w")
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
            if self.txt in sample.texts:
                text = sample.texts[self.txt].encode("utf-8")
                self._tar.addfile(_tarinfo(f"{sample.key}.txt", len(text)), io.BytesIO(text))
        except OSError as e:
            self.abort()
            raise ShardWriteError(f"cannot write {self.tmp_path}: {e.strerror or e}", e.errno) from e
        self.samples += 1

    def close(self, before_publish: Callable[[ShardInfo], None] | None = None) -> ShardInfo:
        """Finish the file and publish it. `before_publish(info)` runs once the file is on disk and
        before it replaces `path`: the place for an intent record (DatasetWriter.recover_intents)."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            info = ShardInfo(self.path.name, self.samples, self._hashing.count, self._hashing.sha.hexdigest(),
                             self.txt)
            if before_publish is not None:
                before_publish(info)
            publish(self.tmp_path, self.path)
        except OSError as e:
            self.abort()
            raise ShardWriteError(f"cannot finish {self.path}: {e.strerror or e}", e.errno) from e
        return info

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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class ShardReader:
    """Iterate over the samples of one shard (a local path or an fsspec URL), collecting problems.

        reader = ShardReader(path)
        for sample in reader: ...
        reader.problems, reader.refused, reader.bytes, reader.sha256   # after the loop

    `refused` counts the samples not read by reason; `problems` names each (and each bad
    member). Raises ShardReadError for a shard that cannot be read to its end.
    """

    def __init__(self, path: str | os.PathLike, with_images: bool = True):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self.with_images = with_images
        self.problems: list[Problem] = []
        self.samples = 0
        self.refused: Counter[str] = Counter()
        self.bytes = 0
        self.sha256 = ""

    def __iter__(self) -> Iterator[Sample]:
        # Without images only the texts are read; the image members' bytes are skipped.
        tar = TarReader(self.path, read=None if self.with_images else (lambda ext: ext in ("json", "txt")),
                        name=self.name)
        try:
            for key, members in tar:
                try:
                    sample = Sample.from_members(key, members)
                except SampleFormatError as e:
                    reason = str(e).removeprefix(f"sample {key}: ")
                    self.problems.append(Problem(self.name, key, reason))
                    self.refused[reason] += 1
                    continue
                if not self.with_images:
                    sample.image = None
                self.samples += 1
                yield sample
        except ShardReadError as e:
            raise ShardReadError(self.name, e.reason, self.samples) from None
        finally:
            self.problems.extend(tar.problems)
            self.refused.update(tar.refused)
        self.bytes, self.sha256 = tar.bytes, tar.sha256


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256) of a file, streamed."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()
