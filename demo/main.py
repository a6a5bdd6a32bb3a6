"""`make demo`: from a URL list to a trained, evaluated Holistic CLIP on one machine.

    python -m demo                      # everything, into runs/demo
    python -m demo --out runs/demo2 --scenes 256 --steps 60

Every stage runs the project's real command (printed as it starts) in its own process:

  1. scenes   draw pictures of shapes (demo/scenes.py) with partial, web-like alt-texts,
              and write a URL list for them; a loopback HTTP server serves them during ingest
  2. ingest   python -m pipeline.ingest (img2dataset) -> OUT/images
  3. caption  python -m pipeline.caption on an embedded local Ray with one vLLM engine on the
              CPU, the default prompt set (4 prompts per image) -> OUT/captioned
  4. split    the last shards become the test set; the generator's reference texts are added
              (text ids ref/*, provenance kind "reference") -> OUT/train, OUT/test, OUT/zeroshot
  5. train    the deepspeed launcher, 2 CPU ranks (gloo), the same steps for each run:
                o2o           plain CLIP on the alt-text alone
                holistic      Holistic CLIP (5 class tokens, M2M) on alt-text + the VLM's 4 captions
                holistic-ref  the same on alt-text + the 4 reference texts
  6. eval     python -m eval: zero-shot over each drawn attribute, retrieval per text id, the
              branch heatmap
  7. report   the numbers side by side, the path of every artefact, and
              `holiclip-manifest summary` of the captioned data (OUT/report.md)

The captioner is the real small VLM named in demo/configs/caption_cpu.yaml when its weights can
be had; without network (as on machines with no model hub) the demo says so and builds a tiny,
randomly initialised VLM instead: the pipeline then runs for real, but its captions are
placeholders and the `holistic` run has nothing more to learn from them than `o2o`. The
`holistic-ref` run shows what the method does with informative texts; its texts come from the
scene generator, never from a VLM, and the report says so.

Rerunning the same command after a crash or a kill resumes: each stage skips the work it
finished (completed shards, checkpoints) and does the rest exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
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

from data_manifests import atomic_write_text, now_iso, publish
from demo import scenes as sc

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
STAGES = ("scenes", "ingest", "caption", "split", "train", "eval", "report")
RUNS = {  # name -> (training config, text ids, what it shows)
    "o2o": ("demo/configs/train_o2o.yaml", ["raw"], "plain CLIP: one embedding, the alt-text only"),
    "holistic": ("demo/configs/train_holistic.yaml", ["raw", "detail", "background", "main_object", "style"],
                 "Holistic CLIP (5 class tokens, M2M) on the alt-text + the VLM's 4 captions"),
    "holistic-ref": ("demo/configs/train_holistic.yaml", ["raw", *sc.REFERENCE_TEXTS],
                     "Holistic CLIP on the alt-text + the generator's 4 reference texts (not a VLM)"),
}
FALLBACK_NOTE = ("the captions come from a tiny, randomly initialised VLM: they are placeholders, "
                 "so `holistic` learns nothing more than `o2o`, and its four caption branches learn noise "
                 "that drags its fused scores down")


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


def choose_captioner(o: Options) -> tuple[dict[str, Any], str | None]:
    """The caption job's config, and a note when the real VLM could not be had."""
    base = yaml.safe_load(o.caption_config.read_text())
    captioner = base["captioners"][0]
    model = str(captioner["model"])
    local, reason = find_weights(model)
    note = None
    if local is None:
        tiny = o.out / "models" / "tiny-qwen2vl"
        say(f"caption: the VLM {model} is not available here ({reason}).")
        say("caption: FALLING BACK to a tiny, randomly initialised Qwen2-VL built locally; its captions are "
            "placeholders, not descriptions. Everything else runs as it would with the real model.")
        if not (tiny / "config.json").exists():
            run_stage("build-tiny-vlm", [PY, "-m", "demo.tiny_vlm", "--arch", "qwen2_vl", "--out", tiny],
                      o.out / "logs" / "caption.log")
        captioner = {**captioner, "name": "tiny-qwen2vl", "model": str(tiny),
                     "engine": {**captioner["engine"], "max_model_len": 1024}}
        note = f"{model} unavailable ({reason}); {FALLBACK_NOTE}"
    else:
        captioner = {**captioner, "model": local}
    return {"input": str(o.out / "images"), "output": str(o.out / "captioned"), "captioners": [captioner]}, note


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
    job, note = choose_captioner(o)
    config = o.out / "caption.yaml"
    header = ("# Written by python -m demo from demo/configs/caption_cpu.yaml; rerun with\n"
              f"#   python -m pipeline.caption --config {config}\n")
    if note:
        header += f"# NOTE: {note}\n"
    atomic_write_text(config, header + yaml.safe_dump(job, sort_keys=False))
    run_stage("caption", [PY, "-m", "pipeline.caption", "--config", config], o.out / "logs" / "caption.log",
              env={"HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(o.out / ".vllm_cache")})


def stage_split(o: Options) -> None:
    from demo.split import SplitError, split

    try:
        counts = split(o.out / "captioned", o.out, test_shards=o.test_shards)
    except SplitError as e:
        raise DemoError(f"split: {e}") from None
    say(f"split: {counts['train']} training and {counts['test']} test samples ({o.out / 'train'}, {o.out / 'test'}); "
        f"zero-shot sets of {counts['zeroshot']} pictures per attribute in {o.out / 'zeroshot'}")


def stage_train(o: Options) -> None:
    for name in o.runs:
        config, text_ids, _ = RUNS[name]
        run_dir = o.out / "runs" / name
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
        if results.exists() and results.stat().st_mtime >= (run_dir / "export" / "config.json").stat().st_mtime:
            say(f"eval {name}: done already ({results})")
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        partial = out / ".results.jsonl"
        commands = [["retrieval", "--data", o.out / "test", "--out", out / "retrieval"]]
        for attribute in sc.ATTRIBUTES:
            where = o.out / "zeroshot" / attribute
            commands.append(["zeroshot", "--data", where, "--classnames", where / "classnames.txt",
                             "--templates", where / "templates.txt", "--out", out / attribute])
        for args in commands:
            argv = [*map(str, args), "--checkpoint", str(run_dir), "--results", str(partial), "--no-progress"]
            say(f"$ python -m eval {shlex.join(argv)}")
            if eval_main(argv) != 0:
                raise DemoError(f"eval {name}: `python -m eval {shlex.join(argv)}` failed (message above)")
        publish(partial, results)


# ----------------------------------------------------------------------------- report


def stage_report(o: Options, note: str | None) -> Path:
    from demo.report import write_report

    report = write_report(o.out, o.runs, RUNS, note)
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
    p.add_argument("--runs", default=",".join(RUNS), help=f"training runs, comma-separated (default {','.join(RUNS)})")
    p.add_argument("--caption-config", type=Path, default=ROOT / "demo" / "configs" / "caption_cpu.yaml",
                   help="the captioner (default demo/configs/caption_cpu.yaml)")
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
                   caption_config=a.caption_config.resolve(), seed=a.seed, until=a.until)


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
            stage_report(o, read_note(o.out))
    except DemoError as e:
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[demo] interrupted; rerun the same command to go on where it stopped", file=sys.stderr)
        return 130
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


def read_note(out: Path) -> str | None:
    """The fallback note of an earlier run of the caption stage (its config records it)."""
    try:
        for line in (out / "caption.yaml").read_text().splitlines():
            if line.startswith("# NOTE: "):
                return line[len("# NOTE: "):]
    except OSError:
        pass
    return None

