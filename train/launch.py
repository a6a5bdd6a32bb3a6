"""Which process am I? The rank, world size and rendezvous of this process, from the launcher's
environment variables.

`decide(os.environ)` is a pure function of the environment. It understands

- the `deepspeed` launcher (one node, or several with `--hostfile`) and `torchrun`: RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set (LOCAL_SIZE / LOCAL_WORLD_SIZE too);
- `srun` (a Slurm job step): SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NUM_TASKS,
  SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST; the rendezvous is the step's first node;
- `mpirun` (Open MPI: OMPI_COMM_WORLD_*; MPICH and Intel MPI: PMI_RANK/PMI_SIZE, MPI_LOCALRANKID;
  PMIx: PMIX_RANK), given MASTER_ADDR and MASTER_PORT;
- none of these: one process, rendezvous on a free loopback port.

Anything that says "several processes" but cannot be resolved is refused with a LaunchError
naming the variables found: N processes that each believed they were rank 0 of 1 would train N
independent copies into one run folder. main() exports the decision (`Launch.env()`) before
DeepSpeed starts, so deepspeed.init_distributed finds every variable it needs and never runs its
own MPI discovery (which needs mpi4py).
"""

from __future__ import annotations

import socket
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# What a process launched by mpirun may carry, by implementation: (rank, size, local rank, local size).
_MPI_VARIABLES = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MPICH / Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "PMIx": ("PMIX_RANK", None, None, None),
}
_TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")


class LaunchError(Exception):
    """A launch this program cannot place: the message names the variables found and the fix."""


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torch" (deepspeed, torchrun), "slurm", "mpi", "single"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    notes: tuple[str, ...] = ()  # warnings for the log (rank 0)

    def env(self) -> dict[str, str]:
        """What torch.distributed's env:// rendezvous and DeepSpeed read. LOCAL_SIZE is
        DeepSpeed's name for LOCAL_WORLD_SIZE (its CPU accelerator counts devices by it)."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "LOCAL_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decide(env: Mapping[str, str], free_port: Callable[[], int] = free_loopback_port) -> Launch:
    """The launch this environment describes (see the module docstring), or a LaunchError."""
    if "RANK" in env:  # deepspeed, torchrun, or a user who set the variables by hand
        return _from_torch_variables(env, free_port)
    mpi = _mpi_found(env)
    slurm_step = "SLURM_STEP_NUM_TASKS" in env
    if mpi and not (slurm_step and _is_srun_pmi(env)):
        return _from_mpi(env, free_port)
    if slurm_step:
        return _from_slurm_step(env, free_port)
    several = {k: env[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "LOCAL_RANK")
               if k in env and env[k].strip() not in ("0", "1")}
    several |= {size: env[size] for _, (_, size, _, _) in _MPI_VARIABLES.items()
                if size and size in env and env[size].strip() != "1"}
    if several:
        raise LaunchError(
            f"the environment says several processes ({_show(several)}) but not which one this is "
            "(no RANK, no Slurm step, no MPI rank): launch with `deepspeed`, `torchrun`, `srun` or `mpirun`, "
            "or unset these variables to run one process")
    notes = ()
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS", default=1) > 1:
        notes = (f"one process, although the Slurm allocation has SLURM_NTASKS={env['SLURM_NTASKS']} tasks: "
                 "this is the batch script itself, not a job step; start the ranks with `srun python -m "
                 "train.main ...` (or a launcher) to use them all",)
    return Launch("single", 0, 0, 1, 1, "127.0.0.1", free_port(), notes)


# ----------------------------------------------------------------------------- deepspeed, torchrun


def _from_torch_variables(env: Mapping[str, str], free_port: Callable[[], int]) -> Launch:
    found = {k: env[k] for k in _TORCH_VARIABLES if k in env}
    if "WORLD_SIZE" not in env:
        raise LaunchError(f"RANK is set but WORLD_SIZE is not ({_show(found)}): set both, or launch with "
                          "`deepspeed` or `torchrun`, which set them")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world == 1 and rank == 0:
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
        return _checked(Launch("torch", 0, _int(env, "LOCAL_RANK", default=0), 1, 1, addr, port), found)
    missing = [k for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
    if missing:
        raise LaunchError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set for a run of "
                          f"{world} processes ({_show(found)}): the rendezvous needs RANK, WORLD_SIZE, LOCAL_RANK, "
                          "MASTER_ADDR and MASTER_PORT; `deepspeed` and `torchrun` set all of them")
    local_size_key = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in env), None)
    local_rank = _int(env, "LOCAL_RANK")
    # Without a local size (variables set by hand) only "at least local_rank + 1" is known; nothing
    # in this program needs more than that.
    local_world = _int(env, local_size_key) if local_size_key else local_rank + 1
    return _checked(Launch("torch", rank, local_rank, world, local_world, env["MASTER_ADDR"].strip(),
                           _int(env, "MASTER_PORT")), found)


# ----------------------------------------------------------------------------- srun (Slurm)


def _from_slurm_step(env: Mapping[str, str], free_port: Callable[[], int]) -> Launch:
    """An srun step. SLURM_NTASKS is not used: in the batch script it is the allocation's task
    count (one process runs the script), and only SLURM_STEP_NUM_TASKS is the step's own."""
    found = {k: env[k] for k in _SLURM_SHOWN if k in env}
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world == 1:
        return Launch("slurm", 0, 0, 1, 1, "127.0.0.1", free_port())
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if missing:
        raise LaunchError(f"a Slurm step of {world} tasks without {', '.join(missing)} ({_show(found)}): "
                          "start the ranks with `srun python -m train.main ...`")
    rank, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    per_node_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in env), None)
    if per_node_key is None:
        raise LaunchError(f"a Slurm step of {world} tasks without SLURM_STEP_TASKS_PER_NODE ({_show(found)})")
    per_node = parse_tasks_per_node(env[per_node_key])
    node = _int(env, "SLURM_NODEID", default=0)
    if node >= len(per_node):
        raise LaunchError(f"SLURM_NODEID={node} but {per_node_key}={env[per_node_key]} lists {len(per_node)} "
                          f"nodes ({_show(found)})")
    if "MASTER_ADDR" in env:  # the user's choice (a batch script may export it) wins
        addr = env["MASTER_ADDR"].strip()
    else:
        nodelist_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                             if k in env), None)
        if nodelist_key is None:
            raise LaunchError(f"a Slurm step of {world} tasks without a node list (SLURM_STEP_NODELIST) and "
                              f"without MASTER_ADDR ({_show(found)}): export MASTER_ADDR=<first node>")
        addr = parse_hostlist(env[nodelist_key])[0]
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env)
    return _checked(Launch("slurm", rank, local_rank, world, per_node[node], addr, port), found)


_SLURM_SHOWN = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST")


def slurm_port(env: Mapping[str, str]) -> int:
    """A port in 20000-29999 from the job and step ids: the same on every task of the step, and
    different for two steps of one job or two jobs (most of the time) that share a first node."""
    if "SLURM_JOB_ID" not in env:
        raise LaunchError("a Slurm step without SLURM_JOB_ID: set MASTER_PORT")
    key = f"{env['SLURM_JOB_ID'].strip()}.{env.get('SLURM_STEP_ID', '0').strip()}"
    return 20000 + zlib.crc32(key.encode()) % 10000


def parse_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, in order: `node[01-04,07],gpu-a1` -> node01, node02, node03,
    node04, node07, gpu-a1. Zero padding is kept; several bracket groups in one name multiply
    (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2)."""
    hosts = [host for part in _split_top_level(hostlist.strip(), hostlist) for host in _expand(part, hostlist)]
    if not hosts:
        raise LaunchError(f"empty Slurm host list {hostlist!r}")
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise LaunchError(f"malformed Slurm host list {whole!r}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"malformed Slurm host list {whole!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand(name: str, whole: str) -> list[str]:
    if "[" not in name:
        return [name]
    prefix, rest = name.split("[", 1)
    spec, suffix = rest.split("]", 1)
    values = []
    for item in spec.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise LaunchError(f"malformed range {item!r} in Slurm host list {whole!r}")
        width = len(low)
        values += [str(n).zfill(width) for n in range(int(low), int(high or low) + 1)]
    return [prefix + value + tail for value in values for tail in _expand(suffix, whole)]


def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm's tasks-per-node form, one count per node in node order: `4(x2),3` -> [4, 4, 3]."""
    counts = []
    for item in text.split(","):
        count, _, repeat = item.strip().partition("(x")
        if not count.isdigit() or (repeat and not (repeat.endswith(")") and repeat[:-1].isdigit())):
            raise LaunchError(f"malformed Slurm tasks-per-node value {text!r}")
        counts += [int(count)] * (int(repeat[:-1]) if repeat else 1)
    return counts


# ----------------------------------------------------------------------------- mpirun


def _mpi_found(env: Mapping[str, str]) -> dict[str, str]:
    names = [v for group in _MPI_VARIABLES.values() for v in group if v]
    return {k: env[k] for k in names if k in env}


def _is_srun_pmi(env: Mapping[str, str]) -> bool:
    """srun --mpi=pmi2/pmix sets PMI_RANK or PMIX_RANK on its tasks too: that is the Slurm step
    itself when the rank matches SLURM_PROCID (mpirun's own ranks carry OMPI_* variables, and a
    Hydra mpirun inside an allocation numbers its ranks apart from the step that started it)."""
    if "OMPI_COMM_WORLD_RANK" in env or "SLURM_PROCID" not in env:
        return False
    rank = env.get("PMI_RANK", env.get("PMIX_RANK"))
    size = env.get("PMI_SIZE", env["SLURM_STEP_NUM_TASKS"])
    return rank == env["SLURM_PROCID"] and size == env["SLURM_STEP_NUM_TASKS"]


def _from_mpi(env: Mapping[str, str], free_port: Callable[[], int]) -> Launch:
    found = _mpi_found(env) | {k: env[k] for k in _TORCH_VARIABLES if k in env}
    name = next((n for n, keys in _MPI_VARIABLES.items() if keys[0] in env), None)
    if name is None:
        raise LaunchError(f"MPI variables without a rank ({_show(found)}): launch with `mpirun` "
                          "(Open MPI, MPICH or Intel MPI)")
    rank_key, size_key, local_rank_key, local_size_key = _MPI_VARIABLES[name]
    rank = _int(env, rank_key)
    size_key = size_key if size_key in env else "WORLD_SIZE"  # DeepSpeed's MPICH runner exports WORLD_SIZE
    if size_key not in env:
        raise LaunchError(f"{name}: {rank_key} is set but not the number of processes ({_show(found)}): "
                          "export WORLD_SIZE (`mpirun -x WORLD_SIZE=N`)")
    world = _int(env, size_key)
    if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") != world:
        raise LaunchError(f"{size_key}={world} but WORLD_SIZE={env['WORLD_SIZE']} ({_show(found)})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
    if missing and world > 1:
        raise LaunchError(
            f"{name} launch of {world} processes without {' and '.join(missing)} ({_show(found)}): the rendezvous "
            "needs a host and port every rank can reach; pass them, e.g. "
            "`mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...` (Open MPI) or "
            "`mpirun -genv MASTER_ADDR $(hostname) -genv MASTER_PORT 29500 ...` (MPICH, Intel MPI)")
    local_rank_key = next((k for k in (local_rank_key, "LOCAL_RANK") if k and k in env), None)
    if local_rank_key is None and world > 1:
        raise LaunchError(f"{name} launch of {world} processes without a local rank ({_show(found)}): "
                          "export LOCAL_RANK for each process (it picks the GPU)")
    local_size_key = next((k for k in (local_size_key, "LOCAL_SIZE", "LOCAL_WORLD_SIZE") if k and k in env), None)
    local_rank = _int(env, local_rank_key) if local_rank_key else 0
    local_world = _int(env, local_size_key) if local_size_key else local_rank + 1
    return _checked(Launch("mpi", rank, local_rank, world, local_world, env.get("MASTER_ADDR", "127.0.0.1").strip(),
                           _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()), found)


# ----------------------------------------------------------------------------- checks


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in env and default is not None:
        return default
    value = env[key].strip()
    if not value.isdigit():
        raise LaunchError(f"{key}={env[key]!r} is not a non-negative integer")
    return int(value)


def _checked(launch: Launch, found: Mapping[str, str]) -> Launch:
    problems = []
    if launch.world_size < 1:
        problems.append(f"world size {launch.world_size} < 1")
    if launch.rank >= launch.world_size:
        problems.append(f"rank {launch.rank} >= world size {launch.world_size}")
    if launch.local_rank >= launch.local_world_size:
        problems.append(f"local rank {launch.local_rank} >= local world size {launch.local_world_size}")
    if launch.local_world_size > launch.world_size:
        problems.append(f"local world size {launch.local_world_size} > world size {launch.world_size}")
    if not 0 < launch.master_port < 65536:
        problems.append(f"port {launch.master_port} out of range")
    if not launch.master_addr:
        problems.append("empty MASTER_ADDR")
    if problems:
        raise LaunchError(f"inconsistent launch variables: {'; '.join(problems)} ({_show(found)})")
    return launch


def _show(variables: Mapping[str, str]) -> str:
    return "found " + ", ".join(f"{k}={v}" for k, v in variables.items()) if variables else "found none"
