# soft-rl: `make quickstart` (set up + a short SofT-GRPO run), `make test` (set up + the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU defaults for vLLM/Ray/DeepSpeed on a workstation; harmless on GPU machines (see README).
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_HOST_IP ?= 127.0.0.1
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test-deps test test-fast test-gpu lint quickstart clean

setup:
	@bash launch/setup_env.sh

# Debian packages some tests start for real (two-node Slurm, Prometheus); idempotent.
test-deps:
	@bash launch/install_test_deps.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup test-deps lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The GPU suite (tests/gpu; skipped without CUDA). Needs only torch, transformers, numpy and pytest there:
# DeepSpeed comes from tests/gpu/prepare_wheels.sh's folder (see tests/gpu/run.sh).
test-gpu:
	@bash tests/gpu/run.sh

quickstart: setup
	$(VENV)/bin/soft-rl quickstart

clean:
	rm -rf .cache runs
