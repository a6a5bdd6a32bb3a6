"""bench/gpu_check.sh --cpu: the GPU check's whole sequence (three trainer runs, one stopped and
resumed, then the eval CLI on the export) with the tiny model on the CPU, as CI runs it. The
GPU mode itself needs a GPU; this keeps the script, its driver and their reading of the
trainer's outputs working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes_and_prints_its_figures(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--out", str(tmp_path / "check"),
                             "--peak-tflops", "1"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "gpu_check: OK (cpu mode" in output
    for line in ("| Psi_CLS H=5 |", "| Psi_MLP H=5 |", "| O2O |", "step-time ratio Psi_CLS H=5 / O2O:",
                 "resume: stopped at step 4, resumed there, continued to step 8", "eval: retrieval on 64 held-out"):
        assert line in output, output[-6000:]
    results = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    for row in results["runs"].values():
        assert row["samples_per_s"] > 0 and row["train_flops_per_sample"] > 0 and row["peak_memory"]["max_rss_bytes"]
        # --peak-tflops 1 on the CPU: the MFU arithmetic of the GPU mode, on made-up peak
        assert row["mfu"] == pytest.approx(row["train_flops_per_sample"] * row["samples_per_s"] / 1e12)
        assert row["mfu_compute"] > 0
    # H=5 branches and 5 texts cost more FLOPs than one embedding and one text.
    assert results["runs"]["Psi_CLS H=5"]["train_flops_per_sample"] > results["runs"]["O2O"]["train_flops_per_sample"]
    assert results["resume"]["final_step"] == 8 and 0 <= results["eval"]["i2t_R@1"] <= 1
