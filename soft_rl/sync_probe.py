"""Rollout-vs-learner log-prob parity: the check that every weight sync delivered the learners' weights.

The learners rescore every rollout anyway (the PPO old log-probs), so comparing their per-position
log-probs with the engine's costs nothing. Discrete and soft positions are measured apart because
they react differently to rounding: a discrete position's log-prob moves by about the logit error,
while a soft position's Gumbel log-density divides the K logits by tau_g (0.1 by default) and so
moves by about ten times as much. The default tolerances (``DEFAULT_TOLERANCES``) come from
measuring healthy runs (the toy task in float32 and bfloat16, SmolLM2-135M in float32; README,
"Weight sync") with a margin; a stale or partial sync moves them by orders of magnitude more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# (discrete, soft) mean |engine - learner| log-prob per position, measured on healthy runs (vLLM CPU
# engine vs DeepSpeed ZeRO-2 learners, float32 head; largest step mean):
#   float32:  toy (bench/probe_gaps.py, 6 steps) discrete 6.0e-8, soft 1.1e-7; SmolLM2-135M (30 layers,
#             tests/test_real_model.py) discrete 5.5e-6, soft 2.8e-6          -> 1e-4 both (margin ~18 over
#             the deep model; a stale tied LM head after a 1e-6-lr step showed 1.0e-4 / 6.5e-5 and 1.5e-2
#             after a 1e-3 perturbation, so a looser bound would pass a broken sync)
#   bfloat16: toy discrete 5.1e-4, soft 2.0e-3      -> 5e-3 and 2e-2 (margin ~10: a deeper model than the
#             2-layer toy accumulates more bf16 rounding; a wrong or stale model is off by far more)
DEFAULT_TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (5e-3, 2e-2)}


def default_tolerances(dtype: str, discrete: float | None = None, soft: float | None = None) -> tuple[float, float]:
    """(discrete, soft) tolerances: the configured ones where set, else the measured default for ``dtype``."""
    d, s = DEFAULT_TOLERANCES["float32" if dtype == "float32" else "bfloat16"]
    return (d if discrete is None else discrete), (s if soft is None else soft)


@dataclass(frozen=True)
class LogprobGaps:
    """|engine - learner| per-position log-prob gaps of one batch, over discrete and soft positions."""

    discrete_mean: float
    discrete_max: float
    soft_mean: float
    soft_max: float
    mean: float
    max: float

    @classmethod
    def measure(cls, learner: Sequence[torch.Tensor], trajs) -> LogprobGaps:
        """``learner``: each trajectory's [R] log-probs from the learners; ``trajs``: the engine's, with
        their ``logprobs`` and ``is_soft`` masks."""
        gaps = torch.cat([(lp.float() - t.logprobs.float()).abs() for lp, t in zip(learner, trajs, strict=True)])
        soft = torch.cat([t.is_soft for t in trajs]) if trajs else torch.zeros(0, dtype=torch.bool)

        def mean_max(g: torch.Tensor) -> tuple[float, float]:
            return (float(g.mean()), float(g.max())) if g.numel() else (0.0, 0.0)

        return cls(*mean_max(gaps[~soft]), *mean_max(gaps[soft]), *mean_max(gaps))

    def metrics(self) -> dict[str, float]:
        p = "rollout_vs_learner/"
        return {p + "max_abs_logprob_diff": self.max, p + "mean_abs_logprob_diff": self.mean,
                p + "mean_abs_logprob_diff_discrete": self.discrete_mean,
                p + "mean_abs_logprob_diff_soft": self.soft_mean,
                p + "max_abs_logprob_diff_discrete": self.discrete_max, p + "max_abs_logprob_diff_soft": self.soft_max}

    def violation(self, tol_discrete: float, tol_soft: float) -> str | None:
        """None when both means are within their tolerances, else what exceeded which."""
        kinds = (("discrete", self.discrete_mean, self.discrete_max, tol_discrete, ""),
                 ("soft", self.soft_mean, self.soft_max, tol_soft, "_soft"))
        bad = [f"{kind} positions {mean:.3g} per position on average (max {mx:.3g}; tolerance {tol:g}: "
               f"learner.sync_probe_tol{suffix})" for kind, mean, mx, tol, suffix in kinds if not mean <= tol]
        return "; ".join(bad) or None
