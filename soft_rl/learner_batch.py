"""Turning trajectories into learner micro-batches (pure torch; the learner actors call these).

A micro-batch is a right-padded batch of prompt+response sequences whose inputs are the detached
mixed embeddings rebuilt from the stored values, plus flat indices of the scored positions: the
logits at sequence position P - 1 + t score generated step t. Soft positions keep their K ids so the
head computes only K logits there; discrete positions get the full vocabulary.
Micro-batches are cut by a token budget so that peak memory stays bounded for long responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soft_rl.densities import RowNoise, density_slots
from soft_rl.noise_kinds import noise_kind
from soft_rl.noise_kinds.embedding_gaussian import EmbeddingObservation
from soft_rl.reference import build_inputs_embeds, observed_inputs
from soft_rl.trajectory import Trajectory


def split_by_token_budget(trajs: Sequence[Trajectory], budget: int, max_seqs: int | None = None) -> list[list[int]]:
    """Consecutive groups of trajectory indices whose padded size (n * longest) fits the budget and,
    with ``max_seqs``, that hold at most that many trajectories.

    A single trajectory longer than the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, t in enumerate(trajs):
        L = t.prompt_ids.shape[0] + t.num_tokens - 1
        full = max_seqs is not None and len(cur) >= max_seqs
        if cur and (full or (len(cur) + 1) * max(longest, L) > budget):
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, L)
    if cur:
        groups.append(cur)
    return groups


@dataclass
class MicroBatch:
    inputs_embeds: torch.Tensor  # [B, L, H] detached
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    disc_rows: torch.Tensor  # flat indices (b * L + s) of the positions scored through the full vocabulary
    soft_rows: torch.Tensor  # flat indices of soft scored positions scored by their K logits (the lean head)
    soft_ids: torch.Tensor  # [Ns, K]
    disc_labels: torch.Tensor  # [Nd, J] the labels scored at disc_rows: the token (J = 1), or with soft steps of a
    # kind scored through the full vocabulary in the batch their K ids (J = K; a discrete step's ids are K copies)
    # per scored position, in the order: all positions of trajectory 0, then 1, ... (length N)
    order_is_soft: torch.Tensor  # [N] bool
    order_full: torch.Tensor  # [N] bool: scored through the full vocabulary (discrete, or a full-vocabulary kind)
    tokens: torch.Tensor  # [N]
    noisy: torch.Tensor  # [N, K]
    temperature: torch.Tensor  # [N]
    slots: torch.Tensor  # [N, K] slots entering the soft density
    noise: RowNoise  # [N] each position's request noise settings (requests may differ within a micro-batch)
    lengths: list[int]  # R per trajectory, to split the N positions back
    # soft steps of a kind that noises the input (NoiseKind.noises_input), None when the micro-batch holds no
    # trajectory of such a kind: their indices among the lean soft rows (soft_rows order), the inputs h observed
    # after them [Ng, H] float32 (rebuilt from the rollout-time embedding), sigma and tau [Ng]
    input_noise_rows: torch.Tensor | None = None
    input_obs: torch.Tensor | None = None
    input_sigma: torch.Tensor | None = None
    input_tau: torch.Tensor | None = None

    def embedding_observation(self, rows: torch.Tensor | None) -> EmbeddingObservation | None:
        """The density's observation of the input-noised soft steps, with the policy's embedding ``rows`` [Ng, K, H]
        at their ids (the model's forward returns them)."""
        if self.input_noise_rows is None:
            return None
        return EmbeddingObservation(obs=self.input_obs, rows=rows, sigma=self.input_sigma, tau=self.input_tau)


def build_micro_batch(embedding_weight: torch.Tensor, trajs: Sequence[Trajectory], density: str) -> MicroBatch:
    """``embedding_weight``: the embedding the inputs are rebuilt from (for a kind that noises the input, the
    rollout-time one: its inputs are the density's observations)."""
    dev = embedding_weight.device
    noised = [noise_kind(t.sampling.noise).noises_input for t in trajs]
    # the inputs after each step of a kind that noises the input, rebuilt once: the model reads them, the density
    # scores them
    inputs = [observed_inputs(embedding_weight, t) if on else None for t, on in zip(trajs, noised, strict=True)]
    seqs = [build_inputs_embeds(embedding_weight, t, observed) for t, observed in zip(trajs, inputs, strict=True)]
    B, L, H = len(seqs), max(s.shape[0] for s in seqs), embedding_weight.shape[1]
    x = torch.zeros(B, L, H, dtype=embedding_weight.dtype, device=dev)
    attn = torch.zeros(B, L, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        x[b, : s.shape[0]] = s
        attn[b, : s.shape[0]] = 1
    pos = torch.arange(L, device=dev).expand(B, L)
    flat, is_soft, tokens, noisy, temps, slots, ids, lengths = [], [], [], [], [], [], [], []
    for b, t in enumerate(trajs):
        P, R = t.prompt_ids.shape[0], t.num_tokens
        flat.append(b * L + P - 1 + torch.arange(R))
        is_soft.append(t.is_soft)
        tokens.append(t.tokens)
        noisy.append(t.noisy)
        temps.append(t.position_temperatures())
        slots.append(density_slots(t.slot_valid(), t.kept, density))
        ids.append(t.topk_ids)
        lengths.append(R)
    noise = RowNoise.from_settings([(t.sampling.noise, t.sampling.noise_scale, t.sampling.noise_clamp,
                                     t.sampling.dirichlet_alpha) for t in trajs],
                                   [t.num_tokens for t in trajs], [t.num_soft for t in trajs])
    flat_t, soft_t = torch.cat(flat), torch.cat(is_soft)
    ids_t, tokens_t = torch.cat(ids), torch.cat(tokens)
    full_t = ~soft_t | (soft_t & noise.full_vocab())
    lean_t = soft_t & ~full_t
    labels = ids_t[full_t] if bool((soft_t & full_t).any()) else tokens_t[full_t, None]
    extra = {}
    if any(noised):  # the observed inputs after the soft steps of a kind that noises the input
        lean_idx = torch.full((soft_t.numel(),), -1, dtype=torch.long)
        lean_idx[lean_t] = torch.arange(int(lean_t.sum()))
        rows, obs, sigma, tau, start = [], [], [], [], 0
        for t, observed in zip(trajs, inputs, strict=True):
            if observed is not None and t.num_soft:
                soft = t.is_soft.nonzero().flatten()
                rows.append(lean_idx[start + soft])
                obs.append(observed[soft.to(dev)])
                sigma.append(torch.full((soft.numel(),), t.sampling.embedding_sigma, dtype=torch.float32))
                tau.append(torch.full((soft.numel(),), t.sampling.tau, dtype=torch.float32))
            start += t.num_tokens
        H = embedding_weight.shape[1]
        extra = dict(input_noise_rows=torch.cat(rows).to(dev) if rows else torch.zeros(0, dtype=torch.long, device=dev),
                     input_obs=torch.cat(obs) if obs else torch.zeros(0, H, device=dev),
                     input_sigma=torch.cat(sigma).to(dev) if sigma else torch.zeros(0, device=dev),
                     input_tau=torch.cat(tau).to(dev) if tau else torch.zeros(0, device=dev))
    return MicroBatch(
        inputs_embeds=x, attention_mask=attn, position_ids=pos,
        disc_rows=flat_t[full_t].to(dev), soft_rows=flat_t[lean_t].to(dev), soft_ids=ids_t[lean_t].to(dev),
        disc_labels=labels.to(dev), order_is_soft=soft_t.to(dev), order_full=full_t.to(dev),
        tokens=tokens_t.to(dev), noisy=torch.cat(noisy).to(dev),
        temperature=torch.cat(temps).to(dev), slots=torch.cat(slots).to(dev), noise=noise.to(dev), lengths=lengths,
        **extra)


def pad_rows(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Split a flat [N] vector by lengths and right-pad to [B, max(lengths)]."""
    out = values.new_zeros(len(lengths), max(lengths) if lengths else 0)
    for b, chunk in enumerate(values.split(lengths)):
        out[b, : chunk.shape[0]] = chunk
    return out
