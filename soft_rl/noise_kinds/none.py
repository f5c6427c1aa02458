"""No noise: plain soft thinking, y_k = log(q_k + 1e-6) and w = softmax(y / tau_g). The stored values are a function
of the logits, so a step has no density: it can be sampled (evaluation) but not trained."""

from __future__ import annotations

import torch

from soft_rl.noise_kinds.base import DrawContext, NoiseKind, register_noise, softmax_weights


def draw(ctx: DrawContext) -> torch.Tensor:
    return ctx.ell


NONE = register_noise(NoiseKind("none", draw, softmax_weights, {}, __doc__))
