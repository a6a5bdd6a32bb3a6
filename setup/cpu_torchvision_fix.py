"""Make the registry's CUDA torchvision importable next to the CPU torch (CPU set only).

Why: on a machine that cannot reach the PyTorch CPU wheel index, the only torchvision
wheel pip can find is a CUDA build. Its compiled ops (`torchvision/_C.so`) cannot load
against the CPU torch, and `torchvision/_meta_registrations.py` then crashes at import
because it registers fake kernels for `torchvision::nms` / `qnms` unconditionally.
vLLM's image processors (Qwen2-VL, LLaVA) import torchvision for its Python
transforms only, which work without the compiled ops.

What: guard those two registrations with `torchvision.extension._has_ops()` (the same
guard torchvision already uses for its other ops), and remove torchaudio and torchcodec,
which are CUDA builds here too and which nothing in this project imports (a broken
torchcodec makes `import vllm` fail). Idempotent; run by setup/install.sh for the CPU set
only. A user with the CPU wheel index gets working `+cpu` wheels and never needs this.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

MARKER = "# holiclip: guarded, see setup/cpu_torchvision_fix.py"
DECORATOR = '@torch.library.register_fake("torchvision::'
GUARDED = '@_holiclip_register_fake_if_ops("torchvision::'
HELPER = f'''
{MARKER}
def _holiclip_register_fake_if_ops(qualname):
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(qualname)(fn)
        return fn
    return wrapper

'''


def patch_meta_registrations() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision not installed: nothing to patch"
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return f"{path}: already patched"
    if DECORATOR not in text:
        return f"{path}: no unguarded fake registration (torchvision changed?): left as is"
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        raise SystemExit(f"{path}: unexpected layout, cannot place the guard; update {__file__}")
    text = text.replace(anchor, anchor + HELPER, 1).replace(DECORATOR, GUARDED)
    path.write_text(text)
    return f"{path}: guarded the torchvision::nms/qnms fake registrations"


def remove_unusable(packages: list[str]) -> None:
    present = [p for p in packages if importlib.util.find_spec(p) is not None]
    if present:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present])
        print(f"removed {', '.join(present)} (CUDA builds that cannot load with the CPU torch)")


if __name__ == "__main__":
    import torch

    if torch.version.cuda is not None:
        sys.exit("cpu_torchvision_fix.py is for the CPU set only; this torch is a CUDA build")
    remove_unusable(["torchaudio", "torchcodec"])
    print(patch_meta_registrations())
