"""Training config: the shipped configs load, every mistake names its key, and the values that
reach DeepSpeed, the model and the schedule are the intended ones. No processes are started."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, load_config
from train.main import build_model_config, deepspeed_config
from train.model import HolisticCLIP, load_model_config
from train.schedule import warmup_cosine
from train.tokenizer import load_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
MINIMAL = {
    "output_dir": "runs/x",
    "data": {"shards": "data/x", "text_ids": ["raw", "detail"]},
    "model": {"branch": "cls"},
    "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_changes(section: str, **changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data.setdefault(section, {}).update(changes)
    return data


@pytest.mark.parametrize("name,branch,mode,h,m", [
    ("tiny_o2o", "none", "o2o", 1, 1), ("tiny_o2m", "none", "o2m", 1, 5), ("tiny_m2m_cls", "cls", "m2m", 5, 5),
    ("tiny_m2m_mlp", "mlp", "m2m", 5, 5), ("vit_b16_o2o", "none", "o2o", 1, 1), ("vit_b16_o2m", "none", "o2m", 1, 5),
    ("vit_b16_m2m_cls", "cls", "m2m", 5, 5), ("vit_b16_m2m_mlp", "mlp", "m2m", 5, 5),
])
def test_shipped_configs(name, branch, mode, h, m):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.branch, cfg.loss.mode, cfg.num_branches, len(cfg.data.text_ids)) == (branch, mode, h, m)
    if name.startswith("vit_b16"):  # the paper's recipe
        assert (cfg.train.global_batch_size, cfg.train.precision) == (2048, "bf16")
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (5e-4, 0.2, 2000)
        assert (tuple(cfg.optim.betas), cfg.optim.eps, tuple(cfg.data.crop_scale)) == ((0.9, 0.98), 1e-6, (0.9, 1.0))
        model_cfg = build_model_config(cfg, load_tokenizer("clip", 77))
        assert (model_cfg.image_size, model_cfg.patch_size, model_cfg.text_width, model_cfg.text_layers,
                model_cfg.context_length, model_cfg.embed_dim) == (224, 16, 512, 12, 77, 512)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.steps=99", "data.shards=[a, b]", "loss.diversity_weight=0.5"])
    assert cfg.train.steps == 99 and cfg.data.shards == ("a", "b") and cfg.loss.diversity_weight == 0.5
    assert cfg.data.shards != MINIMAL["data"]["shards"]
    assert cfg.num_branches == 2 and cfg.segment_steps == cfg.checkpoint.every_steps == 1000
    assert cfg.train.precision == "bf16" and cfg.data.drop_flags == ("empty", "refusal")
    assert load_config(write(tmp_path, MINIMAL), ["data.segment_steps=7"]).segment_steps == 7
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["data"]["text_ids"] == ["raw", "detail"]


@pytest.mark.parametrize("data,overrides,message", [
    ({**MINIMAL, "ouput_dir": "x"}, [], "ouput_dir: unknown key"),
    (with_changes("data", shufle_buffer=3), [], "data.shufle_buffer: unknown key (known here: shards, text_ids"),
    (MINIMAL, ["optim.learning_rate=0.1"], "optim.learning_rate: unknown key"),
    ({k: v for k, v in MINIMAL.items() if k != "train"}, [], "train: missing (required)"),
    (with_changes("train", steps="ten"), [], "train.steps: expected an integer, got 'ten'"),
    (with_changes("train", steps=True), [], "train.steps: expected an integer"),
    (with_changes("optim", lr="fast"), [], "optim.lr: expected a number"),
    (with_changes("optim", grad_clip=-1.0), [], "optim.grad_clip: must be > 0 or null"),
    (with_changes("model", branch="attention"), [], "model.branch: must be one of ['cls', 'mlp', 'none']"),
    (with_changes("train", precision="fp8"), [], "train.precision: must be one of"),
    (with_changes("train", zero_stage=4), [], "train.zero_stage: must be one of [0, 1, 2, 3]"),
    (with_changes("train", global_batch_size=10), [], "train.global_batch_size (10) must be a multiple of "
                                                      "train.micro_batch_size (4)"),
    (with_changes("train", deepspeed={"bf16": {"enabled": True}}), [], "train.deepspeed: ['bf16'] are set by"),
    (with_changes("data", text_ids=["raw", "raw"]), [], "data.text_ids: ids must be distinct"),
    (with_changes("data", text_ids=["bad id"]), [], "data.text_ids: text id 'bad id' is not allowed"),
    (with_changes("data", drop_flags=["ugly"]), [], "data.drop_flags: must be one of"),
    (with_changes("data", crop_scale=[0.9]), [], "data.crop_scale: expected [low, high]"),
    (with_changes("loss", mode="o2o"), [], "loss.mode: 'o2o' needs model.branch 'none' and one text id"),
    (with_changes("model", branch="none"), [], "loss.mode: 'm2m' needs model.branch 'cls' or 'mlp'"),
    (with_changes("model", branch="none", num_branches=3), [], "model.num_branches: must be 1"),
    (MINIMAL, ["train.steps"], "override 'train.steps' must look like section.key=value"),
    (with_changes("model", brnch="cls"), [], "model.brnch: unknown key (known here: config, branch, num_branches, "
                                             "mlp_branch_layers, tokenizer, init) (did you mean 'branch'?)"),
    (with_changes("data", text_ids=["raw", 5]), [], "data.text_ids[1]: expected a string, got 5"),
    (with_changes("data", crop_scale=[0.9, "1"]), [], "data.crop_scale[1]: expected a number, got '1'"),
    (with_changes("train", steps="10"), [], "train.steps: expected an integer, got '10'"),
    (with_changes("train", zero_stage=True), [], "train.zero_stage: expected an integer, got True"),
    (MINIMAL, ["model.num_branches=0"], "model.num_branches: must be at least 1 or null, got 0"),
    # Evaluation during training: an evaluation is of a checkpoint; sets are named once, in names files can carry.
    (MINIMAL, ["eval.every_steps=3", "checkpoint.every_steps=2"],
     "eval.every_steps (3) must be a multiple of checkpoint.every_steps (2)"),
    (MINIMAL, ["eval.retrieval=[{name: a, data: x}, {name: a, data: y}]"], "eval: set names must be distinct"),
    (MINIMAL, ["eval.zeroshot=[{name: 'a/b', data: x}]"], "eval.zeroshot[0].name: String should match pattern"),
    (MINIMAL, ["eval.retrieval=[{name: a, data: x, positives: same}]"], "eval.retrieval[0].positives"),
    (MINIMAL, ["eval.fusions=[avg]"], "eval.fusions: must be among ['average'"),
])
def test_errors_name_file_and_key(tmp_path, data, overrides, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=re.escape(f"config {path}: ") + ".*" + re.escape(message)):
        load_config(path, overrides)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_deepspeed_config(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "train.global_batch_size=32", "train.micro_batch_size=4", "train.zero_stage=3", "train.precision=fp32",
        "optim.grad_clip=1.0", "train.deepspeed={zero_optimization: {overlap_comm: true}}",
    ])
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (32, 4, 4)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["gradient_clipping"] == 1.0 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"]  # torch's AdamW is passed in


@pytest.mark.parametrize("precision,fp16", [("bf16", False), ("fp16", True), ("fp32", False)])
def test_precision_in_deepspeed(tmp_path, precision, fp16):
    # bf16 is autocast around the forward (train/step.py): DeepSpeed keeps fp32 weights, gradients,
    # reduction and master copy, so its own bf16 mode (bf16 weights and gradients) stays off.
    cfg = load_config(write(tmp_path, MINIMAL), [f"train.precision={precision}", "train.zero_stage=1"])
    ds = deepspeed_config(cfg, world_size=1)
    assert not ds["bf16"]["enabled"] and ds["fp16"]["enabled"] == fp16


def test_fp16_needs_a_zero_stage_with_a_reachable_master_copy(tmp_path):
    with pytest.raises(ConfigError, match="train: precision fp16 needs zero_stage 1, 2 or 3"):
        load_config(write(tmp_path, MINIMAL), ["train.precision=fp16", "train.zero_stage=0"])


def test_model_config_follows_tokenizer(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.config=tiny", "model.mlp_branch_layers=2",
                                                 "model.branch=mlp", "model.num_branches=3"])
    model_cfg = build_model_config(cfg, load_tokenizer("clip", 32))
    assert (model_cfg.branch, model_cfg.num_branches, model_cfg.mlp_branch_layers) == ("mlp", 3, 2)
    assert (model_cfg.vocab_size, model_cfg.text_pool, model_cfg.pad_token_id) == (49408, "argmax", 0)
    bad = load_config(write(tmp_path, MINIMAL), ["model.branch=mlp", "model.mlp_branch_layers=9"])
    with pytest.raises(ConfigError, match="'mlp_branch_layers' \\(9\\) must not exceed"):
        build_model_config(bad, load_tokenizer("clip", 32))
    assert HolisticCLIP(model_cfg).visual.blocks[0].mlp_proj.__len__() == 3


def test_warmup_cosine():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert warmup_cosine(0, 10)(0) == pytest.approx(1.0)
    assert load_model_config("tiny").context_length == 32
