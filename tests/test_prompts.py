"""The prompt library: shipped sets, validation with errors naming file and key, content hashes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from caption_prompts import FAMILIES, PromptSetError, available_sets, load_prompt_set


def test_shipped_sets():
    assert {"default", "full", "one_prompt"} <= set(available_sets())
    default = load_prompt_set("default")
    assert default.ids == ["detail", "background", "main_object", "style"]
    full = load_prompt_set("full")
    assert len(full.prompts) == 8 and "relations" in full.ids
    assert {p.family for p in full.prompts} == set(FAMILIES)
    one = load_prompt_set("one_prompt")
    assert one.ids == ["detail"]
    for s in (default, full, one):
        assert all(p.max_new_tokens == 77 and p.text for p in s.prompts)


def test_sets_are_found_from_an_installed_wheel_too(tmp_path):
    # Build the project's wheel and import from it (not from the checkout): the YAML files must
    # be package data, found the same way.
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "wheel"), str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "wheel").glob("holiclip-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import caption_prompts as c; print(c.__file__); print(c.available_sets()); "
            "print(c.load_prompt_set('default').content_hash)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr
    origin, sets, digest = r.stdout.strip().splitlines()
    assert origin.startswith(str(tmp_path / "site"))
    assert "default" in sets and "full" in sets
    assert digest == load_prompt_set("default").content_hash


def test_content_hash_follows_content_not_formatting(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("name: mine\nprompts:\n  - {id: detail, family: gaze-glance, text: Describe this image in detail.}\n")
    b = tmp_path / "b.yaml"
    b.write_text("# a comment\nname: mine\nprompts:\n  - id: detail\n    family: gaze-glance\n"
                 "    text: Describe this image in detail.\n    max_new_tokens: 77\n")
    c = tmp_path / "c.yaml"
    c.write_text("name: mine\nprompts:\n  - {id: detail, family: gaze-glance, text: Describe it.}\n")
    ha, hb, hc = (load_prompt_set(p).content_hash for p in (a, b, c))
    assert ha == hb != hc and ha.startswith("sha256:")


def test_select_keeps_order_and_rejects_unknown_ids():
    s = load_prompt_set("full").select(["style", "detail"])
    assert s.ids == ["style", "detail"]
    with pytest.raises(PromptSetError, match="no prompt with id 'nope'"):
        load_prompt_set("full").select(["nope"])


@pytest.mark.parametrize("body,message", [
    ("name: x\nprompts:\n  - {id: a, family: attention, txt: hi}\n", r"prompts\[0\]: unknown key 'txt'"),
    ("name: x\nprompts:\n  - {id: a, family: attention}\n", r"prompts\[0\]: missing key 'text'"),
    ("name: x\nprompts:\n  - {id: a, family: attention, text: hi}\n  - {id: a, family: attention, text: ho}\n",
     r"prompts\[1\]: duplicate id 'a'"),
    ("name: x\nprompts:\n  - {id: a, family: vibes, text: hi}\n", r"key 'family': 'vibes' is not one of"),
    ("name: x\nprompts:\n  - {id: a, family: attention, text: hi, max_new_tokens: 0}\n", r"key 'max_new_tokens'"),
    ("name: x\nprompts:\n  - {id: a, family: attention, text: hi, sampling: {temp: 1}}\n", r"key 'sampling.temp'"),
    ("name: x\nprompts:\n  - {id: raw, family: attention, text: hi}\n", r"key 'id': 'raw' is reserved"),
    ("name: x\nprompts:\n  - {id: 'bad id', family: attention, text: hi}\n", r"key 'id'"),
    ("name: x\nprompts: []\n", r"key 'prompts' must be a non-empty list"),
    ("prompts:\n  - {id: a, family: attention, text: hi}\n", r"missing key 'name'"),
    ("name: x\nprompt: []\n", r"unknown key 'prompt'"),
    ("name: x\nprompts: [\n", r"not valid YAML"),
])
def test_invalid_sets_name_file_and_key(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(PromptSetError, match=message) as exc:
        load_prompt_set(path)
    assert str(path) in str(exc.value)


def test_unknown_names_and_paths():
    with pytest.raises(PromptSetError, match="no prompt set named 'nope'; shipped sets: default"):
        load_prompt_set("nope")
    with pytest.raises(PromptSetError, match="not found"):
        load_prompt_set("/does/not/exist.yaml")
