"""Captioning with real components: a Ray head on loopback, `ray job submit`, vLLM engines (CPU)
running tiny randomly initialised VLMs built offline, a two-node cluster, an OpenAI-compatible
vLLM server, and kills of the driver and of an actor.

Engine starts cost 20-40 s each on this CPU, so the tests share one reference run and each
later job starts only the engines it needs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from caption_fixtures import BAD_KEYS, ENV, captioner, make_image_dataset, read_texts, write_config
from conftest import BIN, ROOT, free_port

from data_manifests import load_manifest
from demo.tiny_vlm import build_tiny_llava, build_tiny_qwen2vl
from pipeline.caption.captioner import HANG_FILE_VAR, POISON_KEY_VAR

pytestmark = pytest.mark.slow
TWO_PROMPTS = {"set": "default", "ids": ["detail", "background"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"qwen": build_tiny_qwen2vl(root / "tiny-qwen2vl"), "llava": build_tiny_llava(root / "tiny-llava")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp("images") / "ds", shards=6, per_shard=5)


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "holiclip-manifest"), "verify", str(path)], capture_output=True, text=True)


def submit(cluster, config: Path, *args, no_wait=False):
    return cluster.submit("python", "-m", "pipeline.caption", "--config", str(config), "--no-progress", *args,
                          no_wait=no_wait)


@pytest.fixture(scope="module")
def reference(ray_cluster, models, images, tmp_path_factory):
    """One uninterrupted run: qwen x (detail, background), submitted with `ray job submit`."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "job.yaml", images, tmp / "out", [captioner("tiny-qwen", models["qwen"], TWO_PROMPTS)])
    r = submit(ray_cluster, config)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    return {"config": config, "out": tmp / "out", "log": r.stdout, "texts": read_texts(tmp / "out")}


def test_uni_vlm_two_prompts_via_ray_job_submit(reference, images, models):
    out = reference["out"]
    v = verify(out)
    assert v.returncode == 0, v.stdout
    m = load_manifest(out)
    assert m.status == "complete" and m.num_samples == 30 and m.parent["dataset_id"] == load_manifest(images).dataset_id
    texts = reference["texts"]
    assert len(texts) == 30
    for key, s in texts.items():
        if key in BAD_KEYS:
            # The sample stays, with its alt-text and the reason its captions are missing.
            assert set(s["texts"]) == {"raw"} and set(s["errors"]) == {"detail", "background"}
            assert "could not be decoded" in s["errors"]["detail"]
        else:
            assert set(s["texts"]) == {"raw", "detail", "background"} and not s["errors"]
            assert s["texts"]["detail"] and s["texts"]["detail"] != s["texts"]["background"]
    # Different images give different captions (the tiny model is random, not constant).
    details = {s["texts"].get("detail") for s in texts.values()}
    assert len(details) > 20
    prov = m.texts["detail"]
    assert prov["kind"] == "caption" and prov["prompt"]["text"] == "Describe this image in detail."
    assert prov["captioner"]["content_hash"].startswith("sha256:") and prov["sampling"]["max_tokens"] == 77
    assert prov["prompt"]["set_hash"].startswith("sha256:") and prov["software"]["vllm"]
    assert m.texts["raw"]["kind"] == "alt_text"
    run = m.run["caption"]["runs"][-1]
    assert run["images"] == 28 and run["image_passes"] == 28 and run["captions"] == 56 and run["decode_errors"] == 2
    # Both prompts of an image went to the engine together: the second reuses the image's KV.
    assert run["prefix_cache_hit_rate"] > 0
    assert "images/s" in reference["log"] and "prefix-cache hit rate" in reference["log"]
    stats = m.text_stats.to_json()
    assert stats["detail"]["count"] == 28 and stats["detail"]["errors"] == 2


def test_resubmitting_a_finished_job_does_nothing(ray_cluster, reference):
    before = {p.name: p.read_bytes() for p in reference["out"].glob("*.tar")}
    runs = load_manifest(reference["out"]).run["caption"]["runs"]
    r = submit(ray_cluster, reference["config"])
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout[-3000:]
    assert {p.name: p.read_bytes() for p in reference["out"].glob("*.tar")} == before
    # A run that captioned nothing keeps the figures of the run that did the work.
    assert load_manifest(reference["out"]).run["caption"]["runs"] == runs


def _wait_for_records(out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((out / "_shards").glob("*.json"))) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished shards in {out} after {timeout}s")


def _processes(pattern: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if re.search(pattern, " ".join(p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _job_status(cluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard_url).get_job_status(submission_id))


def _wait_job_end(cluster, submission_id: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _job_status(cluster, submission_id)
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {submission_id} still running")


def _submission_id(stdout: str) -> str:
    return re.search(r"Job '([^']+)' submitted successfully", stdout).group(1)


def _submit_reference_config(cluster, models, images, tmp_path, env=(), **options) -> tuple[Path, str]:
    """Submit the reference config without waiting for the job."""
    cap = captioner("tiny-qwen", models["qwen"], TWO_PROMPTS, max_shards_in_flight=1, **options)
    cap["env"].update(env)
    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out", [cap])
    r = submit(cluster, config, no_wait=True)
    assert r.returncode == 0, r.stderr
    return config, _submission_id(r.stdout)


# Two replicas asked for, room for one (the cluster has one engine_slot): the job must go on with
# the one that starts, not wait for the other for ever.
ONE_OF_TWO = {"replicas": 2, "resources": {"num_cpus": 1, "custom": {"engine_slot": 1}}}


def test_killed_driver_resumes_to_the_same_texts(ray_cluster, reference, models, images, tmp_path):
    """Also: more replicas asked for than the cluster holds (the job goes on with the one it gets)."""
    config, job = _submit_reference_config(ray_cluster, models, images, tmp_path, **ONE_OF_TWO)
    _wait_for_records(tmp_path / "out", 1)
    # The job's entrypoint runs as `sh -c "python -m ..."`: the driver is the python process.
    drivers = [p for p in _processes(rf"pipeline\.caption --config {re.escape(str(config))}")
               if p.name().startswith("python")]
    assert len(drivers) == 1
    # The output's lock names the running job (`ray job submit`'s id), for a second job's refusal.
    assert f"Ray job {job}" in (tmp_path / "out" / ".caption.lock").read_text()
    drivers[0].send_signal(signal.SIGKILL)
    assert _wait_job_end(ray_cluster, job).endswith("FAILED")
    done_before = len(list((tmp_path / "out" / "_shards").glob("*.json")))
    assert done_before < 6, "the job finished before it could be killed: nothing was resumed"

    r = submit(ray_cluster, config)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:]
    assert ("going on with 1 of 2 replicas ready; 1 still starting (each replica asks for CPU 1, engine_slot 1; "
            "the cluster has CPU 1 free of 2, engine_slot 0 free of 1;") in r.stdout, r.stdout[-4000:]
    # A shard published in the instant before the kill is recorded from its intent, not redone.
    recovered = r.stdout.count("recorded now")
    assert f"{6 - done_before - recovered} shards to caption" in r.stdout  # only what was missing
    assert verify(tmp_path / "out").returncode == 0
    # Every sample exactly once (read_texts asserts it), with the texts of the uninterrupted run.
    assert read_texts(tmp_path / "out") == reference["texts"]


SHARD_TIMEOUT_S = 30  # a shard takes a few seconds here, with one image in flight


def test_too_few_replicas_within_the_start_timeout_stop_the_job_naming_the_missing_resources(
        ray_cluster, models, images, tmp_path):
    cap = captioner("tiny-qwen", models["qwen"], TWO_PROMPTS, min_replicas=2, start_timeout_s=5, **ONE_OF_TWO)
    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out", [cap])
    r = submit(ray_cluster, config)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "captioner 'tiny-qwen': 0 of 2 replicas started, fewer than min_replicas (2); 2 replica(s) not started: " \
           "not ready within start_timeout_s (5 s): each replica asks for CPU 1, engine_slot 1; the cluster has " \
           "CPU " in r.stdout, r.stdout[-3000:]
    assert not list((tmp_path / "out" / "_shards").glob("*.json"))


def test_an_engine_that_cannot_start_stops_the_job_with_the_engines_error_and_leaves_no_process(
        ray_cluster, models, images, tmp_path):
    """Weights that do not load (a corrupt checkpoint): the replica is given up at once (no retry,
    no wait for start_timeout_s), and the job stops before any shard, naming the captioner and the
    engine's own error. (Also the message when some replicas start
    and others cannot: the same error, on the line that says how many go on.)"""
    bad = tmp_path / "bad-model"
    shutil.copytree(models["qwen"], bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors header
    cap = captioner("broken", bad, TWO_PROMPTS)
    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out", [cap])
    r = submit(ray_cluster, config)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "captioner 'broken': 0 of 1 replicas started, fewer than min_replicas (1); 1 replica(s) not started: " \
           "the engine did not start: " in r.stdout, r.stdout[-3000:]
    # vLLM's AsyncLLM runs its engine core in a child process in every layout (the model in it on a
    # CPU, in further worker processes on GPUs) and says only "see root cause above", which is in
    # that process's log: the message carries the engine's error itself.
    assert "the engine process failed to start: SafetensorError: Error while deserializing header" in r.stdout, \
        r.stdout[-3000:]
    assert "starting it again" not in r.stdout  # the engine's set-up failed: it would fail again
    assert not list((tmp_path / "out" / "_shards").glob("*.json"))
    assert _gone(_engine_processes()), "an engine process outlived the failed start"


def _engine_processes() -> list[psutil.Process]:
    """Every process a caption replica started (engine_guard marks them), alive or not yet reaped."""
    from pipeline.caption.engine_guard import TOKEN_VAR

    found = []
    for p in psutil.process_iter():
        try:
            if TOKEN_VAR in p.environ() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _descendants(actor: psutil.Process) -> list[psutil.Process]:
    """The engine processes under `actor` (one that exits while we look is not among them)."""
    found = []
    for p in _engine_processes():
        try:
            if actor in p.parents():
                found.append(p)
        except psutil.Error:
            continue
    return found


def _engine_and_its_actor(timeout: float = 120) -> tuple[list[psutil.Process], psutil.Process]:
    """The engine processes of the one caption actor with a live engine, once there is one, and
    that actor. (A dead engine's worker process may outlive it for a moment, under its actor.)"""
    deadline = time.time() + timeout
    while True:
        for engine in _engine_processes():
            try:
                if "EngineCore" not in engine.name():
                    continue
                actor = next(p for p in engine.parents() if "ray::CaptionActor" in " ".join(p.cmdline()))
            except (StopIteration, psutil.Error):
                continue
            return _descendants(actor), actor
        assert time.time() < deadline, "no engine process appeared"
        time.sleep(0.05)


def _gone(procs: list[psutil.Process], timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


# The second image of the first shard, made to kill its engine (a test hook); with two images in
# flight the first is usually in the engine with it, an innocent suspect.
POISON = "000000001"


def test_engine_faults_poison_image_and_hung_engine_cost_only_their_work_and_leave_no_engine_behind(
        ray_cluster, reference, models, images, tmp_path):
    """vLLM's GPU process layout on the CPU (the engine is a child process of the caption actor).
    Three faults in one job, to share its engine starts (each takes 30-50 s here):
    - the actor killed while its engine starts: the engine's processes die with it, the actor is
      started again;
    - the engine process killed (SIGKILL) inside a live actor, by a poison image (a test hook: its
      sample kills the engine process when captioned). The actor used to stay and fail every
      shard it was given; a poison image used to fail its shard on every attempt and every rerun.
      Now the replica answers with what it made and is replaced, the images that were in its
      engine are tried alone, the poison kills its engine again and gets a per-sample error, every
      other image gets its texts, and neither death counts against the replacements;
    - a hung engine (a test hook: it stops answering): after shard_timeout_s the replica is
      replaced and the shard redone; without the deadline the job waited forever."""
    hang = tmp_path / "hang-once"
    config, job = _submit_reference_config(ray_cluster, models, images, tmp_path, max_images_in_flight=2,
                                           shard_timeout_s=SHARD_TIMEOUT_S,
                                           env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", HANG_FILE_VAR: str(hang),
                                                POISON_KEY_VAR: POISON})
    # An engine takes 15 s or more to start here: this kill lands before it is ready.
    engines, actor = _engine_and_its_actor()
    assert not list((tmp_path / "out" / "_shards").glob("*.json"))
    actor.send_signal(signal.SIGKILL)
    assert _gone(engines), "a half-started engine outlived its killed actor"

    # The actor started again; the poison kills its engine process on the first shard.
    engines, actor = _engine_and_its_actor()
    core = next(e for e in engines if "EngineCore" in e.name())
    assert _gone([core], timeout=300), "the poison image did not kill the engine"
    assert not list((tmp_path / "out" / "_shards").glob("*.json"))
    assert _gone([actor]), "the actor of a dead engine stayed"
    assert _gone(engines)

    _wait_for_records(tmp_path / "out", 1)  # the first shard, its poison image found
    hang.touch()  # the replica working on the next shard takes it and stops answering

    assert _wait_job_end(ray_cluster, job, timeout=500).endswith("SUCCEEDED")
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(ray_cluster.dashboard_url).get_job_logs(job)
    (tmp_path / "job.log").write_text(logs)  # kept with the test's files, to read after a failure
    assert "died while its engine started" in logs and "starting it again" in logs
    assert f"sample {POISON} killed tiny-qwen's engine twice, the second time alone" in logs, logs[-3000:]
    # A replica answered with what it had made and was replaced; the image in its engine was tried alone.
    assert "tried again one at a time" in logs, logs[-3000:]  # the images in the engine (the poison's first death)
    assert f"over shard_timeout_s ({SHARD_TIMEOUT_S}): the engine is hung" in logs and not hang.exists(), logs[-3000:]
    assert logs.count("started a replacement") == 3, logs[-3000:]  # one per death, none for slowness
    assert " FAILED: " not in logs
    assert verify(tmp_path / "out").returncode == 0
    texts = read_texts(tmp_path / "out")
    assert set(texts[POISON]["texts"]) == {"raw"} and set(texts[POISON]["errors"]) == {"detail", "background"}
    assert "alone" in texts[POISON]["errors"]["detail"]
    assert {k: v for k, v in texts.items() if k != POISON} == {
        k: v for k, v in reference["texts"].items() if k != POISON}
    run = load_manifest(tmp_path / "out").run["caption"]["runs"][-1]
    assert run["poison_images"] == 1 and run["poison_samples"] == [f"00000.tar/{POISON}"]
    assert _gone(_engine_processes(), timeout=30), "engine processes left after the job"


def test_adding_a_prompt_and_a_captioner_computes_only_new_texts(ray_cluster, reference, models, images, tmp_path):
    """Uni-VLM and multi-VLM mixed: qwen gains a prompt, llava joins with one prompt."""
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    caps = [captioner("tiny-qwen", models["qwen"], {"set": "default", "ids": ["detail", "background", "style"]},
                      text_id_prefix="none"),
            captioner("llava", models["llava"], {"set": "one_prompt"})]
    config = write_config(tmp_path / "job.yaml", images, out, caps)
    r = submit(ray_cluster, config)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:]
    assert verify(out).returncode == 0
    m = load_manifest(out)
    run = m.run["caption"]["runs"][-1]
    assert run["captions"] == 28 * 2  # style and llava/detail only: nothing old was recomputed
    # Each image once in the run's images, though two captioners went through it.
    assert run["images"] == 28 and run["image_passes"] == 28 * 2, run
    texts = read_texts(out)
    for key, s in texts.items():
        ref = reference["texts"][key]["texts"]
        for tid in ("raw", "detail", "background"):
            assert s["texts"].get(tid) == ref.get(tid)
        if key not in BAD_KEYS:
            assert {"style", "llava/detail"} <= set(s["texts"])
    assert m.texts["llava/detail"]["captioner"]["name"] == "llava"
    assert m.texts["style"]["prompt"]["id"] == "style"


def test_changing_a_prompt_under_an_existing_id_is_refused(reference, images, models, tmp_path):
    prompts = tmp_path / "mine.yaml"
    prompts.write_text("name: mine\nprompts:\n  - {id: detail, family: gaze-glance, text: Describe it briefly.}\n")
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    config = write_config(tmp_path / "job.yaml", images, out,
                          [captioner("tiny-qwen", models["qwen"], {"set": str(prompts)})])
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(config)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "text id 'detail' already exists" in r.stderr and "Describe it briefly." in r.stderr
    assert "overwrite" in r.stderr and "Traceback" not in r.stderr
    assert read_texts(out) == reference["texts"]  # nothing was touched


def _kill_node(cluster, ip: str) -> int:
    """SIGKILL every process of the node on `ip` (its raylet, agents, workers, engines), as when
    the machine is lost. The number of processes killed."""
    raylet = [p for p in psutil.process_iter(["cmdline"])
              if any(cluster.temp_dir in a for a in p.info["cmdline"] or [])
              and any(a.endswith((f"node_ip_address={ip}", f"node-ip-address={ip}")) or a == ip
                      for a in p.info["cmdline"] or [])]
    doomed = {p for r in raylet for p in [r, *r.children(recursive=True)]}
    for p in doomed:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(doomed)


def test_a_lost_node_costs_only_its_work(two_node_ray_cluster, reference, models, images, tmp_path):
    """Two replicas spread over a head and a second `ray start` node (one CPU each, so one replica
    per node); the second node is lost (every process of it killed) once a shard is done. The
    job finishes on the head: its replacement has no room and is never waited for, work the node
    held (a shard in flight, texts not yet written) is made again, nothing is lost or twice."""
    from ray.job_submission import JobSubmissionClient

    # min_replicas 2: no shard before both engines are up (the head alone would finish the few
    # small shards first); one shard each in flight and one image at a time: the kill lands mid-job.
    cap = captioner("tiny-qwen", models["qwen"], TWO_PROMPTS, replicas=2, min_replicas=2, max_shards_in_flight=1,
                    max_images_in_flight=1)
    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out", [cap])
    r = submit(two_node_ray_cluster, config, no_wait=True)
    assert r.returncode == 0, r.stderr
    job = _submission_id(r.stdout)
    client = JobSubmissionClient(two_node_ray_cluster.dashboard_url)
    _wait_for_records(tmp_path / "out", 1)
    assert len(list((tmp_path / "out" / "_shards").glob("*.json"))) < 5, "too late: nothing left to lose"
    assert _kill_node(two_node_ray_cluster, "127.0.0.2") > 3
    end = _wait_job_end(two_node_ray_cluster, job, timeout=400)
    logs = client.get_job_logs(job)
    assert end.endswith("SUCCEEDED"), logs[-6000:]  # the driver's own account of what went wrong
    # The shard the node held was redone (retried, or captioned again if its texts were made but not written).
    assert "started a replacement" in logs and " FAILED: " not in logs, logs[-3000:]
    assert "retrying" in logs or "captioning it again" in logs, logs[-3000:]
    assert verify(tmp_path / "out").returncode == 0
    assert read_texts(tmp_path / "out") == reference["texts"]  # every sample once, the one-node texts
    # Both nodes worked: the second before it was lost.
    run = load_manifest(tmp_path / "out").run["caption"]["runs"][-1]
    assert set(run["nodes"]) == {"127.0.0.2", "127.0.0.3"}
    # The run's images are the dataset's, once each; work made again is counted apart.
    assert run["images"] == 28 and run["image_passes"] >= 28, run


@pytest.fixture
def openai_server(models):
    port = free_port()
    log = open(Path(models["qwen"]).parent / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models["qwen"]),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "1024", "--enforce-eager", "--served-model-name", "tiny-qwen"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, start_new_session=True)
    import urllib.request

    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            time.sleep(1)
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_openai_backend_against_a_vllm_server(ray_cluster, openai_server, reference, images, tmp_path):
    """The served captioner gets the same texts as the engine-in-actor one on the same model: the
    server (its own chat templating, tokenization and image handling) is the independent check of
    the engine path's shortcuts (prompts tokenized once, images as arrays keyed by content)."""
    cap = {"name": "served", "type": "openai", "model": "tiny-qwen", "endpoints": [openai_server],
           "prompts": TWO_PROMPTS, "concurrency": 4, "timeout_s": 60, "max_retries": 2,
           "resources": {"num_cpus": 0.5}}
    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out", [cap], num_shards=2)
    r = submit(ray_cluster, config)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:]
    assert verify(tmp_path / "out").returncode == 0
    texts = read_texts(tmp_path / "out")
    assert len(texts) == 10
    for key, s in texts.items():
        if key in BAD_KEYS:
            assert set(s["errors"]) == {"detail", "background"}
        else:
            assert s["texts"]["detail"] and s["texts"]["background"]
            assert (s["texts"], s["flags"]) == (reference["texts"][key]["texts"], reference["texts"][key]["flags"]), key
    m = load_manifest(tmp_path / "out")
    assert m.texts["detail"]["captioner"]["type"] == "openai"
    assert m.texts["detail"]["captioner"]["endpoints"] == [openai_server]
    assert m.run["caption"]["runs"][-1]["captions"] == 16


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size, mounted for the test (needs root or CAP_SYS_ADMIN, as in CI)."""
    mounts = []

    def mount(size_kib: int, *options: str) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_kib}k", *options]), "tmpfs",
                            str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): a full disk cannot be made for real")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_fails_clearly_keeps_finished_shards_and_a_rerun_finishes(ray_cluster, reference, models,
                                                                            images, small_disk, tmp_path):
    sizes = sorted(p.stat().st_size for p in reference["out"].glob("*.tar"))
    # Room for two shards and the bookkeeping, not for six.
    disk = small_disk((sizes[0] + sizes[1]) // 1024 + 48)
    config = write_config(tmp_path / "job.yaml", images, disk / "out",
                          [captioner("tiny-qwen", models["qwen"], TWO_PROMPTS, max_shards_in_flight=1)])
    r = submit(ray_cluster, config)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "No space left on device" in r.stdout and "the filesystem is full" in r.stdout, r.stdout[-3000:]
    m = load_manifest(disk / "out")
    done = [s.name for s in m.shards.values() if s.status == "complete"]
    assert 0 < len(done) < 6, m.counts()
    assert not list((disk / "out").glob(".*partial*")), "a partial shard was left behind"
    kept = {name: (disk / "out" / name).read_bytes() for name in done}

    # Room again (the same mount, grown): the rerun captions only what is missing.
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    r = submit(ray_cluster, config)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:]
    assert f"{6 - len(done)} shards to caption" in r.stdout
    assert {name: (disk / "out" / name).read_bytes() for name in done} == kept
    assert verify(disk / "out").returncode == 0
    assert read_texts(disk / "out") == reference["texts"]


def test_read_only_output_is_refused_before_any_work(images, models, small_disk, tmp_path):
    disk = small_disk(1024, "ro")
    config = write_config(tmp_path / "job.yaml", images, disk / "out",
                          [captioner("tiny-qwen", models["qwen"], TWO_PROMPTS)])
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(config), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, **ENV}, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(disk / "out") in r.stderr and ("not writable" in r.stderr or "Read-only" in r.stderr), r.stderr


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(images, models, tmp_path):
    from data_manifests import hold_lock

    config = write_config(tmp_path / "job.yaml", images, tmp_path / "out",
                          [captioner("tiny-qwen", models["qwen"], TWO_PROMPTS)])
    held = hold_lock(tmp_path / "out", "caption", "Ray job raysubmit_first")  # as a running driver holds it
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(config), "--no-progress"],
                           capture_output=True, text=True, env={**os.environ, **ENV}, cwd=ROOT, timeout=300)
    finally:
        held.close()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "another caption job is writing to this directory: Ray job raysubmit_first, pid" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
