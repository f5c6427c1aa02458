"""Dirichlet noise (the paper's ablation): the stored values are Gamma draws around the slot probabilities.

    x_k ~ Gamma(alpha q_k, 1) for the kept slots (0 for slots the truncation emptied)     stored
    w   = x / sum_k x_k                                                                     tau_g does not enter

(x / sum x is Dirichlet(alpha q); scoring the Gamma draws themselves has the Dirichlet's gradient, because
sum x ~ Gamma(alpha) does not depend on the policy.)
"""

from __future__ import annotations

import torch

from soft_rl import rng
from soft_rl.noise_kinds.base import (
    OFFICIAL_PROB_MASK,
    DrawContext,
    NoiseKind,
    gamma_logpdf,
    masked_mean,
    ratio_weights,
    register_noise,
)

DIRICHLET_LOGPDF_CLAMP = (-5.0, 3.0)
GAMMA_SLOT_STRIDE = 4096  # slot index of attempt a, soft slot k: a * stride + k (independent of K)


def gamma(seed, step, conc: torch.Tensor, attempts: int = 24) -> torch.Tensor:
    """Gamma(conc, 1) by Marsaglia-Tsang with a fixed number of vectorised attempts.

    For a < 1 draw Gamma(a + 1) and multiply by u^(1/a). Acceptance per attempt is > 95%, so the
    chance that all attempts fail is < 1e-30; the last candidate is used then. The draws of slot k
    do not depend on the batch width K (engines pad to their own K).
    """
    B, K = conc.shape
    boost = conc < 1
    a = torch.where(boost, conc + 1.0, conc)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    slots = (torch.arange(attempts, device=conc.device)[:, None] * GAMMA_SLOT_STRIDE
             + torch.arange(K, device=conc.device)[None, :])  # [attempts, K]
    u1 = rng.uniform_at(seed, step, slots, rng.STREAM_GAMMA)
    u2 = rng.uniform_at(seed, step, slots, rng.STREAM_GAMMA + 1)
    x = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)  # Box-Muller N(0, 1)
    u = rng.uniform_at(seed, step, slots, rng.STREAM_GAMMA + 2)
    v = (1.0 + c[:, None, :] * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d[:, None, :] - d[:, None, :] * v
                    + d[:, None, :] * torch.log(v.clamp_min(1e-30)))
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(conc, attempts - 1, dtype=torch.int64))
    sample = (d[:, None, :] * v).gather(1, first[:, None, :]).squeeze(1)
    ub = rng.uniform(seed, step, K, rng.STREAM_GAMMA + 3)
    return torch.where(boost, sample * ub ** (1.0 / conc.clamp_min(1e-30)), sample)


def draw(ctx: DrawContext) -> torch.Tensor:
    conc = (ctx.alpha * ctx.q).clamp_min(1e-30)
    return torch.where(ctx.q > 0, gamma(ctx.seed, ctx.step, conc), torch.zeros_like(ctx.q))


def official(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """mean_{k: p-hat_k > 0.05} clamp(log Gamma(x_k; alpha p-hat_k, 1), -5, 3) over the present slots (x_k > 0:
    a zero-probability slot the rollout left empty carries no information)."""
    present = valid & (noisy > 0)
    lp = gamma_logpdf(noisy.clamp_min(1e-30), (alpha * p_hat).clamp_min(1e-30)).clamp(*DIRICHLET_LOGPDF_CLAMP)
    return masked_mean(lp, present & (p_hat > OFFICIAL_PROB_MASK))


def exact(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """x_k ~ Gamma(alpha p-hat_k, 1) independently over the present slots (x_k > 0), summed."""
    present = valid & (noisy > 0)
    lp = gamma_logpdf(noisy.clamp_min(1e-30), (alpha * p_hat).clamp_min(1e-30))
    return torch.where(present, lp, torch.zeros_like(lp)).sum(-1)


DIRICHLET = register_noise(NoiseKind("dirichlet", draw, ratio_weights, {"official": official, "exact": exact},
                                     __doc__))
