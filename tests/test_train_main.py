"""The trainer program's start-up helpers that need no launch: where DeepSpeed's JIT ops are built,
the warning when a build lock keeps the start waiting, and which checkpoint `--resume` picks."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from train.checkpoint import CheckpointError
from train.main import extensions_dir, resume_path, warn_if_waiting_for_a_build


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


def _checkpoint(checkpoints: Path, step: int, complete: bool) -> Path:
    tag = checkpoints / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"saved by DeepSpeed")
    if complete:
        (tag / "COMPLETE").write_text(f"{tag.name}\n")
    return tag


def test_resume_follows_only_checkpoints_every_rank_finished_writing(tmp_path):
    """A job killed while other ranks were still writing step 8 left DeepSpeed's `latest` pointing
    at it; --resume auto (and a checkpoints directory given as PATH) must take step 4, the newest
    with the COMPLETE mark, whether or not our `complete` pointer was written."""
    checkpoints = tmp_path / "checkpoints"
    assert resume_path("auto", checkpoints) is None  # a new run
    four = _checkpoint(checkpoints, 4, complete=True)
    _checkpoint(checkpoints, 8, complete=False)
    (checkpoints / "latest").write_text("step00000008")  # DeepSpeed's, written by rank 0 alone
    assert resume_path("auto", checkpoints) == four  # no pointer: the newest complete one
    (checkpoints / "complete").write_text("step00000008")  # a pointer naming an unmarked tag is not trusted
    assert resume_path("auto", checkpoints) == four
    assert resume_path(str(checkpoints), checkpoints) == four
    assert resume_path("none", checkpoints) is None
    twelve = _checkpoint(checkpoints, 12, complete=True)
    (checkpoints / "complete").write_text("step00000012")
    assert resume_path("auto", checkpoints) == twelve
    for tag in (four, twelve):
        (tag / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint here"):
        resume_path(str(checkpoints), checkpoints)
