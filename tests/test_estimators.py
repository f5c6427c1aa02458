"""Every soft-step score estimator (each density mode, and the discrete score) points along the true gradient of
the expected reward, on soft-rl's own sampler: the one-step bandit of soft_rl/bandit.py. A sign or scale error in a
density fails here; the bounds come from the Monte Carlo error of the estimates, not from measured values."""

import math

import pytest
import torch

from soft_rl.bandit import ESTIMATORS, Bandit, estimate, start_logits, steps_to_confidence, true_gradient
from soft_rl.densities import DENSITY_MODES

Z = 5.0  # standard errors allowed per component (the seeds are fixed: this is margin, not a false-alarm rate)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimates_equal_the_closed_form_gradient_without_clamp_or_truncation(estimator):
    """Unclamped Gumbel noise, no truncation, R = 1 iff token 0 is emitted: grad E[R] has a closed form (the
    Gumbel-max trick) and the discrete, exact and gumbel-max scores are unbiased for it. The official density at
    lambda = 1 is the masked mean of the exact per-slot terms; every slot is in its mask here (q >= 0.15 >
    e^-3), so its estimate is exactly the exact one over K = 3: a third of the gradient."""
    bandit = Bandit.paper(3, noise_clamp=None, top_p=1.0)
    theta = start_logits(0.7, 3)
    truth, _ = true_gradient(bandit, theta, soft=estimator != "discrete")
    est = estimate(bandit, theta, estimator, 20_000, seed0=7)
    scale = 1.0 / 3.0 if estimator == "official" else 1.0
    err = (est["mean"] - scale * truth).abs()
    assert (err <= Z * est["se"]).all(), (estimator, est["mean"], scale * truth, est["se"])
    assert float(est["mean"].norm()) > 10 * float(est["se"].norm())  # the comparison has power


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimates_point_along_the_true_gradient_with_the_papers_sampler(estimator):
    """The paper's sampler (noise clamped to [-1.5, 3], top-p 0.95) from an asymmetric start, where the
    direction is not fixed by symmetry: the true gradient by central differences with common random numbers;
    the cosine must exceed the bound that the two estimates' standard errors allow at Z sigma."""
    bandit = Bandit.paper(4)
    theta = torch.log(torch.tensor([0.55, 0.25, 0.12, 0.08]))
    truth, truth_se = true_gradient(bandit, theta, soft=estimator != "discrete", n=100_000)
    est = estimate(bandit, theta, estimator, 20_000, seed0=11)
    cos = float(est["mean"] @ truth / (est["mean"].norm() * truth.norm()))
    rel = math.sqrt(float((est["se"] / est["mean"].norm()).pow(2).sum() + (truth_se / truth.norm()).pow(2).sum()))
    assert cos >= 1 - (Z * rel) ** 2 / 2, (estimator, cos, rel)


def test_grpo_on_the_bandit_learns_with_every_estimator():
    """The training loop the benchmark times: every estimator takes most runs from q_0 = 0.7 past 0.95."""
    bandit = Bandit.paper(3)
    for estimator in ESTIMATORS:
        steps = steps_to_confidence(bandit, estimator, 0.7, seeds=24, max_steps=300)
        assert (steps <= 300).float().mean() >= 0.75, (estimator, steps)


def test_every_density_mode_is_an_estimator():
    assert set(DENSITY_MODES) < set(ESTIMATORS) and "discrete" in ESTIMATORS
