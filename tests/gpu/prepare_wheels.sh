#!/usr/bin/env bash
# Wheels for the GPU suite on a machine that has torch (CUDA), transformers, numpy and pytest but no network:
# DeepSpeed's source distribution (a pure-Python build, DS_BUILD_OPS=0) and the small packages the learner
# imports, at the versions requirements/cpu.lock pins, for the GPU machine's Python. Run here (PyPI reachable),
# then carry the folder along (`tests/gpu/run.sh` installs from it). Binary wheels differ by Python version: one
# sub-folder per version (cp311, cp312 by default: this project's Python and the lent GPU machines'), about 10 MiB
# each; run.sh picks the one of the interpreter it runs.
#   bash tests/gpu/prepare_wheels.sh [DEST=.cache/gpu_wheels] [PYTHON_VERSIONS="3.11 3.12"]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT_DEST=${1:-.cache/gpu_wheels}
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
for PYVER in ${2:-3.11 3.12}; do
DEST="$ROOT_DEST/cp${PYVER/./}"
mkdir -p "$DEST"
pin() { grep -iE "^$1==" requirements/cpu.lock | head -1; }
# pure Python and binary wheels for Linux x86-64 (manylinux), no dependencies resolved: the list is explicit
PKGS="einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic_core annotated-types typing-inspection
      typing_extensions omegaconf antlr4-python3-runtime PyYAML tqdm"
specs=()
for p in $PKGS; do s=$(pin "$p"); [ -n "$s" ] || { echo "prepare_wheels: $p is not pinned in requirements/cpu.lock" >&2; exit 1; }; specs+=("$s"); done
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$DEST" "${specs[@]}"
# DeepSpeed is a source distribution: its offline build needs these (pinned here: not in the lock file)
$PY -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST/build" setuptools==80.9.0 wheel==0.45.1
$PY -m pip download --quiet --no-deps --no-binary=:all: --dest "$DEST" "$(pin deepspeed)"
done
du -sh "$ROOT_DEST"/*
