"""The GPU suite (``make test-gpu``): soft_rl's device code on CUDA against the CPU.

Written for a machine with one CUDA GPU, torch, transformers, numpy and pytest, and nothing else
(no vLLM, Ray or DeepSpeed; DeepSpeed and the learner's small pure-Python dependencies come as
wheels prepared by ``tests/gpu/prepare_wheels.sh``). Every test is marked ``gpu`` and skipped where
there is no CUDA device. ``SOFT_RL_GPU_TEST_DEVICE=cpu`` runs the suite on the CPU against itself,
to check the suite's own code on a machine without a GPU (not a GPU result).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SOFT_RL_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
if DEVICE == "cuda":
    os.environ["DS_ACCELERATOR"] = "cuda"  # the parent conftest defaults DeepSpeed to the CPU


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if DEVICE is None:
                item.add_marker(pytest.mark.skip(reason="no CUDA device: run `make test-gpu` on a GPU machine"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(DEVICE)
