"""The weight-sync parity probe measures discrete and soft positions apart (soft_rl/sync_probe.py)."""

import pytest
import torch

from soft_rl.sync_probe import DEFAULT_TOLERANCES, LogprobGaps, default_tolerances


class _Traj:  # the two fields the probe reads
    def __init__(self, logprobs, is_soft):
        self.logprobs, self.is_soft = torch.tensor(logprobs), torch.tensor(is_soft)


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
    # a soft-only gap fails the soft tolerance and names its key; the discrete one passes
    bad = g.violation(1e-3, 1e-2)
    assert "soft positions" in bad and "learner.sync_probe_tol_soft" in bad and "discrete" not in bad
    assert g.violation(1e-3, 0.2) is None
    assert "discrete positions" in LogprobGaps(1.0, 1.0, 0.0, 0.0, 0.5, 1.0).violation(1e-3, 1e-3)


def test_no_positions_of_a_kind_is_no_gap():
    g = LogprobGaps.measure([torch.tensor([-1.0, -1.5])], [_Traj([-1.25, -1.5], [False, False])])
    assert g.soft_mean == 0.0 and g.soft_max == 0.0 and g.discrete_mean == pytest.approx(0.125)


def test_default_tolerances_follow_the_dtype_and_config():
    assert default_tolerances("float32") == DEFAULT_TOLERANCES["float32"]
    assert default_tolerances("bfloat16") == DEFAULT_TOLERANCES["bfloat16"]
    assert default_tolerances("bfloat16", soft=0.5) == (DEFAULT_TOLERANCES["bfloat16"][0], 0.5)
    # soft positions tolerate more rounding than discrete ones in bf16 (density over logits / tau_g)
    assert DEFAULT_TOLERANCES["bfloat16"][1] > DEFAULT_TOLERANCES["bfloat16"][0]

