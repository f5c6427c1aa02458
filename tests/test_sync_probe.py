"""The weight-sync parity probe (soft_rl/sync_probe.py): gaps measured per position kind, and the policy that
decides when a gap stops the run (calibrated on the run's first steps, jump factor, floors, hard bounds)."""

import pytest
import torch

from soft_rl.sync_probe import FLOORS, HARD_BOUNDS, LogprobGaps, ParityPolicy, hard_bounds


class _Traj:  # the two fields the probe reads
    def __init__(self, logprobs, is_soft):
        self.logprobs, self.is_soft = torch.tensor(logprobs), torch.tensor(is_soft)


def _gaps(discrete: float, soft: float) -> LogprobGaps:
    return LogprobGaps(discrete, 2 * discrete, soft, 2 * soft, (discrete + soft) / 2, 2 * max(discrete, soft))


def test_gaps_are_measured_per_position_kind():
    trajs = [_Traj([-1.0, -2.0, -3.0], [True, True, False]), _Traj([-0.5, -0.25], [False, True])]
    learner = [torch.tensor([-1.1, -2.0, -3.0]), torch.tensor([-0.5, -0.5])]
    g = LogprobGaps.measure(learner, trajs)
    assert g.discrete_mean == pytest.approx(0.0) and g.discrete_max == pytest.approx(0.0)
    assert g.soft_mean == pytest.approx((0.1 + 0.0 + 0.25) / 3) and g.soft_max == pytest.approx(0.25)
    assert g.mean == pytest.approx(0.35 / 5) and g.max == pytest.approx(0.25)
    m = g.metrics()
    assert m["rollout_vs_learner/mean_abs_logprob_diff_soft"] == g.soft_mean
    assert m["rollout_vs_learner/mean_abs_logprob_diff_discrete"] == g.discrete_mean


def test_no_positions_of_a_kind_is_no_gap():
    g = LogprobGaps.measure([torch.tensor([-1.0, -1.5])], [_Traj([-1.25, -1.5], [False, False])])
    assert g.soft_mean == 0.0 and g.soft_max == 0.0 and g.discrete_mean == pytest.approx(0.125)


def test_hard_bounds_follow_the_dtype_and_config():
    assert hard_bounds("float32") == HARD_BOUNDS["float32"]
    assert hard_bounds("bfloat16") == HARD_BOUNDS["bfloat16"]
    assert hard_bounds("bfloat16", soft=0.5) == (HARD_BOUNDS["bfloat16"][0], 0.5)
    # soft positions tolerate more rounding than discrete ones (the density divides the logits by tau_g)
    for dtype in HARD_BOUNDS:
        assert HARD_BOUNDS[dtype][1] > HARD_BOUNDS[dtype][0] and FLOORS[dtype] < HARD_BOUNDS[dtype]


def test_a_healthy_level_of_any_size_calibrates_and_only_a_jump_stops_the_run():
    """A level far above any fixed CPU tolerance (a bf16 GPU run might sit near 1e-2) passes, with drift inside
    the jump factor; a tenfold jump after calibration stops the run and the message names the level and the key."""
    p = ParityPolicy.for_run("bfloat16", calibration_steps=3, jump=10.0)
    healthy = [(1.2e-2, 9e-2), (1.5e-2, 1.1e-1), (1.1e-2, 8e-2)]
    for step, (d, s) in enumerate(healthy, start=1):
        assert p.check(step, _gaps(d, s)) is None
    assert p.calibrated and p.steps_seen == [1, 2, 3]
    assert p.level == pytest.approx((1.5e-2, 1.1e-1))  # the largest of the calibration steps
    assert p.thresholds() == pytest.approx((0.1, 1.0))  # 10 x level (discrete), capped by the hard bound (soft)
    for step in range(4, 10):  # later healthy steps drift a few-fold: no stop, no change of level
        assert p.check(step, _gaps(4e-2, 3e-1)) is None
    assert p.level == pytest.approx((1.5e-2, 1.1e-1)) and p.steps_seen == [1, 2, 3]
    bad = p.check(10, _gaps(9e-2, 1.5))
    assert "soft positions 1.5" in bad and "hard bound 1: learner.sync_probe_tol_soft" in bad
    assert "discrete" not in bad  # 9e-2 is inside 10 x 1.5e-2
    quiet = ParityPolicy.for_run("float32", calibration_steps=2, jump=10.0)
    assert quiet.check(1, _gaps(6e-6, 3e-6)) is None and quiet.check(2, _gaps(5e-6, 2e-6)) is None
    stale = quiet.check(3, _gaps(1e-4, 6.5e-5))  # a stale tied LM head after one small step (README measurement)
    assert "discrete positions" in stale and "calibrated on steps 1-2" in stale
    assert "learner.sync_probe_jump=10" in stale and "17x the level 6e-06" in stale


def test_calibration_catches_a_sync_that_breaks_during_it_and_floors_guard_tiny_levels():
    p = ParityPolicy.for_run("bfloat16", calibration_steps=3)
    assert p.check(1, _gaps(5e-4, 2e-3)) is None
    # the first sync is broken: step 2 is already judged against step 1's level (floor 1e-3 here: 5e-3 allowed)
    bad = p.check(2, _gaps(2e-2, 2e-3))
    assert bad is not None and "discrete positions 0.02" in bad and "calibrated on steps 1-1" in bad
    assert p.steps_seen == [1] and not p.calibrated  # a rejected step does not raise the level
    # a level near zero (float32 toy: ~1e-7) is guarded by the floor, not multiplied into a hair trigger
    t = ParityPolicy.for_run("float32", calibration_steps=1)
    assert t.check(1, _gaps(6e-8, 1e-7)) is None
    assert t.thresholds() == pytest.approx(FLOORS["float32"])
    assert t.check(2, _gaps(5e-6, 8e-6)) is None and t.check(3, _gaps(2e-5, 0.0)) is not None
    # the same step retried (a learner lost mid-update) is not counted twice
    r = ParityPolicy.for_run("float32", calibration_steps=2)
    assert r.check(1, _gaps(1e-6, 1e-6)) is None and r.check(1, _gaps(1e-6, 1e-6)) is None
    assert r.steps_seen == [1] and not r.calibrated


def test_without_calibration_the_hard_bounds_are_fixed_tolerances_and_nan_fails():
    p = ParityPolicy.for_run("float32", tol=1e-4, tol_soft=2e-4, calibration_steps=0)
    assert p.thresholds() == (1e-4, 2e-4)
    assert p.check(1, _gaps(5e-5, 1e-4)) is None and p.thresholds() == (1e-4, 2e-4)
    bad = p.check(2, _gaps(2e-4, 1e-4))
    assert "discrete positions" in bad and "learner.sync_probe_tol)" in bad
    assert p.check(3, _gaps(float("nan"), 0.0)) is not None
    assert "fixed bounds" in p.describe()
