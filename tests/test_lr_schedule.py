"""Learning-rate schedules: closed forms at their landmarks, and the config's checks."""

import math

import pytest
import torch

from soft_rl.config import load_config
from soft_rl.lr_schedule import learning_rate, set_learning_rate


def test_constant_is_the_base_rate_after_its_warm_up():
    assert [learning_rate(1e-3, s, 10, warmup_steps=4) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decays_from_the_base_rate_to_the_floor_at_the_last_step(schedule):
    lr, total, floor = 3e-4, 101, 0.1
    rates = [learning_rate(lr, s, total, schedule=schedule, min_lr_ratio=floor) for s in range(total)]
    assert rates[0] == pytest.approx(lr) and rates[-1] == pytest.approx(floor * lr)
    # halfway through, both shapes are at the midpoint of base and floor
    assert rates[50] == pytest.approx((lr + floor * lr) / 2)
    assert all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True))
    if schedule == "cosine":  # (1 + cos(pi/4)) / 2 of the way down at a quarter
        assert rates[25] == pytest.approx(floor * lr + (lr - floor * lr) * (1 + math.cos(math.pi / 4)) / 2)
    else:
        assert rates[25] == pytest.approx(lr - 0.25 * (lr - floor * lr))


def test_warm_up_then_cosine_starts_its_decay_after_the_warm_up():
    rates = [learning_rate(1.0, s, 12, schedule="cosine", warmup_steps=2) for s in range(12)]
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0]) and rates[-1] == pytest.approx(0.0)
    assert rates[3] < 1.0


def test_set_learning_rate_sets_every_group():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    set_learning_rate(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


@pytest.mark.parametrize("override,key", [("learner.lr_schedule=step", "learner.lr_schedule"),
                                          ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio"),
                                          ("learner.lr_warmup_steps=-1", "learner.lr_warmup_steps"),
                                          ("learner.lr=0", "learner.lr")])
def test_bad_schedule_settings_name_their_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, ["model.path=x", override])
