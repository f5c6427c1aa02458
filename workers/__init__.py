"""Rollout-side workers: the soft-thinking vLLM engine (``workers.vllm_soft``) and the Ray rollout pool."""
