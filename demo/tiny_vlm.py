"""Tiny, randomly initialised vision-language models that vLLM serves, built offline.

No real VLM weights can be downloaded on the machines this project is tested on, and no
registry package ships one. These models have the real architectures (Qwen2-VL, LLaVA), real
processors and chat templates, and a tokenizer trained here, so vLLM runs them through exactly
the code paths a real captioner takes; only their captions are meaningless placeholders.

    python -m demo.tiny_vlm --arch qwen2_vl --out models/tiny-qwen2vl

Tests and the demo's fallback captioner use them. Building one takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The words the placeholder tokenizer knows (with those of the shipped prompts).
_CORPUS_WORDS = (
    "a an the this image photo picture shows with of in on at and or but is are there red green blue "
    "yellow white black orange purple circle square triangle star shape shapes large small big tiny "
    "left right top bottom center middle background foreground object main style feeling calm bright "
    "dark colourful describe detail only single nothing else sky grass water wall floor table dog cat "
    "person car tree house one two three four five many few some near far behind front next to above "
    "below drawn plain simple scene view close-up style evokes mood warm cool soft sharp"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<unk>"]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def _word_tokenizer(special: list[str], unk: str, extra_words: Iterable[str] = ()):
    """A word-level tokenizer over a small English vocabulary, with the architecture's specials.

    Word-level (not byte-level BPE) so that a random model's output decodes into words, never
    into broken UTF-8: placeholder captions then look like (meaningless) sentences.
    """
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from caption_prompts import available_sets, load_prompt_set

    words = set(_CORPUS_WORDS) | set(".,:;!?'-") | {w.lower() for w in extra_words}
    for name in available_sets():  # every shipped prompt is made of known words
        for prompt in load_prompt_set(name).prompts:
            words.update(re.findall(r"[a-z]+", prompt.text.lower()))
    vocab = {tok: i for i, tok in enumerate(special)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tok.add_special_tokens(special)
    return tok


def build_tiny_qwen2vl(out: str | Path, seed: int = 0, max_pixels: int = 448 * 448, init_std: float = 0.4) -> Path:
    """A ~1 M parameter Qwen2-VL: 2 vision blocks, 2 text layers, head size 32 (vLLM CPU supports it).

    `init_std` is far above a trained model's 0.02 on purpose: with small weights every
    position predicts the same token and all captions come out identical (a run of newlines),
    which would let tests pass without telling images or prompts apart. Larger weights make the
    greedy output depend on the image and the prompt, like a real captioner's.
    `max_pixels` keeps real-model-like image token counts (up to 256 per image), so that prefix
    caching across the prompts of one image has something to reuse.
    """
    import torch

    out = Path(out)
    torch.manual_seed(seed)
    model, processor = tiny_qwen2vl(init_std=init_std, max_pixels=max_pixels)
    save_qwen2vl(model.to(torch.bfloat16), processor, out)
    _write_card(out, "qwen2_vl", seed)
    return out


def tiny_qwen2vl(*, hidden: int = 64, layers: int = 2, heads: int = 2, intermediate: int = 128,
                 vision_depth: int = 2, vision_dim: int = 64, vision_heads: int = 2, min_pixels: int = 28 * 28,
                 max_pixels: int = 448 * 448, init_std: float = 0.02,
                 extra_words: Iterable[str] = ()) -> tuple[Any, Any]:
    """A float32 Qwen2-VL of the given size with its processor (the word tokenizer and the chat
    template vLLM renders). Head sizes must be ones vLLM's CPU attention supports (32, 64, ...);
    the rotary sections assume head size 32."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if hidden // heads != 32 or vision_dim // vision_heads != 32:
        raise ValueError(f"head size must be 32 (hidden {hidden} / heads {heads}, "
                         f"vision {vision_dim} / {vision_heads})")
    raw = _word_tokenizer(QWEN_SPECIAL, unk="<unk>", extra_words=extra_words)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=init_std),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           initializer_range=init_std),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    return model, processor


def save_qwen2vl(model: Any, processor: Any, out: Path) -> None:
    """The model directory vLLM loads: weights (safetensors), config, processor and tokenizer."""
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_llava(out: str | Path, seed: int = 0, init_std: float = 0.4) -> Path:
    """A tiny LLaVA-1.5-style model: CLIP vision tower (2 layers) + Llama (2 layers), head size 32.

    `init_std`: see build_tiny_qwen2vl."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out)
    torch.manual_seed(seed)
    raw = _word_tokenizer(LLAVA_SPECIAL, unk="<unk>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_size, patch = 56, 14
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                       initializer_range=init_std, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    _remap_llava_weights(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)
    _write_card(out, "llava", seed)
    return out


def _remap_llava_weights(out: Path) -> None:
    """transformers 5.19 saves LLaVA's vision tower without the CLIP `vision_model.` level (and,
    depending on the version, under `model.`, with `model.language_model.*` and `lm_head.*`); vLLM 0.32's LLaVA
    loader expects the original checkpoint layout (vision_tower.vision_model.*, language_model.model.*,
    language_model.lm_head.*, multi_modal_projector.*). Rename so vLLM loads it as it loads a real LLaVA-1.5
    checkpoint."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for name, t in tensors.items():
        if name.startswith(("model.vision_tower.", "vision_tower.")):
            rest = name.split("vision_tower.", 1)[1]
            new = "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
        elif name.startswith("model.multi_modal_projector."):
            new = name[len("model."):]
        elif name.startswith("model.language_model."):
            new = "language_model.model." + name[len("model.language_model."):]
        elif name.startswith("lm_head."):
            new = "language_model." + name
        else:
            new = name
        renamed[new] = t.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})


def _write_card(out: Path, arch: str, seed: int) -> None:
    (out / "HOLICLIP_TINY_VLM.json").write_text(json.dumps({
        "architecture": arch, "seed": seed, "random_weights": True,
        "note": "randomly initialised by demo.tiny_vlm: its captions are placeholders, not descriptions",
    }, indent=1))


BUILDERS = {"qwen2_vl": build_tiny_qwen2vl, "llava": build_tiny_llava}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="qwen2_vl")
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = BUILDERS[args.arch](args.out, seed=args.seed)
    print(f"tiny {args.arch} written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
