"""Exported models: what evaluation loads, with no DeepSpeed and no training config needed.

    DIR/model.safetensors   fp32 weights of HolisticCLIP (its state_dict names)
    DIR/config.json         FORMAT, the ModelConfig, branch design, H, text ids in branch order,
                            tokenizer, image preprocessing, and how the model was trained
    DIR/tokenizer/          only for a tokenizer that is not the vendored CLIP BPE (a copy)
    DIR/probe.safetensors   a few fixed inputs and the embeddings the training engine gave them;
                            load_exported recomputes them to prove the weights reload intact
    DIR/branch_profile.safetensors  embeddings of a sample of the texts that trained each branch,
                            for query-adaptive fusion (config.json's "branch_profile" says how
                            it was made); written by add_branch_profile

Python:  model, tokenizer, meta = load_exported(DIR)
CLI:     python -m train.export --checkpoint-dir RUN/checkpoints [--tag step00001000] --out DIR
         (after the fact, from a DeepSpeed checkpoint of any ZeRO stage; the trainer exports
         RUN/export itself at the end of a run).
         python -m train.export --add-branch-profile DIR [--data SHARDS ...] [--texts-per-id 2000]
         (adds the branch profile to an export that has none, from its training shards).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import random
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from data_manifests import ShardReader, ShardReadError, atomic_write_json, list_shard_files, now_iso

from .model import HolisticCLIP, ModelConfig
from .tokenizer import Tokenizer, load_tokenizer, trim_padding
from .transform import preprocess_spec

log = logging.getLogger(__name__)

FORMAT = "holiclip-export/1"
PROBE_TEXTS = ("a photo of a cat", "a red circle at the top left on a gray background", "", "bright yellow tones")
MIN_PROBE_COSINE = 0.99  # bf16 training vs fp32 reload stays above 0.999; a broken reload is near 0


class ExportError(ValueError):
    """An export directory that cannot be loaded (the message names the file)."""


class WeightsMismatch(ExportError):
    """model.safetensors holds tensors of other names or shapes than the model config.json describes."""


def probe_inputs(tokenizer: Tokenizer, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs: seeded noise images and a few texts (one empty)."""
    images = torch.randn(len(PROBE_TEXTS), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return images, tokenizer(list(PROBE_TEXTS))


def branch_text_ids(text_ids: list[str], num_branches: int) -> list[str | None]:
    """Which text id trained each branch: text m pairs with branch m (docs/method.md#4-loss).

    With H < M the extra texts pick a branch per sample (free matching) and are not listed;
    with H > M branches M.. had no text (None).
    """
    return [text_ids[h] if h < len(text_ids) else None for h in range(num_branches)]


def export_checkpoint(
    out_dir: str | Path,
    weights: nn.Module | Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    *,
    text_ids: list[str],
    tokenizer: str,
    training: dict[str, Any] | None = None,
    probe: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write an export directory (layout in the module docstring) and return its path.

    weights: a HolisticCLIP or its state dict. tokenizer: the name it was loaded with ("clip",
    a BPE .txt.gz or a Hugging Face directory; files are copied into DIR/tokenizer). probe:
    {"images", "tokens", "image_embeddings", "text_embeddings"} computed by the training engine.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()},
              str(out / "model.safetensors"))

    tokenizer_ref = tokenizer
    if tokenizer != "clip":
        source = Path(tokenizer)
        target = out / "tokenizer"
        shutil.rmtree(target, ignore_errors=True)
        if source.is_dir():
            shutil.copytree(source, target)
            tokenizer_ref = "tokenizer"
        else:
            target.mkdir()
            shutil.copy2(source, target / source.name)
            tokenizer_ref = f"tokenizer/{source.name}"
    if probe is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in probe.items()}, str(out / "probe.safetensors"))

    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(model_config),
        "branch": model_config.branch,
        "num_branches": model_config.num_branches,
        "text_ids": list(text_ids),
        "branch_text_ids": branch_text_ids(list(text_ids), model_config.num_branches),
        "tokenizer": {"name": tokenizer_ref, "context_length": model_config.context_length,
                      "vocab_size": model_config.vocab_size, "text_pool": model_config.text_pool,
                      "pad_token_id": model_config.pad_token_id},
        "preprocess": preprocess_spec(model_config.image_size),
        "training": training or {},
        "created": now_iso(),
        "software": {"torch": torch.__version__},
    }
    atomic_write_json(out / "config.json", meta)  # last, and whole: a killed export leaves no half config
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  verify: bool = True) -> tuple[HolisticCLIP, Tokenizer, dict[str, Any]]:
    """(model in eval mode, fp32 on `device`; its tokenizer; the config.json dict).

    With verify and a probe file, the probe inputs are re-encoded and compared with the
    embeddings recorded at export; meta["probe_check"] holds the minimum cosine and the largest
    absolute difference, and a mismatch raises ExportError.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no config.json here; export a checkpoint with `python -m train.export`") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path / 'config.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:  # missing section, unknown or invalid field
        raise ExportError(f"{path / 'config.json'}: not a valid export ({type(e).__name__}: {e})") from None
    model = HolisticCLIP(cfg)
    try:
        state = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise ExportError(f"{path}: no model.safetensors here") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        # PyTorch lists every mismatched tensor; the first line and one example are enough here.
        details = [line.strip() for line in str(e).splitlines() if line.strip()]
        example = next((d for d in details[1:] if "size mismatch" in d or "Missing" in d or "Unexpected" in d), "")
        raise WeightsMismatch(f"{path / 'model.safetensors'}: does not match config.json "
                          f"({len(details) - 1} problems, e.g. {example[:200]})") from None
    model = model.to(device).eval()

    name = meta["tokenizer"]["name"]
    tokenizer = load_tokenizer(name if name == "clip" else path / name, context_length=cfg.context_length)

    probe_file = path / "probe.safetensors"
    if verify and probe_file.is_file():
        probe = load_file(str(probe_file))
        with torch.no_grad():
            image = model.encode_image(probe["images"].to(device, torch.float32)).cpu()
            text = model.encode_text(probe["tokens"].to(device)).cpu()
        got, want = (torch.cat([image.flatten(0, 1), text]),
                     torch.cat([probe["image_embeddings"].flatten(0, 1), probe["text_embeddings"]]).float())
        cosine = F.cosine_similarity(got, want, dim=-1).min().item()
        meta["probe_check"] = {"min_cosine": cosine, "max_abs_diff": (got - want).abs().max().item()}
        if cosine < MIN_PROBE_COSINE:
            raise ExportError(
                f"{path}: the reloaded model does not reproduce the embeddings recorded at export "
                f"(min cosine {cosine:.4f}); the weights or config.json do not belong together"
            )
    return model, tokenizer, meta


# ----------------------------------------------------------------------------- branch profile
#
# Query-adaptive fusion (docs/evaluation.md#query-adaptive-fusion) weighs an image's branches per
# query text by how well the query's own content lines up with the ways the texts that trained
# each branch vary. What it needs travels with the export: the normalised embeddings of a bounded
# sample of each branch's training texts, their mean per branch and overall, and the softmax
# temperature fitted on a held-out half of that sample.

PROFILE_FILE = "branch_profile.safetensors"
TEXTS_PER_ID = 2000  # sampled training texts per text id: enough to describe it, seconds to embed
MAX_SAMPLES_PER_TEXT = 20  # stop reading after TEXTS_PER_ID x this many samples, even if an id is rare
NEAREST_K = 1  # a query's affinity to a branch: the mean cosine of its k nearest texts of that branch
TEMPERATURES = tuple(10 ** (k / 8) for k in range(-24, 9))  # 0.001 .. 10, the grid the fit searches
QUERY_BLOCK = 1024  # queries scored against the bank at once


@dataclasses.dataclass
class BranchProfile:
    """What adaptive fusion knows of each branch: embeddings of texts that trained it (`texts`,
    rows tagged by `branch`), their mean per branch (`means`) and over every branch (`mean`),
    and the temperature of the softmax that turns a query's affinities into branch weights.

    Affinity of query t to branch h: the mean of the k largest cos(t - c, u - means[h]) over the
    rows u of branch h, where c is the mean of the queries scored together (the class prompts of
    a zero-shot task, the captions of a retrieval pool; `mean` for a single query). Both sides
    are centred so that what every text shares (a template, the style of a text id) does not
    decide: the query's own content is matched against the directions in which the branch's
    training texts vary. A branch no text trained has no rows and gets weight 0.
    """

    texts: torch.Tensor  # (K, D) float32, L2-normalised
    branch: torch.Tensor  # (K,) int64: the branch each row describes
    means: torch.Tensor  # (H, D) float32: mean of each branch's sampled texts (zero without)
    mean: torch.Tensor  # (D,) float32: mean of every sampled text
    temperature: float
    k: int = NEAREST_K

    @property
    def num_branches(self) -> int:
        return len(self.means)

    def affinities(self, text: torch.Tensor, branches: Sequence[int] | None = None) -> torch.Tensor:
        """(M, len(branches)) affinities (class docstring); -inf for a branch without rows."""
        chosen = list(range(self.num_branches)) if branches is None else list(branches)
        text = text.float()
        centre = text.mean(dim=0) if len(text) > 1 else self.mean.to(text.device)
        query = F.normalize(text - centre, dim=-1)
        out = torch.full((len(text), len(chosen)), float("-inf"), device=text.device)
        for j, h in enumerate(chosen):
            rows = self.texts[self.branch == h].to(text.device, torch.float32)
            if len(rows):
                rows = F.normalize(rows - self.means[h].to(text.device), dim=-1)
                k = min(self.k, len(rows))
                out[:, j] = torch.cat([(q @ rows.T).topk(k, dim=1).values.mean(dim=1)
                                       for q in query.split(QUERY_BLOCK)])
        return out

    def weights(self, text: torch.Tensor, branches: Sequence[int] | None = None) -> torch.Tensor:
        """(M, len(branches)) weights, each row summing to 1: softmax over the chosen branches of
        affinity / temperature. Branches without texts get 0, unless no chosen branch has any
        (then every chosen branch gets the same weight, which is average fusion)."""
        chosen = list(range(self.num_branches)) if branches is None else list(branches)
        if not any(bool((self.branch == h).any()) for h in chosen):
            return torch.full((len(text), len(chosen)), 1 / len(chosen), device=text.device)
        return (self.affinities(text, chosen) / self.temperature).softmax(dim=1)


def sample_training_texts(shards: Sequence[str], text_ids: Sequence[str], per_id: int = TEXTS_PER_ID,
                          drop_flags: Sequence[str] = ("empty", "refusal"),
                          seed: int = 0) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Up to `per_id` texts of each text id, streamed from the training shards (text members only).

    shards: the training config's data.shards: local directories, globs, brace patterns, .tar files
    or .tar URLs (a URL *directory* is not listed here: give its shards as URLs). Shards are read
    whole, in a seeded random order, until every id has its texts or TEXTS_PER_ID x
    MAX_SAMPLES_PER_TEXT samples were read; a text that is empty or carries one of `drop_flags`
    is left out, as the trainer leaves it out. An unreadable shard is skipped (its samples read
    so far are kept) and counted.
    """
    files: list[str] = []
    for spec in (one for pattern in shards for one in braceexpand.braceexpand(pattern)):
        if Path(spec).is_dir():
            files += [str(Path(spec) / name) for name in list_shard_files(spec)]
        elif glob.has_magic(spec):
            files += sorted(glob.glob(spec))
        elif spec.endswith(".tar") and (Path(spec).is_file() or "://" in spec):  # a URL: read by fsspec
            files.append(spec)
    if not files:
        raise ExportError(f"no .tar shards found in {', '.join(shards) or 'no data given'}; "
                          "give the training shards with --data")
    random.Random(seed).shuffle(files)
    texts: dict[str, list[str]] = {t: [] for t in text_ids}
    info = {"shards_read": 0, "unreadable_shards": 0, "samples_read": 0}
    budget = per_id * MAX_SAMPLES_PER_TEXT
    for url in files:
        try:
            for sample in ShardReader(url, with_images=False):
                info["samples_read"] += 1
                for t in text_ids:
                    text = sample.texts.get(t)
                    if (len(texts[t]) < per_id and text and text.strip()
                            and not set(drop_flags).intersection(sample.flags.get(t, ()))):
                        texts[t].append(text)
                if all(len(v) >= per_id for v in texts.values()) or info["samples_read"] >= budget:
                    break
            info["shards_read"] += 1
        except ShardReadError:
            info["unreadable_shards"] += 1
        if all(len(v) >= per_id for v in texts.values()) or info["samples_read"] >= budget:
            break
    return texts, info


@torch.no_grad()
def embed_text_list(model: HolisticCLIP, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """(len(texts), D) float32 CPU embeddings, L2-normalised, in fp32."""
    out = [torch.empty(0, model.config.embed_dim)]
    pad = getattr(tokenizer, "pad_token_id", 0)
    for start in range(0, len(texts), batch_size):
        tokens = trim_padding(tokenizer(list(texts[start:start + batch_size])), pad)  # exact: causal tower
        out.append(model.encode_text(tokens.to(device)).float().cpu())
    return torch.cat(out)


def fit_temperature(sims: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(temperature, mean cross-entropy): the grid value under which softmax(sims / T) gives the
    sampled texts' own branches the highest mean log-probability. sims (N, H), -inf where masked."""
    best = (TEMPERATURES[0], math.inf)
    for t in TEMPERATURES:
        loss = float(F.cross_entropy(sims / t, target))
        if loss < best[1]:
            best = (t, loss)
    return best


def compute_branch_profile(model: HolisticCLIP, tokenizer: Tokenizer, texts: Mapping[str, Sequence[str]],
                           branch_ids: Sequence[str | None],
                           device: str | torch.device = "cpu") -> tuple[BranchProfile, dict[str, Any]]:
    """The profile of each branch from sampled texts per text id (branch h: its text id's texts).

    Each id's sample is split in two halves: the first describes the branch (its distinct
    strings and their mean), the second fits the temperature: the grid value under which the
    weights, with each id's held-out texts scored together (as a task's queries are), give each
    text its own branch with the highest mean log-probability.
    """
    h, d = model.config.num_branches, model.config.embed_dim
    means = torch.zeros(h, d)
    rows, tags, held_out, held_tags, every = [], [], [], [], []
    for m, t in enumerate(branch_ids):
        sample = list(texts.get(t) or []) if t is not None else []
        if not sample:
            continue
        half = max(1, len(sample) // 2)
        position = {text: i for i, text in enumerate(dict.fromkeys(sample[:half]))}  # each string once
        distinct = embed_text_list(model, tokenizer, list(position), device=device)
        described = distinct[[position[text] for text in sample[:half]]]  # with multiplicity
        means[m] = described.mean(dim=0)
        every.append(described)
        rows.append(distinct)
        tags.append(torch.full((len(distinct),), m, dtype=torch.long))
        if len(sample) > half:
            held_out.append(embed_text_list(model, tokenizer, sample[half:], device=device))
            held_tags.append(torch.full((len(sample) - half,), m, dtype=torch.long))
    profile = BranchProfile(torch.cat(rows) if rows else torch.empty(0, d),
                            torch.cat(tags) if tags else torch.empty(0, dtype=torch.long), means,
                            torch.cat(every).mean(dim=0) if every else torch.zeros(d), 1.0)
    info: dict[str, Any] = {"texts": {t: len(texts.get(t, ())) for t in dict.fromkeys(b for b in branch_ids if b)},
                            "rows": len(profile.texts)}
    if len(rows) > 1 and held_out:  # more than one branch to choose from: fit the temperature
        # Each id's held-out texts are scored together, as the queries of one task or retrieval
        # pool are: centred on their own mean.
        target = torch.cat(held_tags)
        sims = torch.cat([profile.affinities(emb) for emb in held_out])
        profile.temperature, loss = fit_temperature(sims, target)
        weights = (sims / profile.temperature).softmax(dim=1)
        info |= {"fit_cross_entropy": round(loss, 4),
                 "own_branch_top": round(float((weights.argmax(dim=1) == target).float().mean()), 4),
                 "own_branch_weight": round(float(weights.gather(1, target[:, None]).mean()), 4)}
    return profile, info


def add_branch_profile(export_dir: str | Path, shards: Sequence[str] | None = None,
                       texts_per_id: int = TEXTS_PER_ID, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Compute the branch profile of an export from its training shards and add it to the export.

    shards: default the training data the export records (config.json's training.data). Writes
    DIR/branch_profile.safetensors and config.json's "branch_profile" (how it was made), and
    returns that section.
    """
    path = Path(export_dir)
    model, tokenizer, _ = load_exported(path, device=device, verify=False)
    meta = json.loads((path / "config.json").read_text())
    training = meta.get("training") or {}
    shards = list(shards or training.get("data") or [])
    if not shards:
        raise ExportError(f"{path / 'config.json'}: no training data recorded (training.data); "
                          "give the training shards with --data")
    drop_flags = ((training.get("config") or {}).get("data") or {}).get("drop_flags", ("empty", "refusal"))
    branch_ids = list(meta["branch_text_ids"])
    text_ids = list(dict.fromkeys(t for t in branch_ids if t))
    texts, read = sample_training_texts(shards, text_ids, texts_per_id, drop_flags)
    missing = [t for t in text_ids if not texts[t]]
    if missing:
        raise ExportError(f"no texts of {', '.join(map(repr, missing))} in {', '.join(shards)}: "
                          "not this model's training data; give its shards with --data")
    profile, info = compute_branch_profile(model, tokenizer, texts, branch_ids, device)
    save_file({"texts": profile.texts.contiguous(), "branch": profile.branch.contiguous(),
               "means": profile.means.contiguous(), "mean": profile.mean.contiguous()}, str(path / PROFILE_FILE))
    section = {"method": "centred-nearest", "file": PROFILE_FILE, "temperature": profile.temperature, "k": profile.k,
               "texts_per_id": texts_per_id, "data": shards, **read, **info, "created": now_iso()}
    meta["branch_profile"] = section
    atomic_write_json(path / "config.json", meta)
    return section


def add_branch_profile_or_warn(export_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """The trainer's call at export time: an export whose profile cannot be made (its shards
    unreadable from here, say) is still an export; the warning says how to add the profile later.
    With one branch there is nothing to weigh: no profile."""
    if json.loads((Path(export_dir) / "config.json").read_text())["num_branches"] == 1:
        return
    try:
        section = add_branch_profile(export_dir, device=device)
    except (ExportError, OSError) as e:
        log.warning("no branch profile in %s (%s); adaptive fusion needs one: "
                    "`python -m train.export --add-branch-profile %s [--data SHARDS]`", export_dir, e, export_dir)
        return
    log.info("branch profile: %s texts per text id, temperature %.4g, own branch on top for %s of them",
             section["texts"], section["temperature"], section.get("own_branch_top", "all"))


def load_branch_profile(path: str | Path, meta: Mapping[str, Any]) -> BranchProfile | None:
    """The export's branch profile, or None for an export written without one."""
    section = meta.get("branch_profile")
    if not section:
        return None
    path = Path(path)
    again = f"compute it again with `python -m train.export --add-branch-profile {path}`"
    try:
        tensors = load_file(str(path / section.get("file", PROFILE_FILE)))
        texts, branch, means, mean = (tensors[k] for k in ("texts", "branch", "means", "mean"))
    except (FileNotFoundError, KeyError):
        raise ExportError(f"{path / PROFILE_FILE}: missing, or without 'texts', 'branch', 'means' and 'mean', "
                          f"though config.json names it; {again}") from None
    h, d = meta["model"]["num_branches"], meta["model"]["embed_dim"]
    if texts.ndim != 2 or texts.shape[1] != d or branch.shape != (len(texts),) or means.shape != (h, d) or (
            len(branch) and not 0 <= int(branch.min()) <= int(branch.max()) < h):
        raise ExportError(f"{path / PROFILE_FILE}: texts of shape {list(texts.shape)} for branches "
                          f"{sorted(set(branch.tolist()))[:10]}, but the model has {h} branches of {d} dimensions; "
                          f"{again}")
    return BranchProfile(texts.float(), branch.long(), means.float(), mean.float(), float(section["temperature"]),
                         int(section.get("k", NEAREST_K)))


def missing_profile_message(path: str | Path) -> str:
    return (f"{Path(path) / 'config.json'}: this export has no branch profile ('branch_profile': embeddings "
            "of each branch's training texts), which adaptive fusion needs; add it with "
            f"`python -m train.export --add-branch-profile {path}` (reads a sample of the training texts; "
            "--data SHARDS if they moved)")


def export_deepspeed_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a DeepSpeed checkpoint of this trainer (any ZeRO stage) without running DeepSpeed."""
    from .checkpoint import consolidated_state_dict

    weights, state = consolidated_state_dict(Path(checkpoint))
    return export_checkpoint(
        out_dir, weights, ModelConfig(**state["model_config"]), text_ids=state["text_ids"],
        tokenizer=state["tokenizer"], training=state["training"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint-dir", help="RUN/checkpoints, or one of its step directories")
    what.add_argument("--add-branch-profile", metavar="DIR",
                      help="add the branch profile (for adaptive fusion) to an existing export directory")
    parser.add_argument("--tag", help="a step directory name (default: the latest checkpoint)")
    parser.add_argument("--out", help="export directory to write (with --checkpoint-dir)")
    parser.add_argument("--no-branch-profile", action="store_true",
                        help="export without the branch profile (it reads a sample of the training shards)")
    parser.add_argument("--data", nargs="+", metavar="SHARDS",
                        help="training shards for the branch profile (default: those the checkpoint records)")
    parser.add_argument("--texts-per-id", type=int, default=TEXTS_PER_ID,
                        help=f"training texts sampled per text id for the branch profile (default: {TEXTS_PER_ID})")
    parser.add_argument("--device", default="cpu", help="torch device that embeds the sampled texts (default: cpu)")
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError

    if args.checkpoint_dir and not args.out:
        parser.error("--checkpoint-dir needs --out")
    try:
        if args.add_branch_profile:
            out = Path(args.add_branch_profile)
        else:
            source = Path(args.checkpoint_dir) / args.tag if args.tag else Path(args.checkpoint_dir)
            out = export_deepspeed_checkpoint(source, args.out)
            print(f"exported {source} -> {out}")
        if not args.no_branch_profile:
            section = add_branch_profile(out, args.data, args.texts_per_id, args.device)
            print(f"branch profile: {section['texts']} texts per text id from {section['shards_read']} shards, "
                  f"temperature {section['temperature']:.4g} -> {out / PROFILE_FILE}")
    except (CheckpointError, ExportError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
