"""Gaussian noise on the slot probabilities (the paper's ablation).

    x_k = q_k + s eps_k,  eps_k ~ N(0, 1),  s = 0.05 lambda      stored
    w   = x / sum_k x_k                                           tau_g does not enter
"""

from __future__ import annotations

import torch

from soft_rl import rng
from soft_rl.noise_kinds.base import (
    OFFICIAL_PROB_MASK,
    DrawContext,
    NoiseKind,
    masked_mean,
    normal_logpdf,
    ratio_weights,
    register_noise,
)

GAUSSIAN_STD = 0.05
GAUSSIAN_VALUE_CLAMP = 0.15


def draw(ctx: DrawContext) -> torch.Tensor:
    eps = rng.normal(ctx.seed, ctx.step, ctx.width, (rng.STREAM_NORMAL_A, rng.STREAM_NORMAL_B))
    return ctx.q + GAUSSIAN_STD * ctx.scale * eps


def official(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """mean_{k: p-hat_k > 0.05} log N(clamp(x_k, p-hat_k +- 3 s); p-hat_k, s), s = 0.05 lambda (the official
    learner fixes s = 0.05 whatever lambda: the same at lambda = 1, which its scripts use)."""
    bound = GAUSSIAN_VALUE_CLAMP * scale  # three standard deviations
    x = torch.minimum(torch.maximum(noisy, p_hat - bound), p_hat + bound)
    return masked_mean(normal_logpdf(x, p_hat, GAUSSIAN_STD * scale), valid & (p_hat > OFFICIAL_PROB_MASK))


def exact(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """x_k ~ N(p-hat_k, s^2) independently, s = 0.05 lambda, summed."""
    return (normal_logpdf(noisy, p_hat, GAUSSIAN_STD * scale) * valid).sum(-1)


GAUSSIAN = register_noise(NoiseKind("gaussian", draw, ratio_weights, {"official": official, "exact": exact},
                                    __doc__))
