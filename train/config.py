"""Training configuration: typed sections loaded once from YAML at the entry point and validated.

A config file has the sections below (train/configs/*.yaml are complete examples); every key
has a default except `output_dir`, `data.shards`, `data.text_ids`, `train.steps` and the batch
sizes. An unknown or mistyped key is an error that names it: a typo must not silently fall back
to a default. `--set KEY=VALUE` overrides (YAML values) go through the same checks. The
mechanism (pydantic models, the error format) is shared with the other stages: data_manifests/config.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, StrictInt, TypeAdapter, ValidationInfo, field_validator, model_validator

from data_manifests import SampleFormatError, check_text_id
from data_manifests.config import ConfigError, ConfigModel, Numbers, Strings, read_yaml, validate
from data_manifests.quality import ALL_FLAGS

__all__ = ["ConfigError", "TrainConfig", "load_config"]


class ModelSection(ConfigModel):
    config: str = "tiny"  # model_configs/<name>.json, or a path to such a JSON file
    branch: Literal["cls", "mlp", "none"] = "none"  # Psi_CLS, Psi_MLP, or plain CLIP (O2O, O2M)
    # H; default: the number of text ids for cls/mlp, 1 for none
    num_branches: int | None = Field(None, ge=1)
    mlp_branch_layers: int | None = Field(None, ge=1)  # L for branch "mlp"; default: the model config's value
    tokenizer: str = "clip"  # "clip", a CLIP BPE .txt.gz, or a local Hugging Face tokenizer directory
    # Start from an OpenCLIP ViT checkpoint (train/openclip.py: Psi_CLS's H class tokens and Psi_MLP's
    # H MLP copies start from its one); ignored when resuming. None: random initialisation.
    init: str | None = None

    @field_validator("num_branches")
    @classmethod
    def _one_embedding(cls, h: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("branch") == "none" and h not in (None, 1):
            raise ValueError(f"must be 1 (or unset) when model.branch is 'none', got {h}")
        return h


class DataSection(ConfigModel):
    # Multi-text shard directories, globs, brace patterns ({00000..00041}.tar) or fsspec URLs.
    shards: Strings
    # The texts to train on, in branch order: text_ids[m] pairs with branch m (O2O uses one).
    text_ids: Strings
    # A sample that lacks a text id (or has it flagged, see drop_flags) gets this text instead;
    # None skips the sample (it is counted either way).
    fallback_text_id: str | None = None
    drop_flags: Strings = ("empty", "refusal")  # texts with these quality flags count as missing
    resampled: bool = True  # draw shards with replacement (OpenCLIP's --dataset-resampled)
    shuffle_buffer: int = Field(1000, ge=1)  # samples per worker
    num_workers: int = Field(4, ge=0)  # decoding processes per rank; 0 decodes in the training process
    # The stream is re-seeded every segment_steps optimizer steps (default: checkpoint.every_steps),
    # which is what makes resuming exact and cheap (docs/training.md).
    segment_steps: int | None = Field(None, ge=1)
    crop_scale: Numbers = (0.9, 1.0)  # random resized crop area range (the paper's)
    check_text_ids: bool = True  # compare text_ids with the datasets' manifests before training

    @field_validator("shards")
    @classmethod
    def _some_shards(cls, shards: tuple[str, ...]) -> tuple[str, ...]:
        if not shards:
            raise ValueError("give at least one shard directory, glob or URL")
        return shards

    @field_validator("text_ids")
    @classmethod
    def _distinct_text_ids(cls, text_ids: tuple[str, ...]) -> tuple[str, ...]:
        if not text_ids:
            raise ValueError("give at least one text id")
        if len(set(text_ids)) != len(text_ids):
            raise ValueError(f"ids must be distinct, got {list(text_ids)}")
        return tuple(_text_id(t) for t in text_ids)

    @field_validator("fallback_text_id")
    @classmethod
    def _fallback_text_id(cls, text_id: str | None) -> str | None:
        return None if text_id is None else _text_id(text_id)

    @field_validator("drop_flags")
    @classmethod
    def _known_flags(cls, flags: tuple[str, ...]) -> tuple[str, ...]:
        # Checked as a whole rather than as Literal items, so the message names the key, not an index.
        for flag in flags:
            if flag not in ALL_FLAGS:
                raise ValueError(f"must be one of {list(ALL_FLAGS)}, got {flag!r}")
        return flags

    @field_validator("crop_scale")
    @classmethod
    def _crop_range(cls, lo_hi: tuple[float, ...]) -> tuple[float, ...]:
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"expected [low, high] with 0 < low <= high <= 1, got {list(lo_hi)}")
        return lo_hi


def _text_id(text_id: str) -> str:
    try:
        return check_text_id(text_id)
    except SampleFormatError as e:
        raise ValueError(str(e)) from None


class LossSection(ConfigModel):
    mode: Literal["o2o", "o2m", "m2m"] = "m2m"  # plain CLIP; one embedding, M texts; H branches, M texts
    diversity_weight: float = Field(0.0, ge=0)  # the public code's branch-diversity hinge; off by default
    diversity_margin: float = 0.7


class OptimSection(ConfigModel):
    """AdamW with the paper's parameter groups, linear warm-up then cosine decay to min_lr."""

    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: Numbers = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(2000, ge=0)
    grad_clip: float | None = Field(None, gt=0)  # max global gradient norm; None: no clipping

    @field_validator("min_lr")
    @classmethod
    def _below_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        if "lr" in info.data and min_lr > info.data["lr"]:
            raise ValueError(f"must not exceed optim.lr ({info.data['lr']}), got {min_lr}")
        return min_lr

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, betas: tuple[float, ...]) -> tuple[float, ...]:
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"expected two values in [0, 1), got {list(betas)}")
        return betas


# Batch sizes, precision and ZeRO stage come from train.*, the optimizer and clipping from optim.*.
_DEEPSPEED_OWNED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "bf16", "fp16", "gradient_clipping", "optimizer", "scheduler"}


class TrainSection(ConfigModel):
    steps: int = Field(ge=1)  # optimizer steps of the whole run
    global_batch_size: int = Field(ge=1)  # images per optimizer step, all ranks together
    micro_batch_size: int = Field(ge=1)  # images per rank per forward; accumulation = global / (micro * ranks)
    # bf16: bf16 matmuls (autocast), fp32 weights, gradients, reduction and optimizer (OpenCLIP's
    # amp_bf16); fp16: DeepSpeed's fp16 mode (fp16 weights and gradients, fp32 master copy, dynamic
    # loss scaling); fp32. docs/training.md#precision lists every tensor's dtype.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # exact: every micro-batch's loss is against the whole global batch (OpenCLIP's accum-freq);
    # independent: each micro-batch is its own contrastive batch (fewer negatives, a different
    # objective). docs/training.md#gradient-accumulation.
    accumulation: Literal["exact", "independent"] = "exact"
    grad_checkpointing: bool = False  # recompute block activations in the backward pass
    compile: bool = False  # torch.compile the model (worth it on GPUs; slow to start on a CPU)
    # A Literal alone would take true or 1.0 for 1: the stage is checked as an integer first.
    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(TypeAdapter(StrictInt).validate_python)] = 1
    seed: int = 0
    # Extra DeepSpeed config merged over the generated one (e.g. {"zero_optimization":
    # {"overlap_comm": true}}).
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fp16_with_a_master_copy(self) -> TrainSection:
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ValueError("precision fp16 needs zero_stage 1, 2 or 3: under ZeRO 0, DeepSpeed's fp16 "
                             "optimizer keeps its fp32 master weights where the logit-scale clamp cannot reach "
                             "them (ZeRO 1 costs nothing more on one GPU); or use bf16")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _not_owned(cls, extra: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_DEEPSPEED_OWNED & set(extra))
        if clash:
            raise ValueError(f"{clash} are set by train.* and optim.* keys, not here")
        return extra


class CheckpointSection(ConfigModel):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=0)  # older step checkpoints (and step exports) are deleted; 0 keeps all
    export: bool = True  # write RUN/export (safetensors + JSON) at the end of the run
    export_every: bool = False  # also write RUN/exports/<step tag> at every checkpoint


_SET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # names files and TensorBoard tags


class ZeroshotSet(ConfigModel):
    """A held-out zero-shot set, as `python -m eval zeroshot` reads it (docs/evaluation.md)."""

    name: str = Field(pattern=_SET_NAME)
    data: str  # labelled shards, DIR/<class>/<image>, or a CLIP_benchmark WebDataset benchmark
    classnames: str | None = None  # default: eval's (the set's own, or ImageNet's for integer labels)
    templates: str | None = None  # default: eval's (the set's own, or the 80 CLIP templates)


class RetrievalSet(ConfigModel):
    """A held-out retrieval set, as `python -m eval retrieval` reads it."""

    name: str = Field(pattern=_SET_NAME)
    data: str  # a dataset in the project's format, or a CLIP_benchmark WebDataset retrieval benchmark
    text_ids: Strings | None = None  # default: every text id of the set
    positives: Literal["own", "same-string"] = "own"  # own: CLIP_benchmark's rule


class EvalSection(ConfigModel):
    """Evaluation during training (train/evaluation.py): the sets are scored at every_steps and at
    the end, on rank 0, by the eval CLI on an export of the checkpoint."""

    every_steps: int | None = Field(None, ge=1)  # a multiple of checkpoint.every_steps; None: only at the end
    at_end: bool = True  # also after the last step (when there is any set)
    zeroshot: list[ZeroshotSet] = Field(default_factory=list)
    retrieval: list[RetrievalSet] = Field(default_factory=list)
    # eval's --fusion methods; default: average, and each branch alone when H > 1
    fusions: Strings | None = None
    device: str | None = None  # default: rank 0's training device
    batch_size: int = Field(64, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    limit: int | None = Field(None, ge=1)  # first N images of each set (quick looks)

    @model_validator(mode="after")
    def _distinct_names(self) -> EvalSection:
        names = [s.name for s in [*self.zeroshot, *self.retrieval]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"set names must be distinct, {twice} appear twice")
        return self

    @field_validator("fusions")
    @classmethod
    def _known_fusions(cls, fusions: tuple[str, ...] | None) -> tuple[str, ...] | None:
        known = ("average", "max", "norm-max", "adaptive", "each-branch")
        for f in fusions or ():
            if f not in known:
                raise ValueError(f"must be among {list(known)}, got {f!r}")
        if fusions is not None and not fusions:
            raise ValueError("give at least one fusion, or leave it unset")
        return fusions

    @property
    def sets(self) -> list[ZeroshotSet | RetrievalSet]:
        return [*self.zeroshot, *self.retrieval]


class LogSection(ConfigModel):
    every_steps: int = Field(10, ge=1)
    tensorboard: bool = True
    progress_bar: bool = True


class TrainConfig(ConfigModel):
    output_dir: str
    data: DataSection
    train: TrainSection
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _sections_agree(self) -> TrainConfig:
        t = self.train
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        m, mode, branch = len(self.data.text_ids), self.loss.mode, self.model.branch
        if mode == "o2o" and (branch != "none" or m != 1):
            raise ValueError(f"loss.mode: 'o2o' needs model.branch 'none' and one text id, got {branch!r} and {m}")
        if mode == "o2m" and branch != "none":
            raise ValueError(f"loss.mode: 'o2m' needs model.branch 'none' (one embedding), got {branch!r}")
        if mode == "m2m" and branch == "none":
            raise ValueError("loss.mode: 'm2m' needs model.branch 'cls' or 'mlp'; with one embedding use 'o2m'")
        every, saved = self.eval.every_steps, self.checkpoint.every_steps
        if every is not None and every % saved:
            raise ValueError(f"eval.every_steps ({every}) must be a multiple of checkpoint.every_steps ({saved}): "
                             "an evaluation is of a checkpoint")
        return self

    @property
    def num_branches(self) -> int:
        if self.model.branch == "none":
            return 1
        return self.model.num_branches or len(self.data.text_ids)

    @property
    def segment_steps(self) -> int:
        return self.data.segment_steps or self.checkpoint.every_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and mappings, so the config dumps as YAML/JSON."""
        return self.model_dump(mode="json")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, override (`section.key=yaml-value`) and validate a training config.

    Every problem raises ConfigError("config PATH: KEY: what is wrong").
    """
    source = f"config {path}"
    data = read_yaml(Path(path), source)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {key}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return validate(TrainConfig, data, source)
