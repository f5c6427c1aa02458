"""Prompt-only prefix caching (``SoftEngine(prefix_caching="prompt")``, workers/vllm_soft/scheduler.py).

Three in-process engines on one tiny Qwen2 (head_dim 64, block_size 32, prompts of 71-73 tokens, so
two full prompt blocks each), shared by the module:

* ``off``: no prefix caching (the reference);
* ``on``: prompt-only caching, a roomy KV cache (64 blocks: no preemption);
* ``tiny``: prompt-only caching, 10 blocks, so that batches are preempted and re-prefilled.

``stock(engine)`` switches the scheduler to stock vLLM caching (soft_rl requests keep hashing their
generated blocks) to show what goes wrong without the prompt-only rule.
"""

from __future__ import annotations

import contextlib

import pytest

from soft_rl.sampling import SoftSamplingParams

pytestmark = pytest.mark.slow

BLOCK = 32
KW = dict(dtype="float32", enforce_eager=True, max_model_len=192, max_k=8, max_new_tokens=64, seed=0,
          block_size=BLOCK, max_num_seqs=16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from soft_rl.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("prefix_cache")
    tok = build_tokenizer(root / "tokenizer")
    build_model(root / "qwen2", tok, arch="qwen2", seed=21, hidden=128, heads=2, kv_heads=1, layers=2)
    return root / "qwen2", tok


def _engine(model, **kw):
    from workers.vllm_soft import SoftEngine

    return SoftEngine(str(model[0]), **{**KW, **kw})


@pytest.fixture(scope="module")
def off(model):
    eng = _engine(model, prefix_caching="off", num_gpu_blocks_override=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def on(model):
    eng = _engine(model, prefix_caching="prompt", num_gpu_blocks_override=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tiny(model):
    eng = _engine(model, prefix_caching="prompt", num_gpu_blocks_override=10)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(model):
    from soft_rl.data import render_prompt

    tok = model[1]
    out = [render_prompt(tok, [{"role": "user", "content": f"add the numbers {i} and {3 * i + 7}, then add "
                                f"{5 * i + 1} and {i + 2}, and check the sum twice carefully please"}])
           for i in range(3)]
    assert all(2 * BLOCK < len(p) < 3 * BLOCK for p in out), [len(p) for p in out]
    return out


def scheduler(eng):
    return eng.llm.llm_engine.engine_core.engine_core.scheduler  # in-process engines (conftest)


@contextlib.contextmanager
def stock(eng):
    """Stock vLLM caching for soft_rl requests (the scheduler's prompt-only rule off), on a clean cache."""
    sched = scheduler(eng)
    eng.reset_prefix_cache()
    sched.prompt_only = False
    try:
        yield
    finally:
        sched.prompt_only = True
        eng.reset_prefix_cache()


def cached(eng) -> int:
    return eng.stats()["prefix_cached_tokens"]


def prompt_hit(p) -> int:
    """Tokens a request with prompt ``p`` can take from the cache: full prompt blocks, at most P - 1 tokens."""
    return (len(p) - 1) // BLOCK * BLOCK


def assert_equal(got, want, tol=1e-5, noisy_tol=None):
    """Emitted ids, slot ids and flags exactly; noisy values (own k slots) and log-probs within tolerances."""
    worst = {"noisy": 0.0, "logprobs": 0.0}
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        k = a.sampling.k
        assert a.tokens.tolist() == b.tokens.tolist(), f"request {i}: emitted ids differ"
        assert a.topk_ids[:, :k].tolist() == b.topk_ids[:, :k].tolist(), f"request {i}: slot ids differ"
        assert a.is_soft.tolist() == b.is_soft.tolist() and a.forced.tolist() == b.forced.tolist(), f"request {i}"
        assert (a.n_think, a.finish_reason) == (b.n_think, b.finish_reason), f"request {i}"
        worst["noisy"] = max(worst["noisy"], float((a.noisy[:, :k] - b.noisy[:, :k]).abs().max()))
        worst["logprobs"] = max(worst["logprobs"], float((a.logprobs - b.logprobs).abs().max()))
    assert worst["noisy"] <= (tol if noisy_tol is None else noisy_tol), worst
    assert worst["logprobs"] <= tol, worst
    return worst


def group_params(seed0, n):
    """n samples of one prompt, as in a GRPO group; varied settings, one soft=False soft_rl request."""
    base = [dict(top_k=5, k=5, tau=0.3), dict(top_k=8, k=8, tau=1.0, noise="dirichlet"),
            dict(top_k=20, soft=False, temperature=0.9), dict(top_k=6, k=4, tau=0.5, thinking_budget=12)]
    return [SoftSamplingParams(seed=seed0 + j, **base[j % len(base)]) for j in range(n)]


def test_modes_and_keys():
    from workers.vllm_soft import SoftEngine, runner, scheduler

    assert scheduler.EXTRA_KEY == runner.EXTRA_KEY
    with pytest.raises(ValueError, match="prefix_caching"):
        SoftEngine("unused", prefix_caching="salted")
    for key in ("enable_prefix_caching", "scheduler_cls"):
        with pytest.raises(ValueError, match=key):
            SoftEngine("unused", **{key: None})


def test_prompt_blocks_shared_trajectories_equal_no_cache(on, off, prompts):
    """GRPO-style groups share their prompt blocks; trajectories equal the no-cache engine's."""
    from vllm import SamplingParams

    n = 3
    group_prompts = [p for p in prompts[:2] for _ in range(n)]
    capped0 = scheduler(on).capped_cache_calls()
    hits = []
    for rnd in range(2):  # round 1: the first of each group misses, the rest hit; round 2: every request hits
        params = [q for g in range(2) for q in group_params(1000 * rnd + 100 * g, n)]
        c_on, c_off = cached(on), cached(off)
        got = on.generate(group_prompts, params, max_new_tokens=40)
        want = off.generate(group_prompts, params, max_new_tokens=40)
        worst = assert_equal(got, want)
        hits.append(cached(on) - c_on)
        assert cached(off) == c_off
        assert worst == {"noisy": 0.0, "logprobs": 0.0}, worst  # measured: bit-identical
    first = (n - 1) * sum(prompt_hit(p) for p in prompts[:2])
    assert hits == [first, n * sum(prompt_hit(p) for p in prompts[:2])], hits
    # generated blocks were offered for caching and refused
    assert scheduler(on).capped_cache_calls() > capped0
    # a plain request shares the soft requests' prompt blocks and keeps stock output
    sp = SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=7, detokenize=False)
    c_on = cached(on)
    assert on.generate_plain([prompts[0]], sp) == off.generate_plain([prompts[0]], sp)
    assert cached(on) - c_on == prompt_hit(prompts[0])
    print(f"prefix-cache hits (tokens) per round: {hits}; plain request: {prompt_hit(prompts[0])}")


def test_generated_blocks_never_shared(on, off, prompts):
    """A soft request's generated block is never served to a request whose prompt has the same ids.

    S (soft) generates 40 tokens after a 71-token prompt P; its third block then holds P[64:] and
    S's first 25 generated ids. Q's prompt is P + S's first 40 ids. With stock caching Q hits that
    block (96 cached tokens) and reads KV computed from S's mixtures, not from Q's token
    embeddings; with the prompt-only rule it hits P's two blocks (64) and equals the no-cache engine.
    """
    from vllm import SamplingParams

    P = prompts[0]
    S = SoftSamplingParams(seed=5, top_k=8, k=8, tau=1.0)
    Qs = SoftSamplingParams(seed=9, top_k=8, k=8, tau=0.5)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, detokenize=False)

    def run(eng):
        (s,) = eng.generate([P], [S], max_new_tokens=40)
        q_prompt = P + s.tokens[:40].tolist()
        (out,) = eng.llm.generate([{"prompt_token_ids": q_prompt}], greedy, use_tqdm=False)
        comp = out.outputs[0]
        logprobs = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids, strict=True)]
        c = cached(eng)
        (q,) = eng.generate([q_prompt], [Qs], max_new_tokens=16)
        return s, list(comp.token_ids), logprobs, out.num_cached_tokens, cached(eng) - c, q

    s_ref, ids_ref, lp_ref, _, _, q_ref = run(off)
    assert s_ref.is_soft[:40].all() and len(P) + 40 > 3 * BLOCK  # Q's prompt covers S's first generated block

    on.reset_prefix_cache()
    s, ids, lp, hit_plain, hit_soft, q = run(on)
    assert_equal([s, q], [s_ref, q_ref])
    # plain Q: P's two blocks, nothing S generated; soft Q: also the third block, which plain Q cached
    # from its own prompt tokens (a prompt block for soft Q too: the right KV)
    assert (hit_plain, hit_soft) == (2 * BLOCK, 3 * BLOCK)
    assert ids == ids_ref and max(abs(a - b) for a, b in zip(lp, lp_ref, strict=True)) <= 1e-5

    with stock(on):  # what the rule prevents
        s, ids, lp, hit_plain, hit_soft, q = run(on)
    assert s.tokens.tolist() == s_ref.tokens.tolist()
    assert (hit_plain, hit_soft) == (3 * BLOCK, 3 * BLOCK), (hit_plain, hit_soft)  # both on S's block
    wrong_lp = max(abs(a - b) for a, b in zip(lp, lp_ref, strict=False))
    wrong_soft = q.tokens.tolist() != q_ref.tokens.tolist() or float((q.noisy - q_ref.noisy).abs().max()) > 1e-2
    assert (ids != ids_ref or wrong_lp > 1e-2) and wrong_soft
    print(f"stock caching: Q hits {hit_plain} tokens incl. S's generated block; plain |dlogp|={wrong_lp:.2f}")


def test_preemption_with_prompt_cache(tiny, off, prompts):
    """Preempted soft requests (10-block KV cache) with prompt caching keep their trajectories.

    (a) 12 requests in groups of 4 over 3 prompts. Recompute after preemption re-prefills generated
    positions in larger matmuls than the decode steps that first computed them, so float32 rounding
    differs: measured up to 2.6e-4 in the noisy values (log q of small slots) vs the roomy no-cache
    engine, and the same 2.6e-4 with caching off on an 11-block engine. Ids must agree exactly,
    log-probs within 1e-5.
    (b) The resume lookup: a plain request Q whose prompt is P + R's first 40 ids (R's reference
    trajectory) runs while soft R, admitted last, is preempted and resumed (timeline below). With
    stock caching R's resume hits Q's (plain-token) block for its generated positions and its
    trajectory changes; with the prompt-only rule it only hits P's blocks and equals the reference
    within 1e-5.
    """
    from vllm import SamplingParams

    params = [SoftSamplingParams(seed=100 + i, top_k=6, k=4 + i % 5, tau=0.2 + 0.05 * i,
                                 thinking_budget=40 if i % 3 == 0 else None) for i in range(12)]
    batch_prompts = [prompts[i % 3] for i in range(12)]
    want = off.generate(batch_prompts, params, max_new_tokens=64)
    s0 = tiny.stats()
    got = tiny.generate(batch_prompts, params, max_new_tokens=64)
    s1 = tiny.stats()
    restored = s1["restored_positions"] - s0["restored_positions"]
    hits = s1["prefix_cached_tokens"] - s0["prefix_cached_tokens"]
    assert restored > 0, "the 10-block KV cache should have forced preemption and recompute"
    assert hits > 0
    worst = assert_equal(got, want, noisy_tol=1e-3)

    # (b) 10 blocks of 32. Admitted in this order (one step): plain Q (prompt P + R's first 40 reference
    # ids, 111 tokens: 4 blocks, 48 more tokens), plain F (72 tokens: 3 blocks, 64 more) and soft R
    # (prompt P: hits P's 2 blocks, 1 own block). 2 blocks are left; Q takes one at step 18, F one at
    # step 25, and at step 26 R (97 tokens) finds none: R, the last admitted, is preempted with 26
    # generated ids. On resume R looks up P + those ids: stock vLLM finds Q's third block (P[64:] and
    # R's first 25 ids, computed by Q from plain token embeddings) and resumes on it at once; the
    # prompt-only rule stops at P's 2 blocks and R waits for Q to finish, then recomputes.
    P = prompts[0]
    R = SoftSamplingParams(seed=5, top_k=8, k=8, tau=1.0)
    (r_ref,) = off.generate([P], [R], max_new_tokens=64)
    assert r_ref.num_tokens >= 40
    q_prompt = P + r_ref.tokens[:40].tolist()

    def run():
        plain = dict(temperature=0.0, ignore_eos=True, detokenize=False)
        sps = [SamplingParams(max_tokens=48, **plain), SamplingParams(max_tokens=64, **plain),
               tiny.sampling_params(R, 64, "r")]
        b = tiny.stats()["restored_positions"]
        outs = tiny.llm.generate([{"prompt_token_ids": p} for p in (q_prompt, prompts[1], P)], sps, use_tqdm=False)
        r = tiny.fetch(["r"])["r"]
        return list(outs[2].outputs[0].token_ids), torch.from_numpy(r["noisy"][: len(r["token"])]), \
            tiny.stats()["restored_positions"] - b

    import torch

    tiny.reset_prefix_cache()
    r_ids, r_noisy, restored_b = run()
    assert restored_b >= 26, "R should have been preempted after 26 steps and recomputed"
    assert r_ids == r_ref.tokens.tolist()
    dy_b = float((r_noisy[: r_ref.num_tokens] - r_ref.noisy).abs().max())
    assert dy_b <= 1e-5, dy_b
    with stock(tiny):
        r_ids, r_noisy, _ = run()
    stock_wrong = (r_ids != r_ref.tokens.tolist()
                   or float((r_noisy[: r_ref.num_tokens] - r_ref.noisy).abs().max()) > 1e-2)
    assert stock_wrong, "stock caching should have served R plain-token KV on resume"
    print(f"(a) restored {restored}, prompt hits {hits} tokens, max |dy|={worst['noisy']:.1e} "
          f"|dlogp|={worst['logprobs']:.1e}; (b) restored {restored_b}, |dy|={dy_b:.1e}, stock caching changes R")
