"""`python -m eval` end to end: real exports of the tiny model, real datasets in the project's format.

The tiny Holistic CLIP (train/model_configs/tiny.json) is trained in-process for a few seconds
with plain PyTorch and the project's loss (train.loss.MultiTextContrastiveLoss) on the synthetic
dataset of tests/synthetic_data.py, whose texts describe what is drawn (colour, shape,
background). The DeepSpeed trainer is covered by test_train_launch.py; here the training loop is
the shortest one that gives a model worth evaluating, exported with train.export like the
trainer's. Evaluation runs through the CLI in-process (eval.cli.main), exactly as
`python -m eval ...` parses it; one test runs the real `python -m eval` subprocess.

- A trained M2M model (Psi_CLS, H = 3) retrieves clearly above chance on fresh images of the same
  kind, and an untrained export of the same architecture does not: the numbers are measured.
- The same commands run on O2O and O2M exports (H = 1); fusions and branch subsets are honoured;
  the branch analysis shows the M2M branches specialising.
- Tables are printed, JSON records and the heatmap PNG are written, results.jsonl grows by one
  line per evaluation, `compare` shows the runs side by side.
- Zero-shot on labelled shards and on an image folder per class.
- Query-adaptive fusion with the branch profile added to the trained M2M export; an export
  without one says what is missing and how to add it; `compare` shows every fusion and branch.
- Bad input ends in one line naming the file, exit code 2: a checkpoint whose weights are of
  another model size, class names that do not match the labels, an empty evaluation set, ...;
  an image that does not decode is skipped and reported.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from synthetic_data import BACKGROUNDS, COLOURS, SHAPES, draw, make_synthetic_dataset

from data_manifests import DatasetWriter, Sample, ShardReader, list_shard_files, sha256_hex
from eval.cli import main
from eval.data import read_lines
from eval.zeroshot import IMAGENET_CLASSNAMES, load_templates
from train.export import add_branch_profile, export_checkpoint
from train.loss import MultiTextContrastiveLoss
from train.model import HolisticCLIP, load_model_config
from train.tokenizer import load_tokenizer
from train.transform import eval_transform

ROOT = Path(__file__).resolve().parents[1]
M2M_TEXT_IDS = ["style", "background", "raw"]  # branch 0 <- colour, 1 <- background, 2 <- colour + shape
STEPS = 150


# ----------------------------------------------------------------------------- fixtures


def train_and_export(out: Path, data: Path, *, branch: str, h: int, text_ids: list[str], steps: int,
                     seed: int = 0) -> Path:
    """Train the tiny model on `data` (seeded random batches of 32) and export it to `out`; steps=0: untrained."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is small and shared; one thread is faster there
    try:
        torch.manual_seed(seed)
        cfg = dataclasses.replace(load_model_config("tiny"), branch=branch, num_branches=h)
        model = HolisticCLIP(cfg)
        tokenizer = load_tokenizer("clip", cfg.context_length)
        mode = "m2m" if h > 1 else ("o2o" if len(text_ids) == 1 else "o2m")
        if steps:
            samples = [s for name in list_shard_files(data) for s in ShardReader(data / name)]
            images = torch.stack([eval_transform(Image.open(io.BytesIO(s.image)), cfg.image_size) for s in samples])
            strings = sorted({s.texts[t] for s in samples for t in text_ids})
            table = dict(zip(strings, tokenizer(strings), strict=True))
            tokens = torch.stack([torch.stack([table[s.texts[t]] for t in text_ids]) for s in samples])
            # Causal text tower: trailing padding is free to drop.
            tokens = tokens[..., : int((tokens != 0).sum(-1).max())]
            loss_fn = MultiTextContrastiveLoss(mode)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            generator = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                batch = torch.randperm(len(samples), generator=generator)[:32]
                out_ = model(images[batch], tokens[batch])
                loss = loss_fn(out_["image"], out_["text"], out_["logit_scale"])["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        return export_checkpoint(out, model, cfg, text_ids=text_ids, tokenizer="clip",
                                 training={"step": steps, "loss": {"mode": mode}})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def eval_data(work) -> Path:
    # Fresh images (another seed) of the kind the models are trained on.
    return make_synthetic_dataset(work / "eval_ds", shards=2, per_shard=32, seed=7, missing_style_every=9)


@pytest.fixture(scope="module")
def m2m_untrained(work) -> Path:
    return train_and_export(work / "runs" / "m2m_untrained" / "export", Path(), branch="cls", h=3,
                            text_ids=M2M_TEXT_IDS, steps=0)


@pytest.fixture(scope="module")
def train_data(work) -> Path:
    return make_synthetic_dataset(work / "train_ds", shards=2, per_shard=128, seed=1)


@pytest.fixture(scope="module")
def m2m(work, train_data) -> Path:
    return train_and_export(work / "runs" / "m2m" / "export", train_data, branch="cls", h=3,
                            text_ids=M2M_TEXT_IDS, steps=STEPS)


@pytest.fixture(scope="module")
def o2o(work, train_data) -> Path:
    return train_and_export(work / "runs" / "o2o" / "export", train_data, branch="none", h=1,
                            text_ids=["raw"], steps=100)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv), "--no-progress"] if argv[0] != "compare" else list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- retrieval


def test_trained_model_beats_chance_and_untrained_does_not(capsys, m2m, m2m_untrained, eval_data, work):
    got = {}
    # The synthetic texts are coarse (4 style strings for 64 images): under CLIP_benchmark's rule an
    # image ties its style text with the other images' copies and cannot be right, so the model's
    # grasp of them shows under the same-string rule.
    for name, ckpt in (("trained", m2m), ("untrained", m2m_untrained)):
        code, out, err = run(capsys, "retrieval", "--checkpoint", ckpt, "--data", eval_data, "--positives",
                             "same-string", "--results", work / f"{name}.jsonl")
        assert code == 0, err
        assert "same-string rule" in out
        record = records(work / f"{name}.jsonl")[0]
        assert record["task"] == "retrieval-same-string" and record["positives"] == "same-string"
        got[name] = record["metrics"]
    print(json.dumps(got, indent=1))
    # Chance level of I2T R@1 for a text id is about 1 / (distinct texts) when one text is
    # right: 1/4 for style and background (4 colours), 1/16 for raw (colour + shape).
    trained, untrained = got["trained"], got["untrained"]
    assert trained["style"]["i2t"]["R@1"] > 0.6 and untrained["style"]["i2t"]["R@1"] < 0.5
    assert trained["raw"]["i2t"]["R@1"] > 0.2 and untrained["raw"]["i2t"]["R@1"] < 0.15
    assert trained["all"]["t2i"]["R@10"] > untrained["all"]["t2i"]["R@10"] + 0.2
    # The default, CLIP_benchmark's rule, on the same embeddings: never above, below where strings repeat.
    code, out, err = run(capsys, "retrieval", "--checkpoint", m2m, "--data", eval_data, "--results", work / "own.jsonl")
    assert code == 0, err
    assert "CLIP_benchmark's rule" in out
    own = records(work / "own.jsonl")[0]
    assert own["task"] == "retrieval" and own["positives"] == "own"
    for text_id, m in own["metrics"].items():
        for d, k in itertools.product(("i2t", "t2i"), ("R@1", "R@5", "R@10")):
            assert m[d][k] <= trained[text_id][d][k] + 1e-9
    assert own["metrics"]["style"]["t2i"]["R@1"] < trained["style"]["t2i"]["R@1"]


def test_m2m_tables_json_heatmap_and_results_file(capsys, m2m, eval_data, work):
    out_dir = work / "m2m_out"
    # Coarse synthetic texts (one background string per colour): the same-string rule (see the test above).
    code, out, err = run(capsys, "retrieval", "--checkpoint", m2m.parent, "--data", eval_data, "--out", out_dir,
                         "--fusion", "average,max,norm-max", "--positives", "same-string")  # a run directory
    assert code == 0, err
    # The printed tables: one per fusion, every text id and "all", and the branch analysis.
    for header in ("fusion average", "fusion max", "fusion norm-max", "branch analysis", "I2T R@1"):
        assert header in out
    assert out.count("\nall ") == 3 and "0 (style)" in out and "1 (background)" in out
    results = m2m.parent / "results.jsonl"  # the run directory's results file
    lines = records(results)
    assert [r["fusion"]["method"] for r in lines] == ["average", "max", "norm-max"]
    record = json.loads((out_dir / "retrieval-same-string-synthetic-7-average.json").read_text())
    assert record == lines[0]
    assert (record["checkpoint"]["config"]["model"]["num_branches"] == 3
            and record["checkpoint"]["label"] == "m2m cls H=3")
    assert record["data"]["dataset_id"] == "synthetic-7" and record["data"]["images"] == 64
    assert record["data"]["text_ids"] == ["raw", "detail", "background", "main_object", "style"]
    assert record["metrics"]["style"]["captions"] == 64 - 8  # every 9th sample has no style text
    assert record["metrics"]["all"]["captions"] == 5 * 64 - 8

    # The branches specialise: the background branch separates background texts best, and is the
    # best branch for them; its margin on colour texts is small.
    analysis = record["branch_analysis"]
    margin = dict(zip(analysis["text_ids"], zip(*analysis["margin"], strict=True), strict=True))
    assert analysis["best_branch"]["background"] == 1 and analysis["best_text_id"][1] == "background"
    assert margin["background"][1] > 0.2 > abs(margin["style"][1])
    with Image.open(analysis["heatmap"]) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 150

    # Appending again adds lines, never rewrites; compare puts the runs side by side.
    code, _, err = run(capsys, "retrieval", "--checkpoint", m2m, "--data", eval_data, "--out", out_dir,
                       "--branches", "background", "--positives", "same-string")
    assert code == 0, err
    lines = records(results)
    assert len(lines) == 4 and lines[-1]["fusion"] == {"method": "average", "label": "average[1]", "branches": [1],
                                                        "branch_text_ids": ["background"]}
    # Embedding customisation: the background branch alone matches background texts better than
    # the average of all branches (which the colour branches dilute), and colour texts far worse.
    alone, together = lines[-1]["metrics"], lines[0]["metrics"]
    print({t: (alone[t]["i2t"]["R@1"], together[t]["i2t"]["R@1"]) for t in alone})
    assert alone["background"]["i2t"]["R@1"] > max(0.8, together["background"]["i2t"]["R@1"])
    assert alone["style"]["i2t"]["R@1"] < together["style"]["i2t"]["R@1"] - 0.3
    code, out, _ = run(capsys, "compare", m2m.parent)
    # One row per record, and the title of the side-by-side table of the fusions.
    assert code == 0 and out.count("m2m cls H=3") == 4 + 1 and "average[1]" in out and "style I2T@1" in out
    assert "fusions side by side" in out and "branch 1 (background)" in out


def test_o2o_and_o2m_checkpoints_run_the_same_way(capsys, o2o, eval_data, work):
    o2m = train_and_export(work / "runs" / "o2m" / "export", Path(), branch="none", h=1, text_ids=M2M_TEXT_IDS, steps=0)
    results = work / "shared_results.jsonl"  # several runs, one results file
    for ckpt in (o2o, o2m):
        code, out, err = run(capsys, "retrieval", "--checkpoint", ckpt, "--data", eval_data, "--results", results,
                             "--fusion", "average,max,norm-max", "--text-ids", "raw", "style",
                             "--positives", "same-string")  # coarse texts: 16 raw strings
        assert code == 0, err
    lines = records(results)
    assert [r["checkpoint"]["label"] for r in lines] == ["o2o none H=1"] * 3 + ["o2m none H=1"] * 3
    assert list(lines[0]["metrics"]) == ["raw", "style", "all"]
    # One branch: every fusion ranks identically.
    assert lines[0]["metrics"] == lines[1]["metrics"] == lines[2]["metrics"]
    assert lines[0]["metrics"]["raw"]["i2t"]["R@1"] > 0.2  # trained on raw: well above 1/16
    assert lines[0]["branch_analysis"]["branches"] == ["0 (raw)"]
    with Image.open(lines[0]["branch_analysis"]["heatmap"]) as png:
        png.verify()
    code, out, _ = run(capsys, "compare", results)
    assert code == 0 and "raw I2T@1" in out  # 3 rows each, and the title of each one's fusions side by side
    assert out.count("o2o none H=1") == 3 + 1 and out.count("o2m none H=1") == 3 + 1


# ----------------------------------------------------------------------------- zero-shot


def colour_dataset(root: Path, per_colour: int = 8, seed: int = 3, labels: str = "index") -> Path:
    """Labelled images of one coloured shape each, as WebDataset shards in the project's format
    (label in the JSON's source, where ingest keeps a URL list's columns) or with .cls members."""
    rng = random.Random(seed)
    colours = list(COLOURS)
    if labels == "cls":  # plain WebDataset: <key>.png + <key>.cls, no manifest
        import webdataset as wds

        root.mkdir(parents=True)
        with wds.TarWriter(str(root / "00000.tar")) as sink:
            for i in range(per_colour * len(colours)):
                buf = io.BytesIO()
                draw(rng.choice(SHAPES), colours[i % 4], rng.choice(list(BACKGROUNDS)),
                     "top left", 32, rng).save(buf, "PNG")
                sink.write({"__key__": f"k{i:04d}", "png": buf.getvalue(), "cls": str(i % 4).encode()})
        return root
    writer = DatasetWriter(root, stage="test", dataset_id=f"colours-{labels}", flush_every_s=0)
    samples = []
    for i in range(per_colour * len(colours)):
        buf = io.BytesIO()
        draw(rng.choice(SHAPES), colours[i % 4], rng.choice(list(BACKGROUNDS)),
             "bottom right", 32, rng).save(buf, "PNG")
        label = i % 4 if labels == "index" else colours[i % 4]
        samples.append(Sample(key=f"c{i:04d}", image=buf.getvalue(), image_ext="png",
                              texts={"raw": f"{colours[i % 4]} shape"},
                              source={"sha256": sha256_hex(buf.getvalue()), "label": label}))
    writer.write_shard("00000.tar", samples)
    writer.finish()
    return root


@pytest.fixture(scope="module")
def colour_files(work) -> tuple[Path, Path]:
    classnames = work / "colours.txt"
    classnames.write_text("\n".join(COLOURS) + "\n")
    templates = work / "templates.txt"
    templates.write_text("bright {} tones\na {} thing\n")
    return classnames, templates


def test_zeroshot_on_labelled_shards_and_image_folders(capsys, m2m, m2m_untrained, work, colour_files):
    classnames, templates = colour_files
    folder = work / "folder"
    shards = colour_dataset(work / "colours_cls", labels="cls")
    named = colour_dataset(work / "colours_named", labels="name")
    for colour in COLOURS:
        (folder / colour).mkdir(parents=True)
    rng = random.Random(5)
    for i in range(32):
        colour = list(COLOURS)[i % 4]
        draw(rng.choice(SHAPES), colour, rng.choice(list(BACKGROUNDS)),
             "top right", 40, rng).save(folder / colour / f"{i}.jpg")

    got = {}
    for name, data, extra in (("cls", shards, ["--classnames", classnames]), ("named", named, []),
                              ("folder", folder, [])):
        for ckpt in (m2m, m2m_untrained):
            results = work / f"zs-{name}-{ckpt.parent.name}.jsonl"
            code, out, err = run(capsys, "zeroshot", "--checkpoint", ckpt, "--data", data, "--templates", templates,
                                 "--results", results, "--out", work / "zs_out", *extra)
            assert code == 0, err
            assert "top-1" in out and "branch 0 (style)" in out
            got[name, ckpt.parent.name] = records(results)[0]["metrics"]
    for name in ("cls", "named", "folder"):
        trained, untrained = got[name, "m2m"], got[name, "m2m_untrained"]
        assert trained["classes"] == 4 and "top5" not in trained  # top-5 of 4 classes would be trivially 1
        # Chance is 1/4; colour is what branch 0 ("style": "bright red tones") was trained on.
        assert trained["top1"] > 0.6 and untrained["top1"] < 0.5, (name, trained, untrained)
        assert trained["per_branch"][0]["text_id"] == "style" and trained["per_branch"][0]["top1"] > 0.6
    assert got["cls", "m2m"]["classnames"] == str(classnames)
    assert (got["named", "m2m"]["classnames"] == "the labels found"
            and got["folder", "m2m"]["classnames"] == "the folder names")


def test_zeroshot_default_imagenet_names(capsys, o2o, work):
    # Integer labels without --classnames index the bundled ImageNet names (one template keeps the
    # classifier at 1000 prompts; the 80 default templates are checked in test_bundled_files).
    data = colour_dataset(work / "colours_index", per_colour=2, labels="index")
    template = work / "one_template.txt"
    template.write_text("a photo of a {}.\n")
    results = work / "zs-imagenet.jsonl"
    code, out, err = run(capsys, "zeroshot", "--checkpoint", o2o, "--data", data, "--results", results, "--limit", "5",
                         "--templates", template)
    assert code == 0, err
    record = records(results)[0]
    metrics = record["metrics"]
    assert (metrics["classes"] == 1000 and metrics["templates"] == 1
            and metrics["classnames"].endswith("imagenet_classnames.txt"))
    assert set(metrics) >= {"top1", "top5"} and metrics["per_branch"] == []  # one branch: nothing to break down
    assert record["data"]["images"] == 5 and record["data"]["dataset_id"] == "colours-index"


def test_bundled_files():
    templates, path = load_templates(None)
    assert len(templates) == 80 and all("{}" in t for t in templates) and templates[0] == "a bad photo of a {}."
    names = read_lines(IMAGENET_CLASSNAMES, "class names")
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"] and names[-1] == "toilet paper"


# ----------------------------------------------------------------------------- adaptive fusion


@pytest.fixture(scope="module")
def m2m_adaptive(work, m2m, train_data) -> Path:
    """The trained M2M export plus its branch profile, as the trainer writes it at export time."""
    export = work / "runs" / "m2m_adaptive" / "export"
    shutil.copytree(m2m, export)
    add_branch_profile(export, [str(train_data)], texts_per_id=200)
    return export


def test_adaptive_fusion_and_the_side_by_side_table(capsys, m2m_adaptive, m2m, eval_data, work, colour_files):
    classnames, templates = colour_files
    colours = colour_dataset(work / "colours_adaptive", labels="name")
    results = m2m_adaptive.parent / "results.jsonl"
    code, out, err = run(capsys, "zeroshot", "--checkpoint", m2m_adaptive, "--data", colours, "--templates", templates,
                         "--fusion", "average,adaptive,each-branch", "--out", work / "adaptive_out")
    assert code == 0, err
    code, out, err = run(capsys, "retrieval", "--checkpoint", m2m_adaptive, "--data", eval_data, "--positives",
                         "same-string", "--fusion", "average,adaptive,each-branch", "--out", work / "adaptive_out")
    assert code == 0, err
    lines = records(results)
    labels = [r["fusion"]["label"] for r in lines]
    assert labels == ["average", "adaptive", "average[0]", "average[1]", "average[2]"] * 2
    zeroshot = {r["fusion"]["label"]: r["metrics"] for r in lines if r["task"] == "zeroshot"}
    retrieval = {r["fusion"]["label"]: r["metrics"] for r in lines if r["task"] == "retrieval-same-string"}
    print({k: v["top1"] for k, v in zeroshot.items()})
    print({k: {t: (m["i2t"]["R@1"], m["t2i"]["R@1"]) for t, m in v.items()} for k, v in retrieval.items()})
    # Colour prompts: adaptive does about as well as the colour branch ("style") alone.
    assert zeroshot["adaptive"]["top1"] > 0.6 and zeroshot["adaptive"]["top1"] >= zeroshot["average[0]"]["top1"] - 0.1
    # Background captions: the background branch's numbers, which averaging dilutes.
    assert retrieval["adaptive"]["background"]["i2t"]["R@1"] >= retrieval["average"]["background"]["i2t"]["R@1"]

    code, out, _ = run(capsys, "compare", m2m_adaptive.parent)
    table = out[out.index("fusions side by side"):]
    assert code == 0 and "adaptive" in table and "branch 0 (style)" in table and "branch 1 (background)" in table
    assert "zeroshot colours-name" in table and "retrieval-same-string synthetic-7 background" in table


def test_adaptive_needs_the_branch_profile(capsys, m2m, o2o, eval_data, work):
    # An export written before branch profiles existed still loads and evaluates...
    code, _, err = run(capsys, "retrieval", "--checkpoint", m2m, "--data", eval_data, "--text-ids", "style",
                       "--results", work / "no_profile.jsonl", "--out", work / "no_profile")
    assert code == 0, err
    # ...and adaptive says what is missing and how to add it, in one line.
    code, out, err = run(capsys, "retrieval", "--checkpoint", m2m, "--data", eval_data, "--fusion", "adaptive",
                         "--results", work / "no_profile.jsonl", "--out", work / "no_profile")
    assert code == 2 and err.count("\n") == 1, err
    assert "no branch profile" in err and f"python -m train.export --add-branch-profile {m2m}" in err
    # One branch (O2O, or a single branch chosen): adaptive is the plain score, no profile needed.
    code, _, err = run(capsys, "retrieval", "--checkpoint", m2m, "--data", eval_data, "--fusion", "adaptive,average",
                       "--branches", "style", "--text-ids", "style", "--results", work / "one_branch.jsonl",
                       "--out", work / "no_profile")
    assert code == 0, err
    adaptive, average = records(work / "one_branch.jsonl")
    assert adaptive["metrics"] == average["metrics"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(work, o2o, colour_files) -> dict[str, Path]:
    """Inputs a user can get wrong, each next to a good one."""
    paths = {}
    # Weights of the tiny model under a config.json that says another model size.
    other_size = work / "bad" / "other_size"
    shutil.copytree(o2o, other_size)
    meta = json.loads((other_size / "config.json").read_text())
    meta["model"]["image_size"], meta["model"]["vision_width"] = 64, 128
    (other_size / "config.json").write_text(json.dumps(meta))
    paths["other_size"] = other_size
    invalid = work / "bad" / "invalid_config"
    shutil.copytree(o2o, invalid)
    meta["model"]["branch"] = "tree"
    (invalid / "config.json").write_text(json.dumps(meta))
    paths["invalid_config"] = invalid
    # Three class names for labels 0-3; names that are not the labels; a template without {}.
    paths["three_names"] = work / "bad" / "three.txt"
    paths["three_names"].write_text("red\ngreen\nblue\n")
    paths["other_names"] = work / "bad" / "other_names.txt"
    paths["other_names"].write_text("cat\ndog\nbird\nfish\n")
    paths["no_slot"] = work / "bad" / "templates.txt"
    paths["no_slot"].write_text("a photo of a {}.\na photo\n")
    # An evaluation set with a manifest and no samples; a directory with nothing usable.
    writer = DatasetWriter(work / "bad" / "empty_ds", stage="test", dataset_id="empty", flush_every_s=0)
    writer.write_shard("00000.tar", [])
    writer.finish()
    paths["empty_ds"] = work / "bad" / "empty_ds"
    paths["empty_dir"] = work / "bad" / "empty_dir"
    paths["empty_dir"].mkdir()
    paths["cls_shards"] = colour_dataset(work / "bad" / "colours_cls", per_colour=2, labels="cls")
    paths["named_shards"] = colour_dataset(work / "bad" / "colours_named", per_colour=2, labels="name")
    paths["folders"] = work / "bad" / "folders"
    for c in ("a", "b"):
        (paths["folders"] / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(paths["folders"] / c / "x.png")
    paths["no_manifest"] = work / "bad" / "no_manifest"
    paths["no_manifest"].mkdir()
    shutil.copy(paths["cls_shards"] / "00000.tar", paths["no_manifest"] / "00000.tar")
    return paths


BAD = {
    # name: (argv with placeholders, fragments the one-line error must hold)
    "weights of another model size": (["retrieval", "--checkpoint", "{other_size}", "--data", "{eval_data}"],
                                      ["model.safetensors", "not of the model size config.json describes",
                                       "image_size 64", "vision_width 128"]),
    "invalid config.json": (["retrieval", "--checkpoint", "{invalid_config}", "--data", "{eval_data}"],
                            ["config.json", "not a valid export", "tree"]),
    "no checkpoint": (["retrieval", "--checkpoint", "{empty_dir}", "--data", "{eval_data}"],
                      ["empty_dir", "no config.json"]),
    "label beyond the class names": (["zeroshot", "--checkpoint", "{o2o}", "--data", "{cls_shards}",
                                      "--classnames", "{three_names}"],
                                     ["three.txt", "label 3", "3 class names", "--classnames"]),
    "labels that are not class names": (["zeroshot", "--checkpoint", "{o2o}", "--data", "{named_shards}",
                                         "--classnames", "{other_names}"],
                                        ["other_names.txt", "'red'", "not one of its 4 class names"]),
    "class folders that do not match": (["zeroshot", "--checkpoint", "{o2o}", "--data", "{folders}",
                                         "--classnames", "{three_names}"],
                                        ["three.txt", "3 class names for 2 class folders"]),
    "template without a slot": (["zeroshot", "--checkpoint", "{o2o}", "--data", "{folders}",
                                 "--templates", "{no_slot}"],
                                ["templates.txt:2", "has no '{}'"]),
    "empty retrieval set": (["retrieval", "--checkpoint", "{o2o}", "--data", "{empty_ds}"],
                            ["empty_ds", "evaluation set is empty"]),
    "empty zero-shot set": (["zeroshot", "--checkpoint", "{o2o}", "--data", "{empty_dir}"],
                            ["empty_dir", "no .tar shards and no class folders"]),
    "retrieval data without manifest": (["retrieval", "--checkpoint", "{o2o}", "--data", "{no_manifest}"],
                                        ["manifest.json", "holiclip-manifest index"]),
    "unknown text id": (["retrieval", "--checkpoint", "{o2o}", "--data", "{eval_data}", "--text-ids", "raw", "caption"],
                        ["manifest.json", "'caption'", "it has raw, detail"]),
    "branch that does not exist": (["retrieval", "--checkpoint", "{o2o}", "--data", "{eval_data}", "--branches", "1"],
                                   ["branch 1 does not exist", "has 1"]),
    "unknown fusion": (["retrieval", "--checkpoint", "{o2o}", "--data", "{eval_data}", "--fusion", "mean"],
                       ["'mean'", "norm-max"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_ends_in_one_clear_line(case, capsys, bad_inputs, o2o, eval_data, work):
    argv, fragments = BAD[case]
    paths = {**bad_inputs, "o2o": o2o, "eval_data": eval_data}
    code, out, err = run(capsys, *(a.format(**paths) if a.startswith("{") else a for a in argv),
                         "--results", work / "bad" / "results.jsonl", "--out", work / "bad" / "out")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith(f"eval {argv[0]}: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (work / "bad" / "results.jsonl").exists()


def test_the_real_command_line(o2o, eval_data, bad_inputs, work):
    """`python -m eval` as a user runs it: a result as JSON on stdout, and an error without traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "eval", "retrieval", "--checkpoint", str(o2o), "--data", str(eval_data),
                         "--text-ids", "raw", "--json", "--no-progress", "--results", str(work / "cli.jsonl")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert (record["task"] == "retrieval" and list(record["metrics"]) == ["raw"]
            and record["data"]["dataset_id"] == "synthetic-7")
    bad = subprocess.run([sys.executable, "-m", "eval", "retrieval", "--checkpoint", str(bad_inputs["other_size"]),
                          "--data", str(eval_data)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert "not of the model size config.json describes" in bad.stderr


def test_undecodable_images_are_skipped_and_reported(capsys, o2o, work):
    root = work / "with_broken_image"
    writer = DatasetWriter(root, stage="test", dataset_id="broken", flush_every_s=0)

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(buf, "PNG")
        return buf.getvalue()

    good = [Sample(key=f"g{i}", image=png(i), image_ext="png", texts={"raw": f"shade {i}"}) for i in range(4)]
    broken = Sample(key="bad", image=b"not an image", image_ext="jpg", texts={"raw": "nothing"})
    writer.write_shard("00000.tar", [*good[:2], broken, *good[2:]])
    writer.finish()
    results = work / "broken.jsonl"
    code, out, err = run(capsys, "retrieval", "--checkpoint", o2o, "--data", root, "--results", results,
                         "--out", work / "broken_out")
    assert code == 0, err
    assert "1 samples skipped" in err and "bad: image does not decode" in err
    record = records(results)[0]
    assert (record["data"]["images"] == 4 and record["data"]["skipped"] == 1
            and record["metrics"]["raw"]["captions"] == 4)
    assert "1 skipped" in out


def test_text_embeddings_do_not_depend_on_trimmed_padding(m2m_untrained):
    from eval.embed import EmbedOptions, embed_texts
    from train.export import load_exported

    model, tokenizer, _ = load_exported(m2m_untrained)
    texts = ["a red circle", "", "a much longer text about a yellow cross at the bottom right on a pink background!!"]
    with torch.no_grad():
        full = model.encode_text(tokenizer(texts))
    assert torch.allclose(embed_texts(model, tokenizer, texts, EmbedOptions(progress=False)), full, atol=1e-5)


# ----------------------------------------------------------------------------- CLIP_benchmark


def clip_benchmark_retrieval_set(root: Path, n: int = 40, seed: int = 11) -> Path:
    """A retrieval benchmark as CLIP_benchmark's convert_retrieval_dataset writes one: DIR/test/{0..}.tar with
    <key>.png and <key>.txt (captions one per line), nshards.txt, dataset_type.txt."""
    import webdataset as wds

    rng = random.Random(seed)
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(n):
            shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
            buf = io.BytesIO()
            draw(shape, colour, background, "top left", 32, rng).save(buf, "PNG")
            # Distinct strings (no exact ties), so CLIP_benchmark's topk and our tie rule must agree.
            captions = [f"{colour} {shape} {i}", f"a {colour} {shape} on a {background} background, picture {i}"]
            sink.write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "txt": "\n".join(captions)})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def clip_benchmark_classification_set(root: Path, per_colour: int = 6, seed: int = 12) -> Path:
    import webdataset as wds

    rng = random.Random(seed)
    colours = list(COLOURS)
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(per_colour * len(colours)):
            buf = io.BytesIO()
            image = draw(rng.choice(SHAPES), colours[i % 4], rng.choice(list(BACKGROUNDS)), "top left", 32, rng)
            image.save(buf, "PNG")
            sink.write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "cls": i % 4})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "classnames.txt").write_text("\n".join(colours) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("bright {c} tones\na {c} thing\n")
    return root


def clip_benchmark_module(where: Path, name: str):
    """A module of CLIP_benchmark's released package (pip download into a temporary directory, never committed)."""
    import importlib.util

    wheel = next(where.glob("clip_benchmark-*.whl"), None)
    if wheel is None:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "clip-benchmark==1.6.2", "--no-deps",
                               "--quiet", "-d", str(where)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        wheel = next(where.glob("clip_benchmark-*.whl"))
    import zipfile

    path = where / f"{name.replace('/', '_')}"
    with zipfile.ZipFile(wheel) as z:
        path.write_bytes(z.read(f"clip_benchmark/{name}"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_benchmark_layout_and_its_own_retrieval_code_agree(capsys, o2o, work):
    import webdataset as wds

    from eval.clip_benchmark import load_holiclip
    from eval.clip_benchmark import main as adapter_main

    bench = clip_benchmark_retrieval_set(work / "cb_retrieval")
    results = work / "cb.jsonl"
    code, out, err = run(capsys, "retrieval", "--checkpoint", o2o, "--data", bench, "--results", results)
    assert code == 0, err
    ours = records(results)[-1]
    assert ours["data"]["kind"] == "clip_benchmark" and ours["data"]["images"] == 40
    assert list(ours["metrics"]) == ["c0", "c1", "all"] and ours["metrics"]["all"]["captions"] == 80

    # The same export through the adapter, scored by CLIP_benchmark's own zeroshot_retrieval.evaluate
    # on a loader built as its build_wds_dataset builds one.
    retrieval = clip_benchmark_module(work, "metrics/zeroshot_retrieval.py")
    model, transform, tokenizer = load_holiclip("holiclip", str(o2o), device="cpu")
    shards = int((bench / "test" / "nshards.txt").read_text())
    dataset = (wds.WebDataset(str(bench / "test" / f"{{0..{shards - 1}}}.tar"), nodesplitter=lambda src: src,
                              shardshuffle=False)
               .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
               .to_tuple(["webp", "png", "jpg", "jpeg"], "txt")
               .map_tuple(transform, str.splitlines))
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, shuffle=False, num_workers=0)
    theirs = retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):  # their "image retrieval" is text -> image
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours["metrics"]["all"]["t2i"][f"R@{k}"])
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours["metrics"]["all"]["i2t"][f"R@{k}"])
    assert 0 < ours["metrics"]["all"]["t2i"]["R@10"] < 1  # neither trivial nor hopeless: the comparison says something

    # Zero-shot reads the benchmark's class names and {c} templates beside the shards.
    classes = clip_benchmark_classification_set(work / "cb_classes")
    code, out, err = run(capsys, "zeroshot", "--checkpoint", o2o, "--data", classes, "--results", results)
    assert code == 0, err
    z = records(results)[-1]
    assert z["metrics"]["classes"] == 4 and z["metrics"]["templates"] == 2 and z["data"]["images"] == 24
    assert z["metrics"]["templates_file"].endswith("zeroshot_classification_templates.txt")
    assert z["metrics"]["classnames"].endswith("classnames.txt")
    assert z["metrics"]["top1"] > 0.5  # o2o learnt colours from "red circle"-like alt-texts; chance is 1/4
    # The wrong task for a set names the file that says what it is.
    code, _, err = run(capsys, "zeroshot", "--checkpoint", o2o, "--data", bench, "--results", results)
    assert code == 2 and "dataset_type.txt" in err and "python -m eval retrieval" in err
    assert adapter_main() == 2 and "pip install clip-benchmark" in capsys.readouterr().err
