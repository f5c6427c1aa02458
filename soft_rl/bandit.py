"""A one-step soft-thinking bandit: where SofT-GRPO's score estimators differ, on soft-rl's own sampler and densities.

One decode step over a vocabulary of ``V`` tokens with logits theta; token 0 is the right one. A rollout is one
``soft_rl.sampling.soft_sample`` step (the paper's sampler unless told otherwise); a soft step is scored by
``soft_rl.densities.soft_logprob`` in a density mode, a discrete step by its full-vocabulary log p(token), exactly
as the learner scores them. Two rewards:

- ``emitted``: R = 1 iff the emitted token (argmax of the noisy values y for a soft step) is token 0. It depends on
  y only through the emitted slot, so the Gumbel-max density is unbiased for it up to the clamp.
- ``mixture``: R = w_0, the weight of token 0 in the mixture fed back. It depends on the whole y (tau_g > 0), which
  is where the Gumbel-max density's conditioning bias shows.

The estimators (``ESTIMATORS``): ``discrete`` (ordinary sampling, the GRPO baseline) and every density mode of
``soft_rl.densities.DENSITIES`` on soft rollouts. Per-sample score gradients come from one backward: every row has
its own copy of theta (``_row_logprobs``), so row r's gradient is that copy's.

The true gradient of E[R] (``true_gradient``) is independent of every density: the closed form for an unclamped,
untruncated sampler and the emitted reward (P(token 0) = softmax(log(q + 1e-6))_0, the Gumbel-max trick), and
otherwise central finite differences with common random numbers (the same seeds at theta +- h e_v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from soft_rl.densities import DENSITY_MODES, density_slots, soft_logprob
from soft_rl.losses import compute_advantages
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample

ESTIMATORS = ("discrete", *DENSITY_MODES)
REWARDS = ("emitted", "mixture")


@dataclass(frozen=True)
class Bandit:
    """A vocabulary of ``vocab`` tokens, sampled with ``params`` (k and top_k default to the vocabulary)."""

    vocab: int
    params: SoftSamplingParams
    reward: str = "emitted"

    @classmethod
    def paper(cls, vocab: int, reward: str = "emitted", **overrides) -> Bandit:
        """The paper's training sampler (T 1.0, top-p 0.95, tau_g 0.1, Gumbel noise clamped to [-1.5, 3])
        with every token a candidate slot."""
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        return cls(vocab, SoftSamplingParams(**{"k": vocab, "top_k": vocab, **overrides}), reward)

    def batch(self, rows: int, soft: bool) -> SamplingBatch:
        return SamplingBatch.from_params([replace(self.params, soft=soft)] * rows)


def start_logits(q0: float, vocab: int) -> torch.Tensor:
    """Logits of q = (q0, (1 - q0) / (V - 1), ...): e.g. 0.7 / 0.15 / 0.15 at V = 3."""
    rest = (1.0 - q0) / (vocab - 1)
    return torch.log(torch.tensor([q0] + [rest] * (vocab - 1), dtype=torch.float64)).float()


def rollout(bandit: Bandit, logits: torch.Tensor, soft: bool, seeds: torch.Tensor, step: int):
    """One sampled step per row of ``logits`` [B, V]; row b draws its noise from (seeds[b], step)."""
    batch = bandit.batch(logits.shape[0], soft)
    steps = torch.full_like(seeds, step)
    return soft_sample(logits.detach(), batch, NoiseCounters(seeds, steps), density="official")


def rewards(bandit: Bandit, out) -> torch.Tensor:
    """R per row: emitted token 0, or token 0's weight in the mixture (the one-hot for a discrete row)."""
    if bandit.reward == "emitted":
        return (out.token == 0).float()
    return (out.weights * (out.ids == 0)).sum(-1)


def _row_logprobs(bandit: Bandit, theta_rows: torch.Tensor, out, estimator: str) -> torch.Tensor:
    """log-prob [B] of each row's step under its own logits row (differentiable in ``theta_rows`` [B, V])."""
    T = bandit.params.temperature
    if estimator == "discrete":
        return torch.log_softmax(theta_rows / T, -1).gather(1, out.token[:, None]).squeeze(1)
    p = bandit.params
    valid = torch.ones_like(out.kept)
    return soft_logprob(theta_rows.gather(1, out.ids) / T, out.noisy, estimator, p.noise_scale, noise=p.noise,
                        valid=density_slots(valid, out.kept, estimator), clamp=p.noise_clamp,
                        dirichlet_alpha=p.dirichlet_alpha)


def score_samples(bandit: Bandit, theta: torch.Tensor, estimator: str, n: int, seed0: int = 0,
                  step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [n], per-sample score gradients d log p / d theta [n, V]) of ``n`` rollouts at logits ``theta`` [V]."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    rows = theta.detach().float().expand(n, -1).clone().requires_grad_(True)
    seeds = seed0 + torch.arange(n, dtype=torch.int64)
    out = rollout(bandit, rows, estimator != "discrete", seeds, step)
    _row_logprobs(bandit, rows, out, estimator).sum().backward()
    return rewards(bandit, out), rows.grad.double()


def estimate(bandit: Bandit, theta: torch.Tensor, estimator: str, n: int, seed0: int = 0) -> dict:
    """The score-function estimate (R - E[R]) grad log p at fixed logits over ``n`` samples: its mean [V], the
    standard error of that mean [V], and the per-sample signal-to-noise ratio |mean| / sqrt(E|e - mean|^2)."""
    r, g = score_samples(bandit, theta, estimator, n, seed0)
    e = (r - r.mean()).double()[:, None] * g  # the baseline E[R] (its sample mean: O(1/n) bias, negligible)
    mean = e.mean(0)
    spread = (e - mean).pow(2).sum(1).mean()
    return {"mean": mean, "se": e.std(0) / math.sqrt(n), "snr": float(mean.norm() / spread.sqrt()),
            "reward": float(r.mean())}


def true_gradient(bandit: Bandit, theta: torch.Tensor, soft: bool = True, n: int = 200_000, h: float = 0.05,
                  seed0: int = 10**9) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_theta E[R] [V], its standard error [V]) of the soft (or, ``soft=False``, the discrete) sampler,
    independent of every density. Closed form where one exists (emitted reward, no truncation, and for the soft
    sampler unclamped Gumbel noise): P(token 0) = q_0 for the discrete sampler and (q_0 + 1e-6) / (1 + V 1e-6) for
    the soft one (the Gumbel-max trick on log(q + 1e-6)), q = softmax(theta / T). Otherwise central differences
    of the mean reward over ``n`` rollouts with the same seeds on both sides (common random numbers)."""
    p = bandit.params
    T = p.temperature
    untruncated = p.top_p >= 1.0 and p.min_p <= 0.0 and p.top_k >= bandit.vocab
    exact_argmax = not soft or (p.noise == "gumbel" and p.noise_clamp is None)
    if bandit.reward == "emitted" and untruncated and exact_argmax:
        th = theta.detach().double().clone().requires_grad_(True)
        q = torch.softmax(th / T, -1)
        (((q[0] + 1e-6) / (1 + bandit.vocab * 1e-6)) if soft else q[0]).backward()
        return th.grad, torch.zeros_like(th.grad)
    seeds = seed0 + torch.arange(n, dtype=torch.int64)
    grad, se = torch.zeros(bandit.vocab, dtype=torch.float64), torch.zeros(bandit.vocab, dtype=torch.float64)
    for v in range(bandit.vocab):
        side = []
        for sign in (1.0, -1.0):
            th = theta.detach().double().clone()
            th[v] += sign * h
            side.append(rewards(bandit, rollout(bandit, th.float().expand(n, -1), soft, seeds, 0)).double())
        diff = (side[0] - side[1]) / (2 * h)
        grad[v], se[v] = diff.mean(), diff.std() / math.sqrt(n)
    return grad, se


def steps_to_confidence(bandit: Bandit, estimator: str, q0: float, seeds: int, group: int = 8, lr: float = 0.05,
                        target: float = 0.95, max_steps: int = 400, seed0: int = 0) -> torch.Tensor:
    """GRPO on the bandit, one independent run per seed (vectorised: Adam is elementwise, so runs whose logits are
    rows of one parameter never mix): ``group`` rollouts a step, soft-rl's GRPO advantages, the on-policy
    surrogate -mean(A log p) (ratio 1, so clipping never binds), Adam at ``lr``. Returns, per run, the first step
    after which softmax(theta)_0 > ``target`` (``max_steps`` + 1 where it never got there)."""
    theta = start_logits(q0, bandit.vocab).expand(seeds, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    group_of = torch.arange(seeds).repeat_interleave(group)
    sample_seeds = seed0 + torch.arange(seeds * group, dtype=torch.int64)
    done = torch.full((seeds,), max_steps + 1, dtype=torch.int64)
    for step in range(max_steps):
        rows = theta.repeat_interleave(group, 0)
        out = rollout(bandit, rows, estimator != "discrete", sample_seeds, step)
        adv = compute_advantages("grpo", rewards(bandit, out), group_of)
        loss = -(adv * _row_logprobs(bandit, rows, out, estimator)).sum() / group
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            reached = (torch.softmax(theta, -1)[:, 0] > target) & (done > max_steps)
            done[reached] = step + 1
        if bool((done <= max_steps).all()):
            break
    return done
