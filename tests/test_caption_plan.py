"""Captioning without engines: configuration errors, planning of resumes and increments,
provenance conflicts, merging. Fast; the engine-backed behaviour is in test_caption.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from caption_fixtures import captioner, make_image_dataset, write_config
from conftest import ROOT

from data_manifests import DatasetWriter, Sample
from pipeline.caption.captioner import Progress, ShardResult
from pipeline.caption.config import ConfigError, TextJob, load_config, parse_config
from pipeline.caption.plan import WHOLE, Part, plan_job
from pipeline.caption.provenance import conflicts, model_content_hash, text_provenance
from pipeline.caption.writer import merge_sample


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp("img") / "ds", shards=3, per_shard=2)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["Qwen2VLForConditionalGeneration"]}')
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    return d


def base(images, tmp_path, model_dir, **cap):
    return {"input": str(images), "output": str(tmp_path / "out"),
            "captioners": [{"name": "tiny", "model": str(model_dir), "prompts": {"set": "default"}, **cap}]}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("input"), r"input: missing"),
    (lambda d: d.update(inptu="x"), r"inptu: unknown key"),
    (lambda d: d["captioners"][0].update(engine={"max_modle_len": 4}),
     r"captioners\[0\]\.engine\.max_modle_len: not a vLLM engine argument"),
    (lambda d: d["captioners"][0].update(sampling={"temprature": 0}),
     r"captioners\[0\]\.sampling\.temprature: unknown key"),
    (lambda d: d["captioners"][0].update(prompts={"set": "default", "ids": ["nope"]}),
     r"captioners\[0\]\.prompts: .*no prompt with id 'nope'"),
    (lambda d: d["captioners"][0].update(type="tgi"), r"captioners\[0\]\.type: 'tgi' is not one of"),
    (lambda d: d["captioners"][0].update(replicas=0), r"captioners\[0\]\.replicas: must be at least 1"),
    (lambda d: d["captioners"][0].update(replicas=2, min_replicas=3),
     r"captioners\[0\]\.min_replicas: 3 is more than replicas \(2\)"),
    (lambda d: d["captioners"][0].update(shard_timeout_s=0), r"captioners\[0\]\.shard_timeout_s: must be > 0, got 0"),
    (lambda d: d["captioners"][0].update(endpoints=["http://x"]),
     r"captioners\[0\]\.endpoints: only for captioners of type openai"),
    (lambda d: d["captioners"][0].update(model="/no/such/model"),
     r"captioners\[0\]\.model: '/no/such/model' is not a directory"),
    (lambda d: d["captioners"].append(dict(d["captioners"][0])), r"captioners\[1\]\.name: duplicate captioner name"),
    (lambda d: d.update(captioners=[{**d["captioners"][0], "text_id_prefix": "none"},
                                    {**d["captioners"][0], "name": "b", "text_id_prefix": "none"}]),
     r"text id 'detail' would be made by both 'tiny' and 'b'"),
    (lambda d: d.update(overwrite=["nope"]), r"overwrite: 'nope' is not a text id this config makes"),
    (lambda d: d.update(output=d["input"]), r"output: must differ from input"),
    (lambda d: d["captioners"][0].update(resources={"num_gpu": 1}),
     r"^job\.yaml: captioners\[0\]\.resources\.num_gpu: unknown key \(known here: num_cpus, num_gpus, custom\) "
     r"\(did you mean 'num_gpus'\?\)$"),
    (lambda d: d["captioners"][0].update(engine={"max_modle_len": 4}), r"\(did you mean 'max_model_len'\?\)$"),
    (lambda d: d["captioners"][0].update(sampling={"seed": "0"}),
     r"captioners\[0\]\.sampling\.seed: expected a number, got '0'"),
    (lambda d: d["captioners"][0].update(scheduling="packed"),
     r"captioners\[0\]\.scheduling: must be one of \['spread', 'pack'\], got 'packed'"),
])
def test_config_errors_name_the_key(images, tmp_path, model_dir, mutate, message):
    data = base(images, tmp_path, model_dir)
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "job.yaml")


def test_command_line_overrides_are_checked_with_the_config(images, tmp_path, model_dir):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base(images, tmp_path, model_dir)))
    with pytest.raises(ConfigError, match=r"output: must differ from input"):
        load_config(path, check_engine_args=False, output=str(images))
    with pytest.raises(ConfigError, match=r"overwrite: 'nope' is not a text id this config makes"):
        load_config(path, check_engine_args=False, overwrite=["nope"])
    cfg = load_config(path, check_engine_args=False, output=str(tmp_path / "elsewhere"), overwrite=["style"])
    assert cfg.output == tmp_path / "elsewhere" and cfg.overwrite == ["style"]


def test_text_ids_by_captioner_count(images, tmp_path, model_dir):
    one = parse_config(base(images, tmp_path, model_dir), "job.yaml", check_engine_args=False)
    assert [j.text_id for j in one.captioners[0].jobs()] == ["detail", "background", "main_object", "style"]
    assert one.captioners[0].jobs()[0].sampling == {"temperature": 0.0, "top_p": 1.0, "seed": 0, "max_tokens": 77}
    data = base(images, tmp_path, model_dir, prompts={"set": "one_prompt"})
    data["captioners"].append({**data["captioners"][0], "name": "other"})
    two = parse_config(data, "job.yaml", check_engine_args=False)
    assert [j.text_id for c in two.captioners for j in c.jobs()] == ["tiny/detail", "other/detail"]


def test_engine_argument_names_are_cached_per_vllm_and_checked_without_importing_it(tmp_path, monkeypatch):
    """A refused config and every driver used to import vLLM (15 s here) only to check `engine`
    keys; the names are now cached under a digest of vLLM's arg_utils.py."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from pipeline.caption.config import _engine_arg_names

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    names = _engine_arg_names()
    assert names == {f.name for f in dataclasses.fields(AsyncEngineArgs)} and "max_model_len" in names
    [cached] = (tmp_path / "holiclip").glob("vllm-engine-args-*.json")
    probe = ("import json, sys; from pipeline.caption.config import _engine_arg_names; "
             "print(json.dumps([sorted(_engine_arg_names()), 'vllm' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}).stdout
    assert json.loads(out.splitlines()[-1]) == [sorted(names), False]  # the same names, vLLM not imported
    cached.write_text("not json")  # a damaged entry is recomputed, not trusted
    assert _engine_arg_names() == names and json.loads(cached.read_text()) == sorted(names)


def test_shipped_configs_validate():
    for path in [*sorted((ROOT / "pipeline" / "caption" / "configs").glob("*.yaml")),
                 ROOT / "demo" / "configs" / "caption_cpu.yaml"]:
        data = yaml.safe_load(path.read_text())
        for cap in data["captioners"]:
            # Hub models are not in this machine's cache; a local dir stands in for validation.
            if not cap["model"].startswith(("..", "/")):
                continue
            # A local model named relative to the config is one the repository ships (the demo's
            # captioners) or one a command builds into the repository's runs/.
            local = (path.parent / cap["model"]).resolve()
            shipped = (local / "config.json").is_file() and local.is_relative_to(ROOT)
            assert Path(cap["model"]).is_absolute() or shipped or local.is_relative_to(ROOT / "runs"), cap["model"]
            cap["model"] = str(local if shipped else ROOT)
        cfg = parse_config(data, str(path), base_dir=path.parent)
        for key in ("input", "output"):
            if not Path(data[key]).is_absolute():  # relative to the file: in the repository's runs/ too
                assert getattr(cfg, key).is_relative_to(ROOT / "runs"), (path, key)


def _prov(model_dir, cfg):
    cap = cfg.captioners[0]
    model = {"name": cap.name, "model": cap.model, "content_hash": model_content_hash(model_dir)}
    return {j.text_id: text_provenance(model, cap.prompt_set.name, cap.prompt_set.content_hash, j, {})
            for j in cap.jobs()}


def test_plan_resume_increment_and_overwrite(images, tmp_path, model_dir):
    from data_manifests import load_manifest

    cfg = parse_config(base(images, tmp_path, model_dir, prompts={"set": "default", "ids": ["detail"]}),
                       "job.yaml", check_engine_args=False)
    prov = _prov(model_dir, cfg)
    writer = DatasetWriter(cfg.output, stage="caption")
    plans, skipped = plan_job(cfg, prov, writer, load_manifest(images))
    assert [p.name for p in plans] == ["00000.tar", "00001.tar", "00002.tar"] and not skipped
    assert plans[0].work == {"tiny": []} and plans[0].source == str(images / "00000.tar")

    # Shard 0 done with this identity: a resume skips it.
    from data_manifests import ShardInfo, TextStats
    from pipeline.caption.writer import write_captioned_shard

    out = write_captioned_shard(str(images / "00000.tar"), str(writer.shard_path("00000.tar")),
                                [ShardResult(texts={"000000000": {"detail": "a"}, "000000001": {"detail": "b"}})])
    writer.commit(ShardInfo(**out["info"]), TextStats(out["stats"]), extra={"text_identities": plans[0].identities})
    plans, _ = plan_job(cfg, prov, writer, load_manifest(images))
    assert [p.name for p in plans] == ["00001.tar", "00002.tar"]

    # A new prompt: shard 0 is read from the output (its texts kept) and only 'style' is made.
    cfg2 = parse_config(base(images, tmp_path, model_dir, prompts={"set": "default", "ids": ["detail", "style"]}),
                        "job.yaml", check_engine_args=False)
    plans, _ = plan_job(cfg2, _prov(model_dir, cfg2), writer, load_manifest(images))
    assert plans[0].name == "00000.tar" and plans[0].source == str(writer.shard_path("00000.tar"))
    assert plans[0].work == {"tiny": []}

    # A changed model under 'detail' is a conflict unless overwritten; then it is redone everywhere.
    (model_dir / "model.safetensors").write_bytes(b"\1" * 4096)
    prov3 = _prov(model_dir, cfg)
    problems = conflicts(writer.manifest.texts | {"detail": prov["detail"]}, prov3, overwrite=[])
    assert len(problems) == 1 and "text id 'detail' already exists" in problems[0] and "overwrite" in problems[0]
    assert conflicts({"detail": prov["detail"]}, prov3, overwrite=["detail"]) == []
    plans, _ = plan_job(cfg, prov3, writer, load_manifest(images))
    assert plans[0].name == "00000.tar" and plans[0].work == {"tiny": ["detail"]}


def test_a_part_whose_engine_died_leaves_the_rest_and_one_part_per_suspect_image():
    """The poison-image search: texts made are kept, images in the engine are tried alone, the
    rest as before; an image alone that kills its engine gets the error. (End to end: test_caption.py
    test_engine_faults_poison_image_and_hung_engine_cost_only_their_work_and_leave_no_engine_behind.)"""
    rest, suspects = WHOLE.after_death(done=["a"], in_flight=["c", "b"])
    assert rest == Part(skip=frozenset("abc")) and [p.only for p in suspects] == [{"b"}, {"c"}]
    assert all(p.isolated for p in suspects) and not rest.isolated
    assert [k for k in "abcd" if rest.wants(k)] == ["d"]
    rest, suspects = rest.after_death(done=["d"], in_flight=[])
    assert rest == Part(skip=frozenset("abcd")) and suspects == []  # a part reads its shard to its end
    rest, suspects = Part(only=frozenset("xyz")).after_death(done=["x"], in_flight=["y"])
    assert rest == Part(only=frozenset("z")) and not rest.isolated and [p.only for p in suspects] == [{"y"}]
    assert Part(only=frozenset("z")).after_death(done=["z"], in_flight=[]) == (None, [])
    # A replica that had read its whole part says exactly what is left: no call reads the shard for it.
    assert WHOLE.after_death(done=["a"], in_flight=["b"], left=["c"])[0] == Part(only=frozenset("c"))
    assert WHOLE.after_death(done=["a"], in_flight=["b"], left=[])[0] is None

    jobs = [TextJob("detail", None, {}), TextJob("style", None, {})]
    progress = Progress()
    progress.result.texts["a"] = {"detail": "a cat", "style": "photo"}
    progress.done.add("a")
    progress.in_flight["b"] = jobs[:1]  # only its detail was to be made
    figures, result = progress.died(WHOLE, "EngineDeadError")
    assert (figures["done"], figures["in_flight"], figures["poison_images"]) == (["a"], ["b"], 0)
    assert result.texts == {"a": {"detail": "a cat", "style": "photo"}} and not result.errors
    assert figures["left"] is None  # its reader had not reached the shard's end
    figures, result = progress.died(Part(only=frozenset("b"), isolated=True), "EngineDeadError")
    assert (figures["poison_key"], figures["poison_images"], figures["in_flight"]) == ("b", 1, [])
    assert list(result.errors["b"]) == ["detail"] and "alone" in result.errors["b"]["detail"]


def test_a_suspect_image_waits_for_a_replica_of_its_own_and_one_replica_is_emptied_for_it(images, tmp_path,
                                                                                          model_dir):
    """The driver's dispatch rule for suspect images (no Ray: the pool's bookkeeping alone)."""
    from pipeline.caption.distributor import Pool, Slot

    cfg = parse_config(base(images, tmp_path, model_dir, replicas=3, max_shards_in_flight=4)).captioners[0]
    pool = Pool(cfg, actor_cls=None, image_max_side=448)
    pool.slots = [Slot(None, i, in_flight=n, ready_at=0.0) for i, n in enumerate((2, 1, 3))]
    pool.slots.append(Slot(None, 3))  # still starting: never chosen
    pool.make_room()
    assert not any(s.draining for s in pool.slots)  # nothing waits: every replica takes shards
    pool.isolated.append(("00000.tar", Part(only=frozenset("b"), isolated=True)))
    assert pool.idle_slot() is None
    pool.make_room()
    assert [s.draining for s in pool.slots] == [False, True, False, False]  # the least busy is emptied
    assert pool.free_slot() is pool.slots[0]  # and gets no new shard meanwhile
    pool.make_room()
    assert [s.draining for s in pool.slots] == [False, True, False, False]  # one at a time
    pool.slots[1].in_flight = 0
    assert pool.idle_slot() is pool.slots[1]
    pool.slots[1].exclusive, pool.slots[1].in_flight = True, 1  # sent the suspect: it holds it alone
    pool.isolated.clear()
    pool.make_room()
    assert not any(s.draining for s in pool.slots)
    assert pool.free_slot() is pool.slots[0] and pool.idle_slot() is None


def test_merge_keeps_other_texts_and_replaces_errors():
    s = Sample("k", b"x", "jpg", texts={"raw": "r", "detail": "old"}, flags={"detail": ["truncated"]},
               errors={"style": "image could not be decoded"})
    merge_sample(s, [ShardResult(texts={"k": {"detail": "new", "style": "calm"}},
                                 flags={"k": {"style": ["repetition"]}}),
                     ShardResult(errors={"k": {"llava/detail": "request rejected: too long"}})])
    assert s.texts == {"raw": "r", "detail": "new", "style": "calm"}
    assert s.flags == {"style": ["repetition"]} and s.errors == {"llava/detail": "request rejected: too long"}


def test_cli_rejects_bad_config_and_missing_model_before_any_work(images, tmp_path, model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base(images, tmp_path, model_dir), "captioners": [
        {"name": "x", "model": str(tmp_path / "missing-model"), "prompts": {"set": "default"}}]}))
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "captioners[0].model" in r.stderr and "missing-model" in r.stderr and "is not a directory" in r.stderr
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cfg = write_config(tmp_path / "job.yaml", images, tmp_path / "out2", [captioner("x", empty, {"set": "default"})])
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(cfg)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "has no config.json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "ray job submit" in r.stdout


def test_writer_counts_the_samples_it_leaves_out(tmp_path):
    """A source sample the format refuses, or one that cannot be stored with its new texts, is left
    out of the output shard and counted by reason: never a failed shard, never a silent loss."""
    import json

    from helpers import write_raw_tar

    from pipeline.caption.writer import write_captioned_shard

    def record(key):
        return json.dumps({"key": key, "texts": {"raw": "a"}, "source": {}}).encode()

    source = tmp_path / "00000.tar"
    write_raw_tar(source, [("a.jpg", b"x"), ("a.json", record("a")),
                           ("b.jpg", b"x"), ("b.json", record("b")),
                           ("../c.jpg", b"x"), ("c.json", record("c"))])
    # "b" gets a caption that UTF-8 cannot store (a lone surrogate from a broken detokenizer, say).
    out = write_captioned_shard(str(source), str(tmp_path / "out.tar"),
                                [ShardResult(texts={"a": {"detail": "fine"}, "b": {"detail": "\udcff"}})])
    assert out["info"]["samples"] == 1
    assert sum(out["refused"].values()) == 2 and out["refused"]["cannot be stored with its new texts"] == 1
    assert any("sample b" in p and "surrogate" in p for p in out["problems"])
    assert any("../c.jpg" in p for p in out["problems"])


def test_a_driver_killed_between_publishing_and_recording_a_shard_loses_no_text(images, tmp_path, model_dir, capsys):
    """The crash window of an incremental run: the writer has replaced shard 0 (old texts plus the
    new prompt's) and the driver dies before its record says so. The next run records the shard
    from its intent; without it, the shard would be rebuilt from the image dataset with the new
    prompt's texts only, and the earlier texts would be lost without a word."""
    import json

    from data_manifests import ShardReader
    from pipeline.caption.job import CaptionJob
    from pipeline.caption.writer import write_captioned_shard

    def config(ids):
        return base(images, tmp_path, model_dir, prompts={"set": "default", "ids": ids})

    def texts(tid):
        return ShardResult(texts={f"00000{i:04d}": {tid: f"{tid} of {i}"} for i in range(2)})

    job = CaptionJob(parse_config(config(["detail"]), "job.yaml", check_engine_args=False), progress=False)
    plan = job.prepare()[0]
    output = str(job.writer.shard_path(plan.name))
    job.commit(plan, write_captioned_shard(plan.source, output, [texts("detail")], plan.identities), None)
    job.writer.finish()
    job.lock.close()

    # The incremental run (the new prompt only), killed right after the writer published shard 0.
    code = f"""
import json, os
from pipeline.caption.captioner import ShardResult
from pipeline.caption.config import parse_config
from pipeline.caption.job import CaptionJob
from pipeline.caption.writer import write_captioned_shard
job = CaptionJob(parse_config(json.loads({json.dumps(json.dumps(config(["style"])))}), "job.yaml",
                              check_engine_args=False), progress=False)
plan = job.prepare()[0]
assert plan.name == "00000.tar" and plan.source.startswith({json.dumps(str(tmp_path / "out"))}), plan
results = [ShardResult(texts={{f"00000{{i:04d}}": {{"style": f"style of {{i}}"}} for i in range(2)}})]
write_captioned_shard(plan.source, str(job.writer.shard_path(plan.name)), results, plan.identities)
os._exit(9)  # the driver is gone: shard 0 is published, its record still says 'detail' only
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]

    job = CaptionJob(parse_config(config(["style"]), "job.yaml", check_engine_args=False), progress=False)
    plans = job.prepare()
    said = capsys.readouterr().out
    assert "shard 00000.tar: published by a job that stopped before recording it; recorded now" in said
    assert [p.name for p in plans] == ["00001.tar", "00002.tar"]  # shard 0 has both texts: nothing to do
    assert set(job.writer.manifest.shards["00000.tar"].info["text_identities"]) == {"detail", "style"}
    for i, sample in enumerate(ShardReader(output)):
        assert sample.texts["detail"] == f"detail of {i}" and sample.texts["style"] == f"style of {i}"
    assert job.writer.manifest.text_stats.raw["detail"]["count"] == 2
    job.lock.close()
