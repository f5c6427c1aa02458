"""Gumbel noise on the log slot probabilities: the SofT-GRPO method (the reference's rollout and learner).

    g_k = clamp(Gumbel(0, 1), -1.5, 3)       (clamp optional: ``rollout.noise_clamp``)
    y_k = log(q_k + 1e-6) + lambda g_k        stored
    w   = softmax(y / tau_g)                  the next input is sum_k w_k E[i_k]; the emitted token is argmax_k y_k
"""

from __future__ import annotations

import torch

from soft_rl import rng
from soft_rl.noise_kinds.base import (
    CLAMP_KINK_TOL,
    EPS_LOG,
    OFFICIAL_GUMBEL_MASK,
    DrawContext,
    NoiseKind,
    gumbel_logpdf,
    masked_mean,
    register_noise,
    softmax_weights,
)


def draw(ctx: DrawContext) -> torch.Tensor:
    g = rng.gumbel(ctx.seed, ctx.step, ctx.width).clamp(ctx.clamp_lo, ctx.clamp_hi)
    return ctx.ell + ctx.scale * g


def official(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """The reference code's learner: with mu_k = log(p-hat_k + 1e-6), g'_k = clamp(y_k - mu_k, -1.5, 3),
        L = mean_{k: mu_k > -3} [ -g'_k - exp(-g'_k) ]   (ignores lambda and tau_g: exact only for lambda = 1)."""
    mu = torch.log(p_hat + EPS_LOG)
    g = noisy - mu
    if clamp is not None:
        # A slot whose rollout noise was clamped sits exactly on a bound at theta_old, where the
        # clamp has a kink; float rounding would pick its side at random (and differ between
        # two forward implementations). Convention: within CLAMP_KINK_TOL of a bound the slot
        # is censored (value at the bound, no gradient), the one-sided derivative that
        # treats the clamped sample as carrying no information about theta.
        lo, hi = clamp
        at_bound = ((g - lo).abs() < CLAMP_KINK_TOL) | ((g - hi).abs() < CLAMP_KINK_TOL)
        g = torch.minimum(torch.maximum(g, lo), hi)
        g = torch.where(at_bound, g.detach(), g)
    return masked_mean(gumbel_logpdf(g), (mu > OFFICIAL_GUMBEL_MASK) & valid)


def exact(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """y_k ~ Gumbel(loc = mu_k, scale = lambda) independently: L = sum_k [ -z_k - exp(-z_k) - log lambda ],
    z_k = (y_k - mu_k) / lambda (exact for unclamped noise; the rollout's clamp puts atoms at the bounds)."""
    zz = (noisy - torch.log(p_hat + EPS_LOG)) / scale
    return ((gumbel_logpdf(zz) - torch.log(scale)) * valid).sum(-1)


def gumbel_max(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """Rao-Blackwellised: the log-probability of the emitted slot i = argmax_k y_k under p-hat, L = log p-hat_i.

    Why: the argmax of y_k = mu_k + g_k with g_k iid Gumbel is a draw of Categorical(p-hat) (the Gumbel-max
    trick), and the mixture weights softmax(y / tau_g) are one-hot at i as tau_g -> 0. Writing the exact density
    as f(y) = p-hat_i f(y | i), the exact score splits into grad log p-hat_i + grad log f(y | i), whose second
    term has conditional mean 0 given i; this mode keeps the first, E[exact score | i], so its variance is the
    discrete token score's (no per-slot term of variance 1 whatever p-hat is), at the same lean-head cost.

    Bias, for the gradient of E[R] with R a function of the whole y (the mixture the model was fed):
        E[R grad log f(y)] - E[R grad log p-hat_i] = E[R grad log f(y | i)] = E_i[ Cov(R, grad log f(y | i) | i) ],
    zero when R depends on y only through i (tau_g -> 0), and otherwise as large as R varies with the
    runner-up weights at a fixed emitted slot (tau_g > 0: real mixtures). The rollout's clamp of g to
    [-1.5, 3] adds a second term: the clamped argmax is not distributed as p-hat exactly (two slots clamped at
    the upper bound tie, and the lower bound lifts improbable slots), so E[grad log p-hat_i] != 0 under it, by
    at most the probability that the clamp changes the argmax. Both are measured in bench/estimator_bandit.py.
    Scored with the same stored values by rollout and learner, so the PPO ratio is exactly 1 before an update;
    lambda and the clamp do not enter."""
    emitted = noisy.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    return logp_hat.gather(-1, emitted).squeeze(-1)


GUMBEL = register_noise(NoiseKind("gumbel", draw, softmax_weights,
                                  {"official": official, "exact": exact, "gumbel-max": gumbel_max}, __doc__))
