"""The soft-thinking vLLM engine (workers.vllm_soft) against the HF reference, on tiny random models.

One in-process engine per architecture, shared by the module (engine start is ~5-10 s):
Engine-vs-HF comparisons use one error model (``assert_same``): ids exactly, values within M times the
trajectory's own measured float32 sensitivity, so no tolerance depends on one processor's rounding.

* Qwen2: default KV cache; reference equality, logits vs an HF inputs_embeds forward, plain
  requests in a mixed batch, and (last, it changes the weights) update_weights.
* Llama: a tiny KV cache (12 blocks of 32 tokens) so that a batch of long requests is preempted and
  re-prefilled (recompute); reference equality must still hold.
* A second Qwen2 engine runs the production CPU default, the compiled engine step (``engine_step="compiled"``,
  soft_rl/engine_step.py), right-sized (``max_candidates``); reference equality must hold there too. The other
  engines run the step eagerly (each compile costs tens of seconds on 2 cores; tests/test_engine_step.py
  compares compiled and eager steps directly).

The models use head_dim 64: vLLM's CPU attention has no kernel for head_dim 16 (conftest's tiny models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from dataclasses import dataclass

import pytest
import torch

from soft_rl.reference import build_inputs_embeds, encode_marker, generate, rebuild_weights
from soft_rl.sampling import SoftSamplingParams

MAX_K = 8
STEPS = 64
ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_k=MAX_K, max_new_tokens=STEPS,
                 seed=0, engine_step="eager")
# the compiled engine: its store (16 + 1 slots x 64 x 8, marker width 8, 512 tokens) and its batch's hints key
# (compiled_params) are tests/test_engine_step.py's, so its inductor graph is a cache hit after that module's
COMPILED_KW = {**ENGINE_KW, "engine_step": "compiled", "max_num_seqs": 16, "max_candidates": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from soft_rl.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("vllm_soft")
    tok = build_tokenizer(root / "tokenizer")
    arch = dict(hidden=128, heads=2, kv_heads=1, layers=2)
    out = {"tokenizer": tok}
    for name, seed in (("qwen2", 11), ("llama", 12)):
        model = build_model(root / name, tok, arch=name, seed=seed, **arch).eval()
        out[name] = (root / name, model)
    return out


@pytest.fixture(scope="module")
def qwen2_engine(models):
    from workers.vllm_soft import SoftEngine

    eng = SoftEngine(str(models["qwen2"][0]), **ENGINE_KW)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def llama_engine(models):
    """Tiny KV cache: a batch of 12 x (~20 + 64) tokens needs ~36 blocks of 32; 12 exist, so requests are preempted."""
    from workers.vllm_soft import SoftEngine

    eng = SoftEngine(str(models["llama"][0]), block_size=32, num_gpu_blocks_override=12, max_num_seqs=16,
                     sync_reserve_mb=3, prepare_params=[SoftSamplingParams(), SoftSamplingParams(seed=1)],
                     **{**ENGINE_KW, "max_model_len": 128})
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def compiled_engine(models):
    from workers.vllm_soft import SoftEngine

    eng = SoftEngine(str(models["qwen2"][0]), **COMPILED_KW)
    yield eng
    eng.shutdown()


def prompts_for(tok, n):
    from soft_rl.data import render_prompt

    return [render_prompt(tok, [{"role": "user", "content": f"what is {i} + {3 * i + 7}?"}]) for i in range(n)]


def mixed_params(seed0=0):
    """Every noise kind, soft on/off, truncations, budgets forcing single- and multi-token markers."""
    return [
        SoftSamplingParams(seed=seed0 + 0, top_k=5, k=5, tau=0.1),
        SoftSamplingParams(seed=seed0 + 1, top_k=30, top_p=0.9, k=8, tau=0.5, temperature=1.2),
        SoftSamplingParams(seed=seed0 + 2, top_k=-1, top_p=0.8, min_p=0.02, k=4, noise="dirichlet",
                           dirichlet_alpha=2.0),
        SoftSamplingParams(seed=seed0 + 3, top_k=10, k=6, noise="gaussian", noise_scale=0.5),
        SoftSamplingParams(seed=seed0 + 4, top_k=8, k=3, noise="none", tau=1.0),
        SoftSamplingParams(seed=seed0 + 5, top_k=20, soft=False, temperature=0.9),
        SoftSamplingParams(seed=seed0 + 6, top_k=5, k=5, thinking_budget=12, answer_temperature=0.5,
                           answer_top_k=3),
        SoftSamplingParams(seed=seed0 + 7, top_k=5, k=5, thinking_budget=20, think_end="</answer>",
                           noise_clamp=None),
        SoftSamplingParams(seed=seed0 + 8, top_k=-1, top_p=1.0, k=8, thinking_budget=30, noise_scale=2.0,
                           answer_top_k=-1, answer_top_p=0.9),
        SoftSamplingParams(seed=seed0 + 9, top_k=5, k=4, tau=0.3, thinking_budget=4, think_end="</answer>"),
        SoftSamplingParams(seed=seed0 + 10, top_k=-1, top_p=0.9, k=3, noise="multiplex"),
        SoftSamplingParams(seed=seed0 + 11, top_k=20, k=3, noise="multiplex_uniform", thinking_budget=10),
        # Gaussian soft tokens: sigma eps on the next input (sigma ~ 0.33 x the tiny models' embedding RMS)
        SoftSamplingParams(seed=seed0 + 12, top_k=6, k=4, tau=0.5, noise="embedding_gaussian", embedding_sigma=0.007),
    ]


def compiled_params(seed0=300):
    """``mixed_params`` (every noise kind, discrete, budgets with both markers) with every top-k bounded: the
    widest request needs 30 candidates (``candidates_needed``), within the compiled engine's max_candidates."""
    out = []
    for p in mixed_params(seed0):
        bounded = {"top_k": 30} if p.top_k <= 0 else {}
        if p.answer_top_k is not None and p.answer_top_k <= 0:
            bounded["answer_top_k"] = None  # the thinking phase's (bounded) top-k
        out.append(dataclasses.replace(p, **bounded))
    return out


def reference(models, arch, prompts, params, steps=STEPS, model=None, eos=True):
    """The HF float32 reference; ``eos=False``: every request decodes ``steps`` tokens (the engine's ignore_eos)."""
    tok = models["tokenizer"]
    hf = model if model is not None else models[arch][1]
    return generate(hf, prompts, params, max_new_tokens=steps, eos_token_ids=[tok.eos_token_id] if eos else [],
                    tokenizer=tok, width=MAX_K)


def value_diffs(a, b):
    """Max |dy| and |dw| over a trajectory pair's own k slots."""
    k = a.sampling.k
    dy = float((a.noisy[:, :k].double() - b.noisy[:, :k].double()).abs().max()) if a.num_tokens else 0.0
    wa, wb = rebuild_weights(a)[:, :k].double(), rebuild_weights(b)[:, :k].double()
    return dy, float((wa - wb).abs().max()) if a.num_tokens else 0.0


# ---- the error model of every engine-vs-HF comparison (see assert_same) --------------------------------------------
U32 = 2.0**-24  # float32 unit roundoff
PERTURB_C = 2.0  # C: a perturbed run multiplies every matmul output by 1 + C * U32 * N(0, 1)
PERTURB_RUNS = 6  # independent perturbed float64 runs per batch; S_i is the largest deviation among them
M_BOUND = 10.0  # M: a float32 implementation may deviate up to M * max(S_i, s_min_i) from the float64 trajectory
PROBE_PAIRS = 2  # +-z pairs of float64 runs at M * C, the largest perturbation the bound admits: near-tie probes


def _rms_norm_float64(self, x):
    """HF's RMSNorm computes in float32 whatever the dtype; the float64 reference normalises in float64."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_copy(model):
    """``model`` in float64 throughout (HF would keep RMSNorm in float32). The rotary tables stay as HF
    computes them (float32, like vLLM's cache); the sampler and the input mixture are float32 by definition
    (``soft_sample``, ``mix_rows``), the same code in every implementation."""
    import copy
    import types

    m = copy.deepcopy(model).double().eval()
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(_rms_norm_float64, mod)
    return m


@contextlib.contextmanager
def perturbed_matmuls(model, blocks, rows, seed=0):
    """Multiply every ``nn.Linear`` output of ``model`` by 1 + s * U32 * z, per block of ``rows`` batch rows.

    ``blocks``: one (direction, s) per block of the batch, which holds len(blocks) copies of the same
    ``rows`` requests. Blocks with the same direction share z, so (d, s) and (d, -s) are an antithetic pair;
    s = 0 leaves a block exact. z ~ N(0, 1) per output element, drawn afresh at every call from a seeded
    generator: the runs are float64 and seeded, hence (to float64 rounding) the same on every machine.
    """
    direction = torch.tensor([d for d, _ in blocks])
    scale = torch.tensor([s for _, s in blocks], dtype=torch.float64).repeat_interleave(rows) * U32
    n_dirs = int(direction.max()) + 1
    gen = torch.Generator().manual_seed(seed)

    def hook(_mod, _inp, out):
        z = torch.randn((n_dirs, rows, *out.shape[1:]), generator=gen, dtype=out.dtype)[direction].flatten(0, 1)
        return out * (1 + scale.view(-1, *[1] * (out.dim() - 1)) * z)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def first_difference(a, b):
    """(step, what) where the discrete record of trajectory ``a`` (ids, slot ids, flags, phase, end) first
    differs from ``b``'s; None if it does not."""
    k = a.sampling.k
    n = min(a.num_tokens, b.num_tokens)
    for t in range(n):
        for name, x, y in (("emitted id", a.tokens[t], b.tokens[t]), ("slot ids", a.topk_ids[t, :k], b.topk_ids[t, :k]),
                           ("is_soft", a.is_soft[t], b.is_soft[t]), ("forced", a.forced[t], b.forced[t])):
            if not torch.equal(x, y):
                return t, f"{name} differ at step {t}"
    for name in ("num_tokens", "n_think", "finish_reason"):
        if getattr(a, name) != getattr(b, name):
            return n, f"{name} differs: {getattr(a, name)} vs {getattr(b, name)}"
    return None


def head(t, n):
    """Trajectory ``t`` cut to its first ``n`` positions (None: all of it)."""
    if n is None:
        return t
    cut = {f: getattr(t, f)[:n] for f in ("tokens", "topk_ids", "noisy", "is_soft", "logprobs", "forced", "kept")}
    return dataclasses.replace(t, **cut, n_think=min(t.n_think, n), finish_reason="cut")


def deviations(a, b):
    """(value deviation max(|dy|, |dw|), log-prob deviation max |d logp|) of two trajectories with equal ids."""
    dlp = float((a.logprobs.double() - b.logprobs.double()).abs().max()) if a.num_tokens else 0.0
    return max(value_diffs(a, b)), dlp


def float32_floor(t):
    """s_min of a trajectory (values, log-probs): one float32 rounding, U32 * max(1, |x|), of the stored
    numbers (weights are <= 1); only binds where the trajectory is insensitive (e.g. a discrete request)."""
    y = float(t.noisy[:, : t.sampling.k].abs().max()) if t.num_tokens else 0.0
    lp = float(t.logprobs.abs().max()) if t.num_tokens else 0.0
    return U32 * max(1.0, y), U32 * max(1.0, lp)


@dataclass
class ExactReference:
    """A batch's float64 trajectories with, per request, the measured sensitivity to float32-sized errors."""

    trajs: list  # the unperturbed float64 HF trajectories
    scale: list  # per request: (max(S_i, s_min_i) for values, the same for log-probs), over the compared steps
    cut: list  # per request: None (compare every step) or the near-tie step before which it is compared
    hf32: list  # the float32 HF reference: one more float32 implementation under the same model

    def subset(self, idx):
        return ExactReference(*([getattr(self, f)[i] for i in idx] for f in ("trajs", "scale", "cut", "hf32")))


def exact_reference(models, arch, prompts, params, steps=STEPS, model=None, eos=True):
    """The float64 reference of a batch and its per-request error scale (see ``assert_same``).

    One batched float64 run holds, as blocks of the batch: the exact trajectories; PERTURB_RUNS perturbed
    copies at C (the sensitivity S_i: their largest deviation from the exact trajectory); and PROBE_PAIRS
    antithetic (+-z) pairs at M * C, the largest perturbation the bound admits. Where any perturbed copy
    has different ids from the exact trajectory, the request is at a near-tie: it is compared only on the
    steps before the first such difference, with the reason printed, never with a looser bound. At most a
    fifth of a batch may be cut so.
    """
    hf = model if model is not None else models[arch][1]
    hf32 = reference(models, arch, prompts, params, steps, model=hf, eos=eos)
    m64 = float64_copy(hf)
    blocks = ([(0, 0.0)] + [(1 + r, PERTURB_C) for r in range(PERTURB_RUNS)]
              + [(1 + PERTURB_RUNS + j, sign * M_BOUND * PERTURB_C) for j in range(PROBE_PAIRS) for sign in (1, -1)])
    n = len(prompts)
    with perturbed_matmuls(m64, blocks, n):
        out = reference(models, arch, list(prompts) * len(blocks), list(params) * len(blocks), steps, model=m64,
                        eos=eos)
    runs = [out[b * n: (b + 1) * n] for b in range(len(blocks))]
    exact, scale, cuts = runs[0], [], []
    for i, t in enumerate(exact):
        diffs = [(d, s) for b, (_, s) in enumerate(blocks[1:], start=1) if (d := first_difference(runs[b][i], t))]
        cut = None
        if diffs:
            (cut, why), s = min(diffs)
            print(f"request {i}: compared on its first {cut} of {t.num_tokens} steps only: in a float64 run "
                  f"perturbed by {s:+g} * U32 the {why} (a near-tie)")
        sens = [deviations(head(runs[b][i], cut), head(t, cut)) for b, (_, s) in enumerate(blocks) if s == PERTURB_C]
        floor_v, floor_lp = float32_floor(head(t, cut))
        scale.append((max([floor_v] + [v for v, _ in sens]), max([floor_lp] + [lp for _, lp in sens])))
        cuts.append(cut)
    n_cut = sum(c is not None for c in cuts)
    assert n_cut <= n // 5, f"{n_cut} of {n} requests at near-ties: more than a fifth of the batch"
    return ExactReference(exact, scale, cuts, hf32)


def assert_same(got, ref, label="engine"):
    """Each trajectory of a float32 implementation against the float64 reference ``ref`` (``exact_reference``).

    Emitted ids, slot ids, flags, phase and end exactly; values (noisy y and input weights w, as
    ``value_diffs``) within M * max(S_i, s_min_i), log-probs likewise with their own S_i and s_min_i.
    Returns the per-request ratios |impl - float64| / max(S_i, s_min_i) (values, log-probs), also printed.

    Why this bound holds on any machine. Soft decoding feeds each step's logits back as the next input, so
    float32 rounding (~1e-7 relative: in the engine, the HF float32 reference, a TP=2 all-reduce alike) is
    amplified along a trajectory by a factor set by the model, the parameters and the trajectory itself; within
    one batch the measured S_i spans ~6e-8 (a discrete request) to ~1e-4. A fixed tolerance, or a multiple of
    one other float32 run's error (a single random realisation), is calibrated on one processor's rounding: the
    old "4x the float32 reference's own error" failed for TP=2 on an AVX2 EPYC (4.5e-4 against 3.6e-4). Here S_i
    is the trajectory's own sensitivity: the largest deviation from the exact float64 trajectory among
    PERTURB_RUNS float64 runs whose every matmul output is multiplied by 1 + C * 2^-24 * N(0, 1), i.e. a
    float32-sized error in every dot product. It is float64 arithmetic with seeded noise, so it is the same
    number on every machine and carries the amplification; what differs between processors (SIMD width, BLAS
    blocking, TP's reduction order) and engines is only the realisation of the rounding, which enters through
    the ratio |impl - float64| / S_i. Measured on the batches of this module and the TP module (vLLM TP=1 and
    TP=2, the HF float32 reference, before and after weight updates; ~100 request comparisons): median ~1
    (0.6-1.2 per batch, which is what fixes C = 2), largest 3.15; log-probs largest 1.83; HF float32 with other
    summation orders (one request at a time, one thread; 84 more) largest 2.5. M = 10 is 3x the largest ratio
    seen and ~10x the median. s_min_i (one float32 rounding of the stored numbers) binds only where a trajectory
    is insensitive (a discrete request). Where the ids are not stable under the largest perturbation the bound
    admits (M * C), a request is compared only before that near-tie (printed by ``exact_reference``); every id
    compared must match exactly.
    """
    ratios, lp_ratios = [], []
    for i, (a, b, cut, (sv, slp)) in enumerate(zip(got, ref.trajs, ref.cut, ref.scale, strict=True)):
        a, b = head(a, cut), head(b, cut)
        diff = first_difference(a, b)
        assert diff is None, f"{label} request {i}: {diff[1]}"
        dv, dlp = deviations(a, b)
        assert dv <= M_BOUND * sv, f"{label} request {i}: max(|dy|, |dw|) = {dv:.2e} > {M_BOUND:g} * {sv:.2e}"
        assert dlp <= M_BOUND * slp, f"{label} request {i}: |dlogp| = {dlp:.2e} > {M_BOUND:g} * {slp:.2e}"
        ratios.append(dv / sv)
        lp_ratios.append(dlp / slp)
    print(f"{label}: |impl - float64| / S per request, values: median {statistics.median(ratios):.2f} max "
          f"{max(ratios):.2f}; log-probs: median {statistics.median(lp_ratios):.2f} max {max(lp_ratios):.2f} "
          f"(bound M = {M_BOUND:g}; {sum(c is not None for c in ref.cut)} of {len(got)} cut at a near-tie)")
    return ratios, lp_ratios


def assert_logits_close(got, hf, x, rows, label):
    """Engine logits ``got`` [R, V] (forward positions ``rows`` of inputs_embeds ``x`` [L, H]) against the
    float64 forward, within M * max(S, s_min): the error model of ``assert_same`` for a single forward
    (no feedback), S from PERTURB_RUNS perturbed float64 forwards, s_min = U32 * max|logit|. The HF float32
    forward is held to the same bound. Returns ([engine, HF float32] deviations / S, S)."""
    blocks = [(0, 0.0)] + [(1 + r, PERTURB_C) for r in range(PERTURB_RUNS)]
    m64 = float64_copy(hf)
    with torch.no_grad(), perturbed_matmuls(m64, blocks, 1):
        out = m64(inputs_embeds=x.double()[None].expand(len(blocks), -1, -1)).logits[:, rows]
    with torch.no_grad():
        hf32 = hf(inputs_embeds=x[None]).logits[0, rows]
    exact = out[0]
    scale = max(float((out[1:] - exact).abs().max()), U32 * max(1.0, float(exact.abs().max())))
    ratios = []
    for name, y in (("engine", got), ("HF float32", hf32)):
        dev = float((y.double() - exact).abs().max())
        assert dev <= M_BOUND * scale, f"{label}, {name}: |logits - float64| = {dev:.2e} > {M_BOUND:g} * {scale:.2e}"
        ratios.append(dev / scale)
    return ratios, scale


def check_phase_switches(trajs, tok):
    """The batch really switches phase: a single-token and a multi-token marker, both forced."""
    by_marker = {}
    for t in trajs:
        if t.sampling.thinking_budget is not None and t.n_think < t.num_tokens:
            m = encode_marker(tok, t.sampling.think_end)
            assert t.n_think > 0
            assert t.tokens[t.n_think - len(m): t.n_think].tolist() == m
            assert bool(t.forced.any()) and not bool(t.is_soft[t.n_think - 1:].any())
            by_marker[len(m)] = True
    assert by_marker.get(1) and by_marker.get(3), "need a single- and a 3-token marker switch"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_matches_hf_reference(request, models, arch):
    eng = request.getfixturevalue(f"{arch}_engine")
    tok = models["tokenizer"]
    params = mixed_params()
    prompts = prompts_for(tok, len(params))
    got = eng.generate(prompts, params, max_new_tokens=STEPS)
    ref = exact_reference(models, arch, prompts, params)
    assert sum(t.num_tokens >= STEPS for t in got) >= 4
    assert_same(ref.hf32, ref, f"{arch} HF float32")
    assert_same(got, ref, f"{arch} vLLM")
    check_phase_switches(got, tok)
    print(f"{arch}: sensitivity S of the values per request "
          + " ".join(f"{v:.1e}" for v, _ in ref.scale))


def test_soft_state_and_sampler_peak_are_reserved_before_the_kv_cache(models, llama_engine):
    """The engine ran the sampler's worst case for all max_num_seqs rows (at the whole vocabulary: no
    max_candidates) while vLLM measured memory for its KV cache (audit item 6), and covered the weight sync's
    reserve (item 12); the outputs of the other tests here show it left no trace. Its prepare_params reached
    the engine step (one hints key: the two settings differ only in their seed)."""
    stats = llama_engine.stats()
    assert stats["profiled_rows"] == 16 and stats["reserved_mb"] == 3
    assert stats["profiled_candidates"] == len(models["tokenizer"]) == llama_engine.vocab_size
    assert stats["engine_step_mode"] == "eager" and stats["engine_step_prepared"] == 1
    assert stats["engine_step_compiles"] == 0


def test_compiled_engine_is_right_sized_and_refuses_wider_requests(models, compiled_engine):
    """``max_candidates``: the memory profiling ran max_num_seqs rows at that width, and a request needing
    more is refused before it reaches the engine (naming its top_k / answer_top_k and the limit)."""
    stats = compiled_engine.stats()
    assert stats["profiled_rows"] == 16 and stats["profiled_candidates"] == 32
    assert stats["engine_step_mode"] == "compiled" and stats["engine_step_compiles"] == 0
    prompts = prompts_for(models["tokenizer"], 1)
    with pytest.raises(ValueError, match=r"answer_top_k=-1 \(the whole vocabulary, 512\).*max_candidates=32"):
        compiled_engine.generate(prompts, [SoftSamplingParams(answer_top_k=-1)], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"needs 40 sampling candidates \(top_k=40.*max_candidates=32"):
        compiled_engine.generate(prompts, [SoftSamplingParams(top_k=40, soft=False)], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_candidates=4 is below max_k=8"):
        from workers.vllm_soft import SoftEngine

        SoftEngine("unused", **{**COMPILED_KW, "max_candidates": 4})


def test_compiled_engine_matches_hf_reference(models, compiled_engine):
    """The production CPU path (the engine step under torch.compile, inductor) against the float64 reference,
    as ``test_matches_hf_reference`` holds the eager engine. Every request decodes STEPS tokens (EOS
    ignored), so the batch, and its hints key, stay the same: one compile for the whole run."""
    tok = models["tokenizer"]
    params = compiled_params()
    prompts = prompts_for(tok, len(params))
    got = compiled_engine.generate(prompts, params, max_new_tokens=STEPS, ignore_eos=True)
    assert all(t.num_tokens == STEPS for t in got)
    ref = exact_reference(models, "qwen2", prompts, params, eos=False)
    assert_same(ref.hf32, ref, "qwen2 HF float32")
    assert_same(got, ref, "qwen2 vLLM, compiled engine step")
    check_phase_switches(got, tok)
    stats = compiled_engine.stats()
    assert stats["engine_step_compiles"] == 1 and stats["sampled_rows"] == len(params) * STEPS, stats


def test_preemption_keeps_soft_trajectories(models, llama_engine):
    tok = models["tokenizer"]
    params = [SoftSamplingParams(seed=100 + i, top_k=6, k=4 + i % 5, tau=0.2 + 0.05 * i,
                                 thinking_budget=40 if i % 3 == 0 else None) for i in range(12)]
    prompts = prompts_for(tok, len(params))
    before = llama_engine.stats()["restored_positions"]
    got = llama_engine.generate(prompts, params, max_new_tokens=STEPS)
    restored = llama_engine.stats()["restored_positions"] - before
    assert restored > 0, "the tiny KV cache should have forced preemption and recompute"
    ref = exact_reference(models, "llama", prompts, params)
    assert_same(ref.hf32, ref, "llama HF float32")
    assert_same(got, ref, "llama vLLM, preempted")
    # and each request alone (no preemption) gives the same trajectory, under the same error model
    first = list(zip(prompts, params, strict=True))[:3]
    alone = [llama_engine.generate([p], [s], max_new_tokens=STEPS)[0] for p, s in first]
    assert_same(alone, ref.subset(range(3)), "llama vLLM, alone")
    print(f"restored soft positions on recompute: {restored}")


def test_logits_after_soft_steps_equal_hf_inputs_embeds_forward(models, qwen2_engine):
    path, hf = models["qwen2"]
    tok = models["tokenizer"]
    params = [SoftSamplingParams(seed=7, top_k=8, k=8, tau=0.5), SoftSamplingParams(seed=8, top_k=5, k=4, tau=1.0)]
    prompts = prompts_for(tok, 2)
    trajs = qwen2_engine.generate(prompts, params, max_new_tokens=24, debug_logits=True)
    emb = hf.get_input_embeddings().weight
    for t in trajs:
        assert t.num_soft >= 10
        P, R = t.prompt_ids.numel(), t.num_tokens
        rows = slice(P - 1, P - 1 + R)
        x = build_inputs_embeds(emb, t)
        assert t.debug_logits.shape == (R, emb.shape[0])
        ratios, scale = assert_logits_close(t.debug_logits, hf, x, rows, f"request seed {t.sampling.seed}")
        with torch.no_grad():
            plain = hf(input_ids=torch.cat([t.prompt_ids, t.tokens])[None, :-1]).logits[0, rows]
        # after the first soft input the plain-token forward must disagree, by far more than rounding
        control = float((t.debug_logits[1:] - plain[1:]).abs().max())
        assert control > 100 * M_BOUND * scale, (control, scale)
        print(f"logits vs float64 inputs_embeds forward / S (S = {scale:.1e}): engine {ratios[0]:.2f}, "
              f"HF float32 {ratios[1]:.2f}; vs plain token embeddings: {control:.2f}")


def test_plain_requests_in_mixed_batch_equal_stock(models, qwen2_engine):
    from vllm import SamplingParams

    tok = models["tokenizer"]
    eng = qwen2_engine
    prompts = prompts_for(tok, 6)
    plain = [SamplingParams(max_tokens=32, temperature=1.0, top_k=20, seed=50 + i, detokenize=False) for i in range(3)]
    soft = mixed_params(seed0=200)[:3]
    keys = [f"mixed-{i}" for i in range(3)]
    sps = [plain[0], eng.sampling_params(soft[0], 32, keys[0]), plain[1],
           eng.sampling_params(soft[1], 32, keys[1]), eng.sampling_params(soft[2], 32, keys[2]), plain[2]]
    outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    eng.fetch(keys)  # release the soft records
    mixed_plain = [list(outs[i].outputs[0].token_ids) for i in (0, 2, 5)]
    alone = [eng.generate_plain([prompts[i]], plain[j])[0] for j, i in enumerate((0, 2, 5))]
    assert mixed_plain == alone
    # the soft requests of the mixed batch equal a soft-only run
    soft_only = eng.generate([prompts[i] for i in (1, 3, 4)], soft, max_new_tokens=32)
    assert [list(outs[i].outputs[0].token_ids) for i in (1, 3, 4)] == [t.tokens.tolist() for t in soft_only]


def test_update_weights_then_logits_match_new_hf(models, qwen2_engine, tmp_path):
    """Runs last in this module: it changes the Qwen2 engine's weights."""
    from soft_rl.tiny import build_model

    tok = models["tokenizer"]
    new = build_model(tmp_path / "new", tok, arch="qwen2", seed=99, hidden=128, heads=2, kv_heads=1, layers=2).eval()
    n = qwen2_engine.update_weights(new.state_dict().items())
    assert n == len(new.state_dict())
    params = [SoftSamplingParams(seed=3, top_k=8, k=8, tau=0.5, thinking_budget=10)]
    prompts = prompts_for(tok, 1)
    (t,) = qwen2_engine.generate(prompts, params, max_new_tokens=16, debug_logits=True)
    P, R = t.prompt_ids.numel(), t.num_tokens
    x = build_inputs_embeds(new.get_input_embeddings().weight, t)
    ratios, _ = assert_logits_close(t.debug_logits, new, x, slice(P - 1, P - 1 + R), "after update_weights")
    ref = exact_reference(models, "qwen2", prompts, params, steps=16, model=new)
    assert_same(ref.hf32, ref, "new weights, HF float32")
    assert_same([t], ref, "new weights, vLLM")
    print(f"after update_weights: logits vs new float64 forward / S: engine {ratios[0]:.2f}, HF {ratios[1]:.2f}")
