"""Reading tar shards: the one reader of member groups that every stage uses.

A WebDataset sample is the run of tar members sharing a key: `000042.jpg`, `000042.json`, ...
`TarReader` yields each as `(key, {extension: bytes})`, in file order while streaming (one
sample in memory, any local path or fsspec URL) or in key order from a seekable file (headers
first, then each sample by offset). It never extracts to disk. Shards are plain, uncompressed
tars (docs/data-format.md).

One rule for a sample: it is read whole or refused. A member whose name could leave the
directory it is extracted to (absolute, `..`, a backslash), a member that is not a regular file,
an extension twice, or a key that an earlier sample used refuses its sample: the member's
problem is recorded and the sample counted in `refused`, never silently dropped.

One rule for the tar: it has ended only where its end-of-archive marker (two zero blocks) is.
tarfile also stops without a word when a file is cut exactly between two members or inside a
header, or where garbage follows a member; all of those raise `ShardReadError` naming the shard,
after the samples before the damage were yielded.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

from .files import HashingFile, open_binary

BLOCK = tarfile.BLOCKSIZE
# What tarfile and the file objects under it raise for a file that is not (or no longer) a tar.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


@dataclass(frozen=True)
class Problem:
    """Something wrong inside a shard that did not stop the read."""

    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.shard + ("" if self.key is None else f" sample {_shown(self.key)}")
        return f"{where}: {self.message}"


def _shown(key: str) -> str:
    # Keys come from member names, which can hold anything: quote the ones that are not plain.
    return key if key and key.isascii() and key.isprintable() and " " not in key else repr(key)


class ShardReadError(Exception):
    """The shard as a whole cannot be read (truncated, corrupt, not a tar)."""

    def __init__(self, shard: str, message: str, samples_read: int = 0):
        super().__init__(f"{shard}: {message} (after {samples_read} good samples)")
        self.shard = shard
        self.reason = message
        self.samples_read = samples_read


class MemberName(NamedTuple):
    key: str
    ext: str
    safe: bool


def parse_member_name(name: str) -> MemberName:
    """Key and extension of a member (WebDataset's split at the first dot of the base name, the
    extension lower-cased), and whether the name is safe to read: not absolute, no `..`, no
    backslash. Directories in the name are not part of the key."""
    path = PurePosixPath(name)
    safe = not (path.is_absolute() or ".." in path.parts or "\\" in name)
    key, _, ext = path.name.partition(".")
    return MemberName(key, ext.lower(), safe)


class _Header(tarfile.TarInfo):
    """A TarInfo that notes why tarfile stopped reading headers (see `_check_end`)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.stopped_by = e
            raise


class _Group:
    """The members of one key while they are read, and why its sample is refused, if it is."""

    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes | tarfile.TarInfo] = {}
        self.problems: list[tuple[str, str]] = []  # (countable reason, message naming the member)


class TarReader:
    """The samples of one tar as `(key, {extension: bytes})`.

        reader = TarReader(url)
        for key, members in reader: ...           # file order, streaming
        for key, members in reader.by_key(): ...  # key order, from a seekable file
        reader.problems, reader.refused, reader.samples, reader.bytes, reader.sha256

    `refused` counts the samples not yielded by reason (the first problem of each); `problems`
    has one entry per bad member.

    `read(ext)` says which members' bytes to read; the others are present with b"" (their bytes
    are skipped, and still hashed). `bytes` and `sha256` are of the whole file, after a streaming
    read to its end. Raises ShardReadError for a tar that cannot be read to its end.
    """

    def __init__(self, url: str | os.PathLike, read: Callable[[str], bool] | None = None, name: str | None = None):
        self.url = str(url)
        self.name = name or os.path.basename(self.url.rstrip("/"))
        self.read = read or (lambda ext: True)
        self.problems: list[Problem] = []
        self.refused: Counter[str] = Counter()
        self.samples = 0  # samples yielded
        self.bytes = 0
        self.sha256 = ""

    # --- the rules ----------------------------------------------------------------------
    def _add(self, group: _Group, info: tarfile.TarInfo, name: MemberName) -> bool:
        """Put a member in its group; False when its bytes are not to be read."""
        if not name.safe:
            group.problems.append(("unsafe member path", f"member {info.name!r} has an unsafe path; sample refused"))
        elif not info.isfile():
            group.problems.append(("a member is not a regular file",
                                   f"member {info.name!r} is not a regular file; sample refused"))
        elif name.ext in group.members:
            group.problems.append(("a member appears twice", f"member {info.name!r} appears twice; sample refused"))
        else:
            group.members[name.ext] = info
            return True
        return False

    def _finish(self, group: _Group | None, seen: set[str]) -> bool:
        """Whether a group is a sample to yield; records why not."""
        if group is None:
            return False
        if group.key in seen:
            group.problems.append(("key appears more than once in the shard",
                                   "key appears more than once in the shard; sample refused"))
        seen.add(group.key)
        if group.problems:
            self.problems.extend(Problem(self.name, group.key, message) for _, message in group.problems)
            self.refused[group.problems[0][0]] += 1
            return False
        return True

    def _error(self, message: str) -> ShardReadError:
        return ShardReadError(self.name, message, self.samples)

    def _open_tar(self, fileobj, mode: str) -> tarfile.TarFile:
        try:
            return tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_Header)
        except TAR_ERRORS as e:
            raise self._error(f"not a readable tar file ({e})") from None

    def _check_end(self, tar: tarfile.TarFile) -> None:
        """The one truncation rule: the headers must end at an end-of-archive marker."""
        stop = getattr(tar, "stopped_by", None)
        if isinstance(stop, tarfile.EOFHeaderError):  # one zero block was read; the marker has two
            if tar.fileobj.read(BLOCK) == bytes(BLOCK):
                return
            raise self._error("truncated or corrupt tar (its end-of-archive marker is incomplete)")
        if isinstance(stop, tarfile.InvalidHeaderError):
            raise self._error(f"corrupt tar (no valid member header at byte {tar.offset})")
        raise self._error("truncated tar (no end-of-archive marker)")

    # --- file order -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            raw = open_binary(self.url)
        except OSError as e:
            raise self._error(f"cannot open: {e.strerror or e}") from None
        hashing = HashingFile(raw, "r")
        stream = io.BufferedReader(hashing, buffer_size=1 << 20)
        try:
            tar = self._open_tar(stream, "r|")
            seen: set[str] = set()
            group: _Group | None = None
            try:
                for info in tar:
                    tar.members = []  # tarfile keeps every header it read; we need none
                    if info.isdir():
                        continue
                    name = parse_member_name(info.name)
                    if group is None or name.key != group.key:
                        if self._finish(group, seen):
                            self.samples += 1
                            yield group.key, group.members  # type: ignore[misc, union-attr]
                        group = _Group(name.key)
                    if self._add(group, info, name):
                        # Stream mode skips the bytes of a member not read (they are still hashed).
                        group.members[name.ext] = tar.extractfile(info).read() if self.read(name.ext) else b""  # type: ignore[union-attr]
                if self._finish(group, seen):
                    self.samples += 1
                    yield group.key, group.members  # type: ignore[misc, union-attr]
                self._check_end(tar)
                while stream.read(1 << 20):  # the padding after the marker, for the size and checksum
                    pass
            except TAR_ERRORS as e:
                raise self._error(f"truncated or corrupt tar ({e})") from None
            self.bytes = hashing.count
            self.sha256 = hashing.sha.hexdigest()
        finally:
            raw.close()

    # --- key order ------------------------------------------------------------------------
    def by_key(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The samples in key order: headers first (tarfile seeks over the data), then each
        sample by offset, so memory holds one sample and the headers, never the shard. The tar
        must end at its marker before the first sample is yielded."""
        try:
            raw = open_binary(self.url)
        except OSError as e:
            raise self._error(f"cannot open: {e.strerror or e}") from None
        try:
            tar = self._open_tar(raw, "r:")
            groups: dict[str, _Group] = {}
            # A key whose members come back after another key's is a second sample of that key,
            # refused as in file order (where the first run is read and the later one refused).
            repeats: dict[str, list[_Group]] = {}
            group: _Group | None = None
            try:
                for info in tar:
                    if info.isdir():
                        continue
                    name = parse_member_name(info.name)
                    if group is None or name.key != group.key:
                        group = _Group(name.key)
                        if name.key in groups:
                            repeats.setdefault(name.key, []).append(group)
                        else:
                            groups[name.key] = group
                    self._add(group, info, name)
                self._check_end(tar)
            except TAR_ERRORS as e:
                raise self._error(f"truncated or corrupt tar ({e})") from None
            seen: set[str] = set()
            for key in sorted(groups):
                group = groups.pop(key)
                whole = self._finish(group, seen)
                for repeat in repeats.pop(key, ()):
                    self._finish(repeat, seen)
                if not whole:
                    continue
                try:
                    members = {ext: tar.extractfile(info).read() if self.read(ext) else b""  # type: ignore[union-attr]
                               for ext, info in group.members.items()}
                except TAR_ERRORS as e:
                    raise self._error(f"truncated or corrupt tar ({e})") from None
                self.samples += 1
                yield key, members
        finally:
            raw.close()
