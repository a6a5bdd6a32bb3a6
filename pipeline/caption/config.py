"""The captioning job's configuration: YAML, validated once at the entry point.

    input: /data/cc3m/images            # image shards, or an already captioned dataset
    output: /data/cc3m/captioned        # new, or the same captioned dataset again (resume, increments)
    captioners:
      - name: qwen2vl-7b
        model: Qwen/Qwen2-VL-7B-Instruct   # a Hugging Face id (in the local cache) or a directory
        prompts: {set: default}            # or {set: full, ids: [detail, relations]}
        sampling: {temperature: 0.0}       # greedy by default; max_new_tokens comes from each prompt
        engine: {dtype: bfloat16, max_model_len: 4096}   # passed to vLLM's engine arguments
        replicas: 8
        resources: {num_gpus: 1}

Every error names the key (`captioners[0].engine.max_modle_len: not a vLLM engine argument`); the
mechanism (pydantic models, the error format) is shared with the other stages: data_manifests/config.py.
Relative paths (input, output, a model directory, a prompt set file) are relative to the config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from caption_prompts import SAMPLING_KEYS, Prompt, PromptSet, PromptSetError, load_prompt_set
from data_manifests.config import ConfigError, ConfigModel, did_you_mean, read_yaml, validate
from data_manifests.sample import RAW, SampleFormatError, check_text_id

__all__ = ["CaptionConfig", "CaptionerConfig", "ConfigError", "TextJob", "load_config", "parse_config"]

TYPES = ("vllm", "openai")
# Engine settings we set for every vLLM engine unless the config says otherwise.
ENGINE_DEFAULTS = {"enable_prefix_caching": True, "disable_log_stats": True}
DEFAULT_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 0}
_OPENAI_ONLY = ("concurrency", "timeout_s", "max_retries", "api_key_env")


@dataclass(frozen=True)
class TextJob:
    """One text to make per image: which prompt, under which text id."""

    text_id: str
    prompt: Prompt
    sampling: dict[str, Any]  # effective settings: captioner sampling + prompt overrides + max_tokens


def _base_dir(info: ValidationInfo) -> Path:
    return (info.context or {}).get("base_dir") or Path.cwd()


def _engine_arg(name: str, info: ValidationInfo) -> str:
    if name in ("model", "revision"):
        raise ValueError(f"set the captioner's `{name}` instead")
    known = (info.context or {}).get("engine_args")  # None: not checked (vLLM is slow to import)
    if known is not None and name not in known:
        raise ValueError("not a vLLM engine argument" + did_you_mean(name, known))
    return name


def _env_text(value: Any) -> Any:
    # Environment values are text; an unquoted YAML number stands for its text.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# float | int: a seed or top_k stays an integer (it is recorded in the texts' provenance as given).
Sampling = dict[Literal[*SAMPLING_KEYS], float | int]
EngineArgs = dict[Annotated[str, AfterValidator(_engine_arg)], Any]
EnvValue = Annotated[str, BeforeValidator(_env_text)]


class PromptChoice(ConfigModel):
    """A captioner's `prompts`: a shipped set by name or a YAML file, optionally some of its ids."""

    set: str = "default"
    ids: list[str] | None = Field(None, min_length=1)
    _loaded: PromptSet = PrivateAttr()

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> PromptChoice:
        ref = self.set
        if ref.endswith((".yaml", ".yml")) and not Path(ref).is_absolute():
            ref = str(_base_dir(info) / ref)
        try:
            prompt_set = load_prompt_set(ref)
            self._loaded = prompt_set.select(self.ids) if self.ids else prompt_set
        except PromptSetError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def prompt_set(self) -> PromptSet:
        return self._loaded


class Resources(ConfigModel):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict)  # Ray custom resources per replica


class CaptionerConfig(ConfigModel):
    name: str
    type: str = "vllm"
    model: str
    revision: str | None = None
    prompts: PromptChoice
    # "auto": texts are named by prompt ("detail") with one captioner, "<captioner>/detail" with several.
    text_id_prefix: str | None = "auto"
    sampling: Sampling = Field(default_factory=dict)
    engine: EngineArgs = Field(default_factory=dict, validate_default=True)  # + ENGINE_DEFAULTS
    replicas: int = Field(1, ge=1)
    # Start-up: replicas not ready within start_timeout_s (no room on the cluster, an engine that
    # cannot load) are given up; the job goes on if at least min_replicas are ready, else stops
    # naming the resources it lacks. The same timeout bounds a replacement's start.
    min_replicas: int = Field(1, ge=1)
    start_timeout_s: float = Field(1800.0, gt=0)
    resources: Resources = Resources()
    scheduling: Literal["spread", "pack"] = "spread"  # spread replicas over nodes, or pack them
    env: dict[str, EnvValue] = Field(default_factory=dict)
    max_images_in_flight: int = Field(64, ge=1)
    max_shards_in_flight: int = Field(2, ge=1)
    # A shard still unanswered this long after its replica was ready to work: the engine is taken
    # for hung, the replica replaced and the shard redone. Generous: a slow shard costs a retry.
    shard_timeout_s: float = Field(3600.0, gt=0)
    # openai type only
    endpoints: list[str] = Field(default_factory=list, validate_default=True)
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, ge=1)
    max_retries: int = Field(4, ge=0)
    api_key_env: str | None = None

    @field_validator("name")
    @classmethod
    def _names_texts(cls, name: str) -> str:
        try:
            check_text_id(name)
            if "/" in name:
                raise SampleFormatError("contains '/'")
        except SampleFormatError as e:
            raise ValueError(f"{name!r} cannot name texts ({e})") from None
        return name

    # `type` is checked here rather than declared a Literal only for its message: "'tgi' is not one of
    # vllm, openai" is the form this stage has always printed (and its tests pin); other choices
    # use Literals and the shared "must be one of [...]".
    @field_validator("type")
    @classmethod
    def _known_type(cls, kind: str) -> str:
        if kind not in TYPES:
            raise ValueError(f"{kind!r} is not one of {', '.join(TYPES)}")
        return kind

    @field_validator("model")
    @classmethod
    def _find_model(cls, model: str, info: ValidationInfo) -> str:
        if info.data.get("type") != "vllm":
            return model  # a name the servers know; nothing to find here
        base = _base_dir(info)
        if not Path(model).is_absolute() and (base / model).exists():
            return str((base / model).resolve())
        if not Path(model).exists() and not _looks_like_hub_id(model):
            raise ValueError(f"{model!r} is not a directory and not a Hugging Face id")
        return model

    @field_validator("prompts", mode="before")
    @classmethod
    def _set_by_name(cls, value: Any) -> Any:
        return {"set": value} if isinstance(value, str) else value

    @field_validator("text_id_prefix")
    @classmethod
    def _no_prefix(cls, prefix: str | None) -> str | None:
        return None if prefix in ("none", "") else prefix

    @field_validator("engine")
    @classmethod
    def _engine_defaults(cls, engine: dict[str, Any]) -> dict[str, Any]:
        return {**ENGINE_DEFAULTS, **engine}

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, endpoints: list[str], info: ValidationInfo) -> list[str]:
        openai = info.data.get("type") == "openai"
        if openai and not endpoints:
            raise ValueError("an openai captioner needs a list of base URLs (http://host:port/v1)")
        if endpoints and not openai:
            raise ValueError("only for captioners of type openai")
        return endpoints

    @field_validator("min_replicas")
    @classmethod
    def _at_most_replicas(cls, value: int, info: ValidationInfo) -> int:
        replicas = info.data.get("replicas", 1)
        if value > replicas:
            raise ValueError(f"{value} is more than replicas ({replicas})")
        return value

    @field_validator(*_OPENAI_ONLY)
    @classmethod
    def _openai_only(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") != "openai":  # runs only for keys given: defaults are not checked
            raise ValueError("only for captioners of type openai")
        return value

    @property
    def prompt_set(self) -> PromptSet:
        return self.prompts.prompt_set

    @property
    def num_cpus(self) -> float:
        return self.resources.num_cpus

    @property
    def num_gpus(self) -> float:
        return self.resources.num_gpus

    @property
    def custom_resources(self) -> dict[str, float]:
        return self.resources.custom

    def jobs(self) -> list[TextJob]:
        out = []
        for p in self.prompt_set.prompts:
            text_id = f"{self.text_id_prefix}/{p.id}" if self.text_id_prefix else p.id
            sampling = {**DEFAULT_SAMPLING, **self.sampling, **p.sampling, "max_tokens": p.max_new_tokens}
            out.append(TextJob(text_id, p, sampling))
        return out


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


class ImageSettings(ConfigModel):
    max_side: int = Field(448, ge=0)  # images are shrunk to this before the engine sees them


class CaptionConfig(ConfigModel):
    input: Path
    output: Path
    captioners: list[CaptionerConfig] = Field(min_length=1)
    ray_address: str | None = None
    shard_retries: int = Field(2, ge=0)
    overwrite: list[str] = Field(default_factory=list)  # text ids to recompute for every sample
    image: ImageSettings = ImageSettings()
    num_shards: int | None = Field(None, ge=1)  # caption only the first N shards (smoke runs)

    @field_validator("input", "output", mode="before")
    @classmethod
    def _path(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a path, got {value!r}")
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (_base_dir(info) / path).resolve()

    @field_validator("captioners")
    @classmethod
    def _prefixes(cls, captioners: list[CaptionerConfig]) -> list[CaptionerConfig]:
        one = len(captioners) == 1
        return [c.model_copy(update={"text_id_prefix": None if one else c.name}) if c.text_id_prefix == "auto" else c
                for c in captioners]

    @model_validator(mode="after")
    def _texts_and_paths(self) -> CaptionConfig:
        names: set[str] = set()
        for i, c in enumerate(self.captioners):
            if c.name in names:
                raise ValueError(f"captioners[{i}].name: duplicate captioner name {c.name!r}")
            names.add(c.name)
        made_by: dict[str, str] = {}
        for c in self.captioners:
            for job in c.jobs():
                if job.text_id == RAW:
                    raise ValueError("captioners: a caption cannot use the text id 'raw' (the alt-text)")
                if job.text_id in made_by:
                    raise ValueError(f"captioners: text id {job.text_id!r} would be made by both "
                                     f"{made_by[job.text_id]!r} and {c.name!r}; give one of them a text_id_prefix")
                made_by[job.text_id] = c.name
        for tid in self.overwrite:
            if tid not in made_by:
                raise ValueError(f"overwrite: {tid!r} is not a text id this config makes "
                                 f"({', '.join(sorted(made_by))})")
        if self.input.resolve() == self.output.resolve():
            raise ValueError("output: must differ from input (to add texts to a captioned dataset, give it as "
                             "output and its image dataset as input)")
        return self

    @property
    def image_max_side(self) -> int:
        return self.image.max_side

    def jobs(self) -> dict[str, list[TextJob]]:
        return {c.name: c.jobs() for c in self.captioners}


def _engine_arg_names() -> set[str]:
    """The names of vLLM's engine arguments, to check a config's `engine` keys against.

    Importing vLLM for them takes 15 s of CPU on a small machine, in every driver and at every
    refused config, so the names are kept in the user's cache (XDG_CACHE_HOME, else ~/.cache),
    under a digest of the module that defines them (vllm/engine/arg_utils.py, found without
    importing vLLM): another vLLM, or an edited one, gets its own entry."""
    import hashlib
    import importlib.util
    import json

    from data_manifests import atomic_write_text

    spec = importlib.util.find_spec("vllm")
    source = Path(next(iter(spec.submodule_search_locations or [])), "engine", "arg_utils.py") if spec else None
    cache = None
    if source is not None and source.is_file():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:20]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "holiclip" / \
            f"vllm-engine-args-{digest}.json"
        try:
            return set(json.loads(cache.read_text()))
        except (OSError, ValueError):
            pass
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    names = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(sorted(names)))
        except OSError:  # a read-only home: checked the slow way next time too
            pass
    return names


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None,
                 check_engine_args: bool = True) -> CaptionConfig:
    context = {"base_dir": base_dir, "engine_args": _engine_arg_names() if check_engine_args else None}
    return validate(CaptionConfig, data, source, context=context)


def load_config(path: str | Path, check_engine_args: bool = True, input: str | None = None,
                output: str | None = None, overwrite: list[str] | tuple[str, ...] = ()) -> CaptionConfig:
    """The job in a YAML file; `input`, `output` and `overwrite` are the command line's, checked with the rest."""
    path = Path(path)
    data = read_yaml(path, str(path))
    # Paths given on the command line are relative to the working directory, not to the config file.
    for key, value in (("input", input), ("output", output)):
        if value:
            data[key] = str(Path(value).resolve())
    if overwrite:
        given = data.get("overwrite") or []
        data["overwrite"] = sorted(set(given) | set(overwrite)) if isinstance(given, list) else given
    return parse_config(data, str(path), base_dir=path.resolve().parent, check_engine_args=check_engine_args)
