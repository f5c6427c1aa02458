"""Losses against hand-computed values and per-element Python re-statements."""

import itertools
import math

import pytest
import torch

from soft_rl.losses import (
    aggregate,
    compute_advantages,
    discrete_logprob,
    entropy_from_logits,
    kl_penalty,
    ppo_policy_loss,
)
from soft_rl.metrics import first_k_pass, pass_at_k

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 7 / 3),                 # (1 + 2 + 4) / 3 tokens
    ("seq-mean-token-mean", 2.75),         # ((1 + 2) / 2 + 4 / 1) / 2
    ("seq-mean-token-sum", 3.5),           # (3 + 4) / 2
    ("seq-mean-token-sum-norm", 7 / 6),    # (3 / 3 + 4 / 3) / 2, constant length = R = 3
])
def test_aggregation_modes_hand_values(mode, expected):
    assert aggregate(X, MASK, mode).item() == pytest.approx(expected)


def test_dr_grpo_norm_length_and_unknown_mode():
    assert aggregate(X, MASK, "seq-mean-token-sum-norm", norm_length=4).item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(X, MASK, "token-sum")


def test_grpo_advantages_match_per_group_loop():
    torch.manual_seed(0)
    rewards = torch.randint(0, 2, (24,)).float()
    rewards[:8] = 1.0  # a group with zero variance
    group = torch.arange(3).repeat_interleave(8)[torch.randperm(24)]
    adv = compute_advantages("grpo", rewards, group)
    adv_ns = compute_advantages("grpo_no_std", rewards, group)
    for g in range(3):
        idx = (group == g).nonzero().flatten()
        r = rewards[idx]
        torch.testing.assert_close(adv[idx], (r - r.mean()) / (r.std() + 1e-6))
        torch.testing.assert_close(adv_ns[idx], r - r.mean())
    with pytest.raises(ValueError, match="grpo"):
        compute_advantages("gae", rewards, group)


def test_rloo_advantages_are_the_leave_one_out_baseline():
    """A_i = R_i - the mean of its group mates' rewards, by a loop over samples; groups of unequal sizes (one of
    one, whose advantage is 0) and float rewards, so a missing n / (n - 1) factor or a wrong group fails."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 5, 8]
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(group.numel(), generator=g)
    group = group[perm]
    rewards = torch.rand(group.numel(), generator=g, dtype=torch.float64).float()
    adv = compute_advantages("rloo", rewards, group)
    for i in range(group.numel()):
        mates = [float(rewards[j]) for j in range(group.numel()) if j != i and group[j] == group[i]]
        want = float(rewards[i]) - sum(mates) / len(mates) if mates else 0.0
        assert float(adv[i]) == pytest.approx(want, abs=1e-6)


def ppo_token_reference(lp, old, a, eps_low, eps_high, c):
    r = math.exp(lp - old)
    loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
    if c is not None and a < 0:
        loss = min(loss, -c * a)
    return loss


@pytest.mark.parametrize("eps_low,eps_high,c", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.2, 3.0),
                                                (0.1, 0.3, 2.0)])
def test_ppo_loss_matches_per_token_reference(eps_low, eps_high, c):
    torch.manual_seed(1)
    B, R = 4, 6
    old = torch.randn(B, R)
    lp = old + torch.randn(B, R) * 0.8  # ratios far outside the clip range too
    adv = torch.randn(B)
    mask = (torch.rand(B, R) > 0.3).long()
    loss, m = ppo_policy_loss(lp, old, adv, mask, clip_low=eps_low, clip_high=eps_high, dual_clip=c)
    per = torch.tensor([[ppo_token_reference(lp[b, t].item(), old[b, t].item(), adv[b].item(), eps_low, eps_high, c)
                         for t in range(R)] for b in range(B)])
    assert loss.item() == pytest.approx(((per * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert 0 < m["clip_frac"].item() < 1


@pytest.mark.parametrize("band", [None, (0.3, 3.0)])
def test_decoupled_ppo_matches_a_per_position_reference(band):
    """Off-policy batches: the clipped ratio against the proximal policy (old), each position's term times
    w = min(exp(old - behaviour), cap), 0 outside the band; value, gradient and metrics against a per-position loop
    (float64). A behaviour equal to the proximal policy gives the on-policy loss bit for bit, and the weights change
    the loss where they differ from 1."""
    g = torch.Generator().manual_seed(4)
    B, R, cap = 5, 7, 2.0
    old = torch.randn(B, R, generator=g, dtype=torch.float64)
    beh = old + torch.randn(B, R, generator=g, dtype=torch.float64) * 1.2  # weights far from 1, both sides
    lp = (old + torch.randn(B, R, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, R, generator=g) > 0.2).double()
    loss, m = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, behaviour_logp=beh,
                              is_cap=cap, is_band=band)
    loss.backward()
    ref_lp = lp.detach().clone().requires_grad_(True)
    terms, ws = [], []
    for b in range(B):
        for t in range(R):
            raw = math.exp(float(old[b, t] - beh[b, t]))
            w = 0.0 if band is not None and not band[0] <= raw <= band[1] else min(raw, cap)
            r = torch.exp(ref_lp[b, t] - old[b, t])
            a = float(adv[b])
            term = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
            if a < 0:
                term = torch.minimum(term, torch.tensor(-3.0 * a, dtype=torch.float64))
            terms.append(term * w * mask[b, t])
            ws.append((w, raw, bool(mask[b, t])))
    want = torch.stack(terms).sum() / mask.sum()
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lp.grad, ref_lp.grad, atol=1e-12, rtol=1e-12)
    kept = [(w, raw) for w, raw, on in ws if on]
    assert float(m["is_capped_frac"]) == pytest.approx(sum(raw > cap for _, raw in kept) / len(kept))
    assert float(m["is_weight_mean"]) == pytest.approx(sum(w for w, _ in kept) / len(kept))
    assert float(m["is_weight_max"]) == max(w for w, _ in kept) <= cap
    if band is not None:
        assert 0 < float(m["is_masked_frac"]) < 1
    on_policy, _ = ppo_policy_loss(lp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.28)
    same, _ = ppo_policy_loss(lp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.28, behaviour_logp=old)
    assert torch.equal(same, on_policy) and abs(float(on_policy) - float(loss)) > 1e-3


def test_ppo_on_policy_gradient_is_policy_gradient():
    """At ratio 1 the gradient of the token-mean loss is -A * grad(logp) / n_tokens."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(lp, lp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -1.0]]))
    assert loss.item() == pytest.approx(-2.0)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = ref - lp
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), -d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() == 10.0  # clamped
    assert torch.all(kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0)
    # nearly equal log-probs: exp(d) - d - 1 cancels to rounding noise of either sign in float32; k3 stays >= 0
    # and close to d^2 / 2 (relative error of expm1's one rounding over d^2 / 2, ~ eps / d)
    base = torch.linspace(-8.0, -0.1, 1000)
    near = base + torch.linspace(-3e-5, 3e-5, 1000)
    k3 = kl_penalty(near, base, "k3")
    d = base.double() - near.float().double()
    assert torch.all(k3 >= 0)
    assert torch.allclose(k3.double(), torch.expm1(d) - d, rtol=0, atol=2 * 1.2e-7 * 3e-5)  # ~ 2 eps |d|


def test_ppo_loss_with_kl_and_entropy_terms():
    torch.manual_seed(2)
    lp, old, ref = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    adv, mask, ent = torch.randn(2), torch.ones(2, 3), torch.rand(2, 3)
    base, _ = ppo_policy_loss(lp, old, adv, mask)
    full, m = ppo_policy_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    expected = base + 0.1 * kl_penalty(lp, ref).mean() - 0.01 * ent.mean()
    assert full.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["kl"].item() == pytest.approx(kl_penalty(lp, ref).mean().item(), rel=1e-6)


def test_discrete_logprob_and_entropy():
    torch.manual_seed(3)
    z = torch.randn(4, 10)
    x = torch.randint(0, 10, (4,))
    torch.testing.assert_close(discrete_logprob(z, x, 0.7), torch.log_softmax(z / 0.7, -1)[torch.arange(4), x])
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy_from_logits(z), -(p * p.log()).sum(-1))


def test_pass_at_k_against_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_first_k_pass_is_order_dependent():
    outcomes = [False, False, True, False]
    assert [first_k_pass(outcomes, k) for k in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # the unbiased one does not depend on order


def test_masked_entropy_equals_entropy_of_the_kept_entries():
    from soft_rl.losses import entropy_from_logits

    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 6, generator=g) * 3
    valid = torch.rand(5, 6, generator=g) > 0.4
    valid[:, 0] = True
    got = entropy_from_logits(z, valid)
    for i in range(5):
        p = torch.softmax(z[i][valid[i]].double(), -1)
        assert got[i].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    assert torch.allclose(entropy_from_logits(z, torch.ones_like(valid)), entropy_from_logits(z))
    assert float(entropy_from_logits(torch.tensor([[0.0, -1e9]]))) == pytest.approx(0.0, abs=1e-6)
