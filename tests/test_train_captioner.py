"""The demo's captioner trainer: a few steps of real training, and the result served by real vLLM.

`python -m demo.train_captioner` must write a model directory vLLM 0.32 loads unchanged, whose
greedy captions through vLLM are the ones the trainer's own (transformers) greedy decoding
wrote into its card; its tokenizer must know every word it is taught; its card must say how it
was made. The shipped captioners (demo/captioners/) are checked for what the demo relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from demo import scenes as sc
from demo import train_captioner as tc

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "demo" / "captioners").iterdir() if (p / "config.json").is_file())

# Run in a child process: vLLM starts its engine core with spawn, which needs an importable main.
VLLM_CAPTIONS = """
import json, sys
from transformers import AutoProcessor
from vllm import LLM, SamplingParams
from demo import scenes as sc
from demo.train_captioner import heldout_scenes
from pipeline.caption.backends import chat_messages

def main():
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    card = json.load(open(model + "/HOLICLIP_TINY_VLM.json"))
    processor = AutoProcessor.from_pretrained(model)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, limit_mm_per_prompt={"image": 1})
    requests = []
    for _, image in heldout_scenes(card["seed"], card["heldout"]["scenes"], card["image_size"]):
        for prompt in prompts.values():
            text = processor.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
            requests.append({"prompt": text, "multi_modal_data": {"image": image}})
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=40))
    print("CAPTIONS " + json.dumps([o.outputs[0].text.strip() for o in outputs]))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captioner") / "tiny"
    r = subprocess.run([sys.executable, "-m", "demo.train_captioner", "--out", str(out), "--style", "terse",
                        "--seed", "5", "--steps", "40", "--heldout", "2", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_the_card_says_how_the_captioner_was_made(trained):
    card = json.loads((trained / "HOLICLIP_TINY_VLM.json").read_text())
    assert card["random_weights"] is False and card["trained_by"] == "demo.train_captioner"
    assert (card["style"], card["seed"], card["steps"]) == ("terse", 5, 40)
    assert "--seed 5" in card["command"] and "--steps 40" in card["command"]
    assert re.fullmatch(r"[0-9a-f]{64}", card["data_sha256"])
    assert card["prompts"] == tc.default_prompts()
    assert len(card["heldout"]["examples"]) == 2 and set(card["heldout"]["examples"][0]["captions"]) == set(
        tc.default_prompts())
    assert (trained / "model.safetensors").stat().st_size < 10 << 20


@pytest.fixture
def keep_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train() sets its own; later tests in this process keep theirs


def test_training_goes_on_from_a_captioner_and_its_card_keeps_the_history(trained, tmp_path, keep_threads):
    with pytest.raises(ValueError, match="not a 'plain' captioner"):
        tc.train(tmp_path / "x", "plain", 6, 1, 1, 1e-4, 1, 0, 96, "cmd", progress=False, init=trained)
    card = tc.train(tmp_path / "more", "terse", 6, 2, 1, 1e-4, 1, 0, 96, "the second command", progress=False,
                    init=trained)
    first = json.loads((trained / "HOLICLIP_TINY_VLM.json").read_text())
    assert (card["steps"], card["total_steps"], card["command"]) == (2, 42, "the second command")
    assert card["init"]["command"] == first["command"] and card["init"]["data_sha256"] == first["data_sha256"]
    assert json.loads((tmp_path / "more" / "HOLICLIP_TINY_VLM.json").read_text()) == card


def test_the_tokenizer_knows_every_word_it_is_taught(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    words = tc.vocabulary() | {w for p in tc.default_prompts().values() for w in re.findall(r"[a-z]+", p.lower())}
    assert {"circles", "crosses", "drawing", "flat", "gray", "squares", "tones", "triangles", "user",
            "assistant"} <= words
    unknown = sorted(w for w in words if tok.convert_tokens_to_ids(w) == tok.unk_token_id)
    assert not unknown
    # every phrasing of every style round-trips through the tokenizer
    labels = dict(shape="cross", colour="yellow", count="three", position="bottom right", background="purple")
    for style in tc.STYLES:
        for prompt_id, options in tc.STYLES[style].items():
            for _, phrase in options:
                text = phrase(labels)
                assert tok.unk_token_id not in tok(text)["input_ids"], (style, prompt_id, text)


def test_the_training_stream_is_fixed_by_the_seed():
    from transformers import AutoProcessor  # noqa: F401 - the processor is needed by _batch

    from demo.tiny_vlm import tiny_qwen2vl

    _, processor = tiny_qwen2vl(hidden=128, heads=4, vision_dim=128, vision_heads=4, min_pixels=tc.IMAGE_PIXELS,
                                max_pixels=tc.IMAGE_PIXELS, extra_words=tc.vocabulary())

    def stream(seed: int) -> str:
        digest, rng = hashlib.sha256(), random.Random(seed)
        for _ in range(2):
            tc._batch(rng, 2, "plain", tc.default_prompts(), processor, 96, digest)
        return digest.hexdigest()

    assert stream(1) == stream(1) != stream(2)


def test_the_phrasings_name_the_truth_and_differ_from_the_reference_texts():
    rng = random.Random(0)
    for _ in range(50):
        labels = sc.make_scene(rng).labels()
        references = set(sc.reference_texts(labels).values())
        for style in tc.STYLES:
            for prompt_id, options in tc.STYLES[style].items():
                for _, phrase in options:
                    text = phrase(labels)
                    assert text not in references
                    assert all(sc.score_caption(text, labels).values()), (style, prompt_id, text)


@pytest.mark.slow
def test_vllm_serves_the_trained_captioner_unchanged(trained, tmp_path):
    script = tmp_path / "vllm_captions.py"
    script.write_text(VLLM_CAPTIONS)
    r = subprocess.run([sys.executable, str(script), str(trained), json.dumps(tc.default_prompts())], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1",
                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    served = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("CAPTIONS "))[9:])
    card = json.loads((trained / "HOLICLIP_TINY_VLM.json").read_text())
    written = [c for example in card["heldout"]["examples"] for c in example["captions"].values()]
    assert served == written


@pytest.mark.parametrize("model", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_captioner_is_small_and_its_card_is_complete(model):
    card = json.loads((model / "HOLICLIP_TINY_VLM.json").read_text())
    assert sum(p.stat().st_size for p in model.iterdir()) < 10 << 20
    while True:  # each stage of its training, the last first
        for key in ("command", "seed", "steps", "data_sha256", "style"):
            assert card[key], key
        assert f"--out {model.relative_to(ROOT)}" in card["command"]  # the command that made it, as run here
        if "init" not in card:
            break
        assert f"--init {model.relative_to(ROOT)}" in card["command"]
        card = card["init"]


def test_two_captioners_are_shipped_with_different_seeds_and_styles():
    cards = [json.loads((m / "HOLICLIP_TINY_VLM.json").read_text()) for m in SHIPPED]
    assert len(cards) == 2
    assert len({c["seed"] for c in cards}) == 2 and len({c["style"] for c in cards}) == 2
