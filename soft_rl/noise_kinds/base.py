"""The interface of a soft-step noise kind, the registry, and the math the kinds share.

A noise kind is one way of turning a soft step's K slot probabilities q into stored values (the noisy numbers the
learner scores) and the mixture weights of the next input. A kind is a small module that builds one ``NoiseKind``
and registers it; nothing else in the sampler, the densities, the engine state or the learner branches on its name:

- ``draw(ctx)``: the stored values [B, K] of every row, from the slot probabilities and the rows' counter-based
  random streams (a pure function of each row's seed and step, so a trajectory does not depend on its batch);
- ``weights(noisy, tau, valid)``: the mixture weights [B, K] rebuilt from the stored values, exactly as the rollout
  formed them (the learner rebuilds the soft inputs with it);
- ``scores``: one log-density per density mode it supports (``soft_rl.densities.DENSITIES``), each
  ``score(logp_hat, p_hat, noisy, valid, scale, clamp, alpha) -> [...]`` on float64 tensors broadcast against
  [..., K] (``logp_hat``/``p_hat``: the softmax over the kept slots at the current weights; ``scale``: lambda;
  ``clamp``: the noise's (low, high) bounds or None; ``alpha``: the Dirichlet concentration scale). A kind with no
  score (``none``) can be sampled but not trained.

Adding a kind: its module in this package (imported in ``__init__``), its name in the config's docs (README's table
of noise kinds); the config's allowed values and every code path pick it up from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

EPS_LOG = 1e-6  # the reference's floor inside log(p + 1e-6)
GUMBEL_CLAMP = (-1.5, 3.0)  # the reference's clamp of the standard Gumbel noise
CLAMP_KINK_TOL = 1e-4
OFFICIAL_GUMBEL_MASK = -3.0  # slots with log(p-hat + 1e-6) > -3 enter the masked mean
OFFICIAL_PROB_MASK = 0.05  # Dirichlet/Gaussian: slots with p-hat > 0.05 enter the masked mean

ScoreFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DrawContext:
    """What a kind may draw its stored values from, for B rows of K slots.

    ``q``: the slot probabilities (renormalised over the kept slots, 0 elsewhere); ``ell`` = log(q + 1e-6);
    ``valid``: the request's slots (k of K); ``scale``, ``clamp_lo``/``clamp_hi``, ``alpha``: per-row columns [B, 1]
    (lambda, the noise clamp, the Dirichlet concentration scale); ``seed``/``step``: the rows' random counters
    (``soft_rl.rng``)."""

    q: torch.Tensor
    ell: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor
    clamp_lo: torch.Tensor
    clamp_hi: torch.Tensor
    alpha: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor

    @property
    def width(self) -> int:
        return self.q.shape[-1]


SlotDraw = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class NoiseKind:
    """``draw_slots(p_cand, seed, step, K)``, when set, picks each row's K slots among its C candidates (positions
    [B, K] into the candidates sorted by probability, ``p_cand`` [B, C] their kept probabilities, 0 where the
    truncation dropped them); unset, the slots are the K most likely candidates. ``sorts_slots``: the sampler orders
    the slots by weight and emits the slot with the largest stored value (the SofT-GRPO rollout); otherwise the slots
    stay in drawn order and slot 0 is emitted. ``samples_kept_set``: the slots are drawn from the whole kept set, so
    a step needs every candidate the truncation keeps (as a discrete step does), not only the top K.
    ``scores_full_vocab``: its scores read the slots' full-vocabulary log-probabilities log softmax(z / T)[i_k] (passed
    as ``logp_hat``, with ``p_hat`` their exponentials), not p-hat over the K slots: the learner scores such a step
    through the chunked full-vocabulary head, as a discrete token. ``noises_input``: the kind's noise is added to the
    next input (sigma eps over the hidden size, ``embedding_gaussian``), not to the stored values: the engine and the
    references add it where they mix the input, and its scores take the observed input (``embedding=``)."""

    name: str
    draw: Callable[[DrawContext], torch.Tensor]
    weights: Callable[[torch.Tensor, torch.Tensor | float, torch.Tensor], torch.Tensor]
    scores: Mapping[str, ScoreFn] = field(default_factory=dict)
    doc: str = ""
    draw_slots: SlotDraw | None = None
    sorts_slots: bool = True
    samples_kept_set: bool = False
    scores_full_vocab: bool = False
    noises_input: bool = False

    @property
    def trainable(self) -> bool:
        return bool(self.scores)


NOISES: dict[str, NoiseKind] = {}


def register_noise(kind: NoiseKind) -> NoiseKind:
    if kind.name in NOISES:
        raise ValueError(f"noise kind {kind.name!r} is already registered")
    NOISES[kind.name] = kind
    return kind


def noise_kind(name: str) -> NoiseKind:
    """The registered noise kind ``name``, or a ValueError naming the kinds there are."""
    if name not in NOISES:
        raise ValueError(f"noise must be one of {tuple(NOISES)}, got {name!r}")
    return NOISES[name]


# ------------------------------------------------------------------------------------------- shared math
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def gumbel_logpdf(x: torch.Tensor) -> torch.Tensor:
    """phi(g) = -g - exp(-g), the log-density of a standard Gumbel(0, 1)."""
    return -x - torch.exp(-x)


def gamma_logpdf(x: torch.Tensor, conc: torch.Tensor) -> torch.Tensor:
    """log Gamma(x; a, 1) = (a - 1) log x - x - lgamma(a)."""
    return (conc - 1.0) * torch.log(x) - x - torch.lgamma(conc)


def normal_logpdf(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2). A Python-float ``std`` stays a scalar operand: making it a device tensor
    would be a host-to-device copy, which blocks CUDA-graph capture (audit item 11)."""
    log_std = math.log(std) if isinstance(std, (int, float)) else torch.log(std)
    return -0.5 * ((x - mean) / std) ** 2 - log_std - 0.5 * math.log(2.0 * math.pi)


def softmax_weights(noisy: torch.Tensor, tau: torch.Tensor | float, valid: torch.Tensor) -> torch.Tensor:
    """w = softmax(y / tau_g) over the valid slots (tau a float or a per-row tensor [...])."""
    tau = torch.as_tensor(tau, dtype=torch.float32, device=noisy.device)
    if tau.dim() > 0:
        tau = tau.unsqueeze(-1)
    return torch.softmax((noisy.float() / tau).masked_fill(~valid, float("-inf")), dim=-1)


def ratio_weights(noisy: torch.Tensor, tau: torch.Tensor | float, valid: torch.Tensor) -> torch.Tensor:
    """w = x / sum(x) over the valid slots (the noisy probabilities are the weights; tau_g does not enter)."""
    x = noisy.float().masked_fill(~valid, 0.0)
    return x / x.sum(-1, keepdim=True)
