"""The trainer program's start-up helpers that need no launch: where DeepSpeed's JIT ops are built,
and the warning when a build lock keeps the start waiting."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from train.main import extensions_dir, warn_if_waiting_for_a_build


def test_extensions_are_built_next_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions_dir() == Path(sys.prefix) / "torch_extensions"  # one build folder per environment
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == tmp_path  # the user's choice wins


def test_a_lock_left_by_a_killed_build_is_named(monkeypatch, tmp_path, caplog):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="train"):
        with warn_if_waiting_for_a_build(after_s=0.05):
            time.sleep(0.5)
        with warn_if_waiting_for_a_build(after_s=5):  # a start that does not wait says nothing
            pass
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(lock) in warnings[0] and "delete the file" in warnings[0]
