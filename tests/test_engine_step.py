"""``soft_rl.engine_step.EngineStep``: the rollout engine's per-step device work, eager, compiled, padded.

* The compiled step (inductor, the production CPU path) equals the eager one on a mixed batch (soft with every
  noise kind, discrete, a thinking budget forcing its marker, the answer phase) whose row count changes from
  step to step, with one compile for all of them. Ids and flags exactly; values within the error model of
  tests/step_error_model.py (M times the eager step's own sensitivity to a float32-sized rounding error in
  every operation). The data has no near-tie (checked: no perturbed run changes an id).
* One compile per distinct hints key over a run whose row count and hints both vary (torch.compile's "eager"
  backend: the graphs are dynamo's, whatever the backend).
* Padding rows onto the scratch slot leaves real rows' outputs, state and history as an unpadded run's.
* ``candidates_needed`` and the store's ``max_candidates`` cap.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from soft_rl.engine_state import SoftStateStore, candidates_needed
from soft_rl.engine_step import AUTO_ENV, EngineStep, resolve_mode, row_buckets
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample
from tests.step_error_model import EXACT, M_BOUND, PERTURB_RUNS, assert_within_model, perturbed_ops

# The store of tests/test_vllm_soft.py's compiled engine (tiny tokenizer's 512 tokens, max_num_seqs 16, max_k 8,
# 64 new tokens, marker width 8) and a batch with its hints key: the inductor graph compiled here is the one
# that engine compiles, so there it comes from the inductor cache. Only the suite's speed depends on this.
V, SLOTS, WIDTH, GEN, MARKER_WIDTH, MAX_CANDIDATES = 512, 16, 8, 64, 8, 32
MARKERS = ([V - 3], [V - 3, V - 2, V - 1])
REQUESTS = [
    SoftSamplingParams(seed=1, top_k=5, k=5),
    SoftSamplingParams(seed=2, top_k=30, top_p=0.9, k=8, tau=0.5, temperature=1.2),
    SoftSamplingParams(seed=3, top_k=20, top_p=0.8, min_p=0.02, k=4, noise="dirichlet", dirichlet_alpha=2.0),
    SoftSamplingParams(seed=4, top_k=10, k=6, noise="gaussian", noise_scale=0.5, noise_clamp=None),
    SoftSamplingParams(seed=5, top_k=8, k=3, noise="none", tau=1.0),
    SoftSamplingParams(seed=6, top_k=20, soft=False, temperature=0.9, thinking_budget=3),
    SoftSamplingParams(seed=7, top_k=5, k=5, thinking_budget=2, answer_temperature=0.5, answer_top_k=3),
    SoftSamplingParams(seed=8, top_k=5, k=4, tau=0.3, thinking_budget=4),
]
ROWS_PER_STEP = [8, 5, 8, 3, 6, 8, 2, 7, 8, 4]  # the first n requests run at each step


def _store(max_candidates=MAX_CANDIDATES) -> tuple[SoftStateStore, np.ndarray]:
    store = SoftStateStore(SLOTS, GEN, WIDTH, MARKER_WIDTH, "cpu", V, max_candidates=max_candidates)
    slots = np.asarray([store.allocate(p, MARKERS[i % 2], GEN) for i, p in enumerate(REQUESTS)])
    return store, slots


def _logits(step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, V, generator=g) * 3


def _call(es: EngineStep, store: SoftStateStore, slots: np.ndarray, logits: torch.Tensor, hints: dict):
    """One step the way the runner makes it: host vectors padded, staged, called; the step counters advanced."""
    n = len(slots)
    steps = store.n_steps[slots]
    rows, slots_p, steps_p = es.pad(np.arange(n), slots, steps)
    idx = torch.from_numpy(np.stack([rows, slots_p, steps_p]))
    out = es(logits, None if len(slots_p) == n else idx[0], idx[1], idx[2], n, **hints)
    store.n_steps[slots] = steps + 1
    return out


@pytest.fixture
def vllm_matmul_precision():
    """vLLM's workers call torch.set_float32_matmul_precision(VLLM_FLOAT32_MATMUL_PRECISION: "highest"), and that
    setting enters inductor's cache key: set here too, the compiled engine's graph is this test's (a cache hit).
    No numerical effect on a CPU."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def test_compiled_step_equals_eager_with_one_compile_for_every_row_count(vllm_matmul_precision):
    torch._dynamo.reset()
    eager_store, slots = _store()
    compiled_store = copy.deepcopy(eager_store)
    hints = eager_store.step_hints(slots)  # the whole batch's (a superset for the subsets: same results)
    assert hints == dict(has_budget=True, candidates=30, kinds=("gumbel", "dirichlet", "gaussian", "none"))
    eager = EngineStep(eager_store, "eager", max_rows=SLOTS)
    compiled = EngineStep(compiled_store, "compiled", max_rows=SLOTS)
    worst = 0.0
    for step, n in enumerate(ROWS_PER_STEP):
        logits = _logits(step, n)
        before = copy.deepcopy(eager_store)
        perturbed = []
        for r in range(PERTURB_RUNS):
            shadow = copy.deepcopy(before)
            with perturbed_ops(seed=100 * step + r):
                perturbed.append(_call(EngineStep(shadow, "eager", max_rows=SLOTS), shadow, slots[:n], logits, hints))
        e = _call(eager, eager_store, slots[:n], logits, hints)
        c = _call(compiled, compiled_store, slots[:n], logits, hints)
        worst = max(worst, assert_within_model(e, c, perturbed, f"step {step} ({n} rows)"))
    assert compiled.stats["compiles"] == 1, compiled.stats
    for name in eager_store.t:  # the phase state is made of ids and flags: equal
        assert torch.equal(eager_store.t[name][:SLOTS], compiled_store.t[name][:SLOTS]), name
    for f in EXACT + ("forced",):
        assert torch.equal(eager_store.h[f][:SLOTS], compiled_store.h[f][:SLOTS]), f
    # the steps exercised what a real batch mixes: soft steps, forced marker tokens, the answer phase
    h = eager_store.h
    assert bool(h["is_soft"].any()) and bool(h["forced"].any()) and not bool(eager_store.t["thinking"][slots].all())
    print(f"compiled vs eager: largest |compiled - eager| / max(S, s_min) = {worst:.2f} (bound {M_BOUND:g})")


def _counting_run(es: EngineStep, store: SoftStateStore, slots: np.ndarray, schedule) -> set:
    keys = set()
    for step, idx in enumerate(schedule):
        s = slots[list(idx)]
        hints = store.step_hints(s)
        keys.add((hints["has_budget"], hints["candidates"], hints["kinds"]))
        out = _call(es, store, s, _logits(step, len(s)), hints)
        assert out.token.shape == (len(s),)
    return keys


# rows (indices into REQUESTS) per step: the row count varies (1 to 8) and the hints take 3 values, each more than once
SCHEDULE = [(0, 1, 2, 3, 4, 5, 6, 7), (0, 1), (1,), (0, 1, 2, 3, 4, 5, 6), (1, 0), (0,), (0,), (2, 1, 4, 3, 6, 5)]


def test_one_compile_per_hints_key_whatever_the_row_count():
    torch._dynamo.reset()
    store, slots = _store()
    es = EngineStep(store, "compiled", max_rows=SLOTS, backend="eager")
    keys = _counting_run(es, store, slots, SCHEDULE)
    assert len(keys) == 3 and es.stats["compiles"] == len(keys), (keys, es.stats)
    # a second engine step over another store in the same process compiles its own graph for a key
    other_store, other_slots = _store()
    other = EngineStep(other_store, "compiled", max_rows=SLOTS, backend="eager")
    _counting_run(other, other_store, other_slots, SCHEDULE[1:3])
    assert other.stats["compiles"] == 1 and es.stats["compiles"] == len(keys)


def test_prepare_compiles_ahead_of_the_first_step():
    torch._dynamo.reset()
    store, slots = _store()
    es = EngineStep(store, "compiled", max_rows=SLOTS, backend="eager")
    keys = es.prepare([REQUESTS[0], REQUESTS[0], REQUESTS[7]])
    assert keys == [(False, WIDTH, ("gumbel",)), (True, WIDTH, ("gumbel",))] and es.stats["compiles"] == 2
    # the prepared steps touched no request's slot (they ran the scratch slot) ...
    fresh, _ = _store()
    for name in store.t:
        assert torch.equal(store.t[name][:SLOTS], fresh.t[name][:SLOTS]), name
    # ... and a batch of those settings compiles nothing more, whatever the logits' dtype (a model-dtype head)
    _call(es, store, slots[[0]], _logits(0, 1), store.step_hints(slots[[0]]))
    _call(es, store, slots[[7]], _logits(1, 1).bfloat16(), store.step_hints(slots[[7]]))
    assert es.stats["compiles"] == 2


def test_padding_onto_the_scratch_slot_changes_nothing_real():
    """Rows padded to a bucket (as under cuda_graph, whose capture a CPU cannot run; the same ``pad`` and the
    same row slicing) point at the scratch slot: the real rows' outputs, state and history equal an unpadded
    run's, bit for bit (every op of the step is row-wise)."""
    plain_store, slots = _store()
    padded_store = copy.deepcopy(plain_store)
    plain = EngineStep(plain_store, "eager", max_rows=SLOTS)
    padded = EngineStep(padded_store, "eager", max_rows=SLOTS, pad_rows=True, smallest_bucket=4)
    assert padded.buckets == (4, 8, 16) and [padded.rows_for(n) for n in (1, 4, 5, 9, 16)] == [4, 4, 8, 16, 16]
    scratch = padded_store.scratch
    assert scratch == SLOTS and scratch not in slots and scratch not in padded_store.free
    for step, n in enumerate(ROWS_PER_STEP):
        s = slots[:n]
        hints = plain_store.step_hints(s)
        logits = _logits(step, n)
        a = _call(plain, plain_store, s, logits, hints)
        b = _call(padded, padded_store, s, logits, hints)
        for f in dataclasses.fields(a):
            assert getattr(b, f.name).shape[0] == n and torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    for name in plain_store.t:
        assert torch.equal(plain_store.t[name][:SLOTS], padded_store.t[name][:SLOTS]), name
    for name in plain_store.h:
        assert torch.equal(plain_store.h[name][:SLOTS], padded_store.h[name][:SLOTS]), name
    assert int(padded_store.t["n_generated"][scratch]) > 0  # the padding did run, on the scratch slot only
    assert not bool(plain_store.t["n_generated"][scratch])


def test_a_resize_keeps_the_scratch_slot_last_and_out_of_reach():
    store = SoftStateStore(2, 4, 3, 2, "cpu", 16)
    version = store.version
    got = [store.allocate(SoftSamplingParams(k=3, seed=i), [15], 4) for i in range(5)]
    assert sorted(got) == list(range(5)) and store.slots == 8 and store.scratch == 8 and store.version > version
    assert all(buf.shape[0] == 9 for buf in list(store.t.values()) + list(store.h.values()))
    assert float(store.t["p_torch.float32"][store.scratch].abs().sum()) > 0  # valid parameters (temperature 1, ...)


def test_modes_resolve_and_refuse_clearly(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    assert resolve_mode("auto", "cpu") == "compiled" and resolve_mode("auto", "cuda") == "cuda_graph"
    assert resolve_mode("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="rollout.engine_step=cuda_graph needs a CUDA device"):
        resolve_mode("cuda_graph", "cpu")
    with pytest.raises(ValueError, match="rollout.engine_step must be one of"):
        resolve_mode("graphs", "cpu")
    monkeypatch.setenv(AUTO_ENV, "eager")  # what auto resolves to; explicit modes are kept
    assert resolve_mode("auto", "cuda") == "eager" and resolve_mode("compiled", "cpu") == "compiled"
    monkeypatch.setenv(AUTO_ENV, "fast")
    with pytest.raises(ValueError, match=AUTO_ENV):
        resolve_mode("auto", "cpu")
    assert row_buckets(64) == (8, 16, 32, 64) and row_buckets(100) == (8, 16, 32, 64, 100)
    assert row_buckets(1) == (2,) and row_buckets(5) == (5,)


# ---- candidate widths --------------------------------------------------------------------------------------------
def test_candidates_needed_is_the_width_the_sampler_reads():
    """At ``candidates_needed`` the engine's sampler equals the sampler that reads its width from the batch
    (the HF reference's). Soft steps with top-p read the top-k mass, so a soft request's top_k counts even
    when its answer phase needs fewer (a width of K alone changes its weights: the rule can fail)."""
    width = 8
    cases = [SoftSamplingParams(seed=1, top_k=40, top_p=0.9, answer_top_k=3, k=5),
             SoftSamplingParams(seed=2, top_k=40, top_p=1.0, answer_top_k=3, k=5),
             SoftSamplingParams(seed=3, top_k=-1, top_p=0.9, answer_top_k=3, k=5),
             SoftSamplingParams(seed=4, soft=False, top_k=12, answer_top_k=3),
             SoftSamplingParams(seed=5, top_k=5, answer_top_k=-1),
             # multiplex draws its slots from the whole kept set, as a discrete step does
             SoftSamplingParams(seed=6, top_k=-1, top_p=0.9, answer_top_k=3, k=3, noise="multiplex"),
             SoftSamplingParams(seed=7, top_k=12, answer_top_k=3, k=3, noise="multiplex_uniform")]
    assert [candidates_needed(p, width, V) for p in cases] == [40, 8, 8, 12, V, V, 12]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(len(cases), V, generator=g) * 0.5  # flat: top-p keeps many tokens
    # request 0: 4 tokens of mass 0.2 each, 36 of 0.2 / 36, the rest ~0. Top-p 0.9 over its top-40 mass (1) keeps
    # all 5 slots; over the top-8 mass (0.82) it would cut the 5th (exclusive cumsum 0.8 > 0.9 * 0.82).
    row = torch.full((V,), -40.0)
    row[:4] = float(np.log(0.2))
    row[4:40] = float(np.log(0.2 / 36))
    logits[0] = row[torch.randperm(V, generator=g)]
    batch = SamplingBatch.from_params(cases, width=width)
    counters = NoiseCounters(torch.arange(len(cases)), torch.zeros(len(cases), dtype=torch.int64))
    for i, p in enumerate(cases):
        row = batch.select(torch.tensor([i]))
        ref = soft_sample(logits[i:i + 1], row, NoiseCounters(counters.seed[i:i + 1], counters.step[i:i + 1]))
        got = soft_sample(logits[i:i + 1], row, NoiseCounters(counters.seed[i:i + 1], counters.step[i:i + 1]),
                          candidates=candidates_needed(p, width, V), kinds=(p.noise,))
        for f in dataclasses.fields(ref):
            assert torch.equal(getattr(ref, f.name), getattr(got, f.name)), (i, f.name)
    short = soft_sample(logits[:1], batch.select(torch.tensor([0])), NoiseCounters(counters.seed[:1],
                        counters.step[:1]), candidates=width, kinds=("gumbel",))
    ref = soft_sample(logits[:1], batch.select(torch.tensor([0])), NoiseCounters(counters.seed[:1], counters.step[:1]))
    assert not torch.equal(short.weights, ref.weights)


def test_max_candidates_caps_requests_and_sizes_the_profile():
    store = SoftStateStore(4, 8, WIDTH, 4, "cpu", V, max_candidates=12)
    store.allocate(SoftSamplingParams(top_k=12, answer_top_k=10), [1], 8)
    with pytest.raises(ValueError, match=r"top_k=-1 \(the whole vocabulary, 512\).*max_candidates=12"):
        store.allocate(SoftSamplingParams(answer_top_k=-1), [1], 8)
    with pytest.raises(ValueError, match=r"needs 20 sampling candidates \(top_k=20, answer_top_k=20.*candidates=12"):
        store.allocate(SoftSamplingParams(top_k=20, soft=False), [1], 8)
    with pytest.raises(ValueError, match="max_candidates=4 is below max_k=8"):
        SoftStateStore(4, 8, WIDTH, 4, "cpu", V, max_candidates=4)
    free = list(store.free)
    assert store.profile_step(8) == 4 and store.free == free  # profiled at 12 candidates: admitted, then undone
    assert SoftStateStore(4, 8, WIDTH, 4, "cpu", V).max_candidates == V
