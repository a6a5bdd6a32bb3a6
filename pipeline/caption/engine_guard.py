"""No engine outlives its replica.

On a GPU, vLLM's engine is a child process of the replica's Ray actor (EngineCore, and with
tensor parallelism its workers under it). Nothing in vLLM or Ray stops that child when the actor
is killed (by Ray when the driver dies, by the out-of-memory killer, by a person): the orphan
keeps its GPU memory, and the replacement or the next job then fails to reserve it.

Two guards:
- `Reaper`: a tiny process the actor starts before its engine, holding the read end of a pipe
  whose write end only the actor has. The actor marks its environment with a token that every
  process it starts from then on inherits (the engine, and the engine's own workers). When the
  actor dies, however it dies, the kernel closes the pipe; the reaper then kills every process
  that carries the token and exits. It is the death-pipe vLLM uses for its own
  tensor-parallel workers, one level up; the token also covers an engine killed half-started.
- `exit_replica()`: an actor whose engine died (or hung) kills what is left of it and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psutil

TOKEN_VAR = "HOLICLIP_REPLICA"

# Run as `python -c`: needs nothing but psutil, and no import path of the project's.
_REAPER = """
import sys, psutil
var, token, actor = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.buffer.read()  # returns when the actor's end of the pipe closes: it exited or was killed
for p in psutil.process_iter():
    try:
        if p.pid != actor and p.environ().get(var) == token:
            p.kill()
    except psutil.Error:
        pass
"""


class Reaper:
    """Kills the processes this process starts from now on, when this process dies."""

    def __init__(self):
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
        # Its own session: a signal to the actor's process group does not reach it first.
        # Held for the actor's life: its stdin pipe closing is what tells the reaper.
        self._proc = subprocess.Popen([sys.executable, "-c", _REAPER, TOKEN_VAR, self.token, str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                      start_new_session=True, close_fds=True)
        os.environ[TOKEN_VAR] = self.token  # inherited by the engine's processes, not by the reaper


def kill_children(name: str | None = None, wait: bool = True) -> int:
    """Kill every process this one started (an engine that died half-way, or hangs), or only those
    whose process name holds `name`; how many."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        procs = []
    killed = []
    for p in procs:
        try:
            if name is None or name in p.name():
                p.kill()
                killed.append(p)
        except psutil.Error:
            pass
    if wait:
        psutil.wait_procs(killed, timeout=10)
    return len(killed)


def exit_replica(reason: str) -> None:
    """Leave this actor's process now, engine processes first: the driver sees the replica die
    and starts a replacement (an actor whose engine is dead would otherwise fail every shard it
    is given, in milliseconds). Ray Data LLM does the same on fatal engine errors."""
    n = kill_children()
    print(f"replica exits: {reason} ({n} engine processes killed)", file=sys.stderr, flush=True)
    os._exit(1)
