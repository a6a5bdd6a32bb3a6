"""The trainer (train.main.main, unchanged) plus a record of this rank's peak memory, for
bench/gpu_check.py: `deepspeed --module bench.gpu_check_rank <train.main's arguments>`.

At exit it writes $GPU_CHECK_MEMORY_FILE.<rank> (JSON): torch.cuda.max_memory_allocated and
max_memory_reserved of the process's device on a GPU, the peak resident set size on the CPU.
The trainer itself does not log memory; measuring it in the driver would measure another process.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path

import torch

from train.main import main


def record_peak_memory() -> None:
    path = os.environ.get("GPU_CHECK_MEMORY_FILE")
    if not path:
        return
    peak = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak |= {"device": torch.cuda.get_device_name(), "max_allocated_bytes": torch.cuda.max_memory_allocated(),
                 "max_reserved_bytes": torch.cuda.max_memory_reserved()}
    Path(f"{path}.{os.environ.get('RANK', '0')}").write_text(json.dumps(peak) + "\n")


if __name__ == "__main__":
    atexit.register(record_peak_memory)
    sys.exit(main())
