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
