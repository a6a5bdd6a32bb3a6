#!/usr/bin/env bash
# Create or update the project's virtual environment with one of the two pinned sets.
#
#   setup/install.sh [cpu|gpu] [VENV_DIR]      (make setup / make setup GPU=1)
#
# The environment is reused when it is current: a stamp in VENV_DIR records a hash of every
# file that decides its contents; when they change, the same steps run again (pip then only
# changes what differs). The CPU and GPU sets never share an environment: switching sets
# needs a new VENV_DIR (the default is .venv for cpu and .venv-gpu for gpu).
set -euo pipefail

SET="${1:-cpu}"
case "$SET" in cpu) VENV="${2:-.venv}" ;; gpu) VENV="${2:-.venv-gpu}" ;;
  *) echo "setup: unknown set '$SET' (use cpu or gpu)" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

stamp_inputs=(pyproject.toml setup/install.sh setup/cpu_torchvision_fix.py setup/check_imports.py
              setup/requirements-common.txt "setup/requirements-$SET.txt")
[ "$SET" = cpu ] && stamp_inputs+=(setup/constraints-cpu.txt)
want="$SET $("$PY" --version 2>&1) $(cat "${stamp_inputs[@]}" | sha256sum | cut -c1-16)"
if [ -f "$VENV/.holiclip-setup" ] && [ "$(cat "$VENV/.holiclip-setup")" = "$want" ]; then
  echo "setup: $VENV is current ($SET set)"
  exit 0
fi
if [ -f "$VENV/.holiclip-setup" ] && ! grep -q "^$SET " "$VENV/.holiclip-setup"; then
  echo "setup: $VENV holds the other set; remove it or choose another directory" >&2; exit 2
fi

echo "setup: building the $SET environment in $VENV (a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --no-compile: pip would byte-compile at every install step; the set is compiled once, at the
# end, on every core (below).
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-compile)
export NO_ALBUMENTATIONS_UPDATE=1

if [ "$SET" = cpu ]; then
  CONSTRAINTS=(-c setup/constraints-cpu.txt)
  # torch first, pinned to the CPU build: an unpinned torch (asked for by any later package)
  # would otherwise bring the multi-GB CUDA build.
  "${PIP[@]}" "${CONSTRAINTS[@]}" torch==2.13.0
  "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is not None and "setup: got a CUDA torch in the CPU set")'
else
  CONSTRAINTS=()
fi
"${PIP[@]}" "${CONSTRAINTS[@]}" -r "setup/requirements-$SET.txt"
# DeepSpeed is a source distribution: build it against the torch just installed, without ops
# (they compile on first use), and without an isolated build env that could fetch another torch.
DS_BUILD_OPS=0 "${PIP[@]}" "${CONSTRAINTS[@]}" --no-build-isolation deepspeed==0.19.8
"${PIP[@]}" --no-deps img2dataset==1.47.0
if [ "$SET" = cpu ]; then
  "$VENV/bin/python" setup/cpu_torchvision_fix.py
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
# Byte-compile every installed module now. Python would write a module's .pyc on its first import,
# except where PYTHONDONTWRITEBYTECODE is set (as on our CI and development machines): there, with
# no .pyc, every process compiled what it imported again, and `import vllm` took 20 s instead of
# 10 (an engine start imports it two or three times: the replica, the engine core, its workers).
# About 40 s on 2 cores; a module that does not compile (some packages ship Python 2 examples) is
# left as it is (-qq: not listed; the exit status says only that one did not).
echo "setup: byte-compiling the installed modules"
"$VENV/bin/python" -m compileall -qq -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
"$VENV/bin/python" setup/check_imports.py "$SET"
echo "$want" > "$VENV/.holiclip-setup"
echo "setup: $VENV ready ($SET set)"
