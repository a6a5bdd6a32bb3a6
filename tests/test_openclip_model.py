"""Checkpoints both ways with OpenCLIP (train/openclip.py): an OpenCLIP model built from its own
model code and ours give the same embeddings for the same weights, images and texts.

OpenCLIP's model code (`open_clip/model.py`, `transformer.py` and the modules they import) is
taken from its released wheel (open_clip_torch 3.3.0, `pip download --no-deps` into a temporary
directory: read here, never committed) and run in a subprocess with an empty package
`__init__` (the real one imports its image transforms, which need torchvision) and a placeholder
for the one torchvision name `utils.py` imports (FrozenBatchNorm2d, for ResNets only); its
optional transformers and timm imports are made to fail, as where they are not installed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.model import HolisticCLIP, load_model_config
from train.openclip import (
    ConversionError,
    config_from_openclip,
    from_openclip,
    init_from_openclip,
    main,
    to_openclip,
)
from train.tokenizer import load_tokenizer

MODULES = ("model.py", "transformer.py", "utils.py", "pos_embed.py", "hf_model.py", "hf_configs.py",
           "modified_resnet.py", "timm_model.py")

# Builds OpenCLIP's CLIP at the tiny size (our model_configs/tiny.json) for each job: with the
# given weights (strictly) or its own random ones (saved), and writes its normalised embeddings.
RUN_OPENCLIP = """
import json, sys
sys.modules["transformers"] = None; sys.modules["timm"] = None  # optional in OpenCLIP: absent here
import torch
from safetensors.torch import load_file, save_file
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
inputs = load_file(sys.argv[1])
out = {}
for job in json.loads(sys.argv[2]):
    torch.manual_seed(job["seed"])
    model = CLIP(32, CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=4, layers=2),
                 quick_gelu=job["quick_gelu"]).eval()
    if job.get("weights"):
        model.load_state_dict(load_file(job["weights"]), strict=True)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, job["save"])
    with torch.no_grad():
        out[job["name"] + "/image"] = model.encode_image(inputs["images"], normalize=True)
        out[job["name"] + "/text"] = model.encode_text(inputs["tokens"], normalize=True)
save_file(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def openclip_site(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("open_clip_model")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "open_clip_torch==3.3.0", "--no-deps", "--quiet",
                           "-d", str(where)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    package = where / "site" / "open_clip"
    package.mkdir(parents=True)
    with zipfile.ZipFile(next(where.glob("open_clip_torch-*.whl"))) as z:
        for name in MODULES:
            (package / name).write_bytes(z.read(f"open_clip/{name}"))
    (package / "__init__.py").write_text("")
    ops = where / "site" / "torchvision" / "ops"
    ops.mkdir(parents=True)
    (ops.parent / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("")
    (ops / "misc.py").write_text("class FrozenBatchNorm2d:  # placeholder: only ResNet towers use it\n    pass\n")
    return where / "site"


def run_openclip(site: Path, work: Path, inputs: dict, jobs: list[dict]) -> dict[str, torch.Tensor]:
    save_file(inputs, str(work / "inputs.safetensors"))
    done = subprocess.run([sys.executable, "-c", RUN_OPENCLIP, str(work / "inputs.safetensors"), json.dumps(jobs),
                           str(work / "out.safetensors")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(work / "out.safetensors"))


def test_openclip_and_ours_give_the_same_embeddings_both_ways(openclip_site, tmp_path):
    torch.manual_seed(0)
    tiny = load_model_config("tiny")
    images = torch.randn(3, 3, 32, 32)
    tokens = load_tokenizer("clip", tiny.context_length)(["a red circle", "a plain gray background", "bright tones"])

    # Ours -> OpenCLIP: H = 1 directly; H = 3 (Psi_CLS, Psi_MLP) one chosen branch, made to differ from the others.
    ours = {"none": HolisticCLIP(tiny).eval()}
    for branch in ("cls", "mlp"):
        ours[branch] = HolisticCLIP(dataclasses.replace(tiny, branch=branch, num_branches=3)).eval()
    jobs = [{"name": "theirs", "seed": 1, "quick_gelu": False, "save": str(tmp_path / "theirs.safetensors")},
            {"name": "theirs_quick", "seed": 2, "quick_gelu": True, "save": str(tmp_path / "quick.safetensors")}]
    for name, model in ours.items():
        state = to_openclip(model.state_dict(), model.config, None if name == "none" else 1, approximate=name == "cls")
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        jobs.append({"name": name, "seed": 0, "quick_gelu": False, "weights": str(tmp_path / f"{name}.safetensors")})
    got = run_openclip(openclip_site, tmp_path, {"images": images, "tokens": tokens}, jobs)

    with torch.no_grad():
        for name, model in ours.items():
            branch = 0 if name == "none" else 1
            image = model.encode_image(images)
            assert torch.allclose(got[f"{name}/text"], model.encode_text(tokens), atol=1e-5), name
            if name == "cls":  # approximate: our patches also attend to the other class tokens
                cosine = (got["cls/image"] * image[:, branch]).sum(-1)
                print("cls export, cosine with branch 1:", cosine.tolist())
                assert cosine.min() > 0.999 and not torch.allclose(got["cls/image"], image[:, branch], atol=1e-3)
                continue
            assert torch.allclose(got[f"{name}/image"], image[:, branch], atol=1e-5), name
        # The chosen branch is not just any branch: the others compute something else.
        assert not torch.allclose(got["mlp/image"], ours["mlp"].encode_image(images)[:, 0], atol=1e-3)

        # OpenCLIP -> ours (its own random weights): H = 1, and every branch of Psi_CLS / Psi_MLP starts as its one.
        theirs = load_file(str(tmp_path / "theirs.safetensors"))
        for branch, h in (("none", 1), ("cls", 3), ("mlp", 3)):
            cfg = config_from_openclip(theirs, branch, h, mlp_branch_layers=1, vision_heads=4, text_heads=4)
            assert (cfg.image_size, cfg.vision_layers, cfg.embed_dim, cfg.context_length) == (32, 2, 32, 32)
            model = HolisticCLIP(cfg).eval()
            model.load_state_dict(from_openclip(theirs, cfg), strict=True)
            image = model.encode_image(images)
            assert image.shape == (3, h, 32)
            for m in range(h):
                if branch == "cls":  # approximate: the patches see H copies of the class token instead of one
                    cosine = (image[:, m] * got["theirs/image"]).sum(-1)
                    print("cls import, cosine with OpenCLIP:", cosine.tolist())
                    assert cosine.min() > 0.999
                    assert torch.allclose(image[:, m], image[:, 0], atol=1e-6)  # the branches start equal
                else:
                    assert torch.allclose(image[:, m], got["theirs/image"], atol=1e-5), (branch, m)
            assert torch.allclose(model.encode_text(tokens), got["theirs/text"], atol=1e-5)
            if branch == "none":  # and back: ours -> OpenCLIP -> ours is the identity on the weights
                again = to_openclip(model.state_dict(), cfg)
                assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)

        # QuickGELU weights need the QuickGELU option, and then agree.
        quick = load_file(str(tmp_path / "quick.safetensors"))
        for activation_matches in (True, False):
            cfg = config_from_openclip(quick, quick_gelu=activation_matches, vision_heads=4, text_heads=4)
            model = HolisticCLIP(cfg).eval()
            model.load_state_dict(from_openclip(quick, cfg))
            same = torch.allclose(model.encode_text(tokens), got["theirs_quick/text"], atol=1e-5)
            assert same == activation_matches

    with pytest.raises(ConversionError, match="choose one"):
        to_openclip(ours["mlp"].state_dict(), ours["mlp"].config)
    with pytest.raises(ConversionError, match="approximate"):
        to_openclip(ours["cls"].state_dict(), ours["cls"].config, 1)
    with pytest.raises(ConversionError, match="no tensor 'visual.conv1.weight'"):
        config_from_openclip({"x": torch.zeros(1)})


def test_the_command_line_both_ways_and_training_from_openclip(tmp_path, capsys):
    tiny = load_model_config("tiny")
    source = HolisticCLIP(tiny).eval()
    save_file(to_openclip(source.state_dict(), tiny), str(tmp_path / "oc.safetensors"))
    # model.init: a Psi_MLP model to train starts with every branch computing the checkpoint's embedding.
    model = HolisticCLIP(dataclasses.replace(tiny, branch="mlp", num_branches=2, mlp_branch_layers=1)).eval()
    init_from_openclip(model, tmp_path / "oc.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = source.encode_image(images)[:, 0], model.encode_image(images)
    assert all(torch.allclose(got[:, m], want, atol=1e-6) for m in range(2))
    with pytest.raises(ConversionError, match="shape .* choose model.config to match"):
        init_from_openclip(HolisticCLIP(dataclasses.replace(tiny, embed_dim=16)), tmp_path / "oc.safetensors")

    assert main(["import", str(tmp_path / "oc.safetensors"), "--out", str(tmp_path / "export"), "--branch", "mlp",
                 "--num-branches", "2", "--mlp-branch-layers", "1", "--vision-heads", "4", "--text-heads", "4"]) == 0
    assert main(["export", str(tmp_path / "export"), "--out", str(tmp_path / "back.safetensors")]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "export"), "--out", str(tmp_path / "back.safetensors"),
                 "--branch-index", "1"]) == 0
    back, first = load_file(str(tmp_path / "back.safetensors")), load_file(str(tmp_path / "oc.safetensors"))
    assert back.keys() == first.keys() and all(torch.equal(back[k], first[k]) for k in first)
