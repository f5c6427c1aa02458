"""Shared test setup: environment for vLLM/Ray/DeepSpeed on CPU, and tiny models built once.

The environment is set before anything imports vllm, ray or deepspeed: in-process vLLM engines,
loopback addresses, caches inside the work tree, Ray without token auth (a local test cluster only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"

_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
    "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions"),
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # engines whose rollout.engine_step is "auto" run eagerly here: a cold compile of the step takes 25-90 s per
    # graph on 2 cores; the compiled production path has tests of its own (tests/test_engine_step.py,
    # tests/test_vllm_soft.py), which ask for it explicitly
    "SOFT_RL_ENGINE_STEP": "eager",
    "TRANSFORMERS_OFFLINE": "1",
}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# This venv's tools first on PATH for every process the tests start (Ray workers, jobs, Slurm steps), as the
# Ray-head and Slurm tests must have it: otherwise DeepSpeed's JIT op build (deepspeed_shm_comm, in
# TORCH_EXTENSIONS_DIR) alternates between the venv's ninja and /usr/bin/ninja, and each switch of ninja
# version rebuilds the op from scratch (25-60 s on 2 cores).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A locally built tokenizer plus random tiny Qwen2 and Llama models (float32)."""
    from soft_rl.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(root / "tokenizer")
    build_model(root / "qwen2", tok, arch="qwen2", seed=1)
    build_model(root / "llama", tok, arch="llama", seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_hf(request, tiny_dir):
    """(arch, model) for each tiny architecture, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / request.param).eval()
    return request.param, model


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (token auth off: a loopback test cluster).

    4 logical CPUs on a 2-core machine: actors here mostly wait on each other, and fractional
    CPU requests keep several pools (reward, learner, rollout) schedulable at once.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
