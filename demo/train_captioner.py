"""Train a tiny captioner for the demo's world: a Qwen2-VL that vLLM serves unchanged.

No real VLM can be downloaded on the machines this project is built on. The demo's pictures
are generated (demo/scenes.py), so their truth is known and a tiny VLM can be taught to
describe them: it sees a scene and one of the default prompts, and learns to answer with that
perspective's description in its own words (several phrasings per perspective, picked at
random, in one of two styles). It knows nothing outside this world.

    python -m demo.train_captioner --out demo/captioners/tiny-plain --style plain --seed 101
    python -m demo.train_captioner --out demo/captioners/tiny-terse --style terse --seed 202
    python -m demo.train_captioner --init demo/captioners/tiny-plain --out demo/captioners/tiny-plain \
        --style plain --seed 102 --lr 3e-4      # go on training it (new scenes from seed 102)

The model: Qwen2-VL, vision 3 blocks x 128, text 3 layers x 128 (head size 32), pictures
resized to 56 px (4 image tokens), 1.4 M parameters, float32 safetensors (5.5 MB). Training: teacher
forcing on (scene, prompt -> text), AdamW with warm-up and cosine decay, one CPU thread by
default (about 18 minutes for the default 6,000 steps). Scenes are drawn from `--seed` with
generator seeds far from the demo's (the demo draws from seed 0 and up), so the pictures it
is scored on are not the ones it was trained on; the world is small (768 combinations of the
five attributes), so the combinations repeat, the pictures (jitter, alt-texts) do not.

The model directory holds HOLICLIP_TINY_VLM.json: the command, seed, steps, the hash of the
training stream, the phrasing style and the held-out caption accuracy it reached (scored
with demo.scenes.score_caption). The caption stage copies that card into each text's
provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from demo import scenes as sc

CARD = "HOLICLIP_TINY_VLM.json"
IMAGE_PIXELS = 56 * 56  # 4 image tokens after Qwen2-VL's 2x2 merge of 14 px patches
SEED_OFFSET = 1_000_000_007  # generator seeds of training scenes: far from the demo's 0, 1, 2, ...
Labels = dict[str, str]
Phrasing = Callable[[Labels], str]


# ----------------------------------------------------------------------------- what it learns to say


def _noun(labels: Labels) -> str:
    shape, count = labels["shape"], labels["count"]
    if count == "one":
        return shape
    return "crosses" if shape == "cross" else shape + "s"


def _objects(labels: Labels) -> str:
    return f"{labels['count']} {labels['colour']} {_noun(labels)}"


def _warm(labels: Labels) -> str:
    return "warm" if labels["colour"] in sc.WARM else "cool"


def _bright(labels: Labels) -> str:
    return "bright" if labels["background"] in sc.LIGHT else "dark"


# style -> prompt id of the default set -> (weight, phrasing). Weights are uneven so that greedy
# decoding settles on one main wording while training still sees several. None of them is the
# scene generator's reference text (demo/scenes.py reference_texts).
STYLES: dict[str, dict[str, list[tuple[float, Phrasing]]]] = {
    "plain": {
        "detail": [
            (0.6, lambda t: f"{_objects(t)} in the {t['position']} corner of a plain {t['background']} background."),
            (0.25, lambda t: f"this picture shows {_objects(t)} at the {t['position']}, on {t['background']}."),
            (0.15, lambda t: f"on a {t['background']} background, {_objects(t)} sit in the {t['position']} corner."),
        ],
        "background": [
            (0.6, lambda t: f"the background is plain {t['background']}."),
            (0.25, lambda t: f"an empty, flat {t['background']} background."),
            (0.15, lambda t: f"plain {t['background']} all around."),
        ],
        "main_object": [
            (0.6, lambda t: f"{_objects(t)}."),
            (0.25, lambda t: f"the main object: {_objects(t)}."),
            (0.15, lambda t: f"{t['count']} {_noun(t)}, all {t['colour']}."),
        ],
        "style": [
            (0.6, lambda t: f"a simple flat drawing, {t['colour']} on {t['background']}, with a {_warm(t)} and "
                            f"{_bright(t)} feeling."),
            (0.25, lambda t: f"flat colours, {_warm(t)} {t['colour']} against {_bright(t)} {t['background']}."),
            (0.15, lambda t: f"minimal and flat, in {_warm(t)} {_bright(t)} tones."),
        ],
    },
    "terse": {
        "detail": [
            (0.6, lambda t: f"{t['background']} background, {_objects(t)}, {t['position']}."),
            (0.25, lambda t: f"{t['position']}: {_objects(t)} on {t['background']}."),
            (0.15, lambda t: f"image of {t['count']} {_noun(t)} in {t['colour']}, placed {t['position']}, "
                             f"over {t['background']}."),
        ],
        "background": [
            (0.6, lambda t: f"solid {t['background']}."),
            (0.25, lambda t: f"background: {t['background']}, nothing else."),
            (0.15, lambda t: f"{t['background']} backdrop."),
        ],
        "main_object": [
            (0.6, lambda t: f"{t['colour']} {_noun(t)}, {t['count']} in all."),
            (0.25, lambda t: f"object: {_objects(t)}."),
            (0.15, lambda t: f"{_noun(t)} in {t['colour']}, {t['count']}."),
        ],
        "style": [
            (0.6, lambda t: f"{_warm(t)} and {_bright(t)}; flat {t['colour']} over {t['background']}."),
            (0.25, lambda t: f"graphic and flat, {t['colour']} over {t['background']}."),
            (0.15, lambda t: f"{_bright(t)} {_warm(t)} mood, simple graphic style."),
        ],
    },
}


def answer(style: str, prompt_id: str, labels: Labels, rng: random.Random) -> str:
    weights, phrasings = zip(*STYLES[style][prompt_id], strict=True)
    return rng.choices(phrasings, weights=weights)[0](labels)


def vocabulary(styles: dict[str, dict[str, list[tuple[float, Phrasing]]]] = STYLES) -> set[str]:
    """Every word any phrasing can say (all combinations of the attributes), and the chat roles."""
    words = {"user", "assistant", "system"}
    for shape in sc.SHAPES:
        for colour in sc.COLOURS:
            for count in sc.COUNTS:
                for position in sc.POSITIONS:
                    for background in sc.BACKGROUNDS:
                        labels = dict(shape=shape, colour=colour, count=count, position=position,
                                      background=background)
                        for prompts in styles.values():
                            for options in prompts.values():
                                for _, phrase in options:
                                    words.update(re.findall(r"[a-z]+", phrase(labels)))
    return words


# ----------------------------------------------------------------------------- training


def default_prompts() -> dict[str, str]:
    from caption_prompts import load_prompt_set

    return {p.id: p.text for p in load_prompt_set("default").prompts}


def _heads(processor, prompts: dict[str, str]) -> dict[str, str]:
    """Each prompt rendered with the model's chat template, as the caption stage renders it."""
    from pipeline.caption.backends import chat_messages

    return {pid: processor.apply_chat_template(chat_messages(text), tokenize=False, add_generation_prompt=True)
            for pid, text in prompts.items()}


def _batch(rng: random.Random, scenes: int, style: str, prompts: dict[str, str], processor, image_size: int,
           digest: Any) -> dict[str, Any]:
    """One teacher-forcing batch: every prompt for each of `scenes` new scenes; the loss is on the
    answer and its end token only."""
    heads = _heads(processor, prompts)
    texts, images = [], []
    for _ in range(scenes):
        scene = sc.make_scene(rng)
        labels = scene.labels()
        image = sc.draw(scene, image_size, seed=SEED_OFFSET + rng.randrange(1 << 30))
        digest.update(image.tobytes())
        for pid, head in heads.items():
            said = answer(style, pid, labels, rng)
            digest.update(f"{pid}\t{said}\n".encode())
            texts.append(head + said + "<|im_end|>")
            images.append(image)
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    labels = ids.clone()
    tok = processor.tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assistant = tok.convert_tokens_to_ids("assistant")
    for row in range(ids.shape[0]):
        seq = ids[row].tolist()
        at = max(i for i in range(len(seq) - 1) if seq[i] == start and seq[i + 1] == assistant) + 2
        labels[row, :at] = -100
    labels[enc["attention_mask"] == 0] = -100
    enc["labels"] = labels
    return enc


def train(out: Path, style: str, seed: int, steps: int, scenes_per_step: int, lr: float, threads: int,
          heldout: int, image_size: int, command: str, progress: bool = True,
          vision_lr_scale: float = 1.0, init: Path | None = None) -> dict[str, Any]:
    import torch

    from demo.tiny_vlm import save_qwen2vl, tiny_qwen2vl

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    earlier, taught = None, vocabulary()
    if init is not None:  # go on training a captioner this command made before
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        earlier = json.loads((init / CARD).read_text())
        if earlier.get("trained_by") != "demo.train_captioner" or earlier.get("style") != style:
            raise ValueError(f"--init {init}: not a {style!r} captioner made by demo.train_captioner")
        model = Qwen2VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(init)
    else:
        model, processor = tiny_qwen2vl(hidden=128, layers=3, heads=4, intermediate=256, vision_depth=3,
                                        vision_dim=128, vision_heads=4, min_pixels=IMAGE_PIXELS,
                                        max_pixels=IMAGE_PIXELS, init_std=0.02, extra_words=taught)
    prompts = default_prompts()
    unknown = sorted(w for w in taught | {w for p in prompts.values() for w in re.findall(r"[a-z]+", p.lower())}
                     if processor.tokenizer.convert_tokens_to_ids(w) == processor.tokenizer.unk_token_id)
    if unknown:  # the tokenizer must know every word it is taught
        raise RuntimeError(f"the tokenizer lacks {unknown}")
    params = sum(p.numel() for p in model.parameters())
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    text = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    optimizer = torch.optim.AdamW([{"params": text, "lr": lr}, {"params": vision, "lr": lr * vision_lr_scale}],
                                  betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))

    def factor(step: int) -> float:  # linear warm-up, cosine decay to a tenth of the peak
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    digest = hashlib.sha256(f"{style}\t{seed}\t{scenes_per_step}\t{image_size}\n".encode())
    model.train()
    started, shown, losses = time.monotonic(), 0.0, []
    for step in range(1, steps + 1):
        batch = _batch(rng, scenes_per_step, style, prompts, processor, image_size, digest)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        now = time.monotonic()
        if progress and (now - shown > 10 or step == steps):
            shown = now
            recent = losses[-50:]
            print(f"[train_captioner] step {step}/{steps} loss {sum(recent) / len(recent):.3f} "
                  f"({now - started:.0f} s)", flush=True)
    model.eval()
    accuracy, examples = evaluate(model, processor, prompts, seed, heldout, image_size) if heldout else ({}, [])
    out.mkdir(parents=True, exist_ok=True)
    save_qwen2vl(model, processor, out)
    card = {
        "architecture": "qwen2_vl", "random_weights": False,
        "trained_by": "demo.train_captioner", "command": command, "style": style, "seed": seed, "steps": steps,
        "scenes_per_step": scenes_per_step, "prompts": prompts, "image_size": image_size,
        "image_pixels_seen": IMAGE_PIXELS, "parameters": params, "learning_rate": lr,
        "vision_lr_scale": vision_lr_scale,
        "data_sha256": digest.hexdigest(), "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "train_seconds": round(time.monotonic() - started, 1),
        "heldout": {"scenes": heldout, "accuracy": accuracy, "examples": examples[:8],
                    "scored_by": "demo.scenes.score_caption: of the captions naming an attribute, the share that "
                                 "name the truth and nothing else"},
        "note": "trained on generated scenes and texts (demo/scenes.py): it knows only the demo's world",
    }
    if earlier is not None:  # the whole history: each stage's command, seed, steps and data hash
        card["total_steps"] = earlier.get("total_steps", earlier["steps"]) + steps
        card["init"] = {k: v for k, v in earlier.items() if k != "heldout"}
    (out / CARD).write_text(json.dumps(card, indent=1) + "\n")
    return card


def heldout_scenes(seed: int, scenes: int, image_size: int) -> Iterator[tuple[Labels, Any]]:
    """The scenes a captioner trained with `seed` is scored on: a stream of their own."""
    rng = random.Random(seed + 7919)
    for _ in range(scenes):
        scene = sc.make_scene(rng)
        yield scene.labels(), sc.draw(scene, image_size, seed=SEED_OFFSET + rng.randrange(1 << 30))


def evaluate(model, processor, prompts: dict[str, str], seed: int, scenes: int,
             image_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy captions of `scenes` new scenes (another stream than training's), scored per attribute."""
    import torch

    heads = _heads(processor, prompts)
    right: dict[str, list[bool]] = {a: [] for a in sc.ATTRIBUTES}
    examples = []
    for labels, image in heldout_scenes(seed, scenes, image_size):
        said = {}
        for pid, head in heads.items():
            enc = processor(text=[head], images=[image], return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=40, do_sample=False)
            said[pid] = processor.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for attribute, ok in sc.score_caption(said[pid], labels).items():
                right[attribute].append(ok)
        examples.append({"truth": labels, "captions": said})
    return {a: round(100 * sum(v) / len(v), 1) for a, v in right.items() if v}, examples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.train_captioner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model directory to write (vLLM loads it unchanged)")
    p.add_argument("--style", choices=sorted(STYLES), default="plain", help="phrasing style (default plain)")
    p.add_argument("--seed", type=int, default=101, help="seed of the weights and of the training scenes")
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps (default 6000)")
    p.add_argument("--scenes-per-step", type=int, default=8, help="scenes per step, each with every prompt (default 8)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (default 5e-4; at 2e-3 the model learnt to ignore the picture)")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="learning rate of the vision tower relative to --lr (default 1)")
    p.add_argument("--init", type=Path, help="go on training this captioner (made by this command, same style) "
                   "instead of starting from random weights; its card is kept in the new one")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--heldout", type=int, default=64,
                   help="new scenes to caption and score after training (default 64)")
    p.add_argument("--image-size", type=int, default=96, help="picture size drawn, as the demo's (default 96)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    command = "python -m demo.train_captioner " + shlex.join(sys.argv[1:] if argv is None else argv)
    card = train(a.out, a.style, a.seed, a.steps, a.scenes_per_step, a.lr, a.threads, a.heldout, a.image_size,
                 command, progress=not a.no_progress, vision_lr_scale=a.vision_lr_scale, init=a.init)
    print(f"[train_captioner] {a.out}: {card['parameters']:,} parameters, loss {card['final_loss']}, "
          f"held-out accuracy {json.dumps(card['heldout']['accuracy'])} ({card['train_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
