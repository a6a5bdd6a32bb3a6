"""Evaluation during training, the parts that need no DeepSpeed: when an evaluation is due, which
sets a resumed run still owes, and the TensorBoard tags of a record. The launch test
(tests/test_train_launch.py, ZeRO-3 stop and resume) runs the whole thing."""

from __future__ import annotations

import json

from train.config import EvalSection, RetrievalSet, ZeroshotSet
from train.evaluation import Evaluation, scalars_of


def section(**changes) -> EvalSection:
    return EvalSection(zeroshot=[ZeroshotSet(name="colours", data="z")],
                       retrieval=[RetrievalSet(name="heldout", data="r")], **changes)


def test_due_at_the_interval_and_at_the_end(tmp_path):
    every = Evaluation(section(every_steps=8), tmp_path, last_step=20, num_branches=3, device="cpu")
    assert [s for s in range(21) if every.due(s)] == [8, 16, 20]
    end_only = Evaluation(section(), tmp_path, last_step=20, num_branches=3, device="cpu")
    assert [s for s in range(21) if end_only.due(s)] == [20]
    assert not Evaluation(EvalSection(every_steps=8), tmp_path, 20, 3, "cpu").due(8)  # no set: nothing to do
    # Fusions: each branch alone by default with H > 1; never with one branch.
    assert every.fusions == ["average", "each-branch"]
    assert Evaluation(section(), tmp_path, 20, 1, "cpu").fusions == ["average"]


def test_a_resumed_run_owes_only_the_sets_without_records(tmp_path):
    evaluation = Evaluation(section(every_steps=8), tmp_path, last_step=16, num_branches=1, device="cpu")
    assert [s.name for s in evaluation.pending(8)] == ["colours", "heldout"]
    lines = [{"format": "holiclip-eval/1", "training_eval": {"step": 8, "set": "colours"}},
             {"format": "holiclip-eval/1"},  # a record of `python -m eval`, not of the trainer
             [1, 2]]
    (tmp_path / "results.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    assert [s.name for s in evaluation.pending(8)] == ["heldout"]  # colours was done before the kill
    assert [s.name for s in evaluation.pending(16)] == ["colours", "heldout"]
    assert evaluation.pending(4) == []  # not an evaluation step


def test_tensorboard_tags_of_records():
    zeroshot = {"task": "zeroshot", "fusion": {"label": "average"},
                "metrics": {"top1": 0.5, "top5": 0.9, "per_branch": [{"branch": 0, "top1": 0.25}]}}
    retrieval = {"task": "retrieval", "fusion": {"label": "max"},
                 "metrics": {"raw": {"i2t": {"R@1": 0.1}, "t2i": {"R@1": 0.2}}}}
    assert scalars_of("s", [zeroshot, retrieval]) == {
        "eval/s/average/top1": 0.5, "eval/s/average/top5": 0.9, "eval/s/average[0]/top1": 0.25,
        "eval/s/max/raw/i2t_R@1": 0.1, "eval/s/max/raw/t2i_R@1": 0.2}
