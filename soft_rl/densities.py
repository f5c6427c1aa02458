"""Log-densities of a soft step and the soft-input weights, shared by rollout and learner.

A soft step stores K token ids ``i_k`` and K noisy values (``y_k`` for Gumbel, the noisy
probabilities ``x_k`` for Dirichlet/Gaussian). The policy's density of those values is written in
terms of p-hat, the softmax over the K logits gathered at the stored ids only:

    p-hat_k = exp(z_{i_k} / T) / sum_{j<=K} exp(z_{i_j} / T)

(the full-vocabulary normaliser cancels), so no full-vocabulary softmax is ever needed at a soft
position. Both the rollout (for its diagnostic log-prob) and the learner call the same functions on
the same inputs, which is what makes the PPO ratio exactly 1 before an update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

NOISE_KINDS = ("gumbel", "dirichlet", "gaussian", "none")

EPS_LOG = 1e-6  # the reference's floor inside log(p + 1e-6)
GUMBEL_CLAMP = (-1.5, 3.0)  # the reference's clamp of the standard Gumbel noise
CLAMP_KINK_TOL = 1e-4
OFFICIAL_GUMBEL_MASK = -3.0  # slots with log(p-hat + 1e-6) > -3 enter the masked mean
OFFICIAL_PROB_MASK = 0.05  # Dirichlet/Gaussian: slots with p-hat > 0.05 enter the masked mean
DIRICHLET_LOGPDF_CLAMP = (-5.0, 3.0)
GAUSSIAN_STD = 0.05
GAUSSIAN_VALUE_CLAMP = 0.15


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Densities are computed in float64: they are sums of up to K stiff terms (tens to hundreds in
    magnitude), so float32 rounding alone would move a log-ratio by ~1e-5; the tensors are only
    [..., K], so the cost is negligible next to the forward pass."""
    return x.double()


def _per_row(value, like: torch.Tensor) -> torch.Tensor:
    """A float or a per-row tensor [...] as a float32 tensor broadcastable against [..., K]."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.dim() > 0 else t


def _valid(noisy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(noisy, dtype=torch.bool) if valid is None else valid


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


# ------------------------------------------------------------------------------------------ density modes
@dataclass(frozen=True)
class DensityMode:
    """One way to score a soft step: ``score(noise, logp_hat, p_hat, noisy, valid, scale, clamp, alpha)`` -> [...].

    Every argument is float64 and broadcast against [..., K]: ``logp_hat``/``p_hat`` the softmax over the kept
    slots (-inf / 0 outside ``valid``), ``noisy`` the stored values, ``scale`` lambda, ``clamp`` the noise's
    (low, high) bounds or None, ``alpha`` the Dirichlet concentration scale. ``noises``: the noise kinds it can
    score. Adding a mode: a function here, ``register_density``, and the docs (README's density table)."""

    name: str
    noises: tuple[str, ...]
    score: Callable[..., torch.Tensor]


DENSITIES: dict[str, DensityMode] = {}


def register_density(name: str, noises: tuple[str, ...]):
    def add(fn):
        DENSITIES[name] = DensityMode(name, noises, fn)
        return fn

    return add


@register_density("official", ("gumbel", "dirichlet", "gaussian"))
def _official(noise, logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """The reference code's learner: a masked mean of clamped per-slot log-densities.

    gumbel: with mu_k = log(p-hat_k + 1e-6), g'_k = clamp(y_k - mu_k, -1.5, 3),
        L = mean_{k: mu_k > -3} [ -g'_k - exp(-g'_k) ]   (ignores lambda and tau_g: exact only for lambda = 1)
    dirichlet: mean_{k: p-hat_k > 0.05} clamp(log Gamma(x_k; alpha p-hat_k, 1), -5, 3)
    gaussian: mean_{k: p-hat_k > 0.05} log N(clamp(x_k, p-hat_k +- 3 s); p-hat_k, s), s = 0.05 lambda
        (the official learner fixes s = 0.05 whatever lambda: the same at lambda = 1, which its scripts use)."""
    if noise == "gumbel":
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
        return _masked_mean(gumbel_logpdf(g), (mu > OFFICIAL_GUMBEL_MASK) & valid)
    if noise == "dirichlet":
        present = valid & (noisy > 0)  # x_k = 0: a zero-probability slot the rollout left empty
        lp = gamma_logpdf(noisy.clamp_min(1e-30), (alpha * p_hat).clamp_min(1e-30)).clamp(*DIRICHLET_LOGPDF_CLAMP)
        return _masked_mean(lp, present & (p_hat > OFFICIAL_PROB_MASK))
    bound = GAUSSIAN_VALUE_CLAMP * scale  # three standard deviations
    x = torch.minimum(torch.maximum(noisy, p_hat - bound), p_hat + bound)
    return _masked_mean(normal_logpdf(x, p_hat, GAUSSIAN_STD * scale), valid & (p_hat > OFFICIAL_PROB_MASK))


@register_density("exact", ("gumbel", "dirichlet", "gaussian"))
def _exact(noise, logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
    """The joint density of the stored values, independent per slot, summed.

    gumbel: y_k ~ Gumbel(loc = mu_k, scale = lambda), L = sum_k [ -z_k - exp(-z_k) - log lambda ],
        z_k = (y_k - mu_k) / lambda (exact for unclamped noise; the rollout's clamp puts atoms at the bounds).
    dirichlet: x_k ~ Gamma(alpha p-hat_k, 1) over the present slots (x_k > 0).
    gaussian: x_k ~ N(p-hat_k, s^2), s = 0.05 lambda."""
    if noise == "gumbel":
        zz = (noisy - torch.log(p_hat + EPS_LOG)) / scale
        return ((gumbel_logpdf(zz) - torch.log(scale)) * valid).sum(-1)
    if noise == "dirichlet":
        present = valid & (noisy > 0)
        lp = gamma_logpdf(noisy.clamp_min(1e-30), (alpha * p_hat).clamp_min(1e-30))
        return torch.where(present, lp, torch.zeros_like(lp)).sum(-1)
    return (normal_logpdf(noisy, p_hat, GAUSSIAN_STD * scale) * valid).sum(-1)


@register_density("gumbel-max", ("gumbel",))
def _gumbel_max(noise, logp_hat, p_hat, noisy, valid, scale, clamp, alpha):
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


DENSITY_MODES = tuple(DENSITIES)


def soft_logprob(
    logits_at_ids: torch.Tensor,
    noisy: torch.Tensor,
    mode: str,
    noise_scale: float | torch.Tensor = 1.0,
    *,
    noise: str = "gumbel",
    valid: torch.Tensor | None = None,
    clamp: tuple[float | torch.Tensor, float | torch.Tensor] | None = GUMBEL_CLAMP,
    dirichlet_alpha: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Log-probability of soft steps, shape [...], from K gathered logits [..., K] and stored values, scored by
    the density ``mode`` (``DENSITIES``: official, exact, gumbel-max; each function's docstring has its formula).

    ``logits_at_ids`` must already be divided by the sampling temperature. ``valid`` masks padding
    slots (requests with fewer than K slots) and should be ``density_slots(...)``: the slots the rollout's
    truncation kept. ``noise_scale``, the clamp bounds and ``dirichlet_alpha`` may be floats or per-row
    tensors of the batch shape [...]. Dirichlet slots with x_k = 0 (zero-probability slots the rollout left
    empty) carry no information and are excluded.
    """
    density = density_mode(mode)
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if noise == "none":
        raise ValueError("noise='none' (plain soft thinking) is deterministic given the logits: it has no "
                         "density and cannot be trained with SofT-GRPO; pick gumbel, dirichlet or gaussian")
    if noise not in density.noises:
        raise ValueError(f"density {mode!r} scores {' and '.join(density.noises)} noise only, got {noise!r}")
    out_dtype = torch.float64 if logits_at_ids.dtype == torch.float64 else torch.float32
    valid = _valid(noisy, valid)
    z = _compute_dtype(logits_at_ids).masked_fill(~valid, float("-inf"))
    logp_hat = torch.log_softmax(z, dim=-1)  # softmax over the K stored ids only
    noisy = noisy.to(z.dtype)
    if clamp is not None:
        clamp = (_per_row(clamp[0], noisy), _per_row(clamp[1], noisy))
    return density.score(noise, logp_hat, torch.exp(logp_hat), noisy, valid, _per_row(noise_scale, noisy), clamp,
                         _per_row(dirichlet_alpha, noisy)).to(out_dtype)


def density_mode(mode: str) -> DensityMode:
    """The registered density ``mode``, or a ValueError naming the modes there are."""
    if mode not in DENSITIES:
        raise ValueError(f"density mode must be one of {DENSITY_MODES}, got {mode!r}")
    return DENSITIES[mode]


def density_slots(valid: torch.Tensor, kept: torch.Tensor, mode: str) -> torch.Tensor:
    """Slots that enter the density, in both modes: the request's valid slots that the rollout's
    truncation kept (q_k > 0). Over them p-hat equals the rollout's q.

    Where top-p/min-p empties slots, soft-rl fills them with the next most likely tokens (reproducible
    ids), whose policy mass is real; the official rollout leaves arbitrary near-zero-mass ids there,
    which drop out of its normaliser and of its mask (log(p-hat + 1e-6) > -3) by themselves. Scoring
    only the kept slots is what makes "official" equal the official learner's value and gradient on
    truncated rows (tests/test_densities.py: a literal transcription with such filler ids)."""
    density_mode(mode)
    return valid & kept


def soft_weights(
    noisy: torch.Tensor,
    noise: str,
    tau: torch.Tensor | float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture weights of a soft step from its stored values, as the rollout formed them.

    gumbel / none: w = softmax(y / tau_g) over the valid slots.
    dirichlet / gaussian: w = x / sum(x) (the reference learner used softmax(x / 1) here, which does
    not match what its rollout fed the model; we rebuild the rollout's weights).
    """
    valid = _valid(noisy, valid)
    noisy = noisy.float()
    if noise in ("gumbel", "none"):
        tau = torch.as_tensor(tau, dtype=torch.float32, device=noisy.device)
        if tau.dim() > 0:
            tau = tau.unsqueeze(-1)
        return torch.softmax((noisy / tau).masked_fill(~valid, float("-inf")), dim=-1)
    if noise in ("dirichlet", "gaussian"):
        x = noisy.masked_fill(~valid, 0.0)
        return x / x.sum(-1, keepdim=True)
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")


@dataclass
class RowNoise:
    """Per-row noise settings [N] of N soft positions, each row its own request's.

    A learner micro-batch may hold requests drawn with different noise kinds, lambdas, clamps or
    Dirichlet alphas; every row is scored with the settings its noise was drawn with.
    """

    kind: torch.Tensor  # int64 [N]: index into NOISE_KINDS
    scale: torch.Tensor  # [N] lambda
    clamp_lo: torch.Tensor  # [N] (-inf: unclamped)
    clamp_hi: torch.Tensor  # [N] (+inf: unclamped)
    alpha: torch.Tensor  # [N] Dirichlet concentration scale
    kinds: tuple[str, ...]  # the kinds present, known on the host (scoring needs no device sync for it)

    @classmethod
    def from_settings(cls, settings: list[tuple[str, float, tuple[float, float] | None, float]],
                      counts: list[int], soft_counts: list[int]) -> RowNoise:
        """Rows for ``counts[i]`` positions of each (noise, lambda, clamp, alpha) in ``settings``, of which
        ``soft_counts[i]`` are soft (only the kinds of those are scored)."""
        rep = torch.tensor(counts, dtype=torch.long)

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype).repeat_interleave(rep)

        clamps = [c if c is not None else (float("-inf"), float("inf")) for _, _, c, _ in settings]
        return cls(kind=col([NOISE_KINDS.index(n) for n, *_ in settings], torch.long),
                   scale=col([s for _, s, _, _ in settings]), clamp_lo=col([c[0] for c in clamps]),
                   clamp_hi=col([c[1] for c in clamps]), alpha=col([a for *_, a in settings]),
                   kinds=tuple(sorted({n for (n, *_), c in zip(settings, soft_counts, strict=True) if c})))

    def take(self, idx: torch.Tensor) -> RowNoise:
        return RowNoise(self.kind[idx], self.scale[idx], self.clamp_lo[idx], self.clamp_hi[idx], self.alpha[idx],
                        self.kinds)

    def to(self, device) -> RowNoise:
        return RowNoise(*(t.to(device) for t in (self.kind, self.scale, self.clamp_lo, self.clamp_hi, self.alpha)),
                        self.kinds)


def soft_logprob_rows(logits_at_ids: torch.Tensor, noisy: torch.Tensor, mode: str, rows: RowNoise,
                      valid: torch.Tensor) -> torch.Tensor:
    """``soft_logprob`` of N rows [N, K], each with its own noise kind and settings (``rows``)."""
    if "none" in rows.kinds:
        raise ValueError("a soft step drawn with noise='none' has no density: it cannot be scored "
                         "(train with gumbel, dirichlet or gaussian noise)")

    def score(name, idx=None):
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])
        return soft_logprob(pick(logits_at_ids), pick(noisy), mode, pick(rows.scale), noise=name, valid=pick(valid),
                            clamp=(pick(rows.clamp_lo), pick(rows.clamp_hi)), dirichlet_alpha=pick(rows.alpha))

    if len(rows.kinds) == 1:
        return score(rows.kinds[0])
    # Score each kind on its own rows only: another kind's formula can be NaN on them (log of a negative
    # Gaussian value), and a NaN branch would poison the gradient even behind torch.where.
    out_dtype = torch.float64 if logits_at_ids.dtype == torch.float64 else torch.float32
    out = torch.zeros(logits_at_ids.shape[0], dtype=out_dtype, device=logits_at_ids.device)
    for name in rows.kinds:
        idx = (rows.kind == NOISE_KINDS.index(name)).nonzero().flatten()
        out = out.index_put((idx,), score(name, idx))
    return out
