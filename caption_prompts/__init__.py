"""Prompt sets for captioning, as YAML data files, validated on load.

A set lives in `caption_prompts/<name>.yaml` (found the same way from a checkout or an
installed package) or in any YAML file a user points to:

    name: default
    description: ...
    prompts:
      - id: detail                 # becomes the text id ("detail" or "<captioner>/detail")
        family: gaze-glance        # attention | physical-sensory | gaze-glance | reasoning
        text: Describe this image in detail.
        max_new_tokens: 77         # optional, 77 as in the paper
        sampling: {temperature: 0.7}   # optional overrides of the captioner's sampling

A set's content hash covers what changes the captions (ids, texts, token limits, sampling),
not comments or formatting; manifests record it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from data_manifests.config import did_you_mean
from data_manifests.sample import SampleFormatError, check_text_id

FAMILIES = ("attention", "physical-sensory", "gaze-glance", "reasoning")
DEFAULT_MAX_NEW_TOKENS = 77
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed")
_SET_KEYS = ("name", "description", "prompts")
_PROMPT_KEYS = ("id", "family", "text", "max_new_tokens", "sampling")


class PromptSetError(ValueError):
    """A prompt set file that is missing or invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Prompt:
    id: str
    family: str
    text: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    prompts: tuple[Prompt, ...]
    source: str

    @property
    def content_hash(self) -> str:
        canonical = json.dumps({"name": self.name, "prompts": [asdict(p) for p in self.prompts]}, sort_keys=True)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    def get(self, prompt_id: str) -> Prompt:
        for p in self.prompts:
            if p.id == prompt_id:
                return p
        raise PromptSetError(f"{self.source}: no prompt with id {prompt_id!r} (has {', '.join(self.ids)})")

    def select(self, ids: list[str]) -> PromptSet:
        """The same set restricted to some prompts, in the order given."""
        return PromptSet(self.name, self.description, tuple(self.get(i) for i in ids), self.source)


def available_sets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


# Prompt sets keep their own small checks rather than the stages' config models
# (data_manifests/config.py): their messages name the prompt and then the key ("prompts[0]:
# unknown key 'txt'"), a form users and tests of the library rely on.
def _keys(raw: Any, allowed: tuple[str, ...], required: tuple[str, ...], where: str, what: str) -> dict:
    if not isinstance(raw, dict):
        raise PromptSetError(f"{where}: {what} must be a mapping with keys {', '.join(allowed)}")
    for key in raw:
        if key not in allowed:
            raise PromptSetError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})"
                                 + did_you_mean(str(key), allowed))
    for key in required:
        if key not in raw:
            raise PromptSetError(f"{where}: missing key {key!r}")
    return raw


def _validate_prompt(raw: Any, where: str) -> Prompt:
    _keys(raw, _PROMPT_KEYS, ("id", "family", "text"), where, "each prompt")
    pid, family, text = raw["id"], raw["family"], raw["text"]
    try:
        check_text_id(str(pid))
    except SampleFormatError as e:
        raise PromptSetError(f"{where}: key 'id': {e}") from None
    if "/" in str(pid) or pid == "raw":
        raise PromptSetError(f"{where}: key 'id': {pid!r} is reserved or contains '/'")
    if family not in FAMILIES:
        raise PromptSetError(f"{where}: key 'family': {family!r} is not one of {', '.join(FAMILIES)}")
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where}: key 'text' must be a non-empty string")
    max_new = raw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= 8192:
        raise PromptSetError(f"{where}: key 'max_new_tokens' must be an integer from 1 to 8192, got {max_new!r}")
    sampling = raw.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise PromptSetError(f"{where}: key 'sampling' must be a mapping")
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise PromptSetError(f"{where}: key 'sampling.{key}' is not a sampling setting "
                                 f"({', '.join(SAMPLING_KEYS)})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PromptSetError(f"{where}: key 'sampling.{key}' must be a number")
    return Prompt(id=str(pid), family=family, text=text.strip(), max_new_tokens=max_new, sampling=dict(sampling))


def parse_prompt_set(data: Any, source: str) -> PromptSet:
    _keys(data, _SET_KEYS, ("name", "prompts"), source, "the file")
    if not isinstance(data["prompts"], list) or not data["prompts"]:
        raise PromptSetError(f"{source}: key 'prompts' must be a non-empty list")
    prompts = []
    seen: set[str] = set()
    for i, raw in enumerate(data["prompts"]):
        prompt = _validate_prompt(raw, f"{source}: prompts[{i}]")
        if prompt.id in seen:
            raise PromptSetError(f"{source}: prompts[{i}]: duplicate id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return PromptSet(name=str(data["name"]), description=str(data.get("description", "")),
                     prompts=tuple(prompts), source=source)


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """A shipped set by name ("default", "full", "one_prompt") or a YAML file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise PromptSetError(f"{candidate}: prompt set file not found")
        source, content = str(candidate), candidate.read_text(encoding="utf-8")
    else:
        resource = resources.files(__name__) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise PromptSetError(f"no prompt set named {str(name_or_path)!r}; "
                                 f"shipped sets: {', '.join(available_sets())}; "
                                 "or give the path of a YAML file")
        source, content = f"caption_prompts/{name_or_path}.yaml", resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(content)
    except yaml.YAMLError as e:
        raise PromptSetError(f"{source}: not valid YAML ({e})") from None
    return parse_prompt_set(data, source)
