"""Last step of the set-up: import every package the project uses and print its version.

Each import runs in its own interpreter so that one failure names its package and does not
hide the others. Exit 1 if any fails.
"""

from __future__ import annotations

import subprocess
import sys

PACKAGES = [
    "torch", "torchvision", "transformers", "vllm", "ray", "ray.data", "deepspeed", "webdataset",
    "pyarrow", "pandas", "img2dataset", "PIL", "yaml", "matplotlib", "tensorboard", "safetensors",
    "tqdm", "pytest", "pydantic", "hypothesis",
    # the project's own packages
    "data_manifests", "caption_prompts", "pipeline.ingest", "pipeline.caption", "train", "eval", "demo",
]
CODE = """
import importlib, os, sys, warnings
warnings.simplefilter("ignore")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
m = importlib.import_module(sys.argv[1])
print(getattr(m, "__version__", "") or "ok")
"""


def main() -> int:
    want = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    failed = []
    for name in PACKAGES:
        r = subprocess.run([sys.executable, "-c", CODE, name], capture_output=True, text=True)
        if r.returncode == 0:
            print(f"  {name:16s} {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'ok'}")
        else:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {name:16s} FAILED: {last}")
            failed.append(name)
    import torch

    if want == "cpu" and torch.version.cuda is not None:
        print("  torch is a CUDA build in the CPU set")
        failed.append("torch")
    if failed:
        print(f"import check failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("import check: all packages import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
