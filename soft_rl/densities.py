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

from dataclasses import dataclass

import torch

from soft_rl.noise_kinds import (  # noqa: F401  (re-exported: the constants' public home stays this module)
    CLAMP_KINK_TOL,
    DIRICHLET_LOGPDF_CLAMP,
    EPS_LOG,
    GAUSSIAN_STD,
    GAUSSIAN_VALUE_CLAMP,
    GUMBEL_CLAMP,
    NOISE_KINDS,
    NOISES,
    OFFICIAL_GUMBEL_MASK,
    OFFICIAL_PROB_MASK,
    noise_kind,
    rows_where,
)
from soft_rl.noise_kinds.base import gamma_logpdf, gumbel_logpdf, normal_logpdf  # noqa: F401
from soft_rl.noise_kinds.embedding_gaussian import EmbeddingObservation


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


# ------------------------------------------------------------------------------------------ density modes
@dataclass(frozen=True)
class DensityMode:
    """One way to score a soft step. Its formula for each noise kind lives in that kind's module
    (``soft_rl.noise_kinds``: ``NoiseKind.scores[name]``); ``noises`` are the kinds that define one. Adding a mode:
    its name here, a score in each kind's module it applies to, and the docs (README's density table)."""

    name: str
    doc: str

    @property
    def noises(self) -> tuple[str, ...]:
        return tuple(n for n, kind in NOISES.items() if self.name in kind.scores)

    def score(self, noise: str, *args, **kwargs) -> torch.Tensor:
        return NOISES[noise].scores[self.name](*args, **kwargs)


DENSITIES: dict[str, DensityMode] = {}


def register_density(name: str, doc: str) -> DensityMode:
    DENSITIES[name] = DensityMode(name, doc)
    return DENSITIES[name]


register_density("official", "the reference code's learner: a masked mean of clamped per-slot log-densities")
register_density("exact", "the joint density of the stored values, independent per slot, summed")
register_density("gumbel-max", "Rao-Blackwellised: log p-hat of the emitted slot (Gumbel noise only)")

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
    log_norm: torch.Tensor | None = None,
    embedding: EmbeddingObservation | None = None,
) -> torch.Tensor:
    """Log-probability of soft steps, shape [...], from K gathered logits [..., K] and stored values, scored by
    the density ``mode`` (``DENSITIES``: official, exact, gumbel-max; each function's docstring has its formula).
    A kind that scores through the full vocabulary (``NoiseKind.scores_full_vocab``) needs ``log_norm`` [...], the
    full-vocabulary log-normaliser of the same scaled logits: its slots' log-probabilities are z_k - log_norm.

    ``logits_at_ids`` must already be divided by the sampling temperature. ``valid`` masks padding
    slots (requests with fewer than K slots) and should be ``density_slots(...)``: the slots the rollout's
    truncation kept. ``noise_scale``, the clamp bounds and ``dirichlet_alpha`` may be floats or per-row
    tensors of the batch shape [...]. Dirichlet slots with x_k = 0 (zero-probability slots the rollout left
    empty) carry no information and are excluded. A kind that noises the input (``NoiseKind.noises_input``) is
    scored from ``embedding``: the observed inputs, the policy's embedding rows at the ids, sigma and tau.
    """
    density = density_mode(mode)
    if not noise_kind(noise).trainable:
        raise ValueError(f"noise={noise!r} is deterministic given the logits: it has no density and cannot be "
                         f"trained; pick one of {trainable_noises()}")
    if noise not in density.noises:
        raise ValueError(f"density {mode!r} scores {' and '.join(density.noises)} noise only, got {noise!r}")
    out_dtype = torch.float64 if logits_at_ids.dtype == torch.float64 else torch.float32
    valid = _valid(noisy, valid)
    z = _compute_dtype(logits_at_ids).masked_fill(~valid, float("-inf"))
    if noise_kind(noise).scores_full_vocab:
        if log_norm is None:
            raise ValueError(f"noise={noise!r} is scored through the full vocabulary: pass log_norm")
        logp_hat = z - _compute_dtype(torch.as_tensor(log_norm, device=z.device)).unsqueeze(-1)
    else:
        logp_hat = torch.log_softmax(z, dim=-1)  # softmax over the K stored ids only
    noisy = noisy.to(z.dtype)
    if clamp is not None:
        clamp = (_per_row(clamp[0], noisy), _per_row(clamp[1], noisy))
    args = (logp_hat, torch.exp(logp_hat), noisy, valid, _per_row(noise_scale, noisy), clamp,
            _per_row(dirichlet_alpha, noisy))
    if noise_kind(noise).noises_input:
        if embedding is None:
            raise ValueError(f"noise={noise!r} is scored from the observed input: pass embedding=")
        return density.score(noise, *args, embedding=embedding).to(out_dtype)
    return density.score(noise, *args).to(out_dtype)


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
    """Mixture weights of a soft step from its stored values, as the rollout formed them (the kind's
    ``weights``: softmax(y / tau_g) for gumbel and none; x / sum(x) for dirichlet and gaussian, where the
    reference learner used softmax(x / 1), which does not match what its rollout fed the model)."""
    return noise_kind(noise).weights(noisy, tau, _valid(noisy, valid))


def trainable_noises() -> tuple[str, ...]:
    """The noise kinds some density scores."""
    return tuple(n for n, kind in NOISES.items() if kind.trainable)


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

    def full_vocab(self) -> torch.Tensor:
        """bool [N]: rows whose kind is scored through the full vocabulary (``NoiseKind.scores_full_vocab``)."""
        return rows_where(self.kind, self.kinds, lambda kind: kind.scores_full_vocab)

    def take(self, idx: torch.Tensor) -> RowNoise:
        return RowNoise(self.kind[idx], self.scale[idx], self.clamp_lo[idx], self.clamp_hi[idx], self.alpha[idx],
                        self.kinds)

    def to(self, device) -> RowNoise:
        return RowNoise(*(t.to(device) for t in (self.kind, self.scale, self.clamp_lo, self.clamp_hi, self.alpha)),
                        self.kinds)


def soft_logprob_rows(logits_at_ids: torch.Tensor, noisy: torch.Tensor, mode: str, rows: RowNoise,
                      valid: torch.Tensor, log_norm: torch.Tensor | None = None,
                      embedding: EmbeddingObservation | None = None) -> torch.Tensor:
    """``soft_logprob`` of N rows [N, K], each with its own noise kind and settings (``rows``); ``log_norm`` [N] for
    rows of kinds scored through the full vocabulary; ``embedding`` holds the rows of the kind that noises the input
    (``NoiseKind.noises_input``), in their order among the N."""
    untrainable = [k for k in rows.kinds if not NOISES[k].trainable]
    if untrainable:
        raise ValueError(f"a soft step drawn with noise={untrainable[0]!r} has no density: it cannot be scored "
                         f"(train with one of {trainable_noises()})")

    def score(name, idx=None):
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])
        obs = embedding if NOISES[name].noises_input else None  # soft_logprob refuses a missing one
        n = logits_at_ids.shape[0] if idx is None else idx.numel()
        if obs is not None and obs.obs.shape[0] != n:
            raise ValueError(f"{n} soft steps of noise={name!r} but {obs.obs.shape[0]} observed inputs")
        return soft_logprob(pick(logits_at_ids), pick(noisy), mode, pick(rows.scale), noise=name, valid=pick(valid),
                            clamp=(pick(rows.clamp_lo), pick(rows.clamp_hi)), dirichlet_alpha=pick(rows.alpha),
                            log_norm=None if log_norm is None else pick(log_norm), embedding=obs)

    if len(rows.kinds) == 1:
        return score(rows.kinds[0])
    # Score each kind on its own rows only: another kind's formula can be NaN on them (log of a negative
    # Gaussian value), and a NaN branch would poison the gradient even behind torch.where.
    out_dtype = torch.float64 if logits_at_ids.dtype == torch.float64 else torch.float32
    out = torch.zeros(logits_at_ids.shape[0], dtype=out_dtype, device=logits_at_ids.device)
    for name in rows.kinds:
        idx = (rows.kind == NOISE_KINDS.index(name)).nonzero().flatten()
        if idx.numel():  # a kind of the batch may have no row here (another head scores it)
            out = out.index_put((idx,), score(name, idx))
    return out
