"""soft_logprob against independent computations: torch.distributions, a literal per-slot re-statement of
the reference learner formula, numerical integration and finite differences."""

import math

import pytest
import torch

from soft_rl.losses import soft_logprob, soft_weights


def literal_official_gumbel(logits_k, y):
    """verl's logprobs_from_logits_topk_gumbel as the spec describes it, one row at a time in Python."""
    p = torch.softmax(logits_k.double(), -1)
    vals = []
    for k in range(len(y)):
        lp = math.log(p[k].item() + 1e-6)
        if lp > -3:
            g = min(max(y[k].item() - lp, -1.5), 3.0)
            vals.append(-g - math.exp(-g))
    return sum(vals) / len(vals)


def test_official_gumbel_matches_reference_formula():
    torch.manual_seed(0)
    B, K = 64, 5
    z = torch.randn(B, K) * 2
    y = torch.log(torch.softmax(torch.randn(B, K), -1) + 1e-6) + torch.randn(B, K)
    ours = soft_logprob(z, y, "official")
    for b in range(B):
        assert abs(ours[b].item() - literal_official_gumbel(z[b], y[b])) < 1e-5


def test_exact_gumbel_matches_torch_distributions():
    torch.manual_seed(1)
    B, K = 32, 6
    z = torch.randn(B, K, dtype=torch.float64)
    y = torch.randn(B, K, dtype=torch.float64)
    for lam in (1.0, 0.5, 2.0):
        ours = soft_logprob(z, y, "exact", lam)
        loc = torch.log(torch.softmax(z, -1) + 1e-6)
        ref = torch.distributions.Gumbel(loc, torch.full_like(loc, lam)).log_prob(y).sum(-1)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_exact_gumbel_integrates_to_one_k2():
    z = torch.tensor([0.3, -0.9], dtype=torch.float64)
    for lam in (1.0, 0.7):
        h = 0.02
        grid = torch.arange(-12.0, 45.0, h, dtype=torch.float64)
        y1, y2 = torch.meshgrid(grid, grid, indexing="ij")
        y = torch.stack([y1.flatten(), y2.flatten()], -1)
        dens = torch.exp(soft_logprob(z.expand(y.shape[0], 2), y, "exact", lam))
        total = dens.sum().item() * h * h
        assert abs(total - 1.0) < 2e-3, total


def test_padding_slots_are_ignored():
    torch.manual_seed(2)
    z, y = torch.randn(4, 6), torch.randn(4, 6)
    valid = torch.tensor([[True] * 3 + [False] * 3] * 4)
    for mode in ("official", "exact"):
        padded = soft_logprob(z, y, mode, valid=valid)
        trimmed = soft_logprob(z[:, :3], y[:, :3], mode)
        torch.testing.assert_close(padded, trimmed)


def test_dirichlet_and_gaussian_densities():
    torch.manual_seed(3)
    B, K = 16, 4
    z = torch.randn(B, K, dtype=torch.float64)
    p = torch.softmax(z, -1)
    x = torch.distributions.Gamma(p * 2.0, torch.ones_like(p)).sample().clamp_min(1e-8)
    exact = soft_logprob(z, x, "exact", noise="dirichlet", dirichlet_alpha=2.0)
    ref = torch.distributions.Gamma(2.0 * p, torch.ones_like(p)).log_prob(x).sum(-1)
    torch.testing.assert_close(exact, ref)
    # official: masked mean over p > 0.05 of the clamped log pdf
    off = soft_logprob(z, x, "official", noise="dirichlet")
    for b in range(B):
        vals = [min(max(torch.distributions.Gamma(p[b, k], 1.0).log_prob(x[b, k]).item(), -5), 3)
                for k in range(K) if p[b, k] > 0.05]
        assert abs(off[b].item() - sum(vals) / len(vals)) < 1e-8
    xg = p + 0.05 * torch.randn(B, K, dtype=torch.float64)
    exact = soft_logprob(z, xg, "exact", 1.5, noise="gaussian")
    torch.testing.assert_close(exact, torch.distributions.Normal(p, 0.075).log_prob(xg).sum(-1))
    off = soft_logprob(z, xg, "official", noise="gaussian")
    for b in range(B):
        vals = [torch.distributions.Normal(p[b, k], 0.05).log_prob(
            xg[b, k].clamp(p[b, k] - 0.15, p[b, k] + 0.15)).item() for k in range(K) if p[b, k] > 0.05]
        assert abs(off[b].item() - sum(vals) / len(vals)) < 1e-8


@pytest.mark.parametrize("noise,mode", [("gumbel", "official"), ("gumbel", "exact"), ("dirichlet", "exact"),
                                        ("dirichlet", "official"), ("gaussian", "exact"), ("gaussian", "official")])
def test_gradients_match_finite_differences(noise, mode):
    torch.manual_seed(4)
    B, K = 3, 4
    z = (torch.randn(B, K, dtype=torch.float64) * 0.5).requires_grad_()
    p = torch.softmax(z.detach(), -1)
    if noise == "gumbel":
        y = torch.log(p + 1e-6) + 0.3 * torch.randn(B, K, dtype=torch.float64)  # well inside the clamp
    elif noise == "dirichlet":
        y = p * (1 + 0.2 * torch.rand(B, K, dtype=torch.float64))
    else:
        y = p + 0.03 * torch.randn(B, K, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda zz: soft_logprob(zz, y, mode, noise=noise), (z,), eps=1e-6, atol=1e-6)


def test_no_noise_has_no_density():
    with pytest.raises(ValueError, match="none"):
        soft_logprob(torch.zeros(1, 2), torch.zeros(1, 2), "official", noise="none")
    with pytest.raises(ValueError, match="density mode"):
        soft_logprob(torch.zeros(1, 2), torch.zeros(1, 2), "joint")


def test_weights_are_rebuilt_like_the_rollout():
    y = torch.tensor([[0.2, -0.5, -3.0]])
    torch.testing.assert_close(soft_weights(y, "gumbel", 0.1), torch.softmax(y / 0.1, -1))
    x = torch.tensor([[0.5, 0.3, 0.2]])
    # x / sum(x), not the reference learner's softmax(x / 1)
    torch.testing.assert_close(soft_weights(x, "dirichlet", 1.0), x / x.sum())
    assert not torch.allclose(soft_weights(x, "dirichlet", 1.0), torch.softmax(x, -1))


def test_official_clamped_slot_on_the_bound_is_censored():
    """At theta_old a slot whose noise was clamped sits on the bound: value as clamped, no gradient."""
    z = torch.tensor([[0.5, 0.0, -0.5]], requires_grad=True)
    mu = torch.log(torch.softmax(z.detach(), -1) + 1e-6)
    g = torch.tensor([[3.0, 0.2, -1.5]])  # slots 0 and 2 clamped in the rollout
    y = mu + g
    lp = soft_logprob(z, y, "official")
    expected = sum(-v - math.exp(-v) for v in (3.0, 0.2, -1.5)) / 3
    assert lp.item() == pytest.approx(expected, abs=1e-6)
    lp.backward()
    # only slot 1 carries gradient: d/dz of phi(y1 - mu1(z)) / 3
    p = torch.softmax(z.detach(), -1)[0]
    dphi = -1 + math.exp(-0.2)  # phi'(g)
    dmu1 = torch.tensor([-p[0], 1 - p[1], -p[2]]) * (p[1] / (p[1] + 1e-6))
    torch.testing.assert_close(z.grad[0], -dphi * dmu1 / 3, atol=1e-5, rtol=1e-4)


def official_learner_topk_gumbel(logits, topk_ids, gumbels):
    """verl's ``logprobs_from_logits_topk_gumbel`` (docs/design/softgrpo-reference.md §2.2), transcribed literally:
    full softmax, the K stored ids' probabilities renormalised over all K slots, mu = log(p-hat + 1e-6),
    g' = clamp(y - mu, -1.5, 3), masked mean of phi(g') over {mu > -3}."""
    probs = torch.softmax(logits, dim=-1)
    p_k = torch.gather(probs, -1, topk_ids)
    p_hat = p_k / p_k.sum(-1, keepdim=True)
    mu = torch.log(p_hat + 1e-6)
    g = torch.clamp(gumbels - mu, -1.5, 3.0)
    mask = (mu > -3.0).to(logits.dtype)
    return ((-g - torch.exp(-g)) * mask).sum(-1) / mask.sum(-1)


def test_official_density_on_truncated_rows_equals_the_official_learner():
    """Rows whose top-p emptied slots: soft-rl stores the next most likely tokens there, the official
    rollout arbitrary near-zero-mass ids. Scoring only the kept slots gives the official value and
    gradient w.r.t. the full logits (at the old weights, and after a small update)."""
    from soft_rl.densities import density_slots
    from soft_rl.rng import NoiseCounters
    from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample

    torch.manual_seed(11)
    B, V, K = 400, 64, 5
    logits = torch.randn(B, V, dtype=torch.float64) * 2.5
    logits[: B // 2, :] *= 2.0  # confident rows: top-p keeps one or two slots
    logits[:, -8:] = -40.0  # tokens of negligible mass, the official rollout's "arbitrary" fillers
    params = [SoftSamplingParams(seed=b, top_k=5, top_p=0.95, k=K) for b in range(B)]
    batch = SamplingBatch.from_params(params)
    out = soft_sample(logits.float(), batch, NoiseCounters(batch.seed, torch.full((B,), 3)))
    emptied = ~out.kept
    assert emptied.any(-1).float().mean() > 0.5  # most rows have an emptied slot
    filler = torch.randint(V - 8, V, (B, K))
    official_ids = torch.where(emptied, filler, out.ids)
    y = out.noisy.double()
    valid = torch.ones(B, K, dtype=torch.bool)

    def ours(z):
        return soft_logprob(z.gather(1, out.ids), y, "official", valid=density_slots(valid, out.kept, "official"))

    # values at the rollout's weights (every slot's noise recovered, clamped slots on their bound)
    torch.testing.assert_close(ours(logits), official_learner_topk_gumbel(logits, official_ids, y), atol=1e-4,
                               rtol=0)
    # value and gradient after an update: no slot sits on a clamp bound any more
    z = (logits + 0.05 * torch.randn(B, V, dtype=torch.float64)).requires_grad_()
    mine = ours(z)
    (g_mine,) = torch.autograd.grad(mine.sum(), z)
    theirs = official_learner_topk_gumbel(z, official_ids, y)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), z)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    scale = g_theirs.abs().amax(-1, keepdim=True)
    err = (g_mine - g_theirs).abs() / (scale + 1e-6)  # 1e-6: rows whose official gradient is the fillers' ~1e-13
    assert float(err.max()) < 1e-3, float(err.max())
    # the former normaliser over all K slots (fillers holding real mass) is visibly off on these rows
    all_k = soft_logprob(z.detach().gather(1, out.ids), y, "official", valid=valid)
    assert float((all_k - theirs.detach()).abs().max()) > 1e-2


def test_gaussian_density_uses_the_scale_its_noise_was_drawn_with():
    """x ~ N(p-hat, (0.05 lambda)^2): both modes score with that std (official: clamp at +- 3 std)."""
    torch.manual_seed(5)
    B, K, lam = 32, 4, 2.0
    z = torch.randn(B, K, dtype=torch.float64)
    p = torch.softmax(z, -1)
    x = p + 0.05 * lam * torch.randn(B, K, dtype=torch.float64)
    exact = soft_logprob(z, x, "exact", lam, noise="gaussian")
    torch.testing.assert_close(exact, torch.distributions.Normal(p, 0.05 * lam).log_prob(x).sum(-1))
    off = soft_logprob(z, x, "official", lam, noise="gaussian")
    for b in range(B):
        vals = [torch.distributions.Normal(p[b, k], 0.1).log_prob(x[b, k].clamp(p[b, k] - 0.3, p[b, k] + 0.3)).item()
                for k in range(K) if p[b, k] > 0.05]
        assert abs(off[b].item() - sum(vals) / len(vals)) < 1e-8
    # the scale matters: at lambda = 1 the same values score differently
    assert not torch.allclose(off, soft_logprob(z, x, "official", 1.0, noise="gaussian"))


def test_zero_noise_scale_is_rejected_with_the_alternative():
    from soft_rl.sampling import SoftSamplingParams

    with pytest.raises(ValueError, match="noise_scale.*noise='none'"):
        SoftSamplingParams(noise_scale=0.0)
    SoftSamplingParams(noise="none", noise_scale=1.0)  # noise-free soft thinking is still available


def test_rows_with_different_noise_settings_are_each_scored_with_their_own():
    """RowNoise: a batch mixing kinds, lambdas, clamps and alphas equals scoring each row on its own."""
    from soft_rl.densities import RowNoise, soft_logprob_rows

    torch.manual_seed(6)
    settings = [("gumbel", 1.0, (-1.5, 3.0), 1.0), ("gumbel", 0.5, None, 1.0), ("gaussian", 1.5, (-1.5, 3.0), 1.0),
                ("dirichlet", 1.0, None, 2.0)]
    counts = [3, 2, 4, 3]
    K = 4
    z = (torch.randn(sum(counts), K, dtype=torch.float64)).requires_grad_()
    p = torch.softmax(z.detach(), -1)
    start, parts = 0, []
    for (kind, lam, _, _), n in zip(settings, counts, strict=True):
        q = p[start: start + n]
        parts.append(torch.log(q + 1e-6) + lam * 0.4 * torch.randn(n, K, dtype=torch.float64) if kind == "gumbel"
                     else q + 0.03 * torch.randn(n, K, dtype=torch.float64) if kind == "gaussian"
                     else q * (1 + 0.2 * torch.rand(n, K, dtype=torch.float64)))
        start += n
    y = torch.cat(parts)
    valid = torch.ones_like(y, dtype=torch.bool)
    rows = RowNoise.from_settings(settings, counts, counts)
    assert rows.kinds == ("dirichlet", "gaussian", "gumbel")
    for mode in ("official", "exact"):
        got = soft_logprob_rows(z, y, mode, rows, valid)
        (grad,) = torch.autograd.grad(got.sum(), z)
        start, want = 0, []
        for (kind, lam, clamp, alpha), n in zip(settings, counts, strict=True):
            want.append(soft_logprob(z[start: start + n], y[start: start + n], mode, lam, noise=kind, clamp=clamp,
                                     dirichlet_alpha=alpha))
            start += n
        want = torch.cat(want)
        (want_grad,) = torch.autograd.grad(want.sum(), z)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=0)
        assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="noise='none'"):
        soft_logprob_rows(z, y, "official", RowNoise.from_settings([("none", 1.0, None, 1.0)], [12], [12]), valid)


def test_gumbel_max_scores_the_emitted_slot_under_p_hat():
    """gumbel-max = log p-hat_i at i = argmax_k y_k over the valid slots, p-hat the softmax of the valid logits
    (a per-row Python loop); its gradient in the logits is onehot(i) - p-hat (closed form). Rows mix widths, and
    an invalid slot holds the largest stored value (it must not be picked)."""
    torch.manual_seed(2)
    B, K = 48, 5
    z = (torch.randn(B, K, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randn(B, K, dtype=torch.float64) * 3
    valid = torch.arange(K)[None, :] < torch.randint(1, K + 1, (B, 1))
    y = torch.where(valid, y, torch.full_like(y, 50.0))
    lp = soft_logprob(z, y, "gumbel-max", valid=valid)
    lp.sum().backward()
    for b in range(B):
        n = int(valid[b].sum())
        i = max(range(n), key=lambda k: y[b, k].item())
        zb = z[b, :n].detach()
        expect = zb[i].item() - math.log(sum(math.exp(v) for v in zb.tolist()))
        assert lp[b].item() == pytest.approx(expect, abs=1e-12)
        grad = -torch.softmax(zb, -1)
        grad[i] += 1.0
        torch.testing.assert_close(z.grad[b, :n], grad, rtol=0, atol=1e-12)
        assert (z.grad[b, n:] == 0).all()


def test_gumbel_max_ignores_lambda_and_clamp_and_refuses_other_noise():
    torch.manual_seed(3)
    z, y = torch.randn(16, 4), torch.randn(16, 4)
    base = soft_logprob(z, y, "gumbel-max")
    torch.testing.assert_close(soft_logprob(z, y, "gumbel-max", 0.3, clamp=None), base, rtol=0, atol=0)
    for noise in ("dirichlet", "gaussian"):
        with pytest.raises(ValueError, match="gumbel-max.*gumbel noise only"):
            soft_logprob(z, y.abs(), "gumbel-max", noise=noise)
    with pytest.raises(ValueError, match="official.*exact.*gumbel-max"):
        soft_logprob(z, y, "rao-blackwell")
