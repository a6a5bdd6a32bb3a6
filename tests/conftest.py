"""Shared fixtures: the test environment, and a real Ray cluster on loopback.

Everything here starts real components. A Ray head costs ~640 MB and several seconds, so one
cluster serves the whole session; tests that need a second node add it and remove it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Offline, quiet and on loopback. Set before anything imports vllm, ray or albumentations.
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep Ray on 127.0.0.1 (see docs/environment.md#ray)
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    "WANDB_MODE": "disabled",
    # Ray turns token auth on by itself once ~/.ray/auth_token exists (any local ray.init makes
    # one); tests on loopback pin it off so that a fresh CI machine and a used one behave alike.
    "RAY_AUTH_MODE": "disabled",
})


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this session: the kernel may offer a port it just
    freed again, and a Ray node given the same port twice refused to start (seen in a full run)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def _port_args(head: bool) -> list[str]:
    # Every port chosen here, so that two nodes on one machine (or two test sessions) never clash.
    args = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
    if head:
        args += ["--ray-client-server-port", str(free_port())]
    return args


def _run_ray(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


@dataclass
class RayCluster:
    """A Ray cluster started with `ray start` on a loopback address, as a user would start one."""

    temp_dir: str
    ip: str = "127.0.0.1"
    gcs_address: str = ""
    dashboard_url: str = ""
    extra_nodes: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        if self.ip != "127.0.0.1":
            # Multi-node mode: Ray refuses worker nodes while this is 0 (see add_node).
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        return env

    def start_head(self, num_cpus: int = 2, resources: dict | None = None) -> None:
        port, dash = free_port(), free_port()
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", self.ip, "--port", str(port),
               "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--dashboard-host", self.ip,
               "--dashboard-port", str(dash), "--temp-dir", self.temp_dir, "--disable-usage-stats",
               "--object-store-memory", str(300 * 1024 * 1024), *_port_args(head=True)]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        _run_ray(cmd, self.env())
        self.gcs_address = f"{self.ip}:{port}"
        self.dashboard_url = f"http://{self.ip}:{dash}"
        self._wait_for_dashboard()

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, ip: str = "127.0.0.2") -> None:
        """`ray start --address HEAD`: a second node on this machine, on another loopback address.

        Ray refuses worker nodes while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it at 1 it
        rewrites "127.0.0.1" (anywhere it appears) into the machine's network address. Other
        loopback addresses are left alone, so a multi-node cluster here uses a head on
        127.0.0.3 and nodes on 127.0.0.2 and up: all of it stays on the lo interface.
        """
        if self.ip == "127.0.0.1":
            raise RuntimeError("a multi-node cluster needs its head on another loopback address (ip='127.0.0.3')")
        cmd = [str(BIN / "ray"), "start", "--address", self.gcs_address, "--node-ip-address", ip,
               "--num-cpus", str(num_cpus), "--object-store-memory", str(200 * 1024 * 1024),
               "--temp-dir", self.temp_dir, "--disable-usage-stats", *_port_args(head=False)]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        _run_ray(cmd, self.env())
        self.extra_nodes.append(ip)

    def _wait_for_dashboard(self, timeout: float = 60) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers (e.g. 401 when token auth is on): it is up
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Ray dashboard did not come up at {self.dashboard_url}")

    def submit(self, *entrypoint: str, working_dir: str | Path = ROOT, timeout: float = 600,
               extra_env: dict | None = None, no_wait: bool = False) -> subprocess.CompletedProcess:
        """`ray job submit --address DASHBOARD --working-dir DIR -- ENTRYPOINT`, as in the README."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir",
               str(working_dir)]
        if no_wait:
            cmd.append("--no-wait")
        cmd += ["--", *entrypoint]
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env(), **(extra_env or {})},
                              timeout=timeout)

    def stop(self) -> None:
        """Stop only this cluster's processes (`ray stop` would stop every cluster on the machine)."""
        import psutil

        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for p in mine:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(mine, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on 127.0.0.1 for the whole session (dashboard for `ray job submit`)."""
    # Unix socket paths must stay short: a temp dir right under /tmp.
    cluster = RayCluster(temp_dir=tempfile.mkdtemp(prefix="hcray", dir="/tmp"))
    try:
        # engine_slot: room for one replica that asks for it (the start-up tests ask for two)
        cluster.start_head(num_cpus=2, resources={"engine_slot": 1})
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_node_ray_cluster():
    """A head on 127.0.0.3 and a second node joined with `ray start --address` on 127.0.0.2.

    The second node carries a custom resource "node2": 1 so tests can place work on it.
    """
    cluster = RayCluster(temp_dir=tempfile.mkdtemp(prefix="hcray", dir="/tmp"), ip="127.0.0.3")
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1, resources={"node2": 1})
        yield cluster
    finally:
        cluster.stop()
