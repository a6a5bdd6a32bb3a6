"""Exported models load without DeepSpeed and give the same embeddings (in-process; the
DeepSpeed-to-export path of every ZeRO stage is covered by test_train_launch.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.export import ExportError, export_checkpoint, load_exported, probe_inputs
from train.model import HolisticCLIP, load_model_config
from train.tokenizer import HFTokenizer, load_tokenizer

TEXT_IDS = ["raw", "detail", "background"]


def model(branch="cls", h=3, **changes) -> HolisticCLIP:
    torch.manual_seed(0)
    return HolisticCLIP(dataclasses.replace(load_model_config("tiny"), branch=branch, num_branches=h, **changes)).eval()


def probe_of(m: HolisticCLIP, tokenizer) -> dict:
    images, tokens = probe_inputs(tokenizer, m.config.image_size)
    with torch.no_grad():
        out = m(images, tokens)
    return {"images": images, "tokens": tokens, "image_embeddings": out["image"], "text_embeddings": out["text"]}


def test_round_trip_layout_and_meta(tmp_path):
    m, tok = model(), load_tokenizer("clip", 32)
    out = export_checkpoint(tmp_path / "export", m, m.config, text_ids=TEXT_IDS, tokenizer="clip",
                            training={"step": 7}, probe=probe_of(m, tok))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "probe.safetensors"]
    loaded, tokenizer, meta = load_exported(out)
    assert meta["format"] == "holiclip-export/1" and meta["branch"] == "cls" and meta["num_branches"] == 3
    assert meta["text_ids"] == TEXT_IDS and meta["branch_text_ids"] == TEXT_IDS and meta["training"] == {"step": 7}
    assert meta["tokenizer"] == {"name": "clip", "context_length": 32, "vocab_size": 49408, "text_pool": "argmax",
                                 "pad_token_id": 0}
    assert meta["preprocess"]["image_size"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["probe_check"]["max_abs_diff"] < 1e-6
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    images, tokens = probe_inputs(tokenizer, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), m.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), m.encode_text(tokens))


def test_branch_text_ids_when_h_differs_from_m(tmp_path):
    m = model("mlp", 5)
    meta = load_exported(export_checkpoint(tmp_path, m.state_dict(), m.config, text_ids=TEXT_IDS, tokenizer="clip"))[2]
    assert meta["branch_text_ids"] == TEXT_IDS + [None, None]  # branches 3 and 4 had no text of their own
    assert "probe_check" not in meta  # no probe given, nothing to check


def test_probe_catches_weights_that_do_not_belong(tmp_path):
    m, tok = model(), load_tokenizer("clip", 32)
    out = export_checkpoint(tmp_path, m, m.config, text_ids=TEXT_IDS, tokenizer="clip", probe=probe_of(m, tok))
    weights = load_file(str(out / "model.safetensors"))
    weights["visual.proj.weight"] = torch.randn_like(weights["visual.proj.weight"])
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="does not reproduce the embeddings"):
        load_exported(out)
    assert load_exported(out, verify=False)[2]["num_branches"] == 3


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        load_exported(tmp_path)
    m = model()
    out = export_checkpoint(tmp_path / "e", m, m.config, text_ids=TEXT_IDS, tokenizer="clip")
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["num_branches"] = 4
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="does not match config.json"):
        load_exported(out)


def test_hugging_face_tokenizer_travels_with_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    # A word-level tokenizer whose end token [SEP] is not its largest id: "argmax" pooling would
    # read the wrong position, "last" (the last non-pad token) reads [SEP].
    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "a": 3, "red": 4, "circle": 5, "square": 6}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                                sep_token="[SEP]")
    fast.save_pretrained(tmp_path / "hf")

    tok = load_tokenizer(tmp_path / "hf", context_length=32)
    assert isinstance(tok, HFTokenizer) and (tok.text_pool, tok.pad_token_id, tok.vocab_size) == ("last", 0, 7)
    ids = tok(["a red circle", "a square"])
    assert ids[0, :4].tolist() == [3, 4, 5, 2] and ids[1, :4].tolist() == [3, 6, 2, 0]
    m = model(vocab_size=tok.vocab_size, text_pool=tok.text_pool, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        pooled = m.encode_text(ids)
        padded = ids.clone()
        padded[:, 10] = 5
        assert not torch.allclose(m.encode_text(padded), pooled)  # a non-pad token there moves the pool...
        longer = ids.clone()
        longer[0, 4:] = 0
        assert torch.allclose(m.encode_text(longer), pooled)  # ...pad tokens do not

    out = export_checkpoint(tmp_path / "export", m, m.config, text_ids=["raw"], tokenizer=str(tmp_path / "hf"),
                            probe=probe_of(m, tok))
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    shutil.rmtree(tmp_path / "hf")  # the export must not depend on the original directory
    loaded, tokenizer, meta = load_exported(out)
    assert meta["tokenizer"]["name"] == "tokenizer" and meta["tokenizer"]["text_pool"] == "last"
    assert torch.equal(tokenizer(["a red circle"]), ids[:1])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(ids), pooled, atol=1e-6)


# ----------------------------------------------------------------------------- branch profile (adaptive fusion)


@pytest.fixture(scope="module")
def texts_data(tmp_path_factory):
    from synthetic_data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("profile") / "ds", shards=3, per_shard=16, size=16)


def test_branch_profile_round_trip(tmp_path, texts_data):
    from train.export import PROFILE_FILE, add_branch_profile, embed_text_list, load_branch_profile, main

    m, tok = model(h=4), load_tokenizer("clip", 32)  # H = 4 > 3 texts: branch 3 has no profile
    out = export_checkpoint(tmp_path / "export", m, m.config, text_ids=TEXT_IDS, tokenizer="clip",
                            training={"data": [str(texts_data)]}, probe=probe_of(m, tok))
    meta = load_exported(out)[2]
    assert "branch_profile" not in meta and load_branch_profile(out, meta) is None  # an export without one loads

    section = add_branch_profile(out, texts_per_id=10)  # the shards the export records
    assert section["texts"] == {"raw": 10, "detail": 10, "background": 10} and section["samples_read"] == 10
    assert section["data"] == [str(texts_data)] and 0.001 <= section["temperature"] <= 10
    assert section["method"] == "centred-nearest" and section["k"] == 1 and 0 <= section["own_branch_top"] <= 1
    loaded, tokenizer, meta = load_exported(out)  # the probe still checks: the weights are untouched
    assert meta["branch_profile"] == section and (out / PROFILE_FILE).is_file()
    profile = load_branch_profile(out, meta)
    assert profile.texts.shape == (section["rows"], 32) and set(profile.branch.tolist()) == {0, 1, 2}
    assert profile.num_branches == 4 and profile.temperature == section["temperature"] and profile.k == 1
    assert torch.allclose(profile.texts.norm(dim=1), torch.ones(len(profile.texts)))
    # Branch h: the distinct strings of the first half of its text id's sample, and their mean (the
    # other half fits the temperature); branch 3 (no text) has neither.
    first_half = load_raw_sample(texts_data, "raw", 10)[:5]
    embedded = embed_text_list(loaded, tokenizer, first_half)
    assert torch.allclose(profile.means[0], embedded.mean(0), atol=1e-5) and not profile.means[3].any()
    distinct = embed_text_list(loaded, tokenizer, list(dict.fromkeys(first_half)))
    assert torch.allclose(profile.texts[profile.branch == 0], distinct, atol=1e-5)
    # A query whose own content (less the queries' common part) is one of branch h's training
    # texts (less its branch's mean) puts most weight on that branch; branch 3 gets none.
    for row, h in zip(profile.texts, profile.branch.tolist(), strict=True):
        w = profile.weights((row - profile.means[h] + profile.mean)[None])
        assert w.argmax() == h and w[0, 3] == 0, (h, w)

    # The CLI adds it to an export that has none; without recorded shards it says to give --data.
    bare = export_checkpoint(tmp_path / "bare", m, m.config, text_ids=TEXT_IDS, tokenizer="clip")
    assert main(["--add-branch-profile", str(bare), "--texts-per-id", "4"]) == 1
    assert main(["--add-branch-profile", str(bare), "--data", str(texts_data), "--texts-per-id", "4"]) == 0
    assert load_branch_profile(bare, load_exported(bare)[2]).texts.shape[1] == 32
    # A profile that does not belong to the model is named.
    meta = json.loads((bare / "config.json").read_text())
    save_file({"texts": torch.zeros(2, 16), "branch": torch.zeros(2, dtype=torch.long), "means": torch.zeros(4, 16),
               "mean": torch.zeros(16)}, str(bare / PROFILE_FILE))
    with pytest.raises(ExportError, match="texts of shape"):
        load_branch_profile(bare, meta)
    (bare / PROFILE_FILE).unlink()
    with pytest.raises(ExportError, match="missing"):
        load_branch_profile(bare, meta)


def load_raw_sample(data, text_id: str, n: int) -> list[str]:
    """The texts sample_training_texts takes: shards in its seeded order, first n usable texts."""
    from train.export import sample_training_texts

    texts, _ = sample_training_texts([str(data)], [text_id], n)
    return texts[text_id]
