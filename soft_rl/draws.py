"""Per-draw log-probs, for losses that give each draw of a soft step its own PPO ratio.

A kind scored through the full vocabulary (``NoiseKind.scores_full_vocab``: Multiplex Thinking) draws its K slots
i.i.d. from the policy, so a soft step's log-probability is the sum of its draws' log p(i_j). The official
Multiplex Thinking loss does not form that joint ratio: it clips one ratio per draw and sums the K clipped terms
(``learner.multiplex_ratio=per_draw``; docs/design/multiplex-reference.md, section 4). The learner then returns,
per trajectory of such a kind, log-probs [R, J] with J = K (its slots' width):

    soft step t:      [log p(i_t1), ..., log p(i_tK)]    the valid draws (duplicates included), 0 elsewhere
    discrete step t:  [log p(x_t), 0, ..., 0]            one draw

and per trajectory of any other kind [R, 1] (its one score per position). Masked entries are 0, so a position's
joint log-prob is the sum over its draws (``joint_logprob``), which is what the rollout stores and the parity probe
compares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soft_rl.densities import density_slots
from soft_rl.noise_kinds import noise_kind
from soft_rl.trajectory import Trajectory

MULTIPLEX_RATIOS = ("per_draw", "joint")  # learner.multiplex_ratio


def per_draw_ratio(multiplex_ratio: str) -> bool:
    """Whether ``learner.multiplex_ratio`` asks for per-draw log-probs (one PPO ratio per draw)."""
    if multiplex_ratio not in MULTIPLEX_RATIOS:
        raise ValueError(f"multiplex_ratio must be one of {MULTIPLEX_RATIOS}, got {multiplex_ratio!r}")
    return multiplex_ratio == "per_draw"


def scores_per_draw(traj: Trajectory) -> bool:
    """Whether ``traj``'s soft steps have per-draw log-probs (a soft trajectory of a full-vocabulary kind)."""
    return bool(traj.sampling.soft) and noise_kind(traj.sampling.noise).scores_full_vocab and bool(traj.is_soft.any())


def draw_count(traj: Trajectory) -> int:
    """J, the width of ``traj``'s per-draw log-probs: its slots' width K, or 1."""
    return int(traj.topk_ids.shape[-1]) if scores_per_draw(traj) else 1


def draw_mask(traj: Trajectory, density: str) -> torch.Tensor:
    """bool [R, J]: the draws a position scores: slot 0 everywhere, and at a soft step every valid draw."""
    J = draw_count(traj)
    mask = torch.zeros(traj.num_tokens, J, dtype=torch.bool)
    mask[:, 0] = True
    if J > 1:
        slots = density_slots(traj.slot_valid(), traj.kept, density)
        mask = torch.where(traj.is_soft[:, None], slots, mask)
    return mask


def joint_logprob(logp: torch.Tensor) -> torch.Tensor:
    """[R, J] per-draw log-probs (masked entries 0) -> [R], the joint log-prob; an [R] tensor passes unchanged."""
    return logp.sum(-1) if logp.dim() == 2 else logp


def split_draws(flat: torch.Tensor, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
    """[N, J'] per-draw log-probs of a micro-batch's positions (trajectory after trajectory, J' >= every J) ->
    each trajectory's [R, J]."""
    rows = flat.split([t.num_tokens for t in trajs])
    return [r[:, : draw_count(t)] for r, t in zip(rows, trajs, strict=True)]


def pad_draws(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """[R_b, J_b] rows -> [B, max R, max J], zero-padded (bool rows pad with False); an [R_b] row is [R_b, 1]."""
    rows = [r[:, None] if r.dim() == 1 else r for r in rows]
    R = max((r.shape[0] for r in rows), default=0)
    J = max((r.shape[1] for r in rows), default=1)
    out = rows[0].new_zeros(len(rows), R, J) if rows else torch.zeros(0, 0, 1)
    for b, r in enumerate(rows):
        out[b, : r.shape[0], : r.shape[1]] = r
    return out
