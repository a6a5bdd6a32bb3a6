"""Tests of the CLIP BPE tokenizer (and the Hugging Face wrapper when transformers is installed)."""

import pickle

import pytest
import torch

from train import tokenizer as tokenizer_module
from train.tokenizer import DEFAULT_BPE_PATH, ClipTokenizer, HFTokenizer, load_tokenizer

SOT, EOT = 49406, 49407

# Produced by open_clip 2.24.0's SimpleTokenizer (OpenAI's code, with ftfy) on the same vocabulary.
KNOWN = [
    ("a photo of a cat", [SOT, 320, 1125, 539, 320, 2368, EOT]),
    ("A PHOTO of a Dog.", [SOT, 320, 1125, 539, 320, 1929, 269, EOT]),
    ("don't won't I'M we'll they'd", [SOT, 847, 713, 1749, 713, 328, 880, 649, 1342, 889, 1896, EOT]),
    ("snake_case_name and CamelCase", [SOT, 8798, 318, 2068, 318, 1981, 537, 27005, 2068, EOT]),
    ("supercalifragilisticexpialidocious", [SOT, 1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, EOT]),
    ("emoji 😀🎉 test", [SOT, 16327, 12832, 3986, 1628, EOT]),
    ("日本語のテキスト", [SOT, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, EOT]),
    ("“curly quotes” and ‘single’", [SOT, 257, 20795, 5808, 257, 537, 568, 17005, 262, EOT]),
    (
        "Hello   World!! it's 2024, café &amp; naïve",
        [SOT, 3306, 1002, 748, 585, 568, 273, 271, 273, 275, 267, 15304, 261, 1097, 35689, 563, EOT],
    ),
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.mark.parametrize("text,ids", KNOWN)
def test_known_encodings(tok, text, ids):
    row = tok([text])[0]
    assert row[: len(ids)].tolist() == ids
    assert row[len(ids) :].eq(0).all()


def test_vocabulary_and_special_tokens(tok):
    assert (tok.pad_token_id, tok.text_pool) == (0, "argmax")  # what the model config gets
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)
    assert tok.context_length == 77 and tok.name == "clip"


def test_batch_shape_and_padding(tok):
    out = tok(["a cat", "", "a photo of a dog on the grass"])
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out[1, :3].tolist() == [SOT, EOT, 0]
    # Every row has exactly one start and one end token, the end token being the largest id.
    assert (out == SOT).sum(1).tolist() == [1, 1, 1]
    assert (out.argmax(1) == (out == EOT).int().argmax(1)).all()
    assert tok("a cat").shape == (1, 77)


@pytest.mark.parametrize("context_length", [77, 10])
def test_truncation_keeps_end_token(context_length):
    tok = ClipTokenizer(context_length=context_length)
    text = " ".join(["photograph", "of", "a", "mountain", "lake"] * 40)
    ids = tok.encode(text)
    assert len(ids) > context_length
    row = tok([text])[0]
    assert row.shape == (context_length,)
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1].tolist() == ids[: context_length - 2]


def test_whitespace_and_html_cleanup(tok):
    assert torch.equal(tok(["  A  Photo\tof\n a cat  "]), tok(["a photo of a cat"]))
    assert torch.equal(tok(["cats &amp; dogs"]), tok(["cats & dogs"]))


def test_decode_round_trip(tok):
    assert tok.decode(tok(["A photo of a cat, on the grass!"])[0]) == "a photo of a cat , on the grass !"


def test_pickle_round_trip(tok):
    # Dataloader workers may receive the tokenizer by pickle.
    clone = pickle.loads(pickle.dumps(tok))
    texts = [t for t, _ in KNOWN]
    assert torch.equal(clone(texts), tok(texts))


def test_load_tokenizer(tmp_path):
    assert load_tokenizer().name == "clip"
    explicit = load_tokenizer(DEFAULT_BPE_PATH, context_length=16)
    assert explicit.name == str(DEFAULT_BPE_PATH) and explicit(["a cat"]).shape == (1, 16)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "missing.txt.gz")
    broken = tmp_path / "broken.txt.gz"
    broken.write_text("not gzip")
    with pytest.raises(ValueError, match="cannot read BPE vocabulary"):
        ClipTokenizer(broken)


def test_stdlib_pattern_agrees_with_regex_pattern():
    # Without the `regex` package the tokenizer falls back to an approximation with `re`.
    regex = pytest.importorskip("regex")
    import re

    texts = [t for t, _ in KNOWN] + ["a_b __ x--y 3.5kg, naïve Ελληνικά Русский!? 12ab"]
    for text in texts:
        text = tokenizer_module.clean_text(text)
        expected = regex.findall(tokenizer_module.WORD_PATTERN, text, regex.IGNORECASE)
        assert re.findall(tokenizer_module.WORD_PATTERN_STDLIB, text, re.IGNORECASE) == expected


def test_hugging_face_tokenizer_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A tiny word-level tokenizer saved in the Hugging Face format, built offline.
    raw = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "cat": 3, "dog": 4}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)

    tok = load_tokenizer(tmp_path, context_length=4)
    assert isinstance(tok, HFTokenizer)
    assert tok.name == str(tmp_path) and tok.vocab_size == 5 and tok.context_length == 4
    out = tok(["a cat", "a dog a cat a dog"])
    assert out.dtype == torch.long
    assert out.tolist() == [[2, 3, 0, 0], [2, 4, 2, 3]]
    assert (tok.pad_token_id, tok.text_pool) == (0, "last")  # its end token is not its largest id


def test_hugging_face_tokenizer_without_pad_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    # GPT-2-like: no pad token, an end-of-sequence token: padding uses the end token's id.
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "a": 2, "cat": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, context_length=5)
    assert tok.pad_token_id == 0 and tok(["a cat"]).tolist() == [[2, 3, 0, 0, 0]]
