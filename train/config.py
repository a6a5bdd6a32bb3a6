"""Training configuration: typed sections loaded once from YAML at the entry point and validated.

A config file has the sections below (train/configs/*.yaml are complete examples); every key
has a default except `output_dir`, `data.shards`, `data.text_ids`, `train.steps` and the batch
sizes. An unknown or mistyped key is an error that names it: a typo must not silently fall back
to a default. `--set KEY=VALUE` overrides (YAML values) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_manifests import SampleFormatError, check_text_id
from data_manifests.quality import ALL_FLAGS

BRANCHES = ("cls", "mlp", "none")
LOSS_MODES = ("o2o", "o2m", "m2m")
PRECISIONS = ("bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A config the user can fix; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSection:
    config: str = "tiny"  # model_configs/<name>.json, or a path to such a JSON file
    branch: str = "none"  # "cls" (Psi_CLS), "mlp" (Psi_MLP) or "none" (plain CLIP: O2O, O2M)
    num_branches: int | None = None  # H; default: the number of text ids for cls/mlp, 1 for none
    mlp_branch_layers: int | None = None  # L for branch "mlp"; default: the model config's value
    tokenizer: str = "clip"  # "clip", a CLIP BPE .txt.gz, or a local Hugging Face tokenizer directory

    def check(self) -> None:
        _choice("model.branch", self.branch, BRANCHES)
        _positive("model.num_branches", self.num_branches)
        _positive("model.mlp_branch_layers", self.mlp_branch_layers)
        if self.branch == "none" and self.num_branches not in (None, 1):
            raise ValueError(f"model.num_branches: must be 1 (or unset) when model.branch is 'none', got {self.num_branches}")


@dataclass(frozen=True)
class DataSection:
    # Multi-text shard directories, globs, brace patterns ({00000..00041}.tar) or fsspec URLs.
    shards: tuple[str, ...]
    # The texts to train on, in branch order: text_ids[m] pairs with branch m (O2O uses one).
    text_ids: tuple[str, ...]
    # A sample that lacks a text id (or has it flagged, see drop_flags) gets this text instead;
    # None skips the sample (it is counted either way).
    fallback_text_id: str | None = None
    drop_flags: tuple[str, ...] = ("empty", "refusal")  # texts with these quality flags count as missing
    resampled: bool = True  # draw shards with replacement (OpenCLIP's --dataset-resampled)
    shuffle_buffer: int = 1000  # samples per worker
    num_workers: int = 4  # decoding processes per rank; 0 decodes in the training process
    # The stream is re-seeded every segment_steps optimizer steps (default: checkpoint.every_steps),
    # which is what makes resuming exact and cheap (docs/training.md).
    segment_steps: int | None = None
    crop_scale: tuple[float, ...] = (0.9, 1.0)  # random resized crop area range (the paper's)
    check_text_ids: bool = True  # compare text_ids with the datasets' manifests before training

    def check(self) -> None:
        if not self.shards:
            raise ValueError("data.shards: give at least one shard directory, glob or URL")
        if not self.text_ids:
            raise ValueError("data.text_ids: give at least one text id")
        wanted = [("data.text_ids", t) for t in self.text_ids]
        if self.fallback_text_id is not None:
            wanted.append(("data.fallback_text_id", self.fallback_text_id))
        for key, text_id in wanted:
            try:
                check_text_id(text_id)
            except SampleFormatError as e:
                raise ValueError(f"{key}: {e}") from None
        if len(set(self.text_ids)) != len(self.text_ids):
            raise ValueError(f"data.text_ids: ids must be distinct, got {list(self.text_ids)}")
        for flag in self.drop_flags:
            _choice("data.drop_flags", flag, ALL_FLAGS)
        _positive("data.shuffle_buffer", self.shuffle_buffer)
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        _positive("data.segment_steps", self.segment_steps)
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"data.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {list(lo_hi)}")


@dataclass(frozen=True)
class LossSection:
    mode: str = "m2m"  # "o2o" (plain CLIP), "o2m" (one embedding, M texts), "m2m" (H branches, M texts)
    diversity_weight: float = 0.0  # the public code's branch-diversity hinge; off by default
    diversity_margin: float = 0.7

    def check(self) -> None:
        _choice("loss.mode", self.mode, LOSS_MODES)
        if self.diversity_weight < 0:
            raise ValueError(f"loss.diversity_weight: must be >= 0, got {self.diversity_weight}")


@dataclass(frozen=True)
class OptimSection:
    """AdamW with the paper's parameter groups, linear warm-up then cosine decay to min_lr."""

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.2
    betas: tuple[float, ...] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 2000
    grad_clip: float | None = None  # max global gradient norm; None: no clipping

    def check(self) -> None:
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr / optim.min_lr: need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas: expected two values in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0 or not self.eps > 0:
            raise ValueError("optim.weight_decay must be >= 0 and optim.eps > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip: must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainSection:
    steps: int  # optimizer steps of the whole run
    global_batch_size: int  # images per optimizer step, all ranks together
    micro_batch_size: int  # images per rank per forward; accumulation = global / (micro * ranks)
    precision: str = "bf16"
    zero_stage: int = 1
    seed: int = 0
    # Extra DeepSpeed config merged over the generated one (e.g. {"zero_optimization":
    # {"overlap_comm": true}}); batch sizes, precision and ZeRO stage belong to the keys above.
    deepspeed: dict = field(default_factory=dict)

    def check(self) -> None:
        for key in ("steps", "global_batch_size", "micro_batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "bf16", "fp16", "gradient_clipping", "optimizer", "scheduler"}
        clash = sorted(owned & set(self.deepspeed))
        if clash:
            raise ValueError(f"train.deepspeed: {clash} are set by train.* and optim.* keys, not here")


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000
    keep_last: int = 2  # older step checkpoints are deleted; 0 keeps all
    export: bool = True  # write RUN/export (safetensors + JSON) at the end of the run

    def check(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps)
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last: must be >= 0, got {self.keep_last}")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = 10
    tensorboard: bool = True
    progress_bar: bool = True

    def check(self) -> None:
        _positive("log.every_steps", self.every_steps)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    data: DataSection
    train: TrainSection
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def num_branches(self) -> int:
        if self.model.branch == "none":
            return 1
        return self.model.num_branches or len(self.data.text_ids)

    @property
    def segment_steps(self) -> int:
        return self.data.segment_steps or self.checkpoint.every_steps

    def check(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()
        m, mode, branch = len(self.data.text_ids), self.loss.mode, self.model.branch
        if mode == "o2o" and (branch != "none" or m != 1):
            raise ValueError(f"loss.mode: 'o2o' needs model.branch 'none' and one text id, got {branch!r} and {m}")
        if mode == "o2m" and branch != "none":
            raise ValueError(f"loss.mode: 'o2m' needs model.branch 'none' (one embedding), got {branch!r}")
        if mode == "m2m" and branch == "none":
            raise ValueError("loss.mode: 'm2m' needs model.branch 'cls' or 'mlp'; with one embedding use 'o2m'")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, override (`section.key=yaml-value`) and validate a training config.

    Every problem raises ConfigError("config PATH: KEY: what is wrong").
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config {path}: override {item!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config {path}: override {key}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    try:
        config = _build(TrainConfig, data, "")
        config.check()
    except ValueError as e:
        raise ConfigError(f"config {path}: {e}") from None
    return config


def _build(cls, data: Any, where: str):
    """Construct dataclass `cls` from a mapping, checking names and types of every key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ValueError(f"{where}{key}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{key}: missing (required)")
            continue
        hint = hints[name]
        kwargs[name] = _build(hint, data[name], f"{key}.") if dataclasses.is_dataclass(hint) else _convert(hint, data[name], key)
    return cls(**kwargs)


def _convert(hint, value: Any, key: str) -> Any:
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]  # a single shard path or text id may be written without a list
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[hint]
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}[hint]
        raise ValueError(f"{key}: expected {expected}{' or null' if optional else ''}, got {value!r}")
    return float(value) if hint is float else value


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{key}: must be a positive integer, got {value}")


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the config dumps as plain YAML/JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
