"""Captioning throughput: the whole pipeline against raw vLLM, on the same images and model.

    python bench/caption_throughput.py                      # tiny random Qwen2-VL on the CPU
    python bench/caption_throughput.py --model DIR --images 512 --engine '{"dtype": "bfloat16"}'   # on a GPU

(a) raw vLLM: `LLM.generate` over every (image, prompt) of images already decoded in memory, the
    best a hand-written script can do (no shard reading, no writing, no bookkeeping), twice:
    with vLLM's defaults, and with the whole engine in the script's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, all cores for torch), which is faster on a small CPU; the
    ratio is taken against the faster of the two;
(b) the pipeline: `python -m pipeline.caption` from image shards to captioned shards, timed from
    the moment its engines are ready (as reported in its manifest) to the last shard written.
Both use the same engine settings and greedy decoding with a fixed output length (the tiny model
never stops early, so every caption is exactly --max-tokens long).

Each of (a) and (b) starts its own engine in its own process and is run --repeats times,
rotating which goes first, so that drift in the machine's load falls on all; the ratio is
that of the medians, and every single figure is printed too (one run of either says little on a
small shared CPU).

Also: 1 prompt vs 4 prompts per image (prefix reuse should keep 4 prompts well under 4x the time
of 1), and prefix caching on vs off. Prints a table and a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_inputs(root: Path, images: int, per_shard: int) -> Path:
    from caption_fixtures import scene

    from data_manifests import DatasetWriter, Sample, sha256_hex

    writer = DatasetWriter(root, stage="ingest", flush_every_s=0)
    writer.set_texts({"raw": {"kind": "alt_text", "source": "bench"}})
    for s in range((images + per_shard - 1) // per_shard):
        samples = []
        for i in range(min(per_shard, images - s * per_shard)):
            data = scene(s * 1000 + i)
            samples.append(Sample(f"{s:05d}{i:04d}", data, "jpg", {"raw": f"scene {i}"},
                                  source={"sha256": sha256_hex(data)}))
        writer.write_shard(f"{s:05d}.tar", samples)
    writer.finish()
    return root


def raw_vllm(model: str, engine: dict, images_dir: Path, prompt_ids: list[str], max_tokens: int) -> dict:
    """(a): decode everything first (untimed), then one LLM.generate over all requests."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from caption_prompts import load_prompt_set
    from data_manifests import ShardReader, list_shard_files
    from pipeline.caption.images import decode_image

    prompts = [load_prompt_set("default").get(i).text for i in prompt_ids]
    processor = AutoProcessor.from_pretrained(model)
    templates = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        tokenize=False, add_generation_prompt=True) for p in prompts]
    decoded = [decode_image(s.image, 448) for name in list_shard_files(images_dir)
               for s in ShardReader(images_dir / name)]
    llm = LLM(model=model, limit_mm_per_prompt={"image": 1}, **engine)
    requests = [{"prompt": t, "multi_modal_data": {"image": im}} for im in decoded for t in templates]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(requests[: len(templates)], params, use_tqdm=False)  # warm-up on one image
    t0 = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    del llm
    return {"images": len(decoded), "captions": len(outs), "seconds": seconds,
            "images_per_s": len(decoded) / seconds, "captions_per_s": len(outs) / seconds,
            "generated_tokens_per_s": generated / seconds,
            "prefix_cache_hit_rate": cached / prompt_tokens if prompt_tokens else None}


def raw_vllm_process(model: str, engine: dict, images_dir: Path, prompt_ids: list[str], max_tokens: int,
                     env: dict[str, str]) -> dict:
    """(a) in a fresh process, as (b) gets: no engine, allocator or cache state carried between runs."""
    out = images_dir.parent / "raw_figures.json"
    spec = json.dumps({"model": model, "engine": engine, "images_dir": str(images_dir), "prompt_ids": prompt_ids,
                       "max_tokens": max_tokens, "out": str(out)})
    r = subprocess.run([sys.executable, __file__, "--raw-spec", spec], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env})
    if r.returncode != 0:
        raise SystemExit(f"raw vLLM run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def pipeline_run(model: str, engine: dict, images_dir: Path, out: Path, prompt_ids: list[str],
                 max_tokens: int, work: Path, actor_cpus: float, shards_in_flight: int) -> dict:
    """(b): the real job on an embedded local Ray; figures from the manifest it writes."""
    import yaml

    prompt_set = work / f"bench_prompts_{len(prompt_ids)}.yaml"
    from caption_prompts import load_prompt_set

    base = load_prompt_set("default")
    prompt_set.write_text(yaml.safe_dump({"name": "bench", "prompts": [
        {"id": p.id, "family": p.family, "text": p.text, "max_new_tokens": max_tokens}
        for p in base.select(prompt_ids).prompts]}))
    config = work / f"bench_{out.name}.yaml"
    config.write_text(yaml.safe_dump({"input": str(images_dir), "output": str(out), "captioners": [{
        "name": "bench", "model": model, "prompts": {"set": str(prompt_set)}, "engine": engine,
        "sampling": {"temperature": 0.0}, "max_shards_in_flight": shards_in_flight, "max_images_in_flight": 128,
        # Ray sets OMP_NUM_THREADS to an actor's CPU count and, on a CPU, the model runs in the
        # engine process with that many threads (on 2 cores, 1 leaves the other to the front end).
        "resources": {"num_cpus": actor_cpus}}]}))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    r = subprocess.run([sys.executable, "-m", "pipeline.caption", "--config", str(config), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"pipeline run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    from data_manifests import load_manifest

    run = load_manifest(out).run["caption"]["runs"][-1]
    return {k: run[k] for k in ("images", "captions", "seconds", "images_per_s", "captions_per_s",
                                "generated_tokens_per_s", "prefix_cache_hit_rate")}


def median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (a real run, so its figures stay consistent with each other)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: build the tiny Qwen2-VL)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--per-shard", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--actor-cpus", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs reserved by the pipeline's engine actor (default: all)")
    parser.add_argument("--shards-in-flight", type=int, default=2,
                        help="the pipeline's max_shards_in_flight per engine (its default: 2)")
    parser.add_argument("--engine", default='{"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": true, '
                                            '"max_num_seqs": 64}', help="vLLM engine settings (JSON)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each of (a) and (b) with 4 prompts")
    parser.add_argument("--raw-spec", help=argparse.SUPPRESS)  # internal: run (a) once and print its figures
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.raw_spec:
        spec = json.loads(args.raw_spec)
        figures = raw_vllm(spec["model"], spec["engine"], Path(spec["images_dir"]), spec["prompt_ids"],
                           spec["max_tokens"])
        Path(spec["out"]).write_text(json.dumps(figures))
        return 0
    engine = json.loads(args.engine)
    work = Path(tempfile.mkdtemp(prefix="capbench"))
    model = args.model
    if not model:
        from demo.tiny_vlm import build_tiny_qwen2vl

        model = str(build_tiny_qwen2vl(work / "tiny-qwen2vl"))
    images_dir = make_inputs(work / "images", args.images, args.per_shard)
    four = ["detail", "background", "main_object", "style"]
    raw_env = {"raw_4p": {}, "raw_4p_1proc": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    runs: dict[str, list[dict]] = {"raw_4p": [], "raw_4p_1proc": [], "pipeline_4p": []}
    for r in range(args.repeats):
        order = list(runs)[r % 3:] + list(runs)[:r % 3]  # each goes first, second and third in turn
        for name in order:
            if name in raw_env:
                res = raw_vllm_process(model, {**engine, "enable_prefix_caching": True}, images_dir, four,
                                       args.max_tokens, raw_env[name])
            else:
                res = pipeline_run(model, engine, images_dir, work / f"out_4p_{r}", four, args.max_tokens, work,
                                   args.actor_cpus, args.shards_in_flight)
            runs[name].append(res)
            print(f"repeat {r + 1}/{args.repeats} {name}: {res['images_per_s']:.2f} images/s", flush=True)
    runs["pipeline_1p"] = [pipeline_run(model, engine, images_dir, work / "out_1p", ["detail"], args.max_tokens,
                                        work, args.actor_cpus, args.shards_in_flight)]
    runs["pipeline_4p_nocache"] = [pipeline_run(model, {**engine, "enable_prefix_caching": False}, images_dir,
                                                work / "out_4p_nocache", four, args.max_tokens, work, args.actor_cpus,
                                                args.shards_in_flight)]
    results = {name: median_run(rs) for name, rs in runs.items()}

    print(f"\n{'run':24s} {'images/s':>9s} {'captions/s':>11s} {'gen tok/s':>10s} {'seconds':>8s} {'prefix hit':>10s}"
          f"  images/s of each run")
    for name, r in results.items():
        hit = r["prefix_cache_hit_rate"]
        each = ", ".join(f"{x['images_per_s']:.1f}" for x in runs[name])
        print(f"{name:24s} {r['images_per_s']:9.2f} {r['captions_per_s']:11.2f} {r['generated_tokens_per_s']:10.1f} "
              f"{r['seconds']:8.2f} {'-' if hit is None else f'{hit:.3f}':>10s}  {each}")
    best_raw = max(raw_env, key=lambda name: results[name]["images_per_s"])
    ratios = {
        "best_raw": best_raw,
        "pipeline_over_raw_vllm": results["pipeline_4p"]["images_per_s"] / results[best_raw]["images_per_s"],
        "pipeline_over_raw_vllm_each": [b["images_per_s"] / a["images_per_s"]
                                        for a, b in zip(runs[best_raw], runs["pipeline_4p"], strict=True)],
        "pipeline_over_raw_vllm_defaults": results["pipeline_4p"]["images_per_s"] / results["raw_4p"]["images_per_s"],
        "time_4_prompts_over_1": results["pipeline_4p"]["seconds"] / results["pipeline_1p"]["seconds"],
        "prefix_cache_speedup": results["pipeline_4p_nocache"]["seconds"] / results["pipeline_4p"]["seconds"],
    }
    print(f"\n(b)/(a) pipeline / raw vLLM images/s (medians of {args.repeats}, against the faster raw, {best_raw}): "
          f"{ratios['pipeline_over_raw_vllm']:.3f}"
          f"  (each repeat: {', '.join(f'{x:.2f}' for x in ratios['pipeline_over_raw_vllm_each'])})")
    print(f"(b)/(a) against raw vLLM with its defaults: {ratios['pipeline_over_raw_vllm_defaults']:.3f}")
    print(f"4 prompts cost {ratios['time_4_prompts_over_1']:.2f}x the time of 1 prompt")
    print(f"prefix caching on is {ratios['prefix_cache_speedup']:.2f}x faster than off")
    print(json.dumps({"model": model, "images": args.images, "max_tokens": args.max_tokens, "engine": engine,
                      "runs": runs, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
