"""Soft-step noise kinds, registered by name (``base.NoiseKind``: how a kind draws its stored values, forms the
mixture weights and is scored by each density mode). The import order below fixes each kind's code (its index in
``NOISE_KINDS``, which engines store per request): a new kind is imported last."""

# ruff: noqa: I001  (the kinds' import order is their code order)
import torch

from soft_rl.noise_kinds.base import (
    CLAMP_KINK_TOL,
    EPS_LOG,
    GUMBEL_CLAMP,
    NOISES,
    OFFICIAL_GUMBEL_MASK,
    OFFICIAL_PROB_MASK,
    DrawContext,
    NoiseKind,
    noise_kind,
    register_noise,
)
from soft_rl.noise_kinds import gumbel, dirichlet, gaussian, none, multiplex, embedding_gaussian  # noqa: F401
from soft_rl.noise_kinds.dirichlet import DIRICHLET_LOGPDF_CLAMP, GAMMA_SLOT_STRIDE
from soft_rl.noise_kinds.gaussian import GAUSSIAN_STD, GAUSSIAN_VALUE_CLAMP

NOISE_KINDS = tuple(NOISES)
NOISE_CODES = {name: i for i, name in enumerate(NOISE_KINDS)}


def rows_where(codes: torch.Tensor, kinds: tuple[str, ...], has) -> torch.Tensor:
    """bool, the shape of ``codes`` (per-row kind codes): the rows whose kind, among ``kinds``, ``has(kind)``."""
    rows = torch.zeros_like(codes, dtype=torch.bool)
    for name in kinds:
        if has(NOISES[name]):
            rows = rows | (codes == NOISE_CODES[name])
    return rows

__all__ = ["CLAMP_KINK_TOL", "DIRICHLET_LOGPDF_CLAMP", "EPS_LOG", "GAMMA_SLOT_STRIDE", "GAUSSIAN_STD",
           "GAUSSIAN_VALUE_CLAMP", "GUMBEL_CLAMP", "NOISES", "NOISE_CODES", "NOISE_KINDS", "OFFICIAL_GUMBEL_MASK",
           "OFFICIAL_PROB_MASK", "DrawContext", "NoiseKind", "noise_kind", "register_noise", "rows_where"]
