"""Per-request thinking/answer phase, batched on the device (shared by the HF reference and vLLM).

Every request starts in the thinking phase (soft inputs when soft thinking is on) and switches to
the answer phase exactly once, at the step whose emitted token completes the think-end marker. The
marker is matched on the tail of generated tokens, so multi-token markers work (the reference code
only looks at the last sub-token). The step that completes the marker is recorded as a discrete step
(one-hot weights, log p(token)), as in the reference. With a thinking budget, once a request has
taken ``budget`` thinking steps without finishing, the marker's tokens are forced, one per step, as
discrete, flagged steps.

Markers are stored right-aligned in a [B, M] tensor padded with -1; the tail of the last M emitted
tokens is kept per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soft_rl.sampling import SampleOutput, to_discrete


class PhaseTracker:
    # every per-row tensor of the state, and the ones a step changes (engines keep them per request
    # and run the tracker on a gathered view: ``from_state`` / ``MUTABLE``)
    STATE = ("marker", "marker_len", "budget", "thinking", "n_think", "n_generated", "tail", "force_pos")
    MUTABLE = ("thinking", "n_think", "n_generated", "tail", "force_pos")

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PhaseTracker:
        """A tracker over given state rows (e.g. gathered from an engine's per-request buffers)."""
        missing = [n for n in cls.STATE if n not in state]
        if missing:
            raise KeyError(f"phase state lacks {missing}")
        tracker = cls.__new__(cls)
        for name in cls.STATE:
            setattr(tracker, name, state[name])
        return tracker

    def __init__(self, markers: Sequence[Sequence[int]], budgets: Sequence[int | None], device="cpu"):
        if any(len(m) == 0 for m in markers):
            raise ValueError("every think-end marker must encode to at least one token")
        B = len(markers)
        M = max(len(m) for m in markers)
        self.marker = torch.full((B, M), -1, dtype=torch.int64, device=device)
        for b, m in enumerate(markers):
            self.marker[b, M - len(m):] = torch.tensor(list(m), dtype=torch.int64)
        self.marker_len = torch.tensor([len(m) for m in markers], dtype=torch.int64, device=device)
        self.budget = torch.tensor([-1 if x is None else x for x in budgets], dtype=torch.int64, device=device)
        self.thinking = torch.ones(B, dtype=torch.bool, device=device)
        self.n_think = torch.zeros(B, dtype=torch.int64, device=device)  # thinking-phase steps so far
        self.n_generated = torch.zeros(B, dtype=torch.int64, device=device)
        self.tail = torch.full((B, M), -2, dtype=torch.int64, device=device)
        self.force_pos = torch.full((B,), -1, dtype=torch.int64, device=device)  # index into marker row

    def forced_tokens(self) -> torch.Tensor:
        """Tokens to force at this step ([B], -1 = none); starts forcing rows over their budget."""
        M = self.marker.shape[1]
        start = self.thinking & (self.budget >= 0) & (self.n_think >= self.budget) & (self.force_pos < 0)
        self.force_pos = torch.where(start, M - self.marker_len, self.force_pos)
        pos = self.force_pos.clamp_min(0)
        tok = self.marker.gather(1, pos[:, None]).squeeze(1)
        return torch.where(self.force_pos >= 0, tok, torch.full_like(tok, -1))

    def advance(self, out: SampleOutput) -> tuple[SampleOutput, torch.Tensor, torch.Tensor]:
        """Record a sampled step: returns (step as recorded, was_thinking [B], forced [B]).

        The recorded step of a row whose token completes its marker becomes discrete (one-hot).
        """
        M = self.marker.shape[1]
        forced = self.force_pos >= 0
        was_thinking = self.thinking.clone()
        self.tail = torch.cat([self.tail[:, 1:], out.token[:, None]], dim=1)
        self.n_generated += 1
        matched = ((self.tail == self.marker) | (self.marker < 0)).all(-1) & (self.n_generated >= self.marker_len)
        ends = was_thinking & matched
        self.n_think += was_thinking.long()
        self.thinking = self.thinking & ~ends
        self.force_pos = torch.where(forced & ~ends, (self.force_pos + 1).clamp_max(M - 1), self.force_pos)
        self.force_pos = torch.where(ends, torch.full_like(self.force_pos, -1), self.force_pos)
        return to_discrete(out, ends), was_thinking, forced

    def is_soft_phase(self, soft_enabled: torch.Tensor) -> torch.Tensor:
        return self.thinking & soft_enabled

    def phase_columns(self, soft_enabled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The phase-dependent SamplingBatch columns of this step (thinking, is_soft)."""
        return {"thinking": self.thinking, "is_soft": self.is_soft_phase(soft_enabled)}
