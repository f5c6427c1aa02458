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


# --------------------------------------------------------------------------------------------------- the loss

def _official_multiplex_loss(old_log_prob, log_prob, advantages, response_mask, topk_probs, cliprange_low,
                             cliprange_high, clip_ratio_c):
    """A literal transcription of the official ``compute_multiplex_thinking_policy_loss`` (verl-latest
    core_algos.py; docs/design/multiplex-reference.md, section 4), token-mean aggregation (verl's masked mean)."""
    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    response_mask_3d = response_mask.unsqueeze(-1).repeat(1, 1, log_prob.shape[-1])
    is_answer_token = (topk_probs[:, :, 0] == 1.0) & (topk_probs[:, :, 1:].sum(dim=-1) == 0.0)
    topk_weight_mask = topk_probs > 1e-20
    topk_weight_mask = torch.where(is_answer_token.unsqueeze(-1), topk_weight_mask, torch.ones_like(topk_weight_mask))
    response_mask_3d = response_mask_3d & topk_weight_mask
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    advantages_3d = advantages.detach().unsqueeze(-1).repeat(1, 1, log_prob.shape[-1])
    pg_losses1 = -advantages_3d * ratio
    pg_losses2 = -advantages_3d * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask_3d)
    pg_losses3 = -advantages_3d * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages_3d < 0, clip_pg_losses2, clip_pg_losses1)
    pg_losses_summed = (pg_losses * response_mask_3d.float()).sum(dim=-1)
    return masked_mean(pg_losses_summed, response_mask), pg_clipfrac


def test_per_draw_loss_equals_the_official_loss_and_differs_from_the_joint_ratio():
    """``ppo_policy_loss`` with a draw mask (soft steps: every draw; answer steps: draw 0) against the literal
    official loss on tensors whose ratios reach far outside the clip range (clip, clip-higher and the dual clip all
    active, both signs of advantage): value, gradient and clip fraction. The joint ratio (one clipped ratio of the
    draws' summed log-probs) gives another value there, so the two options are really different losses."""
    from soft_rl.losses import ppo_policy_loss

    g = torch.Generator().manual_seed(5)
    B, R, K = 6, 9, 3
    soft = torch.rand(B, R, generator=g) < 0.6
    mask = (torch.arange(R)[None, :] < torch.randint(4, R + 1, (B, 1), generator=g)).long()
    old = -torch.rand(B, R, K, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(B, R, K, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    weights = torch.softmax(torch.randn(B, R, K, generator=g, dtype=torch.float64), -1)
    one_hot = (torch.arange(K) == 0).to(torch.float64).expand(B, R, K)
    topk_probs = torch.where(soft[..., None], weights, one_hot)
    draws = soft[..., None] | (torch.arange(K) == 0)
    # soft-rl's per-draw rows hold 0 at masked draws (soft_rl.draws); the official tensors hold whatever was there
    ours_new = torch.where(draws, new, torch.zeros_like(new)).requires_grad_()
    theirs_new = new.clone().requires_grad_()
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    loss, metrics = ppo_policy_loss(ours_new, torch.where(draws, old, torch.zeros_like(old)), adv, mask,
                                    agg="token-mean", draw_mask=draws, **kw)
    want, clipfrac = _official_multiplex_loss(old, theirs_new, adv[:, None].expand(B, R), mask.bool(), topk_probs,
                                              0.2, 0.28, 3.0)
    assert float(clipfrac) > 0.2  # the clip is active
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours_new.grad, torch.where(draws, theirs_new.grad, torch.zeros_like(new)), atol=1e-12,
                               rtol=1e-12)
    assert float(metrics["clip_frac"]) == pytest.approx(float(clipfrac), abs=1e-12)
    joint, _ = ppo_policy_loss(ours_new.detach().sum(-1), torch.where(draws, old, torch.zeros_like(old)).sum(-1),
                               adv, mask, agg="token-mean", **kw)
    assert abs(float(joint) - float(want.detach())) > 1e-2


def test_multiplex_ratio_and_weights_keys():
    """``rollout.multiplex_weights`` selects the weighting (uniform: the registered ``multiplex_uniform`` kind the
    sampler runs), ``learner.multiplex_ratio`` the loss; bad values name their key, and the variant is not a value
    of ``rollout.noise`` itself."""
    base = ["rollout.noise=multiplex", "learner.density=exact", "rollout.k=3"]
    cfg = load_config(None, ["model.path=/m", *base, "rollout.multiplex_weights=uniform"])
    assert cfg.rollout.sampling_params(0).noise == "multiplex_uniform" and cfg.learner.multiplex_ratio == "per_draw"
    assert load_config(None, ["model.path=/m", *base]).rollout.sampling_params(0).noise == "multiplex"
    for bad, key in ((["rollout.multiplex_weights=mean"], "rollout.multiplex_weights"),
                     (["learner.multiplex_ratio=sum"], "learner.multiplex_ratio"),
                     (["rollout.noise=multiplex_uniform"], "rollout.noise")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["model.path=/m", *base[1:], *bad] if "noise" in key else ["model.path=/m", *base, *bad])
