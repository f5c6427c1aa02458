"""Per-request soft-thinking state on the engine's device, indexed by a persistent slot, and the device
work of one engine step (``sample_step``, ``mixed_inputs``). The vLLM runner (workers/vllm_soft/runner.py)
drives it, ``sample_step`` through ``soft_rl.engine_step.EngineStep`` (eager, compiled, or replayed from CUDA
graphs); nothing here imports vLLM, so it runs and compiles anywhere torch does (tests/gpu).

vLLM's persistent batch moves requests between rows (condense, reorder, preemption), so nothing here
is indexed by batch row. Each soft_rl request owns a *slot* for its whole life (including while it is
preempted); every step the runner gathers the rows' slots, runs the core sampler on the gathered
state and scatters the result back.

Per slot it holds:
  * the request's sampling parameters as the columns of a ``soft_rl.sampling.SamplingBatch``;
  * the thinking/answer phase state of ``soft_rl.phase.PhaseTracker`` (marker, tail, budget, ...);
    the tracker's own ``forced_tokens``/``advance`` run on a gathered view (``tracker``/``put_tracker``),
    so the phase logic is the core one, not a copy;
  * the per-position history of the generated steps: every field of the core ``SampleOutput`` (K ids,
    K noisy values, K mixture weights, kept slots, emitted token, is_soft, log-probs) plus the forced
    flag; their shapes come from a one-row prototype step, so new core fields are carried along
    without changes here. The weights are the next input
    (sum_k w_k E[i_k]) of that position, for decode and for re-prefill after preemption (recompute);
    the rest is the request's output, read once when it finishes.
Every buffer has one row more than the store has slots: the *scratch* slot (``SoftStateStore.scratch``), which
no request ever owns. Steps padded to a fixed row count (CUDA-graph buckets) point their padding rows at it,
so padding reads valid parameters and writes only state and history nobody reads.
Every buffer is allocated when the store is built or resized, never during a step.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch

from soft_rl.densities import NOISE_KINDS
from soft_rl.noise_kinds import noise_kind
from soft_rl.phase import PhaseTracker
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import (
    NOISE_CODES,
    SampleOutput,
    SamplingBatch,
    SoftSamplingParams,
    input_offsets,
    mix_rows,
    soft_sample,
)

# Phase-dependent SamplingBatch columns come from the phase state each step (as in soft_rl.reference.generate);
# every other column is a fixed per-request parameter.
_STEP_FIELDS = ("is_soft", "thinking", "width")
_PARAM_FIELDS = [f.name for f in fields(SamplingBatch) if f.name not in _STEP_FIELDS]


def candidates_needed(params: SoftSamplingParams, width: int, vocab_size: int) -> int:
    """The top-C candidate width (``soft_sample``'s ``candidates``) that every step of a request with these
    parameters needs, in an engine whose soft slots are ``width`` wide (its ``max_k``) over ``vocab_size`` tokens.

    * Soft steps use the K slots, but top-p (top_p < 1) compares against the top-k mass S_k = sum of the
      top_k largest probabilities, so the top top_k tokens must be candidates (top_k <= 0: S_k = 1; top_p = 1:
      no top-p; either way the slots suffice).
    * Discrete steps (the answer phase; the thinking phase without soft thinking), and soft steps of a kind that
      draws its slots from the kept set (``NoiseKind.samples_kept_set``), draw from the whole kept prefix: top_k
      tokens, or the whole vocabulary when top_k <= 0.
    The engine's step takes the largest over its rows; a driver takes it over its run's sampling settings
    (``SoftEngine(max_candidates=...)`` profiles and caps the engine at that)."""
    need = int(width)
    kept_set = params.soft and noise_kind(params.noise).samples_kept_set  # soft slots drawn from the kept set
    thinking_top_k = [params.top_k] if params.soft and (kept_set or params.top_k > 0 and params.top_p < 1) else []
    for top_k in [params.answer_top_k] + ([] if params.soft else [params.top_k]) + thinking_top_k:
        need = vocab_size if top_k <= 0 else max(need, top_k)
    return min(need, int(vocab_size))


def candidates_error(params: SoftSamplingParams, need: int, max_candidates: int, vocab_size: int) -> str:
    """Why a request is refused by an engine capped at ``max_candidates`` (``SoftEngine(max_candidates=...)``)."""
    def width(top_k: int) -> str:
        return f"{top_k} (the whole vocabulary, {vocab_size})" if top_k <= 0 else str(top_k)

    return (f"request needs {need} sampling candidates (top_k={width(params.top_k)}, answer_top_k="
            f"{width(params.answer_top_k)}, soft={params.soft}) but the engine was built with max_candidates="
            f"{max_candidates} (set from the run's rollout.top_k / rollout.answer_top_k / rollout.eval_top_k); "
            "raise it or lower the request's top_k")


class SoftStateStore:
    """Device buffers for ``slots`` requests x ``gen_len`` generated positions x ``width`` soft slots (plus the
    scratch slot). ``max_candidates``: the widest candidate set a request may need (``candidates_needed``;
    None: the vocabulary); ``allocate`` refuses wider requests and ``profile_step`` runs at this width."""

    def __init__(self, slots: int, gen_len: int, width: int, marker_width: int, device, vocab_size: int,
                 max_candidates: int | None = None, hidden_size: int | None = None):
        self.device = torch.device(device)
        self.hidden_size = hidden_size  # the model's H: the size of the input noise of a kind that noises the input
        self.width = int(width)
        self.vocab_size = int(vocab_size)
        if max_candidates is not None and not self.width <= max_candidates:
            raise ValueError(f"max_candidates={max_candidates} is below max_k={self.width}: every request needs at "
                             "least max_k candidates (soft_rl.engine_state.candidates_needed)")
        self.max_candidates = self.vocab_size if max_candidates is None else min(int(max_candidates), self.vocab_size)
        self.version = 0  # bumped by every (re)allocation: captured CUDA graphs hold the old buffers' addresses
        self.slots = 0
        self.gen_len = 0
        self.marker_width = int(marker_width)
        self.t: dict[str, torch.Tensor] = {}
        self._packing_cache = self._packing()
        self._history_spec = self._history_fields()
        self.h: dict[str, torch.Tensor] = {}  # history: SampleOutput field (+ "forced") -> [slots + 1, gen_len, ...]
        # host-side per-slot facts (never read back from the device)
        self.free: list[int] = []
        self.need_c = np.zeros(0, dtype=np.int64)  # candidate width the slot's steps need (candidates_needed)
        self.noise_code = np.zeros(0, dtype=np.int64)
        self.n_steps = np.zeros(0, dtype=np.int64)  # generated steps recorded so far (the next step's index)
        self.has_budget = np.zeros(0, dtype=bool)  # a thinking budget may force tokens
        self._resize(slots, gen_len)

    # ----------------------------------------------------------------- allocation
    def _empty(self, slots: int, gen_len: int) -> dict[str, torch.Tensor]:
        d, M, i64 = self.device, self.marker_width, torch.int64
        t = {}
        # parameter columns packed by dtype: one gather per dtype per step instead of one per column
        for dtype, names in self._packing_cache.items():
            t["p_" + str(dtype)] = torch.zeros(slots, len(names), dtype=dtype, device=d)
        t["soft_enabled"] = torch.zeros(slots, dtype=torch.bool, device=d)
        t["marker"] = torch.full((slots, M), -1, dtype=i64, device=d)
        t["marker_len"] = torch.ones(slots, dtype=i64, device=d)
        t["budget"] = torch.full((slots,), -1, dtype=i64, device=d)
        t["thinking"] = torch.zeros(slots, dtype=torch.bool, device=d)
        t["n_think"] = torch.zeros(slots, dtype=i64, device=d)
        t["n_generated"] = torch.zeros(slots, dtype=i64, device=d)
        t["tail"] = torch.full((slots, M), -2, dtype=i64, device=d)
        t["force_pos"] = torch.full((slots,), -1, dtype=i64, device=d)
        return t

    @staticmethod
    def _packing() -> dict[torch.dtype, list[str]]:
        proto = SamplingBatch.from_params([SoftSamplingParams()])
        groups: dict[torch.dtype, list[str]] = {}
        for name in _PARAM_FIELDS:
            groups.setdefault(getattr(proto, name).dtype, []).append(name)
        return groups

    def _history_fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(trailing shape, dtype) of every history field: those of ``soft_sample``'s output on a one-row
        prototype (so new core fields are carried along), plus the forced flag."""
        proto = soft_sample(torch.zeros(1, max(self.width, 2), device=self.device),
                            SamplingBatch.from_params([SoftSamplingParams(k=self.width)], device=self.device,
                                                      width=self.width),
                            NoiseCounters(torch.zeros(1, dtype=torch.int64, device=self.device),
                                          torch.zeros(1, dtype=torch.int64, device=self.device)),
                            candidates=max(self.width, 2), kinds=("gumbel",))
        spec = {f.name: (tuple(getattr(proto, f.name).shape[1:]), getattr(proto, f.name).dtype) for f in fields(proto)}
        spec["forced"] = ((), torch.bool)
        return spec

    def _resize(self, slots: int, gen_len: int) -> None:
        """(Re)allocate every buffer, history included, up front: the engine sizes the store before vLLM
        sizes its KV cache, so nothing here is allocated later (``record`` never allocates). Rows 0..slots-1
        are the slots, row ``slots`` the scratch slot (re-initialised here, never copied)."""
        new = self._empty(slots + 1, gen_len)
        s, g = self.slots, min(self.gen_len, gen_len)
        for name, buf in self.t.items():
            new[name][:s] = buf[:s]
        self.t = new
        for name, (shape, dtype) in self._history_spec.items():
            hb = torch.zeros((slots + 1, gen_len) + shape, dtype=dtype, device=self.device)
            if name in self.h:
                hb[:s, :g] = self.h[name][:s, :g]
            self.h[name] = hb
        self.free.extend(range(slots - 1, self.slots - 1, -1))  # pop() hands out low slots first
        self.need_c = np.concatenate([self.need_c, np.zeros(slots - self.slots, dtype=np.int64)])
        self.noise_code = np.concatenate([self.noise_code, np.zeros(slots - self.slots, dtype=np.int64)])
        self.n_steps = np.concatenate([self.n_steps, np.zeros(slots - self.slots, dtype=np.int64)])
        self.has_budget = np.concatenate([self.has_budget, np.zeros(slots - self.slots, dtype=bool)])
        self.slots, self.gen_len = slots, gen_len
        self.version += 1
        self._write_slot(self.scratch, SoftSamplingParams(k=self.width), [0])

    @property
    def scratch(self) -> int:
        """The slot padding rows point at: valid parameters (a default soft request), owned by no request;
        its state and history are written by padded steps and never read."""
        return self.slots

    def ensure_gen_len(self, n: int) -> None:
        if n > self.gen_len:
            self._resize(self.slots, max(n, 2 * self.gen_len))

    def allocate(self, params: SoftSamplingParams, marker_ids: list[int], max_tokens: int) -> int:
        """Take a slot for a new request and write its parameters and initial phase state."""
        if params.k > self.width:
            raise ValueError(f"request asks for k={params.k} soft slots; the engine was built with max_k={self.width}")
        if not marker_ids:
            raise ValueError("think-end marker encodes to no tokens")
        if len(marker_ids) > self.marker_width:
            raise ValueError(f"think-end marker has {len(marker_ids)} tokens; the engine allows {self.marker_width}")
        need = candidates_needed(params, self.width, self.vocab_size)
        if need > self.max_candidates:
            raise ValueError(candidates_error(params, need, self.max_candidates, self.vocab_size))
        self.ensure_gen_len(max_tokens)
        if not self.free:
            self._resize(2 * self.slots, self.gen_len)
        s = self.free.pop()
        self._write_slot(s, params, marker_ids)
        self.need_c[s] = need
        self.noise_code[s] = NOISE_CODES[params.noise]
        self.n_steps[s] = 0
        self.has_budget[s] = params.thinking_budget is not None
        return s

    def _write_slot(self, s: int, params: SoftSamplingParams, marker_ids: list[int]) -> None:
        """Slot ``s``'s parameter columns and initial phase state on the device."""
        one = SamplingBatch.from_params([params], device=self.device, width=self.width)
        t = self.t
        for dtype, names in self._packing_cache.items():
            t["p_" + str(dtype)][s] = torch.stack([getattr(one, n)[0] for n in names])
        t["soft_enabled"][s] = bool(params.soft)
        M = self.marker_width
        row = [-1] * (M - len(marker_ids)) + list(marker_ids)
        t["marker"][s] = torch.tensor(row, dtype=torch.int64)
        t["marker_len"][s] = len(marker_ids)
        t["budget"][s] = -1 if params.thinking_budget is None else params.thinking_budget
        t["thinking"][s] = True
        t["n_think"][s] = 0
        t["n_generated"][s] = 0
        t["tail"][s] = -2
        t["force_pos"][s] = -1

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def profile_step(self, rows: int) -> int:
        """One worst-case step on dummy logits, then the store as it was: ``rows`` requests (vLLM's
        ``max_num_seqs``), ``max_candidates`` candidates (the widest a request may ask for: right-sized
        from the run's sampling settings, or the vocabulary), every noise kind, a thinking budget. Run inside
        vLLM's memory profiling (before the KV cache is sized), it makes the allocator's peak cover
        ``soft_sample``'s [rows x vocabulary] temporaries, which vLLM's own dummy sampler run does not.
        Float32 logits (model.head_dtype), the largest. Eager: the largest temporaries a step of any mode makes
        outside a captured graph's pool. Returns the rows run (at most the store's slots)."""
        rows = min(int(rows), self.slots)
        free, saved = list(self.free), {n: a.copy() for n, a in self._host_facts().items()}
        C = self.max_candidates
        # a discrete answer phase over the top C: candidates_needed == C, the widest step allocate admits
        params = SoftSamplingParams(k=self.width, top_k=self.width, thinking_budget=1,
                                    answer_top_k=-1 if C >= self.vocab_size else C)
        slots = [self.allocate(params, [0], 1) for _ in range(rows)]
        logits = torch.randn(rows, self.vocab_size, device=self.device)
        slots_t = torch.as_tensor(slots, device=self.device)
        self.sample_step(logits, slots_t, torch.zeros_like(slots_t), has_budget=True, density="official",
                         candidates=C, kinds=tuple(NOISE_KINDS))
        del logits
        self.free = free
        for name, arr in saved.items():
            setattr(self, name, arr)
        return rows

    def _host_facts(self) -> dict[str, np.ndarray]:
        return {"need_c": self.need_c, "noise_code": self.noise_code, "n_steps": self.n_steps,
                "has_budget": self.has_budget}

    # ----------------------------------------------------------------- per step
    def batch(self, slots: torch.Tensor, tracker: PhaseTracker) -> SamplingBatch:
        """The gathered SamplingBatch of these slots for this step, phase columns from ``tracker``
        (exactly how soft_rl.reference.generate assembles its per-step batch)."""
        t = self.t
        kw = {}
        for dtype, names in self._packing_cache.items():
            cols = t["p_" + str(dtype)].index_select(0, slots)
            kw.update({n: cols[:, j] for j, n in enumerate(names)})
        phase = tracker.phase_columns(t["soft_enabled"].index_select(0, slots))
        return SamplingBatch(width=self.width, **phase, **kw)

    def tracker(self, slots: torch.Tensor) -> PhaseTracker:
        """A PhaseTracker whose rows are these slots' phase state (copies; write back with put_tracker)."""
        return PhaseTracker.from_state({name: self.t[name].index_select(0, slots) for name in PhaseTracker.STATE})

    def put_tracker(self, slots: torch.Tensor, tr: PhaseTracker) -> None:
        for name in PhaseTracker.MUTABLE:
            self.t[name].index_copy_(0, slots, getattr(tr, name))

    def _flat(self, name: str) -> torch.Tensor:
        """History buffer ``name`` as [slots * gen_len, ...] (a view): one index_copy_/index_select per
        field instead of a two-index advanced indexing op."""
        buf = self.h[name]
        return buf.view((self.slots + 1) * self.gen_len, *buf.shape[2:])

    def record(self, slots: torch.Tensor, steps: torch.Tensor, out: SampleOutput, forced: torch.Tensor) -> None:
        values = {f.name: getattr(out, f.name) for f in fields(out)}
        values["forced"] = forced
        flat = slots * self.gen_len + steps
        for name, v in values.items():
            self._flat(name).index_copy_(0, flat, v)

    def inputs(self, slots: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, K], weights [N, K]) of the input that follows generated step ``steps`` of ``slots``."""
        flat = slots * self.gen_len + steps
        return self._flat("ids").index_select(0, flat), self._flat("weights").index_select(0, flat)

    # ----------------------------------------------------------------- the device work of one engine step
    def step_hints(self, slots: np.ndarray) -> dict:
        """``sample_step``'s static hints for these slots, from host-side facts only (never the device):
        whether any may force a token, the candidate width and the noise kinds present."""
        return dict(has_budget=bool(self.has_budget[slots].any()), candidates=int(self.need_c[slots].max()),
                    kinds=tuple(NOISE_KINDS[c] for c in sorted(set(self.noise_code[slots].tolist()))))

    def sample_step(self, logits: torch.Tensor, slots: torch.Tensor, steps: torch.Tensor, *, has_budget: bool,
                    density: str, candidates: int, kinds: tuple[str, ...]) -> SampleOutput:
        """One decode step of these slots from their ``logits`` [N, V]: gather the phase state and the
        parameters, ``soft_sample``, advance the phase, write the state and the history back.

        Pure device work: every shape and branch is fixed by the host-side hints (``step_hints``), so it
        makes no host synchronisation and compiles with ``torch.compile(fullgraph=True)``
        (tests/test_gpu_proxies.py)."""
        tracker = self.tracker(slots)
        batch = self.batch(slots, tracker)
        # without a thinking budget in the batch nothing can be forced: skip the forcing ops
        force = tracker.forced_tokens() if has_budget else None
        out = soft_sample(logits, batch, NoiseCounters(batch.seed, steps), force_token=force, density=density,
                          candidates=candidates, kinds=kinds, hidden_size=self.hidden_size)
        out, _, forced = tracker.advance(out)
        self.put_tracker(slots, tracker)
        self.record(slots, steps, out, forced)
        return out

    def _param(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """The parameter column ``name`` of these slots."""
        for dtype, names in self._packing_cache.items():
            if name in names:
                return self.t["p_" + str(dtype)][:, names.index(name)].index_select(0, slots)
        raise KeyError(name)

    def mixed_inputs(self, embed, slots: torch.Tensor, steps: torch.Tensor,
                     kinds: tuple[str, ...] = ()) -> torch.Tensor:
        """The soft inputs that follow generated step ``steps`` of ``slots``: sum_k w_k E[i_k], [N, H]
        (``embed`` maps ids to embedding rows: the model's own, vocabulary-parallel aware), plus sigma eps on the
        soft steps of a kind that noises the input. ``kinds``: the noise kinds of these slots (``step_hints``, a
        host-side fact), so that the input noise is computed only where such a kind is present."""
        ids, w = self.inputs(slots, steps)
        N, K = ids.shape
        rows = embed(ids.reshape(-1)).view(N, K, -1)
        is_soft = self._flat("is_soft").index_select(0, slots * self.gen_len + steps)
        offset = input_offsets(self._param("noise", slots), is_soft, self._param("seed", slots), steps,
                               self._param("embedding_sigma", slots), rows.shape[-1], kinds)
        return mix_rows(rows, w, offset)

    def extract(self, slot: int, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` generated positions of a slot (every history field, keyed by SampleOutput
        field name, plus n_think / n_generated), as host numpy arrays."""
        out = {name: buf[slot, :n] for name, buf in self.h.items()}
        out["n_think"] = self.t["n_think"][slot]
        out["n_generated"] = self.t["n_generated"][slot]
        return {k: v.cpu().numpy().copy() for k, v in out.items()}


class IndexStaging:
    """Host index vectors -> one int64 [rows, n] tensor on the device, per call site.

    On CUDA the vectors go through a pinned host buffer kept per call site (grown, never shrunk), so the
    copy is a true asynchronous DMA; from pageable memory ``non_blocking=True`` degrades to a copy that
    can block the host (gpu-audit item 11). Reusing the buffer is safe because vLLM's step ends with a
    host sync (async scheduling is off) before the next step writes it, and each call site has its own.
    Elsewhere (CPU) the host tensor is used as is.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, site: str, *cols: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for c in cols]))
        if not self.pinned:
            return host.to(self.device)
        buf = self.buffers.get(site)
        if buf is None or buf.numel() < host.numel():
            buf = torch.empty(max(host.numel(), 2 * (buf.numel() if buf is not None else 0), 4096),
                              dtype=torch.int64, pin_memory=True)
            self.buffers[site] = buf
        staged = buf[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)
