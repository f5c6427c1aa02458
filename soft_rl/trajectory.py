"""A generated trajectory: what the rollout hands to the reward pool and the learner.

Per generated position t (R positions), as compact tensors, never nested Python lists:

    tokens[t]      the emitted id (argmax y for soft steps)
    topk_ids[t]    the K slot ids (soft steps, sorted by weight; discrete steps [x, x, ..., x])
    noisy[t]       the K stored noisy values y (or x for Dirichlet/Gaussian); 0 for discrete steps
    is_soft[t]     whether the input after step t was a soft mixture
    logprobs[t]    rollout log-prob: density of a soft step, log p(token) of a discrete one
    forced[t]      token forced by the thinking budget (not sampled: masked out of the loss)
    kept[t]        the K slots the rollout's top-k/top-p/min-p kept (q > 0); used by the exact density

Positions t < n_think were sampled in the thinking phase (scored at the thinking temperature);
the rest in the answer phase. ``sampling`` holds the request's parameters, so the learner can rebuild
the soft inputs and the densities exactly as the rollout formed them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soft_rl.sampling import SoftSamplingParams


@dataclass
class Trajectory:
    prompt_ids: torch.Tensor  # int64 [P]
    tokens: torch.Tensor  # int64 [R]
    topk_ids: torch.Tensor  # int64 [R, K]
    noisy: torch.Tensor  # float32 [R, K]
    is_soft: torch.Tensor  # bool [R]
    logprobs: torch.Tensor  # float32 [R]
    forced: torch.Tensor  # bool [R]
    kept: torch.Tensor  # bool [R, K]
    n_think: int
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    sampling: SoftSamplingParams

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def position_temperatures(self) -> torch.Tensor:
        """Temperature each position was sampled at: thinking-phase T for t < n_think, else answer T."""
        t = torch.full((self.num_tokens,), self.sampling.answer_temperature, dtype=torch.float32)
        t[: self.n_think] = self.sampling.temperature
        return t

    def slot_valid(self) -> torch.Tensor:
        """[R, K] mask of the request's own k slots (the arrays may be wider than k)."""
        K = self.topk_ids.shape[-1]
        return (torch.arange(K) < self.sampling.k).expand(self.num_tokens, K)

    @property
    def num_soft(self) -> int:
        return int(self.is_soft.sum())
