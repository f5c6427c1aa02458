"""Multiplex Thinking's rollout (``rollout.noise=multiplex``): K draws i.i.d. from the kept distribution, against
Monte Carlo frequencies and a literal transcription of the official sampler's weights and input merge
(docs/design/multiplex-reference.md, sections 1 and 3)."""

from __future__ import annotations

import math

import pytest
import torch

from soft_rl import rng
from soft_rl.config import ConfigError, load_config
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, mix_embeddings, soft_sample

V = 40


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


def _kept_distribution(z: torch.Tensor, T: float, top_k: int, top_p: float) -> torch.Tensor:
    """q over the vocabulary: softmax(z / T), top-k, then top-p on the top-k-renormalised mass (reference order)."""
    p = torch.softmax(z.double() / T, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    kk = order[:top_k] if top_k > 0 else order
    mass = p[kk].sum()
    cum = 0.0
    for v in kk:
        if cum < top_p * mass:
            keep[v] = True
        cum += p[v].item()
    q = p * keep
    return q / q.sum()


def _draws(params: SoftSamplingParams, z: torch.Tensor, n: int):
    batch = SamplingBatch.from_params([params] * n)
    counters = rng.NoiseCounters(torch.arange(n) * 7919 + 1, torch.full((n,), 3))
    return soft_sample(z.expand(n, V), batch, counters, density="exact")


def test_draws_are_iid_from_the_kept_distribution_and_draw_0_is_emitted():
    """Each slot's marginal and the joint of slots 0 and 1 match q (and q x q): chi-square over the kept tokens with
    a bound 6 sigma above its mean (the statistic's sd is sqrt(2 dof)); slot 0's id is the emitted token."""
    z, n = _logits(1), 40000
    params = SoftSamplingParams(noise="multiplex", k=3, top_k=-1, top_p=0.9, temperature=1.3)
    out = _draws(params, z, n)
    q = _kept_distribution(z, 1.3, -1, 0.9)
    support = (q > 0).nonzero().flatten()
    assert torch.equal(out.token, out.ids[:, 0]) and bool(out.is_soft.all())
    assert bool(torch.isin(out.ids, support).all())  # no draw outside the kept set
    for j in range(3):
        counts = torch.bincount(out.ids[:, j], minlength=V)[support].double()
        expected = n * q[support]
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        dof = len(support) - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), (j, chi2, dof)
    top = support[q[support].argsort(descending=True)[:4]]  # the four likeliest tokens: cells with enough mass
    pair = torch.zeros(4, 4, dtype=torch.float64)
    for a in range(4):
        for b in range(4):
            pair[a, b] = ((out.ids[:, 0] == top[a]) & (out.ids[:, 1] == top[b])).sum()
    expected = n * q[top][:, None] * q[top][None, :]
    chi2 = ((pair - expected) ** 2 / expected).sum().item()
    assert chi2 < 16 + 6 * math.sqrt(32), chi2  # 16 cells, independence: no cell off by more than noise
    assert (out.ids[:, 0] == out.ids[:, 1]).float().mean() > 0.05  # duplicates are kept (q concentrated enough)


def literal_official_weights(z: torch.Tensor, ids: torch.Tensor, T: float, unweighted: bool) -> torch.Tensor:
    """The official sampler's weights, one row at a time: w_k = p(i_k) / sum_j p(i_j) with p = softmax(z / T) over
    the full vocabulary (untruncated), or 1 / K when unweighting."""
    p = torch.softmax(z.double() / T, -1)
    rows = []
    for row in ids.tolist():
        if unweighted:
            rows.append([1.0 / len(row)] * len(row))
        else:
            total = sum(p[i].item() for i in row)
            rows.append([p[i].item() / total for i in row])
    return torch.tensor(rows, dtype=torch.float64)


def literal_official_merge(E: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The official next input: sum_k (w_k / max(sum_j w_j, 1e-8)) E[i_k], duplicates counted once per slot."""
    out = torch.zeros(ids.shape[0], E.shape[1], dtype=torch.float64)
    for r in range(ids.shape[0]):
        s = max(w[r].sum().item(), 1e-8)
        for k in range(ids.shape[1]):
            out[r] += (w[r, k].item() / s) * E[ids[r, k]].double()
    return out


def test_weights_and_merged_input_equal_the_official_sampler():
    """Float32 weights from float32 log-probs: each is a ratio of K probabilities, so its relative error is a few
    float32 roundings (<= 8 * 2^-24 each way); the merge adds K float32 products (same bound, times the row norm)."""
    z, n = _logits(2), 512
    E = torch.randn(V, 16, generator=torch.Generator().manual_seed(5))
    for noise, unweighted in (("multiplex", False), ("multiplex_uniform", True)):
        params = SoftSamplingParams(noise=noise, k=4, top_k=-1, top_p=1.0, temperature=0.8)
        out = _draws(params, z, n)
        ref = literal_official_weights(z, out.ids, 0.8, unweighted)
        torch.testing.assert_close(out.weights.double(), ref, rtol=16 * 2.0**-24, atol=1e-7)
        merged = mix_embeddings(E, out.ids, out.weights).double()
        bound = 32 * 2.0**-24 * E.abs().max().item()
        torch.testing.assert_close(merged, literal_official_merge(E, out.ids, ref), rtol=0, atol=bound)


def test_a_truncated_thinking_phase_draws_only_kept_tokens_and_the_answer_phase_is_discrete():
    z = _logits(3)
    params = SoftSamplingParams(noise="multiplex", k=3, top_k=6, top_p=1.0)
    out = _draws(params, z, 4000)
    top6 = z.argsort(descending=True)[:6]
    assert bool(torch.isin(out.ids, top6).all()) and len(out.ids.unique()) == 6
    batch = SamplingBatch.from_params([params] * 8)
    batch.thinking = torch.zeros(8, dtype=torch.bool)  # answer phase: one token, one-hot weights
    ans = soft_sample(z.expand(8, V), batch, rng.NoiseCounters(torch.arange(8), torch.zeros(8, dtype=torch.int64)))
    assert not bool(ans.is_soft.any()) and bool((ans.ids == ans.token[:, None]).all())
    assert torch.equal(ans.weights, torch.tensor([[1.0, 0.0, 0.0]]).expand(8, 3))


def test_a_steps_density_is_the_joint_log_probability_of_its_draws():
    """density=exact scores a Multiplex step as sum_j log softmax(z / T)[i_j] over the full vocabulary, untruncated
    (the official learner's per-draw log-probabilities, summed: one joint ratio); the official masked-mean and
    gumbel-max modes do not score it, and the config says so."""
    z, T = _logits(4), 0.7
    out = _draws(SoftSamplingParams(noise="multiplex", k=3, top_k=10, top_p=0.9, temperature=T), z, 64)
    ref = torch.log_softmax(z.double() / T, -1)[out.ids].sum(-1)
    torch.testing.assert_close(out.logprob.double(), ref, atol=1e-5, rtol=1e-6)
    assert load_config(None, ["model.path=x", "rollout.noise=multiplex", "learner.density=exact"])
    for density in ("official", "gumbel-max"):
        with pytest.raises(ConfigError, match="learner.density"):
            load_config(None, ["model.path=x", "rollout.noise=multiplex", f"learner.density={density}"])
