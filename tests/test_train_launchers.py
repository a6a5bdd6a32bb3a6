"""Which rank a process is, per launcher (train/launch.py): the variables each launcher sets go
in, the decision comes out, without starting processes. The last two tests start the trainer:
`python -m train.main` refusing an unresolvable launch before importing DeepSpeed, and (slow) two
processes with the variables of a 2-task srun step training one run together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from synthetic_data import make_synthetic_dataset

from train.launch import Launch, LaunchError, decide, parse_hostlist, parse_tasks_per_node, slurm_port

ROOT = Path(__file__).resolve().parents[1]


def port() -> int:
    return 40000  # stands in for a free loopback port


def test_no_launcher_is_one_process_on_a_free_loopback_port():
    assert decide({"HOME": "/root", "PATH": "/bin"}, port) == Launch("single", 0, 0, 1, 1, "127.0.0.1", 40000)
    launch = decide({}, port)
    assert launch.env() == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                            "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "40000"}


def test_deepspeed_launcher_one_node():
    # deepspeed/launcher/launch.py: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT, CROSS_*
    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    assert decide(env, port) == Launch("torch", 3, 3, 8, 8, "127.0.0.1", 29500)


def test_deepspeed_launcher_hostfile_second_node():
    env = {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_SIZE": "8", "MASTER_ADDR": "node1",
           "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2"}
    launch = decide(env, port)
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (13, 5, 16, 8)
    assert launch.env()["MASTER_ADDR"] == "node1" and launch.env()["LOCAL_WORLD_SIZE"] == "8"


def test_torchrun():
    env = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "2",
           "MASTER_ADDR": "10.0.0.4", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    assert decide(env, port) == Launch("torch", 9, 1, 12, 4, "10.0.0.4", 29400)


def test_torch_variables_take_precedence_over_slurm_and_mpi():
    # torchrun or deepspeed started inside an srun step (or under mpirun): their variables rule.
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
           "MASTER_PORT": "1234", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "0"}
    assert decide(env, port).launcher == "torch" and decide(env, port).rank == 1


def test_torch_variables_world_of_one_fills_in_the_rendezvous():
    assert decide({"RANK": "0", "WORLD_SIZE": "1"}, port) == Launch("torch", 0, 0, 1, 1, "127.0.0.1", 40000)


SRUN_2x4 = {  # `srun --nodes 2 --ntasks-per-node 4 python -m train.main`, task 6 (node 1, local 2)
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_srun_step():
    launch = decide(SRUN_2x4, port)
    assert launch == Launch("slurm", 6, 2, 8, 4, "gpu07", slurm_port(SRUN_2x4))
    assert 20000 <= launch.master_port < 30000


def test_srun_port_is_the_same_on_every_task_and_differs_between_steps_and_jobs():
    ports = {decide({**SRUN_2x4, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4), "SLURM_NODEID": str(r // 4)},
                    port).master_port for r in range(8)}
    assert len(ports) == 1
    assert slurm_port({**SRUN_2x4, "SLURM_STEP_ID": "1"}) != slurm_port(SRUN_2x4)
    assert slurm_port({**SRUN_2x4, "SLURM_JOB_ID": "123457"}) != slurm_port(SRUN_2x4)


def test_srun_step_uses_the_steps_task_count_not_the_allocations():
    # An allocation of 16 tasks, a step of 8 on the first node: SLURM_NTASKS is the allocation in
    # the batch script; the step's own count is SLURM_STEP_NUM_TASKS.
    env = {**SRUN_2x4, "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_TASKS_PER_NODE": "8",
           "SLURM_STEP_NODELIST": "gpu08", "SLURM_NODEID": "0", "SLURM_LOCALID": "6",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    launch = decide(env, port)
    assert (launch.world_size, launch.local_world_size, launch.master_addr) == (8, 8, "gpu08")


def test_srun_uneven_tasks_per_node_and_user_rendezvous():
    env = {**SRUN_2x4, "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "4,3", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "MASTER_ADDR": "gpu07-ib", "MASTER_PORT": "29555"}
    assert decide(env, port) == Launch("slurm", 5, 1, 7, 3, "gpu07-ib", 29555)


def test_srun_single_task_step_is_one_process():
    env = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}
    assert decide(env, port) == Launch("slurm", 0, 0, 1, 1, "127.0.0.1", 40000)


def test_srun_with_pmix_is_the_slurm_step():
    env = {**SRUN_2x4, "PMIX_RANK": "6"}
    assert decide(env, port).launcher == "slurm"
    env = {**SRUN_2x4, "PMI_RANK": "6", "PMI_SIZE": "8"}
    assert decide(env, port).launcher == "slurm"


def test_batch_script_itself_is_one_process_with_a_warning():
    # sbatch --ntasks 8: the script runs once, as the batch step (SLURM_PROCID=0, no SLURM_STEP_*)
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)"}
    launch = decide(env, port)
    assert (launch.launcher, launch.world_size) == ("single", 1)
    assert "SLURM_NTASKS=8" in launch.notes[0] and "srun" in launch.notes[0]


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    assert decide(env, port) == Launch("mpi", 5, 1, 8, 4, "head", 29500)


def test_open_mpi_under_a_slurm_allocation_is_mpirun_not_the_daemon_step():
    # Open MPI's mpirun starts its daemons with srun (one per node): the ranks inherit that step's
    # variables, which describe the daemons, not the ranks.
    env = {**SRUN_2x4, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert decide(env, port) == Launch("mpi", 5, 1, 8, 4, "gpu07", 29500)


def test_mpich_and_intel_mpi_and_deepspeeds_mpich_runner():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert decide(env, port) == Launch("mpi", 2, 0, 4, 2, "h", 1)
    # DeepSpeed's MPICH runner: PMI_RANK from Hydra, WORLD_SIZE/LOCAL_SIZE/MASTER_* from -genv
    env = {"PMI_RANK": "3", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "2"}
    assert decide(env, port) == Launch("mpi", 3, 1, 4, 2, "h", 2)


@pytest.mark.parametrize(("env", "named"), [
    ({"WORLD_SIZE": "4"}, ["WORLD_SIZE=4", "RANK"]),
    ({"LOCAL_RANK": "2", "WORLD_SIZE": "8"}, ["LOCAL_RANK=2", "WORLD_SIZE=8"]),
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "5"}, ["MASTER_ADDR", "RANK=1"]),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "5"},
     ["rank 4 >= world size 4", "RANK=4"]),
    ({"RANK": "x", "WORLD_SIZE": "4"}, ["RANK='x'"]),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1"}, ["local rank 1 >= local world size 1"]),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, ["local world size 8 > world size 4"]),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
      "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "n[1-2]"},
     ["SLURM_NODEID=2", "2 nodes"]),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4"},
     ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS=4", "srun"]),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, ["OMPI_COMM_WORLD_SIZE=4", "mpirun"]),
    ({"PMI_SIZE": "2"}, ["PMI_SIZE=2"]),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ["MASTER_ADDR and MASTER_PORT", "OMPI_COMM_WORLD_SIZE=4", "mpirun -x MASTER_ADDR="]),
    ({"PMIX_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["PMIX_RANK=1", "WORLD_SIZE"]),
])
def test_unresolvable_multi_process_launches_are_refused_naming_the_variables(env, named):
    with pytest.raises(LaunchError) as info:
        decide(env, port)
    for text in named:
        assert text in str(info.value), str(info.value)


def test_hostlist_parser():
    assert parse_hostlist("node[01-04,07],gpu-a1") == ["node01", "node02", "node03", "node04", "node07", "gpu-a1"]
    assert parse_hostlist("n1") == ["n1"]
    assert parse_hostlist("a[8-10]") == ["a8", "a9", "a10"]
    assert parse_hostlist("r[1-2]n[1-2].x,b") == ["r1n1.x", "r1n2.x", "r2n1.x", "r2n2.x", "b"]
    assert parse_hostlist("gpu[009-010]") == ["gpu009", "gpu010"]
    for bad in ("", "n[1-", "n[a-b]", "n[3-1]", "n]1["):
        with pytest.raises(LaunchError):
            parse_hostlist(bad)


def test_tasks_per_node_parser():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("2,1(x3)") == [2, 1, 1, 1]
    with pytest.raises(LaunchError):
        parse_tasks_per_node("4(x)")


def test_main_refuses_an_unresolvable_launch_with_one_error_line():
    env = {"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "SLURM_JOB_ID": "1"}
    result = subprocess.run([sys.executable, "-m", "train.main", "--config", "train/configs/tiny_o2o.yaml"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "WORLD_SIZE=2" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_srun_step_of_two_tasks_trains_as_two_ranks(tmp_path):
    """End to end: two `python -m train.main` processes with the variables srun gives the tasks
    of a 2-task step on one node train one run together (DeepSpeed's CPU accelerator, gloo). No
    Slurm here: the variables are set by hand, as srun would."""
    data = make_synthetic_dataset(tmp_path / "data", shards=2, per_shard=32)
    bin_dir = Path(sys.executable).parent  # its ninja first: see tests/test_train_launch.py
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    base |= {"PATH": f"{bin_dir}:{base['PATH']}", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
             "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_NODEID": "0",
             "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "train.main", "--config", "train/configs/tiny_o2o.yaml",
           "--set", f"data.shards={data}", "--set", f"output_dir={tmp_path / 'run'}", "--set", "train.steps=2",
           "--set", "train.global_batch_size=32", "--set", "train.micro_batch_size=16", "--set", "data.num_workers=0",
           "--set", "checkpoint.export=false", "--set", "log.progress_bar=false"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "launch: slurm, rank 0 of 2 (local 0 of 2), rendezvous localhost:" in outputs[0]
    assert "2 ranks x 16 images x 1 accumulation" in outputs[0]
