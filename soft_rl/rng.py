"""Counter-based random numbers: noise as a pure function of (seed, step, slot, stream).

Why not ``torch.Generator``? A rollout engine batches many requests whose membership changes every
step, runs on the device with no host round trip, and may recompute a request after preemption;
the learner and the HF reference must be able to reproduce the exact same noise. A counter-based
generator gives all of that for free: the uniform for request ``seed`` at generation step ``step``,
slot ``slot`` and purpose ``stream`` is ``hash(seed, step, slot, stream)``. It is batched, identical
on CPU and GPU (integer ops only), independent of batch composition, and resuming a run needs only
the step counter. The hash is a chain of 32-bit avalanche mixes ("lowbias32"-style multiply/xorshift),
computed in int64 lanes masked to 32 bits so that torch's wrapping int64 arithmetic is exact.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

# Streams keep the different uses of one (seed, step) independent.
STREAM_GUMBEL = 0
STREAM_CATEGORICAL = 1
STREAM_NORMAL_A = 2
STREAM_NORMAL_B = 3
STREAM_GAMMA = 4  # + attempt offsets, see sampling._gamma


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """32-bit avalanche mix of the low 32 bits of an int64 tensor, in place (result in [0, 2^32)).

    In place on a tensor the caller owns, so the hash holds one [B, n] temporary besides its result whatever
    the interpreter does with argument lifetimes (after a ``torch.compile`` in the process, CPython keeps a
    call's arguments alive until it returns: out-of-place, the sampler's peak grew by 8 B per candidate)."""
    x.bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return x


def hash_counters(seed: torch.Tensor, step: torch.Tensor, slot: torch.Tensor, stream: int) -> torch.Tensor:
    """hash(seed, step, slot, stream) -> int64 in [0, 2^32); arguments broadcast together."""
    seed = seed.to(torch.int64)
    h = _mix32_(slot.to(torch.int64) + (stream * 0x9E3779B9 & _M32))
    h = h ^ (step.to(torch.int64) & _M32)  # a new tensor, owned here
    shape = torch.broadcast_shapes(h.shape, seed.shape)
    h = _mix32_(h if h.shape == shape else h.expand(shape).clone())
    h = _mix32_(h.bitwise_xor_(seed & _M32))
    return _mix32_(h.bitwise_xor_((seed >> 32) & _M32))


def uniform(seed: torch.Tensor, step: torch.Tensor, n: int, stream: int, offset: int = 0) -> torch.Tensor:
    """U(0,1) float32 of shape [B, n] for rows (seed[b], step[b]) and slots offset..offset+n-1.

    u = (k + 0.5) / 2^23 with k the top 23 bits of the hash, so u lies in [2^-24, 1 - 2^-24]:
    never exactly 0 or 1, hence -log(u) and -log(-log(u)) are always finite.
    """
    return uniform_at(seed, step, torch.arange(offset, offset + n, device=seed.device, dtype=torch.int64), stream)


def uniform_at(seed: torch.Tensor, step: torch.Tensor, slots: torch.Tensor, stream: int) -> torch.Tensor:
    """U(0,1) of shape [B, *slots.shape] at explicit slot indices (same values as ``uniform``)."""
    shape = (-1,) + (1,) * slots.dim()
    h = hash_counters(seed.view(shape), step.view(shape), slots.unsqueeze(0), stream)
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def gumbel(seed: torch.Tensor, step: torch.Tensor, n: int, stream: int = STREAM_GUMBEL) -> torch.Tensor:
    """Standard Gumbel(0, 1): g = -log(-log u)."""
    return -torch.log(-torch.log(uniform(seed, step, n, stream)))


def exponential(seed: torch.Tensor, step: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """Exp(1): e = -log u."""
    return -torch.log(uniform(seed, step, n, stream))


def normal(seed: torch.Tensor, step: torch.Tensor, n: int, stream_pair: tuple[int, int], offset: int = 0):
    """N(0, 1) by Box-Muller: sqrt(-2 log u1) cos(2 pi u2)."""
    u1 = uniform(seed, step, n, stream_pair[0], offset)
    u2 = uniform(seed, step, n, stream_pair[1], offset)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


class NoiseCounters:
    """Per-row generator state: the request's seed and its generation step (both int64 [B])."""

    def __init__(self, seed: torch.Tensor, step: torch.Tensor):
        self.seed = seed.to(torch.int64)
        self.step = step.to(torch.int64)
