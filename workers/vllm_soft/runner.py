"""The model-runner mixin and worker classes: the only code that touches vLLM's V1 model runner.

Installed through vLLM's ``worker_cls`` extension point (``SoftEngine`` passes it):

* CPU: ``SoftCPUWorker(CPUWorker)`` turns the runner ``CPUWorker.init_device`` built into a
  ``SoftCPUModelRunner`` (a subclass that only adds methods, so the instance's class is swapped;
  no vLLM module globals are patched).
* GPU: ``SoftGPUWorker(Worker)`` builds a ``SoftGPUModelRunner`` in ``_make_model_runner``. vLLM 0.32
  defaults to Model Runner V2 on GPU, a different code path: it fails with a clear message unless
  ``VLLM_USE_V2_MODEL_RUNNER=0``.

The mixin hooks three runner methods:

``_update_states``  registers new soft_rl requests (``SamplingParams.extra_args["soft_rl"]``) in a
    persistent device slot and moves finished ones to the host (one copy per request).
``_preprocess``     after vLLM's own input preparation (``enable_prompt_embeds=True``: the model reads
    the persistent ``inputs_embeds`` buffer), writes sum_k w_k E[i_k] into every scheduled position
    that holds a generated token of a soft_rl request. In decode that is the last step's mixture;
    when a preempted request is re-prefilled (recompute), it is every generated position again, from
    the per-position history, so soft positions are never recomputed as plain tokens. Soft and
    discrete steps share the path (discrete steps have one-hot weights, which gives exactly E[x]).
``_sample``         runs the engine step (``soft_rl.engine_step.EngineStep``: ``SoftStateStore.sample_step``,
    i.e. ``soft_rl.sampling.soft_sample`` with the core ``PhaseTracker`` logic for the think-end marker and
    budget, and the history writes) on the gathered logits rows of the soft_rl requests, then lets vLLM's
    sampler handle the batch (soft_rl requests are sent as greedy so it only takes an argmax for them) and
    overrides their sampled ids with the emitted tokens, so vLLM's bookkeeping, detokenisation and stop
    checks see them. Plain requests in the same batch never touch the soft path: their sampling is stock vLLM.
    The step runs as ``additional_config["soft_rl"]["engine_step"]`` says (``rollout.engine_step``): eager,
    ``torch.compile``d (the CPU default), or replayed from CUDA graphs captured per row bucket and hints key
    (the CUDA default); see soft_rl/engine_step.py.

Memory profiling (``profile_run`` on GPU; ``determine_available_memory`` on CPU) builds the soft state store
and prepares the engine step (compiles it; under cuda_graph captures the graphs of the run's own sampling
settings, ``additional_config["soft_rl"]["prepare"]``) before vLLM's dummy forward, then runs the sampler's worst
case at ``max_num_seqs`` rows and ``max_candidates`` candidates: vLLM sizes the KV cache around all of it.

The only per-step host->device traffic is three small index vectors (rows, slots, step counters),
built from host state vLLM already has; nothing is read back from the device per step besides what
vLLM itself reads (the sampled ids).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker as GPUWorker

from soft_rl.densities import DENSITY_MODES
from soft_rl.engine_state import IndexStaging, SoftStateStore
from soft_rl.engine_step import EngineStep, resolve_mode
from soft_rl.sampling import SoftSamplingParams

EXTRA_KEY = "soft_rl"  # SamplingParams.extra_args[EXTRA_KEY] = request dict (see engine.request_dict)
CONFIG_KEY = "soft_rl"  # VllmConfig.additional_config[CONFIG_KEY] = engine settings
_PARAM_NAMES = tuple(SoftSamplingParams.__dataclass_fields__)


def params_from_dict(d: dict[str, Any]) -> SoftSamplingParams:
    kw = {k: d[k] for k in _PARAM_NAMES if k in d}
    if kw.get("noise_clamp") is not None:
        kw["noise_clamp"] = tuple(kw["noise_clamp"])
    return SoftSamplingParams(**kw)


class SoftThinkingMixin:
    """Adds soft thinking to a V1 ``GPUModelRunner`` (or its CPU subclass); see the module docstring."""

    # ------------------------------------------------------------------ setup
    def _soft_setup(self) -> None:
        cfg = dict((self.vllm_config.additional_config or {}).get(CONFIG_KEY, {}))
        self._soft_width = int(cfg.get("max_k", 8))
        self._soft_gen_len = int(cfg.get("gen_len", 256))
        self._soft_marker_width = int(cfg.get("marker_width", 8))
        self._soft_density = cfg.get("density", "official")
        self._soft_reserve_mb = int(cfg.get("reserve_mb", 0))  # weight-sync buffers allocated after start-up
        max_candidates = cfg.get("max_candidates")  # None: the vocabulary (every request admitted)
        self._soft_max_candidates = None if max_candidates is None else int(max_candidates)
        # sampling settings whose steps are compiled / captured during memory profiling (the run's own)
        self._soft_prepare_params = [params_from_dict(d) for d in cfg.get("prepare", ())]
        if self._soft_density not in DENSITY_MODES:
            raise ValueError(f"density must be one of {DENSITY_MODES}, got {self._soft_density!r}")
        self._soft_step_mode = resolve_mode(str(cfg.get("engine_step", "auto")), self.device)  # fails early if bad
        if self.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("soft thinking needs pipeline_parallel_size=1 (sampling and inputs on one rank)")
        if not self.enable_prompt_embeds:
            raise ValueError("soft thinking needs enable_prompt_embeds=True (the model must read inputs_embeds)")
        self._soft_store: SoftStateStore | None = None  # built in memory profiling, after load_model (vocab size)
        self._soft_step: EngineStep | None = None  # built with the store
        self._soft_prepared = False
        self._soft_staging = IndexStaging(self.device)  # per-step index vectors, pinned on CUDA
        self._soft_slot: dict[str, int] = {}  # vLLM request id -> slot
        self._soft_meta: dict[int, dict[str, Any]] = {}  # slot -> {key, req_id}
        self._soft_debug_slots: set[int] = set()  # slots whose raw logits are kept (tests)
        self._soft_by_key: dict[str, str] = {}  # front-end key -> vLLM request id
        self._soft_done: dict[str, dict[str, np.ndarray]] = {}  # finished, not yet fetched
        self._soft_debug: dict[str, list[torch.Tensor]] = {}  # key -> per-step raw logits (tests)
        self._soft_stats = {"soft_rl_requests": 0, "sampled_rows": 0, "mixed_inputs": 0, "restored_positions": 0,
                            "profiled_rows": 0, "profiled_candidates": 0, "reserved_mb": 0,
                            "engine_step_mode": self._soft_step_mode}

    def _soft_get_store(self) -> SoftStateStore:
        if self._soft_store is None:
            rows = int(self.scheduler_config.max_num_seqs)
            self._soft_store = SoftStateStore(max(8, rows), self._soft_gen_len, self._soft_width,
                                              self._soft_marker_width, self.device, self.input_batch.vocab_size,
                                              max_candidates=self._soft_max_candidates,
                                              hidden_size=int(self.model_config.get_hidden_size()))
            self._soft_step = EngineStep(self._soft_store, self._soft_step_mode, density=self._soft_density,
                                         max_rows=rows)
        return self._soft_store

    def _soft_step_stats(self) -> dict[str, int]:
        stats = self._soft_step.stats if self._soft_step is not None else {}
        return {f"engine_step_{k}": v for k, v in stats.items()}

    def profile_run(self, *args, **kwargs) -> None:
        self._soft_prepare()  # persistent memory first: see _soft_prepare
        super().profile_run(*args, **kwargs)
        self._soft_reserve_memory()

    def _soft_prepare(self) -> None:
        """Build the store and the engine step, and compile (cuda_graph: capture for every row bucket) the steps
        of the run's own sampling settings (``prepare``), once. Called before vLLM's dummy forward: vLLM counts
        what is still allocated after profiling as used and adds the transient headroom peak - allocated at
        the end, so persistent memory (the store, the static inputs, the graph pool) allocated *after* the
        forward's peak would be subtracted from the activations' headroom instead of added to it."""
        if self._soft_prepared:
            return
        self._soft_get_store()
        self._soft_step.prepare(self._soft_prepare_params)
        self._soft_prepared = True

    def _soft_reserve_memory(self) -> None:
        """Run the sampler's worst case now, inside vLLM's memory profiling (GPU: ``profile_run``; CPU: before
        ``determine_available_memory``), so that the KV cache is sized around it (gpu-audit item 6): an eager
        step of ``max_num_seqs`` rows at ``max_candidates`` candidates (``SoftStateStore.profile_step``).

        Then the weight sync's buffers (``reserve_mb``: its receive buckets and, for the NCCL broadcast, NCCL's
        own; audit item 12), allocated and freed *after* the sampler's temporaries are freed: the measured peak
        becomes max(forward activations, sampler step, reserve) on top of the persistent memory, not their sum.
        That is what a run needs: a sync runs between steps, when no activations or sampler temporaries are
        alive, so the reserve only matters where it exceeds the step's transients (gpu-audit-2 item 6(b))."""
        self._soft_prepare()
        store = self._soft_store
        self._soft_stats["profiled_rows"] = store.profile_step(int(self.scheduler_config.max_num_seqs))
        self._soft_stats["profiled_candidates"] = store.max_candidates
        if self._soft_reserve_mb:  # the peak covers at least the sync's buffers (not in addition to the above)
            reserve = torch.empty(self._soft_reserve_mb << 20, dtype=torch.uint8, device=self.device)
            del reserve
        self._soft_stats["reserved_mb"] = self._soft_reserve_mb

    # ------------------------------------------------------------------ request lifecycle
    def _soft_register(self, req_id: str, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        d = extra.get(EXTRA_KEY)
        if d is None:
            return
        params = params_from_dict(d)
        store = self._soft_get_store()
        slot = store.allocate(params, list(d["marker_ids"]), int(sampling_params.max_tokens or store.gen_len))
        key = str(d.get("key", req_id))
        self._soft_slot[req_id] = slot
        self._soft_meta[slot] = {"key": key, "req_id": req_id}
        if d.get("debug_logits", False):
            self._soft_debug_slots.add(slot)
        self._soft_by_key[key] = req_id
        self._soft_stats["soft_rl_requests"] += 1

    def _soft_retire(self, req_id: str) -> dict[str, np.ndarray] | None:
        """Copy a request's generated positions to the host and free its slot."""
        slot = self._soft_slot.pop(req_id, None)
        if slot is None:
            return None
        meta = self._soft_meta.pop(slot)
        self._soft_by_key.pop(meta["key"], None)
        self._soft_debug_slots.discard(slot)
        data = self._soft_store.extract(slot, int(self._soft_store.n_steps[slot]))
        if meta["key"] in self._soft_debug:
            dbg = self._soft_debug.pop(meta["key"])
            data["logits"] = torch.stack(dbg).numpy() if dbg else np.zeros((0, 0), np.float32)
        self._soft_store.release(slot)
        return data

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            if req_id in self._soft_slot:
                key = self._soft_meta[self._soft_slot[req_id]]["key"]
                self._soft_done[key] = self._soft_retire(req_id)
        result = super()._update_states(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id not in self._soft_slot and new.sampling_params is not None:
                self._soft_register(new.req_id, new.sampling_params)
        return result

    def _soft_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(batch rows, slots) of the soft_rl requests in the current persistent batch."""
        if not self._soft_slot:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        slot_of = self._soft_slot
        rows, slots = [], []
        for i, rid in enumerate(self.input_batch.req_ids[: self.input_batch.num_reqs]):
            s = slot_of.get(rid)
            if s is not None:
                rows.append(i)
                slots.append(s)
        return np.asarray(rows, np.int64), np.asarray(slots, np.int64)

    # ------------------------------------------------------------------ inputs
    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        out = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        rows, slots = self._soft_rows()
        if rows.size == 0:
            return out
        inputs_embeds = out[1]
        if inputs_embeds is None:
            raise RuntimeError("soft thinking needs the inputs_embeds path (enable_prompt_embeds=True, PP rank 0)")
        req_ids = self.input_batch.req_ids
        n_sched = np.asarray([scheduler_output.num_scheduled_tokens.get(req_ids[i], 0) for i in rows], np.int64)
        start = self.input_batch.num_computed_tokens_cpu[rows].astype(np.int64)
        prompt = self.input_batch.num_prompt_tokens[rows].astype(np.int64)
        qstart = self.query_start_loc.np[rows].astype(np.int64)
        if np.all(n_sched == 1):  # pure decode: one position per request
            tok_slot, step, flat = slots, start - prompt, qstart
        else:  # prefill chunks (e.g. recompute after preemption): every generated position in the chunk
            owner = np.repeat(np.arange(rows.size), n_sched)
            offset = np.arange(owner.size) - np.repeat(np.cumsum(n_sched) - n_sched, n_sched)
            tok_slot, step, flat = slots[owner], start[owner] + offset - prompt[owner], qstart[owner] + offset
            self._soft_stats["restored_positions"] += int(((step >= 0) & (n_sched[owner] > 1)).sum())
        keep = step >= 0
        if not keep.all():
            tok_slot, step, flat = tok_slot[keep], step[keep], flat[keep]
        if step.size == 0:
            return out
        idx = self._soft_staging("inputs", tok_slot, step, flat)
        kinds = self._soft_store.step_hints(tok_slot)["kinds"]
        mixed = self._soft_store.mixed_inputs(self.model.embed_input_ids, idx[0], idx[1], kinds)
        inputs_embeds.index_copy_(0, idx[2], mixed.to(inputs_embeds.dtype))
        self._soft_stats["mixed_inputs"] += int(step.size)
        return out

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits, spec_decode_metadata):
        rows, slots = self._soft_rows()
        if rows.size and logits is not None:
            keep = ~self.discard_request_mask.np[: self.input_batch.num_reqs][rows].astype(bool)
            rows, slots = rows[keep], slots[keep]
        if rows.size == 0 or logits is None:
            return super()._sample(logits, spec_decode_metadata)
        if spec_decode_metadata is not None:
            raise RuntimeError("soft thinking does not support speculative decoding")
        store, engine_step = self._soft_store, self._soft_step
        n = int(rows.size)
        # the step index of each row = steps recorded so far (== len(output_token_ids), also after a
        # preemption; SoftEngine.generate checks the final counts against vLLM's outputs)
        steps = store.n_steps[slots]
        all_ours = n == logits.shape[0] and rows[-1] == n - 1  # every row is a soft_rl request (rows 0..n-1)
        # padded to the step's row bucket (cuda_graph) / at least 2 rows (compiled): padding runs the scratch slot
        idx = self._soft_staging("sample", *engine_step.pad(rows, slots, steps))
        rows_t, slots_t, steps_t = idx[0], idx[1], idx[2]
        # the logits rows are passed as they are when they are exactly the step's rows (the step does not modify them)
        o = engine_step(logits, None if all_ours and idx.shape[1] == n else rows_t, slots_t, steps_t, n,
                        **store.step_hints(slots))

        store.n_steps[slots] = steps + 1
        if self._soft_debug_slots:
            for j, s in enumerate(slots.tolist()):
                if s in self._soft_debug_slots:
                    row = logits[int(rows[j])]
                    self._soft_debug.setdefault(self._soft_meta[s]["key"], []).append(row.float().cpu().clone())
        self._soft_stats["sampled_rows"] += n

        # o's tensors may be a CUDA graph's static outputs: copied (.to(int32) / index_copy_) before the next step
        if all_ours and self.input_batch.sampling_metadata.max_num_logprobs is None:
            # every row is ours and nobody asked for logprobs: vLLM's sampler would only take an argmax
            # that is overwritten anyway, so skip it (same output type and dtype as Sampler.forward).
            self.input_batch.update_async_output_token_ids()
            return SamplerOutput(sampled_token_ids=o.token.to(torch.int32).view(-1, 1), logprobs_tensors=None)
        out = super()._sample(logits, spec_decode_metadata)
        sampled = out.sampled_token_ids
        sampled.index_copy_(0, rows_t[:n], o.token.to(sampled.dtype).view(-1, 1))
        return out

    # ------------------------------------------------------------------ RPC surface (via the worker)
    def soft_fetch(self, keys: list[str]) -> dict[str, dict[str, np.ndarray] | None]:
        res: dict[str, dict[str, np.ndarray] | None] = {}
        for key in keys:
            if key in self._soft_done:
                res[key] = self._soft_done.pop(key)
            elif key in self._soft_by_key:
                res[key] = self._soft_retire(self._soft_by_key[key])
            else:
                res[key] = None
        return res

    def soft_clear(self) -> None:
        self._soft_done.clear()
        self._soft_debug.clear()


class SoftCPUModelRunner(SoftThinkingMixin, CPUModelRunner):
    pass


class SoftGPUModelRunner(SoftThinkingMixin, GPUModelRunner):
    pass


class _SoftWorkerMethods:
    """Named worker methods called with ``collective_rpc`` (picklable arguments and results only)."""

    def soft_fetch(self, keys: list[str]) -> bytes:
        # pickled: collective_rpc (multiprocess) does not rebuild arrays nested in results
        return pickle.dumps(self.model_runner.soft_fetch(list(keys)))

    def soft_stats(self) -> dict[str, int | str]:
        return {**self.model_runner._soft_stats, **self.model_runner._soft_step_stats()}

    def soft_clear(self) -> None:
        self.model_runner.soft_clear()

    def soft_update_weights(self, named_tensors) -> int:
        """In-place weight reload from (name, tensor) pairs (in-process engines pass real tensors)."""
        count = [0]

        def counted():
            for item in named_tensors:  # consumed lazily: a stream is never materialised here
                count[0] += 1
                yield item

        # CPU repacks linear weights after start-up, so model.load_weights() fails there; reload_weights works.
        self.reload_weights(weights_iterator=self._soft_with_tied_head(counted()), is_checkpoint_format=True)
        return count[0]

    def _soft_with_tied_head(self, items):
        """A tied model's output matrix is its input embedding, sent once (the learners' named parameters
        hold it once). vLLM on CPU keeps a separately packed LM head that a reload of the embedding alone
        leaves stale (measured: mean |engine - HF| log-prob 1.5e-2 after a 1e-3 perturbation, 1.5e-5 with
        the head reloaded too), so the same tensor is handed to the loader again as the head: loaded twice
        here, transferred once. Harmless where the head shares the embedding's storage (GPU)."""
        tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        for name, tensor in items:
            yield name, tensor
            if tied and name.endswith("embed_tokens.weight"):
                yield "lm_head.weight", tensor

    def soft_update_weights_from_spool(self, spool_dir: str, readers: int) -> int:
        """In-place reload from a spool of bucket files (``workers.weight_spool``; this worker is reader
        ``self.rank`` of ``readers``), loaded in order as the loader consumes them."""
        from workers.weight_spool import read_spool

        items = read_spool(spool_dir, self.rank, readers)
        try:
            n = self.soft_update_weights(items)
            for _ in items:  # a loader that stopped early must still let the writer and the other readers finish
                pass
        finally:
            items.close()  # unfinished: publishes the spool's ABORT now, not when the traceback is freed
        return n

    # broadcast transport (workers.weight_broadcast): each worker process of the engine is one rank
    def soft_join_weight_group(self, host: str, port: int, base_rank: int, world_size: int, backend: str,
                               timeout_s: float) -> int:
        from workers.weight_broadcast import close_group, open_group

        close_group(getattr(self, "_soft_weight_group", None))
        self._soft_weight_group = None
        rank = base_rank + self.rank
        self._soft_weight_group = open_group(backend, host, port, rank, world_size, timeout_s,
                                             device=getattr(self, "device", "cpu"))
        return rank

    def soft_receive_weights(self, layout) -> int:
        """Receive the learner's broadcast and reload in place, bucket by bucket (streamed into the loader).
        Any failure here (the loader's too) aborts the group, so the other ranks stop waiting for this one."""
        from workers.weight_broadcast import abort_group, receive

        group = getattr(self, "_soft_weight_group", None)
        if group is None:
            raise RuntimeError("soft_receive_weights before soft_join_weight_group")
        count = 0

        def stream():
            nonlocal count
            for item in receive(group, layout):
                count += 1
                yield item

        items = stream()
        try:
            self.reload_weights(weights_iterator=self._soft_with_tied_head(items), is_checkpoint_format=True)
            for _ in items:  # a loader that stopped early must not leave buckets unreceived (the group would desync)
                pass
        except BaseException as e:
            abort_group(group, f"engine worker rank {group.rank} failed while loading: {type(e).__name__}: {e}")
            raise
        return count

    def soft_leave_weight_group(self) -> None:
        """Tear the group down explicitly (``abort``; a failed NCCL group is not left to its destructor)."""
        from workers.weight_broadcast import close_group

        close_group(getattr(self, "_soft_weight_group", None))
        self._soft_weight_group = None


def _install(runner, cls) -> None:
    base = cls.__mro__[2]
    if type(runner) is not base:
        raise RuntimeError(
            f"soft thinking patches vLLM's V1 model runner ({base.__name__}), but the worker built "
            f"{type(runner).__module__}.{type(runner).__name__} (Model Runner V2?). "
            "Set VLLM_USE_V2_MODEL_RUNNER=0.")
    runner.__class__ = cls
    runner._soft_setup()


class SoftCPUWorker(_SoftWorkerMethods, CPUWorker):
    def init_device(self):
        super().init_device()
        _install(self.model_runner, SoftCPUModelRunner)

    def determine_available_memory(self) -> int:
        # vLLM on CPU sizes its KV cache from free host memory without a profile run (unless compiling)
        if not self.model_runner._soft_stats["profiled_rows"]:
            self.model_runner._soft_reserve_memory()
        return super().determine_available_memory()


class SoftGPUWorker(_SoftWorkerMethods, GPUWorker):
    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise RuntimeError("vLLM selected Model Runner V2, which the soft-thinking hooks do not support; "
                               "set VLLM_USE_V2_MODEL_RUNNER=0 (vLLM 0.32 defaults to V2 on GPU).")
        runner = SoftGPUModelRunner(self.vllm_config, self.device)
        runner._soft_setup()
        return runner
