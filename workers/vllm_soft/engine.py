"""``SoftEngine``: a vLLM ``LLM`` with the soft-thinking worker, returning ``soft_rl.trajectory.Trajectory``.

Only public vLLM entry points are used here (``LLM``, ``SamplingParams``, ``TokensPrompt``,
``collective_rpc`` to the named worker methods of ``workers.vllm_soft.runner``).

Engine settings that matter for correctness (set by the constructor, overridable only where safe):

* ``enable_prompt_embeds=True``: the model reads the persistent ``inputs_embeds`` buffer, which the
  runner overwrites with the soft mixtures.
* Prefix caching (``prefix_caching``). vLLM hashes KV blocks by token ids, while a soft position's
  KV depends on its mixture: another request with the same ids (a GRPO group shares its prompt and
  often its first tokens) could be served KV computed from a different mixture.
  ``"prompt"``: on, with ``workers.vllm_soft.scheduler.PromptCacheScheduler`` (``scheduler_cls``): a
  soft_rl request caches and looks up only the blocks made entirely of prompt tokens, so the n
  samples of a prompt (and later batches re-using it) share the prompt's KV, and no block holding a
  generated position is ever cached or hit; plain requests keep stock caching (the default; it gives
  the same trajectories as ``"off"``, see tests/test_prefix_cache.py). ``"off"``: no prefix caching.
  Never pass ``enable_prefix_caching``/``scheduler_cls`` directly. (The former ``"salted"`` mode, a
  per-request ``cache_salt``, is gone: it shared nothing between soft requests.)
* ``async_scheduling=False``: a soft row's next input is the mixture sampled at this step, so the
  next step's inputs cannot be prepared before this step's sampling has run (CPU forces it off anyway).
* Preemption by recompute is safe: the runner restores every generated position's mixture from its
  per-position device history when the request is re-prefilled (tested with a tiny KV cache).
* The per-step soft-thinking device work runs as ``engine_step`` says (soft_rl/engine_step.py): ``auto``
  (CUDA graphs per row bucket on GPU, ``torch.compile`` on CPU), ``eager``, ``compiled`` or ``cuda_graph``.
  ``prepare_params`` (the run's sampling settings) are compiled / captured at start-up, inside vLLM's memory
  profiling; other settings on first use.
* ``max_candidates`` right-sizes the sampler: vLLM's memory profiling runs the sampler at ``max_num_seqs`` rows
  and this candidate width (``soft_rl.engine_state.candidates_needed`` of the run's settings; None: the whole
  vocabulary, ~8x more memory at 152k), and a request needing more is refused with an error (``sampling_params``).
"""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

from soft_rl.engine_state import candidates_error, candidates_needed
from soft_rl.sampling import SoftSamplingParams
from soft_rl.trajectory import Trajectory

_ROOT = str(Path(__file__).resolve().parents[2])
PREFIX_CACHING_MODES = ("off", "prompt")
PREFIX_CACHING_DEFAULT = "prompt"  # exact (tests/test_prefix_cache.py): prompts shared, generated blocks never


def force_v1_model_runner() -> None:
    """``VLLM_USE_V2_MODEL_RUNNER=0`` in this process (and the engine's worker processes, which inherit it).

    vLLM 0.32 picks Model Runner V2 by default on GPU; the soft-thinking hooks live in the V1 runner
    (``runner.py``). Called before the engine is built; a user's ``=1`` is overridden with a warning.
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() not in ("0", "false"):
        logging.getLogger(__name__).warning("VLLM_USE_V2_MODEL_RUNNER=%s overridden to 0: soft thinking runs on "
                                            "vLLM's V1 model runner", os.environ["VLLM_USE_V2_MODEL_RUNNER"])
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    import vllm.envs as envs

    if hasattr(envs.__getattr__, "cache_clear"):  # an earlier engine in this process froze vLLM's env cache
        envs.__getattr__.cache_clear()


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _params_dict(params: SoftSamplingParams) -> dict:
    """``params`` as a plain dict (the runner rebuilds it with ``runner.params_from_dict``)."""
    d = asdict(params)
    if d["noise_clamp"] is not None:
        d["noise_clamp"] = list(d["noise_clamp"])
    return d


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
    ``vllm.LLM`` (dtype, tensor_parallel_size, max_model_len, max_num_seqs, num_gpu_blocks_override, ...).
    ``engine_step``: how the per-step soft work runs (``rollout.engine_step``, soft_rl/engine_step.py).
    ``max_candidates``: the widest candidate set a request may need (``soft_rl.engine_state.candidates_needed``
    over the run's sampling settings); the memory profiling runs the sampler at that width, and wider requests
    are refused. None: the vocabulary. ``prepare_params``: sampling settings whose steps are compiled (captured)
    during start-up rather than at their first step.
    """

    def __init__(self, model_dir: str, *, max_k: int = 8, max_new_tokens: int = 256, marker_width: int = 8,
                 density: str = "official", prefix_caching: str = PREFIX_CACHING_DEFAULT, sync_reserve_mb: int = 0,
                 engine_step: str = "auto", max_candidates: int | None = None,
                 prepare_params: Sequence[SoftSamplingParams] = (), **llm_kwargs):
        from vllm import LLM

        from soft_rl.engine_step import ENGINE_STEP_MODES

        if prefix_caching not in PREFIX_CACHING_MODES:
            raise ValueError(f"prefix_caching must be one of {PREFIX_CACHING_MODES}, got {prefix_caching!r}")
        if engine_step not in ENGINE_STEP_MODES:
            raise ValueError(f"engine_step must be one of {list(ENGINE_STEP_MODES)}, got {engine_step!r}")
        if max_candidates is not None and not max_k <= max_candidates:
            raise ValueError(f"max_candidates={max_candidates} is below max_k={max_k}: every request needs at least "
                             "max_k candidates (soft_rl.engine_state.candidates_needed)")
        # Worker processes (multiprocess engines, TP) must import workers.vllm_soft and soft_rl.
        pp = os.environ.get("PYTHONPATH", "")
        if _ROOT not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = _ROOT + (os.pathsep + pp if pp else "")
        force_v1_model_runner()
        self.max_k = max_k
        self.max_new_tokens = max_new_tokens
        self.prefix_caching = prefix_caching
        self.max_candidates = max_candidates
        cache = prefix_caching == "prompt"
        worker = "SoftCPUWorker" if _is_cpu_platform() else "SoftGPUWorker"
        kw = dict(
            model=str(model_dir),
            worker_cls=f"workers.vllm_soft.runner.{worker}",
            enable_prompt_embeds=True,
            enable_prefix_caching=cache,
            async_scheduling=False,
            additional_config={"soft_rl": {"max_k": max_k, "gen_len": max_new_tokens,
                                           "marker_width": marker_width, "density": density,
                                           "reserve_mb": int(sync_reserve_mb), "engine_step": engine_step,
                                           "max_candidates": max_candidates,
                                           "prepare": [_params_dict(p) for p in prepare_params]}},
        )
        if cache:
            kw["scheduler_cls"] = "workers.vllm_soft.scheduler.PromptCacheScheduler"
        for k in ("worker_cls", "enable_prompt_embeds", "additional_config", "async_scheduling",
                  "enable_prefix_caching", "scheduler_cls"):
            if k in llm_kwargs:
                raise ValueError(f"{k} is set by SoftEngine (prefix caching: use prefix_caching=...)")
        kw.update(llm_kwargs)
        self._closed = False
        self.llm = LLM(**kw)
        if cache and not self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
            # vLLM turns it off on some platforms (e.g. MLA on CPU, RISC-V): say so instead of running without
            self.shutdown()
            raise RuntimeError("vLLM disabled prefix caching for this model/platform; use prefix_caching='off'")
        # prompt tokens and prefix-cache hits (RequestOutput.num_cached_tokens, first scheduling only)
        self._cache_counts = {"prompt_tokens": 0, "prefix_cached_tokens": 0}
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self._markers: dict[str, list[int]] = {}

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
        d = _params_dict(params)
        d["marker_ids"] = self.marker_ids(params.think_end)
        d["key"] = key
        d["debug_logits"] = debug_logits
        return d

    def sampling_params(self, params: SoftSamplingParams | None, max_new_tokens: int, key: str,
                        debug_logits: bool = False, ignore_eos: bool = False, **plain):
        """vLLM SamplingParams of one request: soft_rl (greedy on vLLM's side, overridden) or plain.
        ``ignore_eos``: decode exactly ``max_new_tokens`` (benchmarks)."""
        from vllm import SamplingParams

        if params is None:
            return SamplingParams(max_tokens=max_new_tokens, detokenize=False, **plain)
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} > the engine's {self.max_new_tokens}")
        if params.k > self.max_k:
            raise ValueError(f"k={params.k} > the engine's max_k={self.max_k}")
        if self.max_candidates is not None:  # checked here: refused inside the engine core, it would fail the step
            need = candidates_needed(params, self.max_k, self.vocab_size)
            if need > self.max_candidates:
                raise ValueError(candidates_error(params, need, self.max_candidates, self.vocab_size))
        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False, ignore_eos=ignore_eos,
                              extra_args={"soft_rl": self.request_dict(params, key, debug_logits)})

    def _count(self, outs) -> None:
        for o in outs:
            self._cache_counts["prompt_tokens"] += len(o.prompt_token_ids or ())
            self._cache_counts["prefix_cached_tokens"] += int(o.num_cached_tokens or 0)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SoftSamplingParams],
                 max_new_tokens: int | Sequence[int], debug_logits: bool = False,
                 ignore_eos: bool = False) -> list[Trajectory]:
        """One trajectory per prompt (token-id lists), in order. Arrays are max(k) wide, as the reference's.

        ``max_new_tokens``: one limit for all requests, or one per request; ``ignore_eos``: decode them all
        (benchmarks).
        """
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens")
        keys = [uuid.uuid4().hex for _ in prompts]
        sps = [self.sampling_params(p, n, k, debug_logits, ignore_eos) for p, n, k in zip(params, limits, keys,
                                                                                          strict=True)]
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts], sps, use_tqdm=False)
        self._count(outs)
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
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params, use_tqdm=False)
        self._count(outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    def fetch(self, keys: list[str]) -> dict:
        blobs = self.llm.collective_rpc("soft_fetch", args=(keys,))
        return pickle.loads(blobs[0])  # identical on every TP rank; rank 0's copy

    def failed(self) -> bool:
        """A process of this engine died: it cannot generate again (its actor is replaced, workers/recovery.py)."""
        return engine_failed(self.llm)

    def stats(self) -> dict[str, int]:
        """The runner's counters plus ``prompt_tokens`` / ``prefix_cached_tokens`` of this engine's requests."""
        return {**self.llm.collective_rpc("soft_stats")[0], **self._cache_counts}

    # ------------------------------------------------------------------ weights and cache
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], spool_mb: float = 256.0) -> int:
        """Load new weights (HF checkpoint names) in place; the prefix cache is reset afterwards.

        One in-process worker consumes the stream directly. Worker processes (TP>1, or a multiprocess engine core)
        get it through a spool of bucket files of about ``spool_mb`` in /dev/shm (``workers.weight_spool``),
        written on a thread of this process as the stream arrives while the workers load them in order: at most
        two files exist at a time, each deleted once every worker has loaded it, never a whole-model file.
        ``spool_stats`` records the last spooled sync (files, peak files on disk, bytes)."""
        items = ((n, t.detach().to("cpu").contiguous()) for n, t in named_tensors)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0" and self.num_ranks == 1:
            # one in-process worker: the loader consumes the stream lazily (one bucket resident at a time)
            n = self.llm.collective_rpc("soft_update_weights", args=(items,))[0]
        else:  # tensors nested in collective_rpc arguments are not rebuilt across processes: spool them
            import threading

            from workers.weight_spool import SpoolWriter

            spool = SpoolWriter(readers=self.num_ranks, file_mb=spool_mb)
            writer = threading.Thread(target=spool.run, args=(items,), name="soft-rl-weight-spool", daemon=True)
            writer.start()
            try:
                n = self.llm.collective_rpc("soft_update_weights_from_spool", args=(spool.dir, self.num_ranks))[0]
            except Exception as e:
                if spool.error is not None:  # the stream itself failed (e.g. fetching a bucket): that is the cause
                    raise spool.error from e
                raise
            finally:
                spool.cancel()
                writer.join(timeout=60)  # a writer stuck fetching its stream is left behind (a daemon)
                spool.cleanup()
            if spool.error is not None:
                raise spool.error
            self.spool_stats = dict(spool.stats)
        self.reset_prefix_cache()
        return n

    @property
    def num_ranks(self) -> int:
        """Worker processes of this engine (tensor x pipeline parallel): its ranks in a weight-sync group."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def join_weight_group(self, host: str, port: int, base_rank: int, world_size: int, backend: str,
                          timeout_s: float) -> list[int]:
        """Every worker process joins the learner's broadcast group (ranks base_rank ...); blocks until all joined."""
        return self.llm.collective_rpc("soft_join_weight_group",
                                       args=(host, port, base_rank, world_size, backend, timeout_s))

    def receive_weights(self, layout) -> int:
        """Receive one broadcast sync (``workers.weight_broadcast`` layout) and reload in place."""
        n = self.llm.collective_rpc("soft_receive_weights", args=(layout,))[0]
        self.reset_prefix_cache()
        return n

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("soft_leave_weight_group")

    def sleep(self) -> None:
        """vLLM sleep mode, level 2 (needs enable_sleep_mode=True): the weights and the KV cache are discarded,
        not copied to host memory as level 1 does (a pinned copy of every engine's weights, 15 GB each at 7B, for
        nothing: every wake is followed by a full weight sync). The model's buffers (rotary tables) are kept
        by vLLM across it; the soft state store lives outside vLLM's sleep pools and stays."""
        self.llm.sleep(level=2)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def reset_prefix_cache(self) -> bool:
        ok = bool(self.llm.reset_prefix_cache())
        if not ok and self.prefix_caching != "off":
            # after a weight update, a surviving cache would serve KV computed with the old weights
            raise RuntimeError("vLLM could not reset the prefix cache (requests still running?)")
        return ok

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


def engine_failed(llm) -> bool:
    """Whether a process of ``llm``'s engine died (vLLM's executor monitors its worker processes and marks itself
    failed; the generate in progress raises a RuntimeError, later ones ``EngineDeadError``). In-process engine
    core only (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, how ``SoftEngine`` runs); a single-process executor cannot
    lose a process without its actor."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    return bool(getattr(getattr(core, "model_executor", None), "is_failed", False))


def engine_dead_error() -> type[Exception]:
    """vLLM's ``EngineDeadError``: raised when one of the engine's processes (e.g. a tensor-parallel worker) dies;
    the actor holding the engine is alive but cannot generate again."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError


def engine_died(error: BaseException) -> bool:
    return isinstance(error, engine_dead_error())
