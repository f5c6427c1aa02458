#!/usr/bin/env bash
# The GPU suite in one prepared command, for a bare GPU machine (CUDA torch, transformers, numpy, pytest and
# pytest-timeout installed; any Python version that tests/gpu/prepare_wheels.sh fetched wheels for; no network):
#
#   here (PyPI reachable):  bash tests/gpu/prepare_wheels.sh            # .cache/gpu_wheels/cp311, cp312 (~16 MiB)
#   there (repository root, .cache/gpu_wheels carried along):
#                           bash tests/gpu/device_run.sh                 # report and log to $OUT (default runs/)
#
# Installs DeepSpeed and the learner's small dependencies from the wheels (tests/gpu/run.sh), records the machine,
# runs every test of tests/gpu with a per-test timeout, and leaves gpu_report.txt (the suite's measured figures)
# and gpu_suite.log in $OUT. The exit status is pytest's.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs}
mkdir -p "$OUT"
export SOFT_RL_GPU_REPORT="$OUT/gpu_report.txt"
{
  echo "# machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/gpu_suite.log"
bash tests/gpu/run.sh --timeout "${SOFT_RL_GPU_TEST_TIMEOUT:-300}" -rA 2>&1 | tee -a "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"
