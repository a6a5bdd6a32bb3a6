"""Joining a Ray cluster, the one start-up both stages use.

Under `ray job submit` the job's environment names its cluster (RAY_ADDRESS). Without an address
a caption job starts an embedded single-machine Ray (`embedded=True`); an ingest with
`--distributor ray` joins the cluster already running on this machine ("auto") or fails.
"""

from __future__ import annotations

import os


class ClusterError(Exception):
    """No Ray cluster to join (the message is Ray's)."""


def connect(address: str | None = None, *, embedded: bool, env_vars: dict[str, str] | None = None) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or (None if embedded else "auto")
    if not address:
        # An embedded single-machine Ray needs no network address: keep it on loopback
        # (read by Ray at import, hence before importing it).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    # Ray's workers are not children of this process: variables they need travel in the runtime env.
    runtime_env = {"env_vars": env_vars} if env_vars else None
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        else:
            ray.init(include_dashboard=False, runtime_env=runtime_env, logging_level="WARNING")
    except ConnectionError as e:
        raise ClusterError(str(e)) from None
