"""`make demo`: from a URL list to a trained, evaluated Holistic CLIP on one machine.

    python -m demo                      # everything, into runs/demo
    python -m demo --out runs/demo2 --scenes 256 --steps 60

Every stage runs the project's real command (printed as it starts) in its own process:

  1. scenes   draw pictures of shapes (demo/scenes.py) with partial, web-like alt-texts,
              and write a URL list for them; a loopback HTTP server serves them during ingest
  2. ingest   python -m pipeline.ingest (img2dataset) -> OUT/images
  3. caption  python -m pipeline.caption on an embedded local Ray with two vLLM engines on the
              CPU (demo/configs/caption_cpu.yaml): captioner `plain` with the default prompt set
              (4 prompts per image) and captioner `terse` with one prompt (detail)
  4. split    the last shards become the test set; the generator's reference texts are added
              (text ids ref/*, provenance kind "reference") -> OUT/train, OUT/test, OUT/zeroshot
  5. train    the deepspeed launcher, 2 CPU ranks (gloo), the same steps for each run:
                o2o        plain CLIP on the alt-text alone
                o2m        one embedding, every text: alt-text + the 4 captions of `plain`
                holistic   Holistic CLIP (5 class tokens, M2M) on the same 5 texts
                multi-vlm  Holistic CLIP (3 class tokens) on alt-text + each captioner's detail
              (and, when asked for with --runs, holistic-ref: the 4 reference texts instead of
              the captions, an upper bound that never passes through a VLM)
  6. eval     python -m eval: zero-shot over each drawn attribute (average and adaptive fusion,
              each branch alone), retrieval per text id, the branch heatmap
  7. report   the numbers side by side, each captioner's accuracy per attribute on the
              held-out pictures, a grid of held-out pictures with their captions, the path of
              every artefact, and `holiclip-manifest summary` of the captioned data (OUT/report.md)

The captioners are two tiny Qwen2-VL models trained by this project on generated scenes of the
same world (python -m demo.train_captioner; the card HOLICLIP_TINY_VLM.json beside each says how):
they describe these pictures and nothing else. `--captioner HF_ID_OR_DIR` captions with a real
VLM instead (its weights from a local directory, the Hugging Face cache, or the hub), with the
default prompts; every later stage runs unchanged.

Rerunning the same command after a crash or a kill resumes: each stage skips the work it
finished (completed shards, checkpoints) and does the rest exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from data_manifests import atomic_write_text, load_manifest, now_iso, publish
from demo import scenes as sc

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
STAGES = ("scenes", "ingest", "caption", "split", "train", "eval", "report")
# name -> (training config, texts it trains on, what it shows). The texts are a group of text ids
# (text_groups) known once the caption stage has run: they depend on the captioners.
RUNS = {
    "o2o": ("demo/configs/train_o2o.yaml", "raw", "plain CLIP: one embedding, the alt-text only"),
    "o2m": ("demo/configs/train_o2m.yaml", "captions",
            "O2M, the paper's strongest baseline: one embedding trained on the alt-text and every caption"),
    "holistic": ("demo/configs/train_holistic.yaml", "captions",
                 "Holistic CLIP (one class token per text id, M2M) on the alt-text + one VLM's 4 captions"),
    "multi-vlm": ("demo/configs/train_holistic.yaml", "vlms",
                  "Holistic CLIP (M2M) on the alt-text + each VLM's detailed caption (multi-VLM gadget)"),
    "holistic-ref": ("demo/configs/train_holistic.yaml", "ref",
                     "upper bound, not a VLM: Holistic CLIP on the alt-text + the generator's 4 reference texts"),
}
DEFAULT_RUNS = ("o2o", "o2m", "holistic", "multi-vlm")


class DemoError(RuntimeError):
    """A stage failed; the message names it and how to go on."""


@dataclass
class Options:
    out: Path
    scenes: int
    shard_size: int
    test_shards: int
    image_size: int
    steps: int
    ranks: int
    runs: list[str]
    caption_config: Path
    captioner: str | None
    seed: int
    until: str


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# ----------------------------------------------------------------------------- processes


def run_stage(name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one stage's command, its output both on the terminal and in OUT/logs/<name>.log."""
    say(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        sink.write(f"\n=== {now_iso()} $ {shlex.join(map(str, cmd))}\n".encode())
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            sink.write(chunk)
        code = proc.wait()
    if code != 0:
        raise DemoError(f"stage {name} failed (exit {code}); its log is {log}. Fix what it names and rerun the "
                        "same command: finished work is kept and only the rest is done.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(directory: Path, port: int) -> Iterator[str]:
    """A quiet HTTP server on 127.0.0.1:port for the scene pictures."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(directory)))
    except OSError as e:
        raise DemoError(f"cannot serve the pictures on 127.0.0.1:{port} ({e.strerror}); "
                        "the URL list of this demo directory names that port: stop what holds it, "
                        "or start afresh with another --out") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- stages


def stage_scenes(o: Options) -> dict[str, Any]:
    """Pictures in OUT/www and their URL list OUT/urls.csv (written once; reruns reuse them)."""
    spec_path = o.out / "scenes.json"
    spec = {"scenes": o.scenes, "seed": o.seed, "image_size": o.image_size}
    if spec_path.exists():
        saved = json.loads(spec_path.read_text())
        if {k: saved.get(k) for k in spec} != spec:
            raise DemoError(f"{o.out} holds a demo made with {json.dumps({k: saved.get(k) for k in spec})}, not "
                            f"{json.dumps(spec)}: use another --out, or delete {o.out} to start afresh")
        say(f"scenes: {o.scenes} pictures already drawn ({o.out / 'www'})")
        return saved
    www = o.out / "www"
    www.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rows = []
    for i, scene in enumerate(sc.scenes(o.scenes, o.seed)):
        name = f"{i:06d}.png"
        (www / name).write_bytes(sc.encode(sc.draw(scene, o.image_size, seed=o.seed * 1_000_003 + i)))
        rows.append({"url": f"http://127.0.0.1:{port}/{name}", "caption": scene.alt_text, **scene.labels()})
    import pandas as pd

    atomic_write_text(o.out / "urls.csv", pd.DataFrame(rows).to_csv(index=False))
    saved = {**spec, "port": port}
    atomic_write_text(spec_path, json.dumps(saved, indent=1) + "\n")
    say(f"scenes: drew {o.scenes} pictures of {o.image_size}x{o.image_size} px into {www}; "
        f"URL list {o.out / 'urls.csv'}")
    return saved


def stage_ingest(o: Options, spec: dict[str, Any]) -> None:
    cmd = [PY, "-m", "pipeline.ingest", "--urls", o.out / "urls.csv", "--out", o.out / "images",
           "--keep-columns", ",".join(sc.ATTRIBUTES), "--shard-size", o.shard_size, "--image-size", o.image_size,
           "--processes", 1, "--threads", 16, "--timeout", 5]
    with serve(o.out / "www", spec["port"]):
        run_stage("ingest", cmd, o.out / "logs" / "ingest.log")


def caption_job(o: Options) -> dict[str, Any]:
    """The caption job's config: the demo config's captioners, or the one VLM of --captioner."""
    base = yaml.safe_load(o.caption_config.read_text())
    captioners = []
    for captioner in base["captioners"]:
        model = Path(str(captioner["model"])).expanduser()
        if not model.is_absolute() and str(captioner["model"]).startswith("."):
            model = (o.caption_config.parent / model).resolve()
        captioners.append({**captioner, "model": str(model)})
    if o.captioner:
        local, reason = find_weights(o.captioner)
        if local is None:
            raise DemoError(f"--captioner {o.captioner}: {reason}. Give a local directory holding the VLM's "
                            "weights, or leave --captioner out to use the demo's own captioners")
        engine = {k: v for k, v in captioners[0].get("engine", {}).items() if k != "max_model_len"}
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(o.captioner).name).strip("-") or "vlm"
        captioners = [{**captioners[0], "name": name, "model": local,
                       "prompts": {"set": "default"}, "engine": {**engine, "max_model_len": 2048}}]
    for captioner in captioners:
        if not Path(captioner["model"]).is_dir() and captioner["model"].startswith("/"):
            raise DemoError(f"captioner {captioner['name']!r}: model directory {captioner['model']} does not exist "
                            f"(named in {o.caption_config})")
    return {"input": str(o.out / "images"), "output": str(o.out / "captioned"), "captioners": captioners}


def find_weights(model: str) -> tuple[str | None, str]:
    """A local directory holding the model's weights, or None and the reason."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve()), ""
    try:
        from huggingface_hub import model_info, snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    # huggingface_hub raises its HTTP client's own errors as well as OSError: whatever goes wrong
    # here, the answer is "not available", with the reason shown to the user.
    try:
        return snapshot_download(model, local_files_only=True), ""
    except Exception:  # noqa: BLE001 - not in the local cache: try the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return None, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        model_info(model, timeout=10)
    except Exception as e:  # noqa: BLE001
        return None, ("the Hugging Face hub cannot be reached: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    say(f"caption: downloading {model} from the Hugging Face hub")
    try:
        return snapshot_download(model), ""
    except Exception as e:  # noqa: BLE001
        return None, f"the download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def stage_caption(o: Options) -> None:
    job = caption_job(o)
    config = o.out / "caption.yaml"
    source = f"--captioner {o.captioner}" if o.captioner else str(o.caption_config.relative_to(ROOT)
                                                                   if o.caption_config.is_relative_to(ROOT)
                                                                   else o.caption_config)
    header = (f"# Written by python -m demo from {source}; rerun with\n"
              f"#   python -m pipeline.caption --config {config}\n")
    atomic_write_text(config, header + yaml.safe_dump(job, sort_keys=False))
    run_stage("caption", [PY, "-m", "pipeline.caption", "--config", config], o.out / "logs" / "caption.log",
              env={"HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(o.out / ".vllm_cache")})


def text_groups(captioned: Path) -> dict[str, list[str]]:
    """The text ids each run trains on, from the captioned dataset's provenance:
    raw (the alt-text); captions (alt-text + every text of the first captioner); vlms (alt-text +
    each captioner's `detail` text, when there are two or more); ref (alt-text + reference texts)."""
    from demo.report import captioners

    by_captioner = [c["text_ids"] for c in captioners(load_manifest(captioned)).values()]  # text id -> prompt id
    first = by_captioner[0] if by_captioner else {}
    details = [tid for texts in by_captioner for tid, pid in texts.items() if pid == "detail"]
    return {"raw": ["raw"], "captions": ["raw", *first],
            "vlms": ["raw", *details] if len(details) > 1 else [], "ref": ["raw", *sc.REFERENCE_TEXTS]}


def stage_split(o: Options) -> None:
    from demo.split import SplitError, split

    try:
        counts = split(o.out / "captioned", o.out, test_shards=o.test_shards)
    except SplitError as e:
        raise DemoError(f"split: {e}") from None
    say(f"split: {counts['train']} training and {counts['test']} test samples ({o.out / 'train'}, {o.out / 'test'}); "
        f"zero-shot sets of {counts['zeroshot']} pictures per attribute in {o.out / 'zeroshot'}")


def stage_train(o: Options) -> None:
    groups = text_groups(o.out / "captioned")
    for name in o.runs:
        config, group, _ = RUNS[name]
        text_ids = groups[group]
        run_dir = o.out / "runs" / name
        if not text_ids:
            say(f"train {name}: skipped: it needs two or more captioners with a `detail` prompt")
            continue
        if finished_steps(run_dir) == o.steps:
            say(f"train {name}: already trained for {o.steps} steps ({run_dir / 'export'})")
            continue
        cmd = [BIN / "deepspeed", "--num_gpus", o.ranks, "--master_port", free_port(), "--module", "train.main",
               "--config", config, "--set", f"output_dir={run_dir}", "--set", f"data.shards=[{o.out / 'train'}]",
               "--set", f"data.text_ids=[{','.join(text_ids)}]", "--set", f"train.steps={o.steps}",
               "--set", f"checkpoint.every_steps={max(1, o.steps // 3)}"]
        run_stage(f"train-{name}", cmd, o.out / "logs" / f"train-{name}.log",
                  env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})


def finished_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "export" / "config.json").read_text())["training"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_eval(o: Options) -> None:
    """Every evaluation of every run, in this process (one model load per run, no start-up cost)."""
    from eval.cli import main as eval_main

    for name in o.runs:
        run_dir = o.out / "runs" / name
        out = o.out / "eval" / name
        results = out / "results.jsonl"
        if finished_steps(run_dir) is None:
            continue  # a run the train stage skipped
        if results.exists() and results.stat().st_mtime >= (run_dir / "export" / "config.json").stat().st_mtime:
            say(f"eval {name}: done already ({results})")
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        partial = out / ".results.jsonl"
        branched = yaml.safe_load((ROOT / RUNS[name][0]).read_text())["model"]["branch"] != "none"
        fusion = "average,adaptive" if branched else "average"  # adaptive: weights over branches per query
        commands = [["retrieval", "--data", o.out / "test", "--out", out / "retrieval"]]
        for attribute in sc.ATTRIBUTES:
            where = o.out / "zeroshot" / attribute
            commands.append(["zeroshot", "--data", where, "--classnames", where / "classnames.txt",
                             "--templates", where / "templates.txt", "--out", out / attribute])
        for args in commands:
            argv = [*map(str, args), "--checkpoint", str(run_dir), "--results", str(partial), "--no-progress",
                    "--fusion", fusion]
            say(f"$ python -m eval {shlex.join(argv)}")
            if eval_main(argv) != 0:
                raise DemoError(f"eval {name}: `python -m eval {shlex.join(argv)}` failed (message above)")
        publish(partial, results)


# ----------------------------------------------------------------------------- report


def stage_report(o: Options) -> Path:
    from demo.report import write_report

    runs = [r for r in o.runs if (o.out / "eval" / r / "results.jsonl").exists()]
    report = write_report(o.out, runs, RUNS)
    print(report.read_text(), flush=True)
    run_stage("summary", [BIN / "holiclip-manifest", "summary", o.out / "captioned"], o.out / "logs" / "summary.log")
    say(f"report: {report}")
    return report


# ----------------------------------------------------------------------------- entry


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="demo directory (default: runs/demo)")
    p.add_argument("--scenes", type=int, default=768, help="pictures to draw (default 768)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--test-shards", type=int, default=2, help="last shards held out for evaluation (default 2)")
    p.add_argument("--image-size", type=int, default=96, help="picture size in pixels (default 96)")
    p.add_argument("--steps", type=int, default=150, help="training steps of every run (default 150)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed processes (default 2)")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help=f"training runs, comma-separated, of {', '.join(RUNS)} (default {','.join(DEFAULT_RUNS)})")
    p.add_argument("--caption-config", type=Path, default=ROOT / "demo" / "configs" / "caption_cpu.yaml",
                   help="the captioners (default demo/configs/caption_cpu.yaml: the demo's two trained tiny VLMs)")
    p.add_argument("--captioner", metavar="HF_ID_OR_DIR",
                   help="caption with this VLM instead (a local directory, or a Hugging Face id found in the cache "
                        "or on the hub), the default prompt set, the config's engine settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--until", choices=STAGES, default="report", help="stop after this stage")
    a = p.parse_args(argv)
    runs = [r for r in a.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown run {', '.join(unknown)} (known: {', '.join(RUNS)})")
    shards = -(-a.scenes // a.shard_size)
    if a.scenes < 1 or a.shard_size < 1 or not 0 < a.test_shards < shards:
        p.error(f"--test-shards must leave at least one of the {shards} shards for training")
    return Options(out=a.out.resolve(), scenes=a.scenes, shard_size=a.shard_size, test_shards=a.test_shards,
                   image_size=a.image_size, steps=a.steps, ranks=a.ranks, runs=runs,
                   caption_config=a.caption_config.resolve(), captioner=a.captioner, seed=a.seed, until=a.until)


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    o.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last = STAGES.index(o.until)
    try:
        spec = stage_scenes(o)
        steps = [("ingest", lambda: stage_ingest(o, spec)), ("caption", lambda: stage_caption(o)),
                 ("split", lambda: stage_split(o)), ("train", lambda: stage_train(o)), ("eval", lambda: stage_eval(o))]
        for stage, fn in steps:
            if STAGES.index(stage) > last:
                return 0
            t0 = time.monotonic()
            say(f"--- {stage} ---")
            fn()
            say(f"{stage}: {time.monotonic() - t0:.0f} s")
        if last == STAGES.index("report"):
            stage_report(o)
    except DemoError as e:
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[demo] interrupted; rerun the same command to go on where it stopped", file=sys.stderr)
        return 130
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0
