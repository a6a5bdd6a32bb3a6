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

Every error names the key (`captioners[0].engine.max_modle_len: not a vLLM engine argument`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from caption_prompts import Prompt, PromptSet, PromptSetError, load_prompt_set
from data_manifests.sample import RAW, SampleFormatError, check_text_id

TYPES = ("vllm", "openai")
# Engine settings we set for every vLLM engine unless the config says otherwise.
ENGINE_DEFAULTS = {"enable_prefix_caching": True, "disable_log_stats": True}
DEFAULT_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 0}


class ConfigError(ValueError):
    """A configuration error; the message names the file and the key."""


@dataclass(frozen=True)
class TextJob:
    """One text to make per image: which prompt, under which text id."""

    text_id: str
    prompt: Prompt
    sampling: dict[str, Any]  # effective settings: captioner sampling + prompt overrides + max_tokens


@dataclass
class CaptionerConfig:
    name: str
    model: str
    type: str = "vllm"
    revision: str | None = None
    prompt_set: PromptSet | None = None
    text_id_prefix: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)
    scheduling: str = "spread"  # "spread" replicas over nodes, or "pack" them
    env: dict[str, str] = field(default_factory=dict)
    max_images_in_flight: int = 64
    max_shards_in_flight: int = 2
    # openai type only
    endpoints: list[str] = field(default_factory=list)
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 4
    api_key_env: str | None = None

    def jobs(self) -> list[TextJob]:
        assert self.prompt_set is not None
        out = []
        for p in self.prompt_set.prompts:
            text_id = f"{self.text_id_prefix}/{p.id}" if self.text_id_prefix else p.id
            sampling = {**DEFAULT_SAMPLING, **self.sampling, **p.sampling, "max_tokens": p.max_new_tokens}
            out.append(TextJob(text_id, p, sampling))
        return out


@dataclass
class CaptionConfig:
    input: Path
    output: Path
    captioners: list[CaptionerConfig]
    source: str = "<config>"
    ray_address: str | None = None
    shard_retries: int = 2
    overwrite: list[str] = field(default_factory=list)
    image_max_side: int = 448
    num_shards: int | None = None  # caption only the first N shards (smoke runs)

    def jobs(self) -> dict[str, list[TextJob]]:
        return {c.name: c.jobs() for c in self.captioners}


_TOP_KEYS = {"input", "output", "captioners", "ray_address", "shard_retries", "overwrite", "image", "num_shards"}
_CAPTIONER_KEYS = {"name", "model", "type", "revision", "prompts", "text_id_prefix", "sampling", "engine", "replicas",
                   "resources", "scheduling", "env", "max_images_in_flight", "max_shards_in_flight", "endpoints",
                   "concurrency", "timeout_s", "max_retries", "api_key_env"}
_RESOURCE_KEYS = {"num_cpus", "num_gpus", "custom"}
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed"}


def _engine_arg_names() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.source}: {key}: {message}")

    def keys(self, obj: Any, allowed: set[str], where: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(where or "(top level)", "must be a mapping")
        for k in obj:
            if k not in allowed:
                self.fail(f"{where}.{k}" if where else k, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return obj

    def number(self, obj: dict, key: str, where: str, default, kind=(int, float), minimum=None):
        value = obj.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            self.fail(f"{where}.{key}" if where else key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(f"{where}.{key}" if where else key, f"must be at least {minimum}, got {value!r}")
        return value


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None,
                 check_engine_args: bool = True) -> CaptionConfig:
    ck = _Checker(source)
    ck.keys(data, _TOP_KEYS, "")
    for key in ("input", "output", "captioners"):
        if key not in data:
            ck.fail(key, "missing")
    base = base_dir or Path.cwd()

    def path(key: str) -> Path:
        value = data[key]
        if not isinstance(value, str) or not value:
            ck.fail(key, "must be a path")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base / p).resolve()

    cfg = CaptionConfig(input=path("input"), output=path("output"), captioners=[], source=source)
    cfg.ray_address = data.get("ray_address")
    cfg.shard_retries = ck.number(data, "shard_retries", "", 2, int, 0)
    cfg.num_shards = data.get("num_shards")
    if cfg.num_shards is not None:
        ck.number(data, "num_shards", "", None, int, 1)
    overwrite = data.get("overwrite", [])
    if not isinstance(overwrite, list) or not all(isinstance(x, str) for x in overwrite):
        ck.fail("overwrite", "must be a list of text ids")
    cfg.overwrite = overwrite
    image = ck.keys(data.get("image", {}), {"max_side"}, "image")
    cfg.image_max_side = ck.number(image, "max_side", "image", 448, int, 0)

    caps = data["captioners"]
    if not isinstance(caps, list) or not caps:
        ck.fail("captioners", "must be a non-empty list")
    engine_args = _engine_arg_names() if check_engine_args else None
    names: set[str] = set()
    for i, raw in enumerate(caps):
        where = f"captioners[{i}]"
        ck.keys(raw, _CAPTIONER_KEYS, where)
        for key in ("name", "model", "prompts"):
            if key not in raw:
                ck.fail(f"{where}.{key}", "missing")
        name = raw["name"]
        try:
            check_text_id(str(name))
            if "/" in str(name):
                raise SampleFormatError("contains '/'")
        except SampleFormatError as e:
            ck.fail(f"{where}.name", f"{name!r} cannot name texts ({e})")
        if name in names:
            ck.fail(f"{where}.name", f"duplicate captioner name {name!r}")
        names.add(name)
        c = CaptionerConfig(name=name, model=str(raw["model"]))
        c.type = raw.get("type", "vllm")
        if c.type not in TYPES:
            ck.fail(f"{where}.type", f"{c.type!r} is not one of {', '.join(TYPES)}")
        c.revision = raw.get("revision")
        if c.type == "vllm" and not Path(c.model).is_absolute() and (base / c.model).exists():
            c.model = str((base / c.model).resolve())
        prompts = raw["prompts"]
        if isinstance(prompts, str):
            prompts = {"set": prompts}
        ck.keys(prompts, {"set", "ids"}, f"{where}.prompts")
        try:
            set_ref = prompts.get("set", "default")
            if isinstance(set_ref, str) and set_ref.endswith((".yaml", ".yml")) and not Path(set_ref).is_absolute():
                set_ref = str(base / set_ref)
            pset = load_prompt_set(set_ref)
            if "ids" in prompts:
                if not isinstance(prompts["ids"], list) or not prompts["ids"]:
                    ck.fail(f"{where}.prompts.ids", "must be a non-empty list of prompt ids")
                pset = pset.select([str(x) for x in prompts["ids"]])
        except PromptSetError as e:
            ck.fail(f"{where}.prompts", str(e))
        c.prompt_set = pset
        prefix = raw.get("text_id_prefix", "auto")
        if prefix == "auto":
            # One captioner: texts are named by prompt ("detail"); several: "<captioner>/detail".
            c.text_id_prefix = None if len(caps) == 1 else name
        elif prefix in (None, "none", ""):
            c.text_id_prefix = None
        else:
            c.text_id_prefix = str(prefix)
        sampling = ck.keys(raw.get("sampling", {}), _SAMPLING_KEYS, f"{where}.sampling")
        for k in sampling:
            ck.number(sampling, k, f"{where}.sampling", None)
        c.sampling = dict(sampling)
        engine = raw.get("engine", {})
        if not isinstance(engine, dict):
            ck.fail(f"{where}.engine", "must be a mapping of vLLM engine arguments")
        for k in ("model", "revision"):
            if k in engine:
                ck.fail(f"{where}.engine.{k}", f"set the captioner's `{k}` instead")
        if engine_args is not None:
            for k in engine:
                if k not in engine_args:
                    close = difflib.get_close_matches(k, engine_args, n=1)
                    ck.fail(f"{where}.engine.{k}", "not a vLLM engine argument"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        c.engine = {**ENGINE_DEFAULTS, **engine}
        c.replicas = ck.number(raw, "replicas", where, 1, int, 1)
        res = ck.keys(raw.get("resources", {}), _RESOURCE_KEYS, f"{where}.resources")
        c.num_cpus = ck.number(res, "num_cpus", f"{where}.resources", 1, minimum=0)
        c.num_gpus = ck.number(res, "num_gpus", f"{where}.resources", 0, minimum=0)
        custom = res.get("custom", {})
        if not isinstance(custom, dict):
            ck.fail(f"{where}.resources.custom", "must map resource names to amounts")
        c.custom_resources = {str(k): float(v) for k, v in custom.items()}
        c.scheduling = raw.get("scheduling", "spread")
        if c.scheduling not in ("spread", "pack"):
            ck.fail(f"{where}.scheduling", "must be 'spread' or 'pack'")
        env = raw.get("env", {})
        if not isinstance(env, dict):
            ck.fail(f"{where}.env", "must map variable names to values")
        c.env = {str(k): str(v) for k, v in env.items()}
        c.max_images_in_flight = ck.number(raw, "max_images_in_flight", where, 64, int, 1)
        c.max_shards_in_flight = ck.number(raw, "max_shards_in_flight", where, 2, int, 1)
        if c.type == "openai":
            endpoints = raw.get("endpoints")
            if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
                ck.fail(f"{where}.endpoints", "an openai captioner needs a list of base URLs (http://host:port/v1)")
            c.endpoints = endpoints
            c.concurrency = ck.number(raw, "concurrency", where, 16, int, 1)
            c.timeout_s = ck.number(raw, "timeout_s", where, 120.0, minimum=1)
            c.max_retries = ck.number(raw, "max_retries", where, 4, int, 0)
            c.api_key_env = raw.get("api_key_env")
        else:
            for k in ("endpoints", "concurrency", "timeout_s", "max_retries", "api_key_env"):
                if k in raw:
                    ck.fail(f"{where}.{k}", "only for captioners of type openai")
            if not Path(c.model).exists() and not _looks_like_hub_id(c.model):
                ck.fail(f"{where}.model", f"{c.model!r} is not a directory and not a Hugging Face id")
        cfg.captioners.append(c)

    seen: dict[str, str] = {}
    for c in cfg.captioners:
        for job in c.jobs():
            if job.text_id == RAW:
                ck.fail("captioners", "a caption cannot use the text id 'raw' (the alt-text)")
            if job.text_id in seen:
                ck.fail("captioners", f"text id {job.text_id!r} would be made by both {seen[job.text_id]!r} and "
                                      f"{c.name!r}; give one of them a text_id_prefix")
            seen[job.text_id] = c.name
    for tid in cfg.overwrite:
        if tid not in seen:
            ck.fail("overwrite", f"{tid!r} is not a text id this config makes ({', '.join(sorted(seen))})")
    if cfg.input.resolve() == cfg.output.resolve():
        ck.fail("output", "must differ from input (to add texts to a captioned dataset, give it as output "
                          "and its image dataset as input)")
    return cfg


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def load_config(path: str | Path, check_engine_args: bool = True) -> CaptionConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_config(data, str(path), base_dir=path.resolve().parent, check_engine_args=check_engine_args)
