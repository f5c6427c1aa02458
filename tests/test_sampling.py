"""The core sampler against a literal, per-row re-statement of the reference order, and Monte Carlo
checks of its distributions."""

import math

import pytest
import torch

from soft_rl import rng
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, mix_embeddings, soft_sample, truncate_sorted


def literal_truncation(p: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The reference's sequence, step by step on the full vector, renormalising after each step."""
    p = p.clone().double()
    if top_k > 0:
        kth = torch.sort(p, descending=True).values[top_k - 1]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum()
    if top_p < 1:
        sp, order = torch.sort(p, descending=True)
        cum_before = torch.cumsum(sp, 0) - sp
        keep_sorted = cum_before < top_p
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum()
    if min_p > 0:
        p = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
        p = p / p.sum()
    return p


def literal_soft_step(z, T, top_k, top_p, min_p, K, tau, lam, g):
    """Reference §1.2 for one row, in order, with the given standard-Gumbel draws g[K] (slot order)."""
    p = torch.softmax(z.double() / T, -1)
    p3 = literal_truncation(p, top_k, top_p, min_p)
    # top-K of p3; among equal (zero) probabilities take the more likely tokens under p
    key = p3 + 1e-30 * p
    q, ids = torch.topk(key, K)
    q = p3[ids] / p3[ids].sum()
    ell = torch.log(q + 1e-6)
    y = ell + lam * g.double().clamp(-1.5, 3.0)
    w = torch.softmax(y / tau, -1)
    order = torch.argsort(w, descending=True, stable=True)
    return ids[order], y[order], w[order], ids[torch.argmax(y)]


CASES = [
    dict(temperature=1.0, top_k=5, top_p=0.95, min_p=0.0, k=5, tau=0.1),
    dict(temperature=0.6, top_k=30, top_p=0.95, min_p=0.0, k=30, tau=0.5),
    dict(temperature=1.3, top_k=-1, top_p=0.7, min_p=0.05, k=8, tau=0.25),
    dict(temperature=1.0, top_k=10, top_p=1.0, min_p=0.2, k=4, tau=1.0),
]


@pytest.mark.parametrize("case", CASES)
def test_soft_step_matches_literal_reference(case):
    torch.manual_seed(0)
    B, V = 16, 300
    logits = torch.randn(B, V) * 2.5
    params = [SoftSamplingParams(seed=100 + b, **case) for b in range(B)]
    batch = SamplingBatch.from_params(params)
    step = torch.full((B,), 7)
    out = soft_sample(logits, batch, NoiseCounters(batch.seed, step))
    g_all = rng.gumbel(batch.seed, step, case["k"])
    for b in range(B):
        ids, y, w, tok = literal_soft_step(logits[b], case["temperature"], case["top_k"], case["top_p"],
                                           case["min_p"], case["k"], case["tau"], 1.0, g_all[b])
        assert out.ids[b].tolist() == ids.tolist()
        torch.testing.assert_close(out.noisy[b].double(), y, atol=2e-5, rtol=0)
        torch.testing.assert_close(out.weights[b].double(), w, atol=2e-5, rtol=0)
        assert int(out.token[b]) == int(tok)
        assert bool(out.is_soft[b])


def test_truncation_order_matters_and_is_reference_order():
    """Designed distributions where another order of top-k, top-p and min-p keeps another set."""
    def ours(p, top_k, top_p, min_p):
        keep = truncate_sorted(p[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
        return keep.nonzero().flatten().tolist()

    def kept(p):
        return (p > 0).nonzero().flatten().tolist()

    # top-k before top-p: after top-k=2 the first token has 0.4/0.7 = 0.57 >= 0.5 of the mass, so top-p
    # keeps it alone; top-p first (on the full vector) would keep two tokens.
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert ours(p, 2, 0.5, 0.0) == kept(literal_truncation(p, 2, 0.5, 0.0)) == [0]
    assert kept(literal_truncation(literal_truncation(p, -1, 0.5, 0.0), 2, 1.0, 0.0)) == [0, 1]
    # top-p before min-p: top-p keeps 3 (exclusive cumsums 0, .3, .55 < .6), min-p (0.75 * 0.3) keeps
    # them all; min-p first renormalises to (.375, .3125, .3125) and top-p then keeps only two.
    p = torch.tensor([0.3, 0.25, 0.25, 0.2])
    assert ours(p, -1, 0.6, 0.75) == kept(literal_truncation(p, -1, 0.6, 0.75)) == [0, 1, 2]
    assert kept(literal_truncation(literal_truncation(p, -1, 1.0, 0.75), -1, 0.6, 0.0)) == [0, 1]
    # and on random vectors our prefix formulation equals the literal sequence
    torch.manual_seed(3)
    for _ in range(200):
        p = torch.sort(torch.softmax(torch.randn(12) * 2, -1), descending=True).values
        top_k = int(torch.randint(-1, 12, ()))
        top_p, min_p = float(torch.rand(())) * 0.9 + 0.1, float(torch.rand(())) * 0.3
        assert ours(p, top_k, top_p, min_p) == kept(literal_truncation(p, top_k, top_p, min_p))


def test_gumbel_max_property_monte_carlo():
    """With clamps off and lambda = 1: P(argmax y = slot k) = q_k."""
    N, V, K = 40000, 50, 5
    z = torch.randn(1, V) * 1.5
    params = SoftSamplingParams(k=K, top_k=-1, top_p=1.0, noise_clamp=None, tau=0.5)
    batch = SamplingBatch.from_params([params])
    batch = batch.select(torch.zeros(N, dtype=torch.long))
    batch.seed = torch.arange(N)
    out = soft_sample(z.expand(N, V), batch, NoiseCounters(batch.seed, torch.zeros(N)))
    top = torch.topk(torch.softmax(z[0], -1), K)
    q = top.values / top.values.sum()
    for k in range(K):
        freq = (out.token == top.indices[k]).float().mean().item()
        sigma = math.sqrt(q[k] * (1 - q[k]) / N)
        assert abs(freq - q[k].item()) < 4.5 * sigma + 1e-5, (k, freq, q[k].item())


def test_discrete_rows_sample_truncated_distribution():
    N, V = 40000, 20
    z = torch.randn(1, V)
    params = SoftSamplingParams(soft=False, answer_top_k=6, answer_top_p=0.8, answer_temperature=0.7)
    batch = SamplingBatch.from_params([params]).select(torch.zeros(N, dtype=torch.long))
    batch.seed = torch.arange(N) + 12345
    batch.thinking = torch.zeros(N, dtype=torch.bool)  # answer phase: the answer_* parameters apply
    out = soft_sample(z.expand(N, V), batch, NoiseCounters(batch.seed, torch.full((N,), 3)))
    expected = literal_truncation(torch.softmax(z[0] / 0.7, -1), 6, 0.8, 0.0)
    freq = torch.bincount(out.token, minlength=V).double() / N
    sigma = torch.sqrt(expected * (1 - expected) / N)
    assert torch.all((freq - expected).abs() <= 4.5 * sigma + 1e-4)
    assert not out.is_soft.any()
    assert torch.equal(out.weights[:, 0], torch.ones(N)) and torch.all(out.weights[:, 1:] == 0)
    assert torch.equal(out.ids, out.token[:, None].expand_as(out.ids))
    torch.testing.assert_close(out.logprob, torch.log_softmax(z[0] / 0.7, -1)[out.token])


def test_dirichlet_and_gaussian_noise_distributions():
    N, V, K = 20000, 30, 4
    z = torch.randn(1, V)
    base = dict(k=K, top_k=-1, top_p=1.0)
    for noise in ("dirichlet", "gaussian"):
        params = SoftSamplingParams(noise=noise, noise_scale=1.0, **base)
        batch = SamplingBatch.from_params([params]).select(torch.zeros(N, dtype=torch.long))
        batch.seed = torch.arange(N)
        out = soft_sample(z.expand(N, V), batch, NoiseCounters(batch.seed, torch.zeros(N)))
        top = torch.topk(torch.softmax(z[0], -1), K)
        q = top.values / top.values.sum()
        # map sorted slots back to token order
        x = torch.zeros(N, K)
        for k in range(K):
            x[:, k] = torch.where(out.ids == top.indices[k], out.noisy, torch.zeros_like(out.noisy)).sum(-1)
        if noise == "dirichlet":
            w = x / x.sum(-1, keepdim=True)
            # Dirichlet(q): E[w_k] = q_k, Var = q_k (1 - q_k) / (sum(q) + 1) = q_k (1 - q_k) / 2
            torch.testing.assert_close(w.mean(0), q, atol=0.012, rtol=0)
            torch.testing.assert_close(w.var(0), q * (1 - q) / 2, atol=0.01, rtol=0)
            # Gamma(q_k, 1): mean q_k, variance q_k
            torch.testing.assert_close(x.mean(0), q, atol=0.02, rtol=0)
            torch.testing.assert_close(x.var(0), q, atol=0.03, rtol=0)
            torch.testing.assert_close(out.weights.sum(-1), torch.ones(N))
        else:
            torch.testing.assert_close(x.mean(0), q, atol=0.002, rtol=0)
            torch.testing.assert_close(x.std(0), torch.full((K,), 0.05), atol=0.002, rtol=0)


def test_noise_is_reproducible_and_independent_of_batch_composition():
    torch.manual_seed(1)
    V = 64
    z = torch.randn(5, V) * 2
    params = [SoftSamplingParams(seed=s, noise=n) for s, n in zip([3, 9, 3, 4, 11], ["gumbel", "gumbel",
                                                                                        "dirichlet", "gaussian",
                                                                                        "gumbel"], strict=True)]
    batch = SamplingBatch.from_params(params)
    step = torch.tensor([0, 5, 2, 2, 9])
    full = soft_sample(z, batch, NoiseCounters(batch.seed, step))
    again = soft_sample(z, batch, NoiseCounters(batch.seed, step))
    assert torch.equal(full.noisy, again.noisy) and torch.equal(full.token, again.token)
    perm = torch.tensor([4, 2, 0, 3, 1])
    sub = batch.select(perm)
    permuted = soft_sample(z[perm], sub, NoiseCounters(sub.seed, step[perm]))
    assert torch.equal(permuted.ids, full.ids[perm])
    torch.testing.assert_close(permuted.noisy, full.noisy[perm], atol=0, rtol=0)
    # a different step gives different noise
    other = soft_sample(z, batch, NoiseCounters(batch.seed, step + 1))
    assert not torch.equal(other.noisy, full.noisy)


def test_per_row_k_pads_slots():
    z = torch.randn(2, 40)
    batch = SamplingBatch.from_params([SoftSamplingParams(k=2, seed=1), SoftSamplingParams(k=6, seed=2)])
    out = soft_sample(z, batch, NoiseCounters(batch.seed, torch.zeros(2)))
    assert out.ids.shape == (2, 6)
    assert torch.all(out.weights[0, 2:] == 0) and torch.all(out.noisy[0, 2:] == 0)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2))


def test_force_token_gives_discrete_step():
    z = torch.randn(2, 30)
    batch = SamplingBatch.from_params([SoftSamplingParams(seed=1, temperature=0.8), SoftSamplingParams(seed=2)])
    out = soft_sample(z, batch, NoiseCounters(batch.seed, torch.zeros(2)), force_token=torch.tensor([17, -1]))
    assert out.token[0] == 17 and not out.is_soft[0] and out.is_soft[1]
    torch.testing.assert_close(out.logprob[0], torch.log_softmax(z[0] / 0.8, -1)[17])


def test_mix_embeddings_one_hot_is_exact_and_mixture_is_weighted_sum():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        E = torch.randn(100, 16).to(dtype)
        ids = torch.tensor([[5, 5, 5], [7, 3, 9]])
        w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]])
        e = mix_embeddings(E, ids, w)
        assert e.dtype == dtype
        assert torch.equal(e[0], E[5])
        manual = 0.5 * E[7].float() + 0.3 * E[3].float() + 0.2 * E[9].float()
        torch.testing.assert_close(e[1].float(), manual, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    # weights are renormalised
    E = torch.randn(10, 4)
    torch.testing.assert_close(mix_embeddings(E, torch.tensor([[1, 2]]), torch.tensor([[2.0, 2.0]])),
                               (0.5 * (E[1] + E[2]))[None])


@pytest.mark.parametrize("field,value,msg", [
    ("temperature", 0.0, "temperature"), ("top_p", 1.5, "top_p"), ("k", 0, "k="), ("noise", "uniform", "noise"),
    ("tau", -1.0, "tau"), ("thinking_budget", -2, "thinking_budget"), ("noise_clamp", (3.0, -1.5), "noise_clamp"),
])
def test_invalid_params_name_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        SoftSamplingParams(**{field: value})


def test_answer_params_inherit_thinking_params():
    p = SoftSamplingParams(temperature=0.6, top_k=30, top_p=0.9, min_p=0.01, answer_top_k=5)
    assert (p.answer_temperature, p.answer_top_k, p.answer_top_p, p.answer_min_p) == (0.6, 5, 0.9, 0.01)


def test_uniform_range_and_gumbel_moments():
    seed = torch.arange(50000)
    u = rng.uniform(seed, torch.zeros_like(seed), 4, 0)
    assert float(u.min()) > 0 and float(u.max()) < 1
    g = rng.gumbel(seed, torch.zeros_like(seed), 4)
    # Gumbel(0,1): mean = Euler-Mascheroni 0.5772, variance = pi^2 / 6
    assert abs(g.mean().item() - 0.5772) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    # slots and streams are decorrelated
    c = torch.corrcoef(torch.stack([u[:, 0], u[:, 1], rng.uniform(seed, torch.zeros_like(seed), 1, 1)[:, 0]]))
    assert c.abs().triu(1).max() < 0.02


def test_bfloat16_logits_give_the_float32_result():
    torch.manual_seed(5)
    z = (torch.randn(6, 80) * 2).to(torch.bfloat16)
    batch = SamplingBatch.from_params([SoftSamplingParams(seed=i) for i in range(6)])
    counters = NoiseCounters(batch.seed, torch.zeros(6))
    a = soft_sample(z, batch, counters)
    b = soft_sample(z.float(), batch, counters)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.token, b.token)
    assert a.noisy.dtype == torch.float32 and a.logprob.dtype == torch.float32
    torch.testing.assert_close(a.noisy, b.noisy, atol=0, rtol=0)


def test_noise_does_not_depend_on_the_array_width():
    """An engine pads every request to its own K: a request's draws must not change with it."""
    torch.manual_seed(6)
    z = torch.randn(3, 60)
    for noise in ("gumbel", "dirichlet", "gaussian"):
        params = [SoftSamplingParams(seed=s, noise=noise, k=4) for s in (1, 2, 3)]
        outs = []
        for width in (4, 9):
            batch = SamplingBatch.from_params(params, width=width)
            outs.append(soft_sample(z, batch, NoiseCounters(batch.seed, torch.full((3,), 5))))
        assert torch.equal(outs[0].ids, outs[1].ids[:, :4]), noise
        torch.testing.assert_close(outs[0].noisy, outs[1].noisy[:, :4], atol=0, rtol=0)


def test_stable_topk_orders_ties_by_token_id_whatever_the_width():
    """Against a Python sort by (-value, id) on bf16-rounded logits (many ties; none wider than TIE_WINDOW)."""
    from soft_rl.sampling import stable_topk

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(32, 400, generator=g) * 4).bfloat16().float()
    z[0, 10:20] = 7.0  # one long tie at the top
    for c in (1, 5, 37, 400):
        vals, ids = stable_topk(z, c)
        want = [sorted(range(400), key=lambda j, b=b: (-z[b, j].item(), j))[:c] for b in range(32)]
        assert ids.tolist() == want, c
        assert torch.equal(vals, z.gather(1, ids))


def test_a_rows_slots_do_not_depend_on_its_batch_mates_when_logits_tie():
    """A soft row whose K-th candidate ties with the (K+1)-th gets the same slots, noise and token alone
    (candidate width K) and beside a discrete full-vocabulary row (width V): audit item 9."""
    V, K = 64, 4
    z = torch.full((V,), -2.0)
    z[[3, 40, 41, 50, 60, 7]] = torch.tensor([4.0, 2.0, 1.0, 1.0, 1.0, 1.0])  # ties across slot K
    soft = SoftSamplingParams(seed=5, k=K, top_k=K)
    disc = SoftSamplingParams(seed=6, k=K, soft=False, top_k=-1, answer_top_k=-1)
    alone = SamplingBatch.from_params([soft], width=K)
    pair = SamplingBatch.from_params([soft, disc], width=K)
    a = soft_sample(z[None], alone, NoiseCounters(alone.seed, torch.zeros(1, dtype=torch.int64)), candidates=K)
    b = soft_sample(torch.stack([z, z]), pair, NoiseCounters(pair.seed, torch.zeros(2, dtype=torch.int64)),
                    candidates=V)
    assert a.ids[0].tolist() == b.ids[0].tolist()
    assert sorted(a.ids[0].tolist()) == [3, 7, 40, 41]  # the tied 1.0s by token id: 7, 41 (then 50, 60)
    for f in ("noisy", "weights", "token", "logprob"):
        assert torch.equal(getattr(a, f)[0], getattr(b, f)[0]), f
