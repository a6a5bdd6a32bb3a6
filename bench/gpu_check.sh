#!/usr/bin/env bash
# GPU check: the trainer and eval on one GPU, on synthetic data, in under 8 minutes (one H200).
#
#   bench/gpu_check.sh [--cpu] [bench/gpu_check.py's options: --steps N --batch B --out DIR ...]
#   bench/gpu_check.sh --fetch-wheels      (on a machine with a package registry: fill bench/wheels)
#
# What it runs (bench/gpu_check.py has the details): ViT-B/16 at 224 px, 5 texts per image, bf16
# (autocast, fp32 weights), ZeRO 1, one rank through the deepspeed launcher: Psi_CLS H=5 (stopped
# half-way with --stop-at-step and resumed), Psi_MLP H=5 and O2O, 200 steps of 256 images each;
# then `python -m eval retrieval` on the Psi_CLS export. It prints samples/s, step time, data
# wait, model FLOPs per sample and MFU, peak GPU memory (torch.cuda.max_memory_allocated of the
# trainer process), the step-time ratio Psi_CLS H=5 / O2O, and ends with "gpu_check: OK" (exit
# 0) or "gpu_check: FAILED ..." (exit 1). --cpu: the same sequence with the tiny model at 32 px,
# 8 steps, DS_ACCELERATOR=cpu, without the launcher (what CI runs).
#
# A bare GPU machine needs only Python 3.12 with torch (CUDA), numpy, tensorboard and
# safetensors. Everything else the trainer and eval import travels as wheels in bench/wheels
# (git-ignored, about 31 MiB): when one of those modules is missing from $PYTHON (default
# python3), this script makes bench/.venv-gpu-check with --system-site-packages (the machine's
# CUDA torch stays in use) and installs the missing ones with `pip install --no-index
# --find-links bench/wheels --no-deps`. Nothing is downloaded on the GPU machine.
#
# Fetching the wheels (`bench/gpu_check.sh --fetch-wheels` does exactly this): the versions
# are those of setup/constraints-cpu.txt; binary wheels for CPython 3.12 on x86-64 Linux
# (glibc >= 2.28; set WHEEL_PYTHON=3.11 for another Python):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d bench/wheels <the list below>
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w bench/wheels
# deepspeed is published only as a source distribution; with DS_BUILD_OPS=0 it builds here into
# a pure-Python wheel (deepspeed-0.19.8-py3-none-any.whl, 2.1 MiB) without torch in the build
# environment. No op is pre-compiled, and the trainer needs none on a GPU (torch's AdamW,
# NCCL through torch.distributed); the wheel records accelerator "cpu" and torch 0.0 as its
# build-time facts, which DeepSpeed consults only for pre-compiled ops.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/bench/wheels}"
VENV="${GPU_CHECK_VENV:-$ROOT/bench/.venv-gpu-check}"
PYTHON="${PYTHON:-python3}"

# import name=distribution==version, for everything the trainer, eval and the check import
# beyond torch, numpy, tensorboard and safetensors (deepspeed's own requirements included).
PACKAGES=(
  deepspeed=deepspeed==0.19.8 webdataset=webdataset==1.0.2 braceexpand=braceexpand==0.1.7
  fsspec=fsspec==2026.9.0 pydantic=pydantic==2.14.3 pydantic_core=pydantic_core==2.50.4
  annotated_types=annotated-types==0.8.0 typing_inspection=typing-inspection==0.4.5
  typing_extensions=typing_extensions==4.16.0 yaml=PyYAML==6.0.3 PIL=pillow==13.0.0 hjson=hjson==3.1.0
  cpuinfo=py-cpuinfo==9.0.0 ninja=ninja==1.13.2 msgpack=msgpack==1.2.4 psutil=psutil==7.2.2
  einops=einops==0.8.2 tqdm=tqdm==4.70.1 packaging=packaging==26.3 regex=regex==2026.11.15
  matplotlib=matplotlib==3.11.2 contourpy=contourpy==1.3.3 cycler=cycler==0.12.1
  fontTools=fonttools==4.68.0 kiwisolver=kiwisolver==1.5.1 pyparsing=pyparsing==3.3.3
  dateutil=python-dateutil==4.0.0 six=six==1.17.0
)
ON_THE_MACHINE=(torch numpy tensorboard safetensors)

fetch_wheels() {
  local py="${WHEEL_PYTHON:-3.12}" dists=()
  for entry in "${PACKAGES[@]}"; do
    [[ ${entry#*=} == deepspeed==* ]] || dists+=("${entry#*=}")
  done
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --abi "cp${py/./}" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${dists[@]}"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps deepspeed==0.19.8 -w "$WHEELS"
  du -sh "$WHEELS"
}

# The modules of PACKAGES and ON_THE_MACHINE that $1 cannot import, as "import=dist" entries.
missing() {
  "$1" - "${ON_THE_MACHINE[@]/%/=}" "${PACKAGES[@]}" <<'EOF'
import importlib.util, sys
for entry in sys.argv[1:]:
    name = entry.split("=", 1)[0]
    if importlib.util.find_spec(name) is None:
        print(entry)
EOF
}

if [[ ${1:-} == --fetch-wheels ]]; then
  fetch_wheels
  exit 0
fi

cd "$ROOT"
mapfile -t MISSING < <(missing "$PYTHON")
if ((${#MISSING[@]})); then
  if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  PYTHON="$VENV/bin/python"
  mapfile -t MISSING < <(missing "$PYTHON")
fi
if ((${#MISSING[@]})); then
  FROM_MACHINE=() DISTS=()
  for entry in "${MISSING[@]}"; do
    if [[ -z ${entry#*=} ]]; then FROM_MACHINE+=("${entry%%=*}"); else DISTS+=("${entry#*=}"); fi
  done
  if ((${#FROM_MACHINE[@]})); then
    echo "gpu_check: FAILED: this Python lacks ${FROM_MACHINE[*]}, which the machine must provide" >&2
    exit 1
  fi
  echo "gpu_check: installing ${DISTS[*]} from $WHEELS into $VENV" >&2
  # --no-deps: PACKAGES holds every requirement beyond the machine's modules, and pip's resolver
  # would otherwise re-check the requirements of the machine's own torch against bench/wheels.
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "${DISTS[@]}"; then
    echo "gpu_check: FAILED: cannot install from $WHEELS; fill it first on a machine with a package" \
         "registry: bench/gpu_check.sh --fetch-wheels" >&2
    exit 1
  fi
fi
mapfile -t MISSING < <(missing "$PYTHON")
if ((${#MISSING[@]})); then
  echo "gpu_check: FAILED: still missing after the install: ${MISSING[*]}" >&2
  exit 1
fi
exec "$PYTHON" bench/gpu_check.py "$@"
