"""``SoftEngine``: a vLLM ``LLM`` with the soft-thinking worker, returning ``soft_rl.trajectory.Trajectory``.

Only public vLLM entry points are used here (``LLM``, ``SamplingParams``, ``TokensPrompt``,
``collective_rpc`` to the named worker methods of ``workers.vllm_soft.runner``).

Engine settings that matter for correctness (set by the constructor, overridable only where safe):

* ``enable_prompt_embeds=True``: the model reads the persistent ``inputs_embeds`` buffer, which the
  runner overwrites with the soft mixtures.
* ``enable_prefix_caching=False`` by default. vLLM hashes KV blocks by token ids, while a soft
  position's KV depends on its mixture: another request with the same ids (a GRPO group shares its
  prompt and often its first tokens) could be served KV computed from a different mixture. With
  ``prefix_caching="salted"`` it is on, and every soft_rl request gets its own ``cache_salt``: a
  request can then only hit its own blocks (e.g. when it resumes after preemption, which is correct:
  same request, same mixtures), and plain requests still share prompts
  (not covered by tests yet). Sharing the prompt between
  soft requests needs a scheduler change (cache only prompt blocks) and is not done.
* ``async_scheduling=False``: the runner reads each request's step counter from the host-side
  output list, which async scheduling fills in late (CPU forces it off anyway).
* Preemption by recompute is safe: the runner restores every generated position's mixture from its
  per-position device history when the request is re-prefilled (tested with a tiny KV cache).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

from soft_rl.sampling import SoftSamplingParams
from soft_rl.trajectory import Trajectory

_ROOT = str(Path(__file__).resolve().parents[2])


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# Trajectory field <- per-step record field (SampleOutput names); other Trajectory tensor fields are
# taken from the record field of the same name, so fields added to both in soft_rl are carried along.
_RENAME = {"tokens": "token", "topk_ids": "ids", "logprobs": "logprob"}
_SCALARS = ("prompt_ids", "n_think", "finish_reason", "sampling")


def _trajectory(prompt, params: SoftSamplingParams, d: dict, n: int, width: int, n_think: int,
                finish_reason: str) -> Trajectory:
    kw = {"prompt_ids": torch.tensor(list(prompt), dtype=torch.long), "n_think": n_think,
          "finish_reason": finish_reason, "sampling": params}
    for f in fields(Trajectory):
        if f.name in _SCALARS:
            continue
        src = _RENAME.get(f.name, f.name)
        if src not in d:
            raise RuntimeError(f"the engine records no {src!r} for Trajectory.{f.name}")
        a = torch.from_numpy(d[src][:n])
        kw[f.name] = a[:, :width] if a.dim() == 2 else a
    return Trajectory(**kw)


class SoftEngine:
    """One vLLM engine that generates soft-thinking trajectories.

    ``SoftEngine(model_dir, max_k=8, max_new_tokens=..., **llm_kwargs)``; ``llm_kwargs`` go to
    ``vllm.LLM`` (dtype, tensor_parallel_size, max_model_len, num_gpu_blocks_override, ...).
    """

    def __init__(self, model_dir: str, *, max_k: int = 8, max_new_tokens: int = 256, marker_width: int = 8,
                 density: str = "official", prefix_caching: str = "off", **llm_kwargs):
        from vllm import LLM

        if prefix_caching not in ("off", "salted"):
            raise ValueError("prefix_caching must be 'off' or 'salted'")
        # Worker processes (multiprocess engines, TP) must import workers.vllm_soft and soft_rl.
        pp = os.environ.get("PYTHONPATH", "")
        if _ROOT not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = _ROOT + (os.pathsep + pp if pp else "")
        self.max_k = max_k
        self.max_new_tokens = max_new_tokens
        self.salted = prefix_caching == "salted"
        worker = "SoftCPUWorker" if _is_cpu_platform() else "SoftGPUWorker"
        kw = dict(
            model=str(model_dir),
            worker_cls=f"workers.vllm_soft.runner.{worker}",
            enable_prompt_embeds=True,
            enable_prefix_caching=self.salted,
            async_scheduling=False,
            additional_config={"soft_rl": {"max_k": max_k, "gen_len": max_new_tokens,
                                           "marker_width": marker_width, "density": density}},
        )
        for k in ("worker_cls", "enable_prompt_embeds", "additional_config", "async_scheduling"):
            if k in llm_kwargs:
                raise ValueError(f"{k} is set by SoftEngine")
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()
        self._markers: dict[str, list[int]] = {}
        self._closed = False

    # ------------------------------------------------------------------ requests
    def marker_ids(self, marker: str) -> list[int]:
        if marker not in self._markers:
            ids = list(self.tokenizer.encode(marker, add_special_tokens=False))
            if not ids:
                raise ValueError(f"think-end marker {marker!r} encodes to no tokens")
            self._markers[marker] = ids
        return self._markers[marker]

    def request_dict(self, params: SoftSamplingParams, key: str, debug_logits: bool = False) -> dict:
        """The plain dict a request carries in ``SamplingParams.extra_args["soft_rl"]``."""
        d = asdict(params)
        if d["noise_clamp"] is not None:
            d["noise_clamp"] = list(d["noise_clamp"])
        d["marker_ids"] = self.marker_ids(params.think_end)
        d["key"] = key
        d["debug_logits"] = debug_logits
        return d

    def sampling_params(self, params: SoftSamplingParams | None, max_new_tokens: int, key: str,
                        debug_logits: bool = False, **plain):
        """vLLM SamplingParams of one request: soft_rl (greedy on vLLM's side, overridden) or plain."""
        from vllm import SamplingParams

        if params is None:
            return SamplingParams(max_tokens=max_new_tokens, detokenize=False, **plain)
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} > the engine's {self.max_new_tokens}")
        if params.k > self.max_k:
            raise ValueError(f"k={params.k} > the engine's max_k={self.max_k}")
        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False,
                              extra_args={"soft_rl": self.request_dict(params, key, debug_logits)})

    def _prompt(self, ids: Sequence[int], salt: str | None):
        p = {"prompt_token_ids": list(ids)}
        if salt is not None:
            p["cache_salt"] = salt
        return p

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SoftSamplingParams],
                 max_new_tokens: int | Sequence[int], debug_logits: bool = False) -> list[Trajectory]:
        """One trajectory per prompt (token-id lists), in order. Arrays are max(k) wide, as the reference's.

        ``max_new_tokens``: one limit for all requests, or one per request.
        """
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens")
        keys = [uuid.uuid4().hex for _ in prompts]
        sps = [self.sampling_params(p, n, k, debug_logits) for p, n, k in zip(params, limits, keys, strict=True)]
        inputs = [self._prompt(ids, k if self.salted else None) for ids, k in zip(prompts, keys, strict=True)]
        outs = self.llm.generate(inputs, sps, use_tqdm=False)
        data = self.fetch(keys)
        width = max(p.k for p in params)
        trajs = []
        for prompt, p, key, out in zip(prompts, params, keys, outs, strict=True):
            d = data[key]
            if d is None:
                raise RuntimeError(f"the engine returned no soft-thinking record for request {out.request_id}")
            comp = out.outputs[0]
            n = len(comp.token_ids)
            if n != int(d["n_generated"]) or d["token"][:n].tolist() != list(comp.token_ids):
                raise RuntimeError("soft-thinking record and vLLM output disagree "
                                   f"({int(d['n_generated'])} vs {n} tokens)")
            traj = _trajectory(prompt, p, d, n, width, int(d["n_think"]),
                               "stop" if comp.finish_reason == "stop" else "length")
            if debug_logits:
                traj.debug_logits = torch.from_numpy(d["logits"])  # [R, V] raw logits of every step (tests)
            trajs.append(traj)
        return trajs

    def generate_plain(self, prompts: Sequence[Sequence[int]], sampling_params) -> list[list[int]]:
        """Stock vLLM generation (no soft_rl), token ids per prompt."""
        outs = self.llm.generate([self._prompt(p, None) for p in prompts], sampling_params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def fetch(self, keys: list[str]) -> dict:
        blobs = self.llm.collective_rpc("soft_fetch", args=(keys,))
        return pickle.loads(blobs[0])  # identical on every TP rank; rank 0's copy

    def stats(self) -> dict[str, int]:
        return self.llm.collective_rpc("soft_stats")[0]

    # ------------------------------------------------------------------ weights and cache
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (HF checkpoint names) in place; the prefix cache is reset afterwards."""
        items = [(n, t.detach().to("cpu").contiguous()) for n, t in named_tensors]
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
            n = self.llm.collective_rpc("soft_update_weights", args=(items,))[0]
        else:  # tensors nested in collective_rpc arguments are not rebuilt across processes: go through a file
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="soft_rl_weights_", dir=shm)
            os.close(fd)
            try:
                save_file(dict(items), path)
                n = self.llm.collective_rpc("soft_update_weights_from_file", args=(path,))[0]
            finally:
                os.unlink(path)
        self.reset_prefix_cache()
        return n

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def shutdown(self) -> None:
        """Stop the engine (and its worker processes / shared memory) explicitly."""
        if self._closed:
            return
        self._closed = True
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            del self.llm
            import gc

            gc.collect()
