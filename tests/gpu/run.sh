#!/usr/bin/env bash
# `make test-gpu`: the GPU suite. Where DeepSpeed or OmegaConf is missing (the bare GPU machine), installs the
# wheels of tests/gpu/prepare_wheels.sh into .cache/gpu_site first. Figures go to $SOFT_RL_GPU_REPORT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
PYTAG=cp$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS=${SOFT_RL_GPU_WHEELS:-.cache/gpu_wheels}/$PYTAG
if ! $PY -c "import deepspeed, omegaconf" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "tests/gpu: DeepSpeed/OmegaConf are not installed and $WHEELS (wheels for this Python, $PYTAG) is" \
         "missing: run tests/gpu/prepare_wheels.sh where PyPI is reachable and bring .cache/gpu_wheels along" >&2
    exit 2
  fi
  # the build tools first (DeepSpeed builds from source, offline), then everything else next to them
  $PY -m pip install --quiet --no-index --no-deps --target .cache/gpu_build "$WHEELS"/build/*.whl
  PYTHONPATH="$PWD/.cache/gpu_build" DS_BUILD_OPS=0 $PY -m pip install --quiet --no-index --no-deps \
      --no-build-isolation --find-links "$WHEELS" --target .cache/gpu_site "$WHEELS"/*.whl "$WHEELS"/*.tar.gz
  export PYTHONPATH="$PWD/.cache/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p runs
export SOFT_RL_GPU_REPORT=${SOFT_RL_GPU_REPORT:-runs/gpu_report.txt}
$PY -c "import torch; print('tests/gpu: torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
exec $PY -m pytest -q -s -p no:cacheprovider -o addopts="" tests/gpu "$@"
