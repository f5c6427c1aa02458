"""Gaussian soft tokens ("Soft Tokens, Hard Truths", arXiv 2509.19170): the noise is on the input embedding, not on
the logits.

    q   = the K slot probabilities (temperature, top-k, top-p, min-p, renormalised over the kept slots)
    y_k = log q_k                                   stored (a function of the logits: nothing random here)
    w   = softmax(y / tau)                          the mixture weights; tau 0.5 "soft", tau -> 0 "fuzzy"
    h   = sum_k w_k E[i_k] + sigma eps,  eps ~ N(0, I_H)        the next input, H = the hidden size
    sigma = rollout.embedding_noise x RMS(E),  RMS(E) = sqrt(mean_{v,j} E_vj^2)     per coordinate
    emitted token = the most likely slot (argmax y)

The step's density under the policy theta is a Gaussian around the policy's own mixture:

    log pi_theta(h) = log N(h; mu_theta, sigma^2 I),   mu_theta = sum_k softmax(log p-hat_theta / tau)_k E_theta[i_k]
                    = -||h - mu_theta||^2 / (2 sigma^2) - H log sigma - (H / 2) log(2 pi)

with p-hat_theta the softmax over the K stored ids (``soft_rl.densities``). At the rollout's own weights mu = the
mixture, so h - mu = sigma eps and the step's log-density is -||eps||^2 / 2 - H log sigma - (H / 2) log 2 pi
(``rollout_logprob``). eps is regenerated from the request's counters (``input_noise``), so nothing of size H is
stored; sigma is a sampling parameter of the request (``SoftSamplingParams.embedding_sigma``), computed from the
policy's embedding at the weight version that generates it (``embedding_rms``) and stored with the trajectory.

Against the paper: it mixes the whole distribution; here the mixture is over the K kept slots (top-K at the rollout
temperature, then top-p / min-p), the same truncation every soft kind uses. With K and top-k covering the
vocabulary the two agree; otherwise the mean and the density are those of the truncated mixture. "RMS norm of the
embeddings" is read per coordinate (the noise vector's expected norm is then ``embedding_noise`` x the embedding
rows' RMS norm); per row it would be sqrt(H) times larger than the embeddings themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soft_rl import rng
from soft_rl.noise_kinds.base import DrawContext, NoiseKind, register_noise, softmax_weights

STREAM_EMBED = (128, 129)  # the Box-Muller pair of the input noise eps (H coordinates per step)
EMBEDDING_NOISE = 0.33  # the paper's sigma / RMS(E)


def draw(ctx: DrawContext) -> torch.Tensor:
    # q > 0 on the kept slots; the floor keeps an emptied slot finite (its weight underflows to 0)
    return torch.log(ctx.q.clamp_min(1e-30))


def input_noise(seed: torch.Tensor, step: torch.Tensor, hidden: int) -> torch.Tensor:
    """eps [N, H] float32 ~ N(0, I) of the input after generated step ``step`` of the requests with ``seed``."""
    return rng.normal(seed, step, hidden, STREAM_EMBED)


def embedding_rms(weight: torch.Tensor) -> float:
    """RMS(E) = sqrt(mean_{v,j} E_vj^2), accumulated in float64 so that every holder of the same weights (learner,
    engine, HF reference) gets the same float, whatever its reduction order."""
    return float(weight.detach().double().square().mean().sqrt())


def embedding_sigma(weight: torch.Tensor, embedding_noise: float = EMBEDDING_NOISE) -> float:
    """sigma = embedding_noise x RMS(E): the per-coordinate standard deviation of the input noise."""
    return sigma_from_rms(embedding_rms(weight), embedding_noise)


def sigma_from_rms(rms: float, embedding_noise: float = EMBEDDING_NOISE) -> float:
    """embedding_noise x rms rounded to a float32 value (the engine holds sigma as a float32 parameter column; the
    learner reads the same number from the trajectory)."""
    return float(torch.tensor(float(embedding_noise) * float(rms), dtype=torch.float32))


def centred_logpdf(sq_dist: torch.Tensor, sigma: torch.Tensor, hidden: int) -> torch.Tensor:
    """log N(h; mu, sigma^2 I_H) from ||h - mu||^2: -||h - mu||^2 / (2 sigma^2) - H log sigma - (H / 2) log 2 pi."""
    sigma = sigma.double()
    return -0.5 * sq_dist.double() / sigma**2 - hidden * torch.log(sigma) - 0.5 * hidden * math.log(2.0 * math.pi)


def rollout_logprob(seed: torch.Tensor, step: torch.Tensor, sigma: torch.Tensor, hidden: int) -> torch.Tensor:
    """[N] float64: the step's log-density at the weights that drew it, h - mu = sigma eps."""
    eps = input_noise(seed, step, hidden)
    return centred_logpdf(sigma.double()[:, None].square() * eps.double().square().sum(-1, keepdim=True),
                          sigma.double()[:, None], hidden).squeeze(-1)


@dataclass
class EmbeddingObservation:
    """What the learner scores a Gaussian soft step with, N steps: ``obs`` [N, H] the input h that followed each step
    (float32, rebuilt from the stored values, the rollout-time embedding and eps), ``rows`` [N, K, H] the policy's own
    embedding rows E_theta[i_k] (differentiable), ``sigma`` [N] and ``tau`` [N] the requests' settings."""

    obs: torch.Tensor
    rows: torch.Tensor
    sigma: torch.Tensor
    tau: torch.Tensor


def mixture_mean(logp_hat: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """mu = sum_k softmax(log p-hat / tau)_k E[i_k] over the valid slots, [N, H] float32 (softmax(log q / tau) is
    the rollout's w = softmax(y / tau) with y = log q). The weights are formed in float64 (K per step), the [N, H]
    mixture in float32: h - mu is of the order of sigma, a third of the embedding's scale, so float32 keeps it to
    ~1e-7 relative, and an H-sized float64 copy of the K rows would double the memory the density needs."""
    pi = torch.softmax((logp_hat.double() / tau.double()[:, None]).masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("nk,nkh->nh", pi.float(), rows.float())


def exact(logp_hat, p_hat, noisy, valid, scale, clamp, alpha, *, embedding: EmbeddingObservation):
    """log N(h; sum_k softmax(log p-hat / tau)_k E_theta[i_k], sigma^2 I_H): the density of the input the step fed
    (the squared distance summed in float64)."""
    mu = mixture_mean(logp_hat, valid, embedding.rows, embedding.tau)
    sq = (embedding.obs.float() - mu).double().square().sum(-1)
    return centred_logpdf(sq, embedding.sigma, embedding.obs.shape[-1])


EMBEDDING_GAUSSIAN = register_noise(NoiseKind("embedding_gaussian", draw, softmax_weights, {"exact": exact}, __doc__,
                                              noises_input=True))
