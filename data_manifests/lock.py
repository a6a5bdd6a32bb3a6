"""One job per dataset directory: an advisory lock that names the job holding it.

Two jobs committing into one dataset would record shards twice and delete each other's partial
files, so each stage holds `DIR/.<stage>.lock` for as long as it writes there. The lock is
`flock`: the kernel drops it whenever its holder exits, killed or not, so a dead job's lock is
simply taken by the next one (its leftover description in the file is overwritten). On NFS
(v4, and v3 with lockd) flock is a POSIX lock the server arbitrates across machines; Lustre
needs the `flock` mount option, without which flock fails and the job stops saying so.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from .manifest import ManifestError


class DatasetLocked(Exception):
    """Another live job writes to the directory (the message names it)."""


def hold_lock(root: Path, stage: str, holder: str = "") -> IO:
    """Take `root/.<stage>.lock` or raise DatasetLocked naming who has it (ManifestError if the
    directory cannot be written). Keep the returned file open for as long as the job writes:
    closing it (or exiting) releases the lock."""
    path = root / f".{stage}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{root}: output directory is not writable ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        running = handle.read().strip() or "a job that did not say who it is"
        handle.close()
        raise DatasetLocked(f"{root}: another {stage} job is writing to this directory: {running} "
                            f"(it holds {path}); wait for it to end or stop it, or choose another output") from None
    except OSError as e:
        handle.close()
        raise DatasetLocked(f"{path}: cannot lock ({e.strerror}); the file system must support flock "
                            "(on Lustre: mount with -o flock)") from None
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder + ', ' if holder else ''}pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    handle.flush()
    return handle
