"""Multiplex Thinking (arXiv 2601.08808): K tokens drawn independently, with replacement, from the thinking-phase
distribution; the next input merges their embeddings (docs/design/multiplex-reference.md has the official code).

    i_1..i_K ~ q  i.i.d.                 q: the distribution after temperature, top-k, top-p, min-p (the kept set)
    y_j = log q(i_j)                     stored; a token drawn twice fills two slots
    w   = softmax(y) = q(i_j) / sum_l q(i_l)        the next input is sum_j w_j E[i_j]  (tau_g does not enter)
    emitted token = i_1 (draw 0): the slots stay in drawn order

The official weights are p(i_j) / sum_l p(i_l) with p the untruncated softmax; on the kept set q = p / S, and S
cancels, so they are the same. ``multiplex_uniform``: w_j = 1 / K (the official ``enable_unweighting``), y_j = 0.

Each draw is an exponential race over the candidates (argmax_c q_c / E_jc, an exact categorical draw), one
counter-based stream per draw, so a draw does not depend on K or on the batch.
"""

from __future__ import annotations

import torch

from soft_rl import rng
from soft_rl.noise_kinds.base import DrawContext, NoiseKind, register_noise, softmax_weights

STREAM_MULTIPLEX = 64  # + draw index j: one stream per draw


def draw_slots(p_cand: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, K: int) -> torch.Tensor:
    C = p_cand.shape[-1]
    draws = [(p_cand / rng.exponential(seed, step, C, STREAM_MULTIPLEX + j)).argmax(-1) for j in range(K)]
    return torch.stack(draws, -1)


def draw_prob(ctx: DrawContext) -> torch.Tensor:
    # q > 0 at every drawn slot (the draws come from the kept set); the floor keeps padding slots finite
    return torch.log(ctx.q.clamp_min(1e-30))


def draw_uniform(ctx: DrawContext) -> torch.Tensor:
    return torch.zeros_like(ctx.q)


def weights(noisy: torch.Tensor, tau, valid: torch.Tensor) -> torch.Tensor:
    """w = softmax(y) over the valid slots (q renormalised over the draws, duplicates counted; uniform for y = 0):
    tau_g does not enter."""
    return softmax_weights(noisy, 1.0, valid)


def exact(logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """The joint log-probability of the K ordered draws, L = sum_j log p(i_j), with p the full-vocabulary softmax at
    the step's temperature (``logp_hat`` holds log p(i_j) here: the kind scores through the full vocabulary). The
    draws come from the truncated q = p / S on the kept set; log S is a sum over that set, which the official learner
    leaves out (it scores log p without the truncation, as answer tokens are scored), and so does this one.
    One PPO ratio per step (the joint ratio); the per-draw ratios of the official loss are not implemented."""
    return torch.where(valid, logp_hat, torch.zeros_like(logp_hat)).sum(-1)


_SCORES = {"exact": exact}
MULTIPLEX = register_noise(NoiseKind("multiplex", draw_prob, weights, _SCORES, __doc__, draw_slots=draw_slots,
                                     sorts_slots=False, samples_kept_set=True, scores_full_vocab=True))
MULTIPLEX_UNIFORM = register_noise(NoiseKind("multiplex_uniform", draw_uniform, weights, _SCORES, __doc__,
                                             draw_slots=draw_slots, sorts_slots=False, samples_kept_set=True,
                                             scores_full_vocab=True))
# rollout.multiplex_weights -> the registered kind the sampler runs for rollout.noise=multiplex
MULTIPLEX_WEIGHTS = {"prob": MULTIPLEX.name, "uniform": MULTIPLEX_UNIFORM.name}


def weighted_kind(noise: str, multiplex_weights: str) -> str:
    """The kind a request runs: ``noise``, or for ``multiplex`` the variant its merge weights select."""
    return MULTIPLEX_WEIGHTS[multiplex_weights] if noise == MULTIPLEX.name else noise
