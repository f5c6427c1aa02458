"""Rollout-vs-learner log-prob parity: the check that every weight sync delivered the learners' weights.

The learners rescore every rollout anyway (the PPO old log-probs), so comparing their per-position
log-probs with the engine's costs nothing. Discrete and soft positions are measured apart because
they react differently to rounding: a discrete position's log-prob moves by about the logit error,
while a soft position's Gumbel log-density divides the K logits by tau_g (0.1 by default) and so
moves by about ten times as much.

When a gap stops the run is ``ParityPolicy``'s decision: the healthy level is calibrated on the run's
own first steps (engine and learner kernels differ by device, dtype and depth, so no fixed number fits
every run), and a later step stops the run only when its gap jumps far above that level or above a
hard bound (``HARD_BOUNDS``). A stale or partial sync moves the gap by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Measured healthy gaps, (discrete, soft) mean |engine - learner| log-prob per position (vLLM CPU engine vs
# DeepSpeed ZeRO-2 learners, float32 head; largest step mean):
#   float32:  toy (bench/probe_gaps.py, 6 steps) discrete 6.0e-8, soft 1.1e-7; SmolLM2-135M (30 layers,
#             tests/test_real_model.py) discrete 5.5e-6, soft 2.8e-6; a stale tied LM head after one 1e-6-lr
#             step: 1.0e-4 / 6.5e-5, 1.5e-2 after a 1e-3 perturbation
#   bfloat16: toy discrete 5.1e-4, soft 2.0e-3
# On a GPU the engine (FlashAttention, fused kernels, CUDA graphs) and the learner (HF modules) use different
# kernels, over 28+ layers and thousands of tokens: the healthy level there is unmeasured and plausibly near 1e-2
# in bfloat16. No fixed tolerance can be both tight enough to see a broken sync on the CPU and loose enough never
# to stop a healthy GPU run, so the level is calibrated on each run's first steps (``ParityPolicy``) and the fixed
# bounds below are only the hard ceiling: a mean gap above them means a wrong model or garbage weights (a woken
# engine that never got its weights), whatever the calibration says.
HARD_BOUNDS = {"float32": (1e-2, 1e-1), "bfloat16": (1e-1, 1.0)}
# The smallest jump threshold: calibrated levels near zero (a toy in float32: 6e-8) would otherwise stop a run on
# rounding noise that a longer run accumulates. Far below a real sync fault (the stale head above: 1e-4).
FLOORS = {"float32": (1e-5, 1e-5), "bfloat16": (1e-3, 1e-3)}


def _dtype_key(dtype: str) -> str:
    return "float32" if dtype == "float32" else "bfloat16"


def hard_bounds(dtype: str, discrete: float | None = None, soft: float | None = None) -> tuple[float, float]:
    """(discrete, soft) hard bounds: the configured ones where set (learner.sync_probe_tol, _soft), else the
    default for ``dtype``."""
    d, s = HARD_BOUNDS[_dtype_key(dtype)]
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


@dataclass
class ParityPolicy:
    """Decides, step by step, whether the engines' log-probs are close enough to the learners' to go on.

    * Hard bounds ``hard`` (discrete, soft), at every step: a mean gap above them stops the run.
    * Calibration: the first ``calibration_steps`` steps this process runs set the healthy ``level`` of each
      kind, the largest mean gap among them. The first step's rollout normally comes from weights both sides
      loaded from the same files, with no sync involved; each later calibration step must itself stay within
      ``jump`` x the level so far, so a sync that breaks during calibration is still caught.
    * After calibration a step stops the run when a kind's mean gap exceeds
      max(``jump`` x its level, ``floor``) (and always above the hard bound).
    ``calibration_steps=0``: the hard bounds alone (fixed tolerances)."""

    hard: tuple[float, float]
    calibration_steps: int = 3
    jump: float = 10.0
    floor: tuple[float, float] = (0.0, 0.0)
    level: tuple[float, float] | None = None  # the calibrated healthy level so far (None: no step yet)
    steps_seen: list[int] = field(default_factory=list)  # the calibration steps (1-based RL steps)

    @classmethod
    def for_run(cls, dtype: str, tol: float | None = None, tol_soft: float | None = None, calibration_steps: int = 3,
                jump: float = 10.0) -> ParityPolicy:
        return cls(hard_bounds(dtype, tol, tol_soft), calibration_steps, jump, FLOORS[_dtype_key(dtype)])

    @property
    def calibrated(self) -> bool:
        return len(self.steps_seen) >= self.calibration_steps

    def thresholds(self) -> tuple[float, float]:
        """(discrete, soft) mean gaps above which the next step stops the run."""
        if self.level is None or self.calibration_steps == 0:
            return self.hard
        return tuple(min(h, max(self.jump * lv, f))  # type: ignore[return-value]
                     for h, lv, f in zip(self.hard, self.level, self.floor, strict=True))

    def check(self, step: int, gaps: LogprobGaps) -> str | None:
        """None when step ``step``'s gaps are acceptable (a calibration step then updates the level), else what
        exceeded which bound, naming the keys that set it."""
        limits = self.thresholds()
        calibrated = self.level is not None and self.calibration_steps > 0
        bad = []
        for i, (kind, mean, mx, suffix) in enumerate((("discrete", gaps.discrete_mean, gaps.discrete_max, ""),
                                                       ("soft", gaps.soft_mean, gaps.soft_max, "_soft"))):
            if mean <= limits[i]:
                continue
            what = f"{kind} positions {mean:.3g} per position on average (max {mx:.3g}; "
            if calibrated and limits[i] < self.hard[i]:
                first, last = self.steps_seen[0], self.steps_seen[-1]
                what += (f"{mean / max(self.level[i], 1e-30):.0f}x the level {self.level[i]:.3g} calibrated on steps "
                         f"{first}-{last}: above {limits[i]:.3g}, learner.sync_probe_jump={self.jump:g})")
            else:
                what += f"above the hard bound {limits[i]:g}: learner.sync_probe_tol{suffix})"
            bad.append(what)
        if bad:
            return "; ".join(bad)
        if not self.calibrated and step not in self.steps_seen:  # (a retried step is judged, not counted, again)
            now = (gaps.discrete_mean, gaps.soft_mean)
            self.level = now if self.level is None else tuple(max(a, b) for a, b in zip(self.level, now, strict=True))
            self.steps_seen.append(step)
        return None

    def describe(self) -> str:
        """One log line: the calibrated level and what now stops the run."""
        d, s = self.thresholds()
        if self.calibration_steps == 0 or self.level is None:
            return f"parity probe: fixed bounds discrete {d:.3g}, soft {s:.3g} (learner.sync_probe_tol, _soft)"
        return (f"parity probe calibrated on steps {self.steps_seen[0]}-{self.steps_seen[-1]}: healthy mean gap "
                f"discrete {self.level[0]:.3g}, soft {self.level[1]:.3g}; a later step stops the run above "
                f"{d:.3g} / {s:.3g} (learner.sync_probe_jump={self.jump:g}, floors {self.floor[0]:g} / "
                f"{self.floor[1]:g}, hard bounds {self.hard[0]:g} / {self.hard[1]:g})")
