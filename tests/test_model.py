"""Tests of the Holistic CLIP model: shapes, branch designs, parameter counts, config validation."""

import dataclasses
import json
import math
import re

import pytest
import torch

from train.model import (
    CONFIG_DIR,
    HolisticCLIP,
    ModelConfig,
    count_parameters,
    load_model_config,
    param_groups,
)

TINY = load_model_config("tiny")
EOT = 49407


def build(branch: str = "none", num_branches: int = 1, **overrides) -> HolisticCLIP:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, branch=branch, num_branches=num_branches, **overrides)
    return HolisticCLIP(cfg).eval()


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))


def tokens(*shape: int, length: int = 9) -> torch.Tensor:
    """Random token rows of `length` ids ending in EOT, zero-padded to the context length."""
    ids = torch.zeros(*shape, TINY.context_length, dtype=torch.long)
    ids[..., :length] = torch.randint(1, 49406, (*shape, length), generator=torch.Generator().manual_seed(2))
    ids[..., length - 1] = EOT
    return ids


@pytest.mark.parametrize("branch,h", [("none", 1), ("cls", 1), ("cls", 3), ("mlp", 3)])
def test_shapes_and_normalisation(branch, h):
    model = build(branch, h)
    out = model(images(2), tokens(2, 4))
    assert out["image"].shape == (2, h, TINY.embed_dim)
    assert out["text"].shape == (2, 4, TINY.embed_dim)
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(2, h), atol=1e-5)
    assert torch.allclose(out["text"].norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    assert model.encode_text(tokens(5)).shape == (5, TINY.embed_dim)
    raw = model.encode_image(images(2), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2, h))
    # Branches are distinct embeddings, not copies.
    if h > 1:
        assert not torch.allclose(out["image"][:, 0], out["image"][:, 1])


@pytest.mark.parametrize("h", [1, 2, 5])
def test_cls_extra_parameters(h):
    extra = count_parameters(build("cls", h)) - count_parameters(build("none"))
    assert extra == 2 * (h - 1) * TINY.vision_width


@pytest.mark.parametrize("h,layers", [(2, 1), (4, 2), (3, 3)])
def test_mlp_extra_parameters(h, layers):
    w = TINY.vision_width
    extra = count_parameters(build("mlp", h, vision_layers=3, mlp_branch_layers=layers))
    extra -= count_parameters(build("none", vision_layers=3))
    assert extra == (h - 1) * layers * (4 * w * w + w)


def test_vit_b16_sizes():
    cfg = load_model_config("vit_b16")
    with torch.device("meta"):  # count without allocating 150M parameters
        plain = count_parameters(HolisticCLIP(cfg))
        mlp = count_parameters(HolisticCLIP(dataclasses.replace(cfg, branch="mlp", num_branches=5)))
    assert plain == 149_620_737  # OpenAI CLIP ViT-B/16
    assert mlp - plain == 4 * 3 * (4 * 768 * 768 + 768)  # the paper's "about +28M" at H = 5


def test_cls_mask_blocks_only_class_to_class():
    mask = build("cls", 3).visual.attn_mask
    num_tokens = 3 + (TINY.image_size // TINY.patch_size) ** 2
    assert mask.dtype == torch.bool and mask.shape == (num_tokens, num_tokens)
    assert torch.equal(mask[:3, :3], torch.eye(3, dtype=torch.bool))
    assert mask[:3, 3:].all() and mask[3:].all()
    assert build("none").visual.attn_mask is None


def test_cls_tokens_do_not_attend_to_each_other():
    # One block: patches attend to every class token, so after two blocks token j reaches token i
    # through the patches, by design. Within one block, token i must ignore token j.
    model = build("cls", 3, vision_layers=1)
    x = images(2)
    with torch.no_grad():
        before = model.encode_image(x)
        model.visual.class_embedding[1] += torch.randn(TINY.vision_width)
        after = model.encode_image(x)
        model.visual.attn_mask = None  # control: without the mask the change leaks into token 0
        leaked = model.encode_image(x)
    assert torch.allclose(after[:, [0, 2]], before[:, [0, 2]], atol=1e-6)
    assert not torch.allclose(after[:, 1], before[:, 1], atol=1e-3)
    assert not torch.allclose(leaked[:, 0], after[:, 0], atol=1e-3)


def test_mlp_branches_are_independent_streams():
    model = build("mlp", 3, vision_layers=3, mlp_branch_layers=2)
    x = images(3)
    with torch.no_grad():
        before = model.encode_image(x)
        for block in model.visual.blocks[1:]:
            block.mlp_proj[2].weight.mul_(3.0)
        after = model.encode_image(x)
    assert torch.allclose(after[:, :2], before[:, :2], atol=1e-6)
    assert not torch.allclose(after[:, 2], before[:, 2], atol=1e-3)


def test_mlp_with_identical_heads_equals_plain_clip():
    # Copies of one model's second MLP linear in every branch must give that model's embedding in
    # every branch, image by image: checks how streams are laid out and folded back to (B, H, D).
    plain = build("none", vision_layers=3)
    model = build("mlp", 3, vision_layers=3, mlp_branch_layers=2)
    source = plain.state_dict()
    state = {k: source[re.sub(r"mlp_proj\.\d+", "mlp_proj.0", k)] for k in model.state_dict()}
    model.load_state_dict(state)
    x = images(4)
    with torch.no_grad():
        expected = plain.encode_image(x)
        got = model.encode_image(x)
    assert torch.allclose(got, expected.expand_as(got), atol=1e-5)


def test_text_pools_at_end_token_with_causal_mask():
    model = build()
    ids = tokens(2, length=6)
    with torch.no_grad():
        base = model.encode_text(ids)
        after_end = ids.clone()
        after_end[:, 10] = 1234  # past <end_of_text>: invisible to it through the causal mask
        before_end = ids.clone()
        before_end[:, 2] = 1234
        assert torch.allclose(model.encode_text(after_end), base, atol=1e-6)
        assert not torch.allclose(model.encode_text(before_end), base, atol=1e-3)


def test_text_pools_at_last_non_pad_token():
    # text_pool "last" (any tokenizer whose end token is not its largest id): the embedding is read
    # at the last position that is not pad_token_id, and padding after it does not matter.
    model = build(text_pool="last", pad_token_id=5)
    ids = torch.full((2, TINY.context_length), 5, dtype=torch.long)
    ids[0, :4] = torch.tensor([7, 8, 9, 1])  # the last real token (1) is not the largest id (9)
    ids[1, :2] = torch.tensor([7, 3])
    argmax = build(text_pool="argmax")
    with torch.no_grad():
        base = model.encode_text(ids)
        changed = ids.clone()
        changed[0, 4:] = 5  # more padding: nothing moves
        assert torch.allclose(model.encode_text(changed), base)
        changed[0, 6] = 11  # a real token later on: the pooled position moves there
        assert not torch.allclose(model.encode_text(changed)[0], base[0], atol=1e-4)
        # Same weights, argmax pooling reads position 2 (id 9) instead of 3: another embedding.
        argmax.load_state_dict(model.state_dict())
        assert not torch.allclose(argmax.encode_text(ids)[0], base[0], atol=1e-4)


def test_gradients_reach_every_parameter():
    model = build("mlp", 3).train()
    out = model(images(2), tokens(2, 2))
    (out["image"].sum() + out["text"].sum() + out["logit_scale"].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_logit_scale_shape_init_and_clamp():
    model = build()
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out = model(images(1), tokens(1))
    assert out["logit_scale"].shape == (1,)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images(1), tokens(1))["logit_scale"].item() == pytest.approx(100.0)
    # The trainer clamps the parameter after each step (train.main.clamp_logit_scale); at the bound
    # the forward's clamp still passes the gradient, so the scale can come down again.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model(images(1), tokens(1))["logit_scale"].sum().backward()
    assert model.logit_scale.grad.item() == pytest.approx(100.0, rel=1e-5)


def test_param_groups():
    model = build("cls", 3)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay_names = {by_id[id(p)] for p in decay["params"]}
    no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(by_id.values())
    for name in no_decay_names:
        assert name.endswith((".bias", "class_embedding", "positional_embedding", "logit_scale")) or ".ln_" in name
    for name in by_id.values():
        if name.endswith(".bias") or ".ln_" in name:
            assert name in no_decay_names
    embeddings = {"visual.class_embedding", "visual.positional_embedding", "text.positional_embedding"}
    assert embeddings | {"logit_scale"} <= no_decay_names
    assert {
        "visual.patch_embed.weight",
        "visual.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.blocks.1.mlp_proj.0.weight",
        "text.token_embedding.weight",
        "text.proj.weight",
    } <= decay_names
    torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3)  # accepted as is


def test_load_model_config_by_name_and_path():
    assert load_model_config("tiny") == load_model_config("tiny.json") == load_model_config(CONFIG_DIR / "tiny.json")
    assert load_model_config("vit_b16").vision_width == 768
    with pytest.raises(ValueError, match="no built-in config.*tiny.*vit_b16"):
        load_model_config("nope")


def write_config(tmp_path, **changes):
    data = {**json.loads((CONFIG_DIR / "tiny.json").read_text()), **changes}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"widht": 64}, "unknown key 'widht'"),
        ({"embed_dim": None}, "missing key 'embed_dim'"),
        ({"vision_layers": "2"}, "'vision_layers' must be a positive integer"),
        ({"vision_heads": 0}, "'vision_heads' must be a positive integer"),
        ({"vision_heads": 3}, "'vision_width' must be divisible by 'vision_heads'"),
        ({"branch": "attention"}, "'branch' must be one of"),
        ({"num_branches": 3}, "'num_branches' must be 1 when branch is 'none'"),
        ({"text_pool": "first"}, "'text_pool' must be one of ('argmax', 'last')"),
        ({"pad_token_id": -1}, "'pad_token_id' must be a non-negative integer"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, changes, message):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(f"model config {path}: {message}")):
        load_model_config(path)


def test_config_overrides_are_validated():
    assert dataclasses.replace(TINY, branch="cls", num_branches=4).num_branches == 4
    with pytest.raises(ValueError, match="'mlp_branch_layers'"):
        dataclasses.replace(TINY, branch="mlp", num_branches=2, mlp_branch_layers=5)
    with pytest.raises(ValueError, match="'image_size'"):
        dataclasses.replace(TINY, image_size=30)
    with pytest.raises(ValueError, match="'num_branches' must be a positive integer"):
        ModelConfig(**{**dataclasses.asdict(TINY), "branch": "cls", "num_branches": 0})
