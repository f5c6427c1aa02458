"""``EngineStep``: the soft-thinking device work of one rollout-engine step, as the vLLM runner calls it.

The work is ``SoftStateStore.sample_step`` (the soft sampler, the phase tracker, the state and history
writes). Its shapes and branches are fixed by host-side hints: ``SoftStateStore.step_hints`` (has_budget,
candidates, kinds) plus the engine's density, together the *hints key*. Run eagerly it is 150-250 small
kernels per decode step, and on a GPU their launch and dispatch cost is comparable to a 1.5B model's decode
step (gpu-audit-2 item 4). The modes (``rollout.engine_step``):

* ``eager``: ``sample_step`` as is.
* ``compiled``: ``torch.compile(fullgraph=True)``, one compiled graph per hints key. The row count changes
  almost every step (requests finish, new ones arrive), so the row dimension of the inputs is marked dynamic
  and one graph serves every row count. Static row buckets would cost one compile per bucket, at 25-90 s per
  cold inductor compile on 2 CPU cores, and 4 s warm from TORCHINDUCTOR_CACHE_DIR. Rows are padded to at least
  2, because dynamo specialises size-1 dimensions and would compile a second graph for one row. Nothing else
  is dynamic (``dynamic=False``): without it, dynamo's automatic dynamic shapes, whose state is keyed by the
  function's name and line, would turn the candidate width into a symbolic value once two keys had been
  compiled (seen on the CPU: another graph, with a dynamic top-k). Each key's function has a code object of
  its own. Dynamo keeps its compiled code and its recompile budget (``torch._dynamo.config.recompile_limit``,
  8) per code object, so the keys never share that budget, and one key's guards are never evaluated on another
  key's calls. ``stats["compiles"]`` counts the graphs compiled: one per key (plus one after a store resize, which
  re-allocates the buffers the graph reads). Inputs reach the graph in one form (inference tensors at storage
  offset 0; anything else is copied), since dynamo guards on dispatch keys and offsets.
* ``cuda_graph`` (CUDA only): rows are padded to a bucket (``row_buckets``: powers of two up to the engine's
  ``max_num_seqs``). For each (bucket, hints key), the compiled step is captured once in a CUDA graph on
  static inputs: logits [bucket, V] float32, slots, steps. All graphs share one memory pool. Before capture,
  the step is warmed up on a side stream. A step copies its rows into the static inputs, replays, and reads
  the real rows from the static outputs. Keys given to ``prepare`` are captured for every bucket when the
  runner calls it, inside vLLM's memory profiling, so the pool is counted before the KV cache is sized.
  Other keys are captured lazily, on first use. A store resize drops every graph (they hold the old buffers'
  addresses), and they are captured again as needed. A row count above the largest bucket runs the compiled
  step without a graph (``stats["ungraphed_steps"]``).
* ``auto``: ``cuda_graph`` on CUDA, ``compiled`` elsewhere. The environment variable ``SOFT_RL_ENGINE_STEP``
  replaces what ``auto`` resolves to; an explicit mode is never overridden. Test suites, which build many
  short-lived engines and would otherwise compile in each, set it to ``eager``.

Padding. A padded row points at the store's *scratch slot* (``SoftStateStore.scratch``), which no request ever
owns, at generation step 0. It reads valid parameters, and it writes only the scratch slot's state and
history, which nobody reads. Every op of the step is row-wise, so a real row's outputs do not depend on the
padding. The padded rows' logits are stale or another row's, which is harmless. ``pad_rows=True`` buckets
the rows in the eager and compiled modes too, so that the padding can be tested on a CPU.

Only ``sample_step`` is compiled and captured. ``mixed_inputs`` calls the model's embedding (vocabulary-parallel
under tensor parallelism, so it is a collective) and stays eager, outside our graphs. The mixture is written
into vLLM's persistent ``inputs_embeds`` buffer before vLLM's own CUDA graphs replay, so those graphs are
unaffected.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from soft_rl.engine_state import SoftStateStore, candidates_needed
from soft_rl.sampling import SampleOutput, SoftSamplingParams

ENGINE_STEP_MODES = ("auto", "eager", "compiled", "cuda_graph")
AUTO_ENV = "SOFT_RL_ENGINE_STEP"  # what ``auto`` resolves to, when set (test suites: eager)
SMALLEST_BUCKET = 8

HintsKey = tuple[bool, int, tuple[str, ...]]  # (has_budget, candidates, kinds); the density is per engine


def resolve_mode(mode: str, device) -> str:
    """The mode an engine on ``device`` runs: ``auto`` -> ``$SOFT_RL_ENGINE_STEP`` if set, else cuda_graph on CUDA
    and compiled elsewhere. Raises ValueError naming ``rollout.engine_step`` for a bad or impossible mode."""
    device = torch.device(device)
    if mode not in ENGINE_STEP_MODES:
        raise ValueError(f"rollout.engine_step must be one of {list(ENGINE_STEP_MODES)}, got {mode!r}")
    if mode == "auto":
        override = os.environ.get(AUTO_ENV, "").strip()
        if override:
            if override not in ENGINE_STEP_MODES[1:]:
                raise ValueError(f"{AUTO_ENV}={override!r} (what rollout.engine_step=auto resolves to) must be one "
                                 f"of {list(ENGINE_STEP_MODES[1:])}")
            mode = override
        else:
            mode = "cuda_graph" if device.type == "cuda" else "compiled"
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"rollout.engine_step=cuda_graph needs a CUDA device; this engine runs on {device.type} "
                         "(use auto, compiled or eager)")
    return mode


def row_buckets(max_rows: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Padded row counts: smallest, 2 x smallest, ... below ``max_rows``, then ``max_rows`` itself; every
    bucket at least 2 (a size-1 dimension would be specialised by dynamo)."""
    top = max(2, int(max_rows))
    out, b = [], max(2, int(smallest))
    while b < top:
        out.append(b)
        b *= 2
    return (*out, top)


def hints_key(has_budget: bool, candidates: int, kinds: Sequence[str]) -> HintsKey:
    return bool(has_budget), int(candidates), tuple(kinds)


def params_key(store: SoftStateStore, params: SoftSamplingParams) -> HintsKey:
    """The hints key of a step whose rows all have ``params`` (``SoftStateStore.step_hints`` of such a batch)."""
    return hints_key(params.thinking_budget is not None, candidates_needed(params, store.width, store.vocab_size),
                     (params.noise,))


def head(out: SampleOutput, n: int) -> SampleOutput:
    """The first ``n`` rows of a step's output (views)."""
    return SampleOutput(**{f.name: getattr(out, f.name)[:n] for f in fields(out)})


def _bound_step(store: SoftStateStore, density: str, key: HintsKey) -> Callable:
    """``store.sample_step`` with the hints of ``key`` fixed, as a function with a code object of its own.
    Dynamo caches compiled code and counts recompiles per code object; a copy per key keeps the keys apart."""
    has_budget, candidates, kinds = key

    def soft_engine_step(logits, slots, steps):
        return store.sample_step(logits, slots, steps, has_budget=has_budget, density=density,
                                 candidates=candidates, kinds=kinds)

    code = soft_engine_step.__code__.replace()  # a new, equal code object
    return types.FunctionType(code, soft_engine_step.__globals__, code.co_name, None, soft_engine_step.__closure__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    out: SampleOutput  # the static outputs the graph writes at every replay


class EngineStep:
    """Runs ``SoftStateStore.sample_step`` in one of the modes of the module docstring.

    Per step the caller (workers/vllm_soft/runner.py ``_sample``) pads its host index vectors with ``pad``, stages
    them to the device and calls the object; it gets the real rows' ``SampleOutput``. Under ``cuda_graph`` the
    output tensors are the graphs' static outputs, overwritten by the next step: use (or copy) them within the
    step. ``max_rows``: the most rows a step has (vLLM's max_num_seqs), which sizes the buckets.
    ``backend``: torch.compile's backend (inductor in production; tests of the bookkeeping use "eager").
    """

    def __init__(self, store: SoftStateStore, mode: str = "auto", *, density: str = "official", max_rows: int,
                 pad_rows: bool = False, backend: str = "inductor", smallest_bucket: int = SMALLEST_BUCKET):
        self.store = store
        self.mode = resolve_mode(mode, store.device)
        self.density = density
        self.backend = backend
        self.max_rows = int(max_rows)
        self.buckets = row_buckets(max_rows, smallest_bucket) if pad_rows or self.mode == "cuda_graph" else ()
        self.stats = {"prepared": 0, "compiles": 0, "captures": 0, "graph_steps": 0, "ungraphed_steps": 0}
        self._fns: dict[HintsKey, Callable] = {}
        self._graphs: dict[tuple[int, HintsKey], _Captured] = {}
        self._graphs_version = store.version
        self._pool = None  # one memory pool for every graph (graph_pool_handle), made at the first capture
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logits, slots, steps

    # ------------------------------------------------------------------ padding
    def rows_for(self, n: int) -> int:
        """The row count a step of ``n`` real rows runs with (its bucket; at least 2 when compiled)."""
        for b in self.buckets:
            if b >= n:
                return b
        return n if self.mode == "eager" else max(n, 2)

    def pad(self, rows: np.ndarray, slots: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, ...]:
        """(rows, slots, steps) padded to ``rows_for(n)``: padding rows read logits row 0 and run the scratch slot
        at step 0."""
        n = len(slots)
        extra = self.rows_for(n) - n
        if extra == 0:
            return rows, slots, steps
        return (np.concatenate([rows, np.zeros(extra, np.int64)]),
                np.concatenate([slots, np.full(extra, self.store.scratch, np.int64)]),
                np.concatenate([steps, np.zeros(extra, np.int64)]))

    # ------------------------------------------------------------------ the step
    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor, steps: torch.Tensor,
                 n: int, *, has_budget: bool, candidates: int, kinds: tuple[str, ...]) -> SampleOutput:
        """One step of ``n`` real rows. ``slots``/``steps`` [b] and ``rows`` [b] (the logits row of each; None when
        the step's rows are exactly ``logits``' rows) on the device, padded by ``pad`` (b = ``rows_for(n)``)."""
        key = hints_key(has_budget, candidates, kinds)
        b = int(slots.shape[0])
        with torch.inference_mode():  # as vLLM's execute_model: one grad mode, so dynamo never recompiles for it
            if self.mode == "cuda_graph" and b in self.buckets:
                out = self._replay(logits, rows, slots, steps, b, key)
            else:
                if self.mode == "cuda_graph":
                    self.stats["ungraphed_steps"] += 1
                z = logits if rows is None else logits.index_select(0, rows)
                out = self._function(key)(z, slots, steps)
        return out if b == n else head(out, n)

    def prepare(self, params: Sequence[SoftSamplingParams]) -> list[HintsKey]:
        """Compile (and, under cuda_graph, capture for every bucket) the step of a batch of each of ``params``,
        now rather than at the first such step: the runner calls it inside vLLM's memory profiling. Returns
        the hints keys prepared."""
        return self.prepare_keys([params_key(self.store, p) for p in params])

    def prepare_keys(self, keys: Sequence[HintsKey]) -> list[HintsKey]:
        """``prepare`` for hints keys (``hints_key``)."""
        keys = list(dict.fromkeys(hints_key(*k) for k in keys))
        self.stats["prepared"] += len(keys)
        if self.mode == "eager":
            return keys
        with torch.inference_mode():
            for key in keys:
                if self.mode == "cuda_graph":
                    for b in self.buckets:
                        self._graph(b, key)
                else:  # one call compiles the key's graph (its rows run the scratch slot)
                    dev, scratch = self.store.device, self.store.scratch
                    self._function(key)(torch.zeros(2, self.store.vocab_size, device=dev),
                                        torch.full((2,), scratch, dtype=torch.int64, device=dev),
                                        torch.zeros(2, dtype=torch.int64, device=dev))
        return keys

    # ------------------------------------------------------------------ compiled functions
    def _function(self, key: HintsKey) -> Callable:
        fn = self._fns.get(key)
        if fn is None:
            fn = _bound_step(self.store, self.density, key)
            if self.mode != "eager":
                fn = self._compile(fn)
            self._fns[key] = fn
        return fn

    def _compile(self, fn: Callable) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        backend = lookup_backend(self.backend)

        def counting_backend(gm, example_inputs):
            self.stats["compiles"] += 1
            return backend(gm, example_inputs)

        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=counting_backend)

        def call(logits, slots, steps):
            # One form of input whoever calls: dynamo guards on each input's dtype and dispatch keys (inference
            # tensors, as vLLM's step runs under inference_mode, or a test's normal ones), and the graph (and its
            # inductor cache key) depends on storage offsets (the staged index vectors are rows of one tensor).
            # Anything else is copied: slots and steps are a few bytes; the logits only when they are not float32
            # (a model-dtype head: the sampler converts them to float32 first anyway).
            if logits.dtype != torch.float32:
                logits = logits.float()
            inputs = [t if t.is_inference() and t.storage_offset() == 0 else t.clone() for t in (logits, slots, steps)]
            for t in inputs:  # one graph for every row count (>= 2, see rows_for)
                torch._dynamo.mark_dynamic(t, 0)
            return compiled(*inputs)

        return call

    # ------------------------------------------------------------------ CUDA graphs
    def _static_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graphs' static inputs, [largest bucket] rows (allocated once, outside the graph pool)."""
        if self._static is None:
            rows, dev = self.buckets[-1], self.store.device
            self._static = (torch.zeros(rows, self.store.vocab_size, dtype=torch.float32, device=dev),
                            torch.zeros(rows, dtype=torch.int64, device=dev),
                            torch.zeros(rows, dtype=torch.int64, device=dev))
        return self._static

    def _graph(self, b: int, key: HintsKey) -> _Captured:
        if self._graphs_version != self.store.version:  # the store re-allocated: the graphs read freed buffers
            self._graphs.clear()
            self._graphs_version = self.store.version
        captured = self._graphs.get((b, key))
        if captured is None:
            captured = self._graphs[(b, key)] = self._capture(b, key)
        return captured

    def _capture(self, b: int, key: HintsKey) -> _Captured:
        fn = self._function(key)
        logits, slots, steps = (t[:b] for t in self._static_inputs())
        # the graph must read these very buffers: the compiled call passes such inputs through uncopied
        assert all(t.is_inference() and t.storage_offset() == 0 for t in (logits, slots, steps))
        # capture on scratch rows: the warm-up runs (which execute) touch no request's slot
        logits.zero_()
        slots.fill_(self.store.scratch)
        steps.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and settle the allocator outside the capture
            for _ in range(2):
                fn(logits, slots, steps)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Graphs sharing a pool may reuse each other's freed temporaries, so a graph's outputs are only valid
        # until another graph replays: __call__ reads the outputs of the graph it just replayed, nothing else.
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn(logits, slots, steps)
        self.stats["captures"] += 1
        return _Captured(graph, out)

    def _replay(self, logits, rows, slots, steps, b: int, key: HintsKey) -> SampleOutput:
        captured = self._graph(b, key)
        s_logits, s_slots, s_steps = self._static_inputs()
        if rows is None:
            s_logits[:b].copy_(logits)
        elif logits.dtype == s_logits.dtype:
            torch.index_select(logits, 0, rows, out=s_logits[:b])
        else:
            s_logits[:b].copy_(logits.index_select(0, rows))
        s_slots[:b].copy_(slots)
        s_steps[:b].copy_(steps)
        captured.graph.replay()
        self.stats["graph_steps"] += 1
        return captured.out

