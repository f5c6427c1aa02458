"""A single-process SofT-GRPO update on an HF model: the plain-torch reference of one learner step.

Given trajectories (from the HF reference or the vLLM engine) and their rewards, it forms GRPO
advantages per prompt group, recomputes old log-probs with the current weights (the learner never
trusts rollout log-probs for the ratio), and takes PPO mini-batch steps with the SofT-GRPO (soft
positions: Gumbel density; discrete positions: token log-prob) or plain GRPO objective. The
distributed DeepSpeed learner must end at the same parameters on the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from soft_rl.draws import draw_mask, pad_draws, per_draw_ratio
from soft_rl.losses import PER_MICRO_BATCH_AGGREGATIONS, compute_advantages, ppo_policy_loss
from soft_rl.noise_kinds import noise_kind
from soft_rl.reference import teacher_forced_logprobs
from soft_rl.trajectory import Trajectory


@dataclass
class UpdateConfig:
    density: str = "official"
    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    grad_clip: float = 1.0
    micro_batch_seqs: int | None = None  # with agg="micro-batch-token-mean": sequences per micro-batch
    multiplex_ratio: str = "per_draw"  # per_draw | joint: one ratio per draw of a full-vocabulary kind, or per step
    is_cap: float = 2.0  # off-policy batches (grpo_update's behaviour): the behaviour weight's truncation
    is_band: tuple[float, float] | None = None  # and the band outside which a position is masked


def pad_logprobs(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    R = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), R, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def loss_mask(trajs: Sequence[Trajectory]) -> torch.Tensor:
    """1 for generated positions that were sampled (forced marker tokens are not the policy's)."""
    return pad_logprobs([(~t.forced).float() for t in trajs])


def grpo_update(model, optimizer, trajs: Sequence[Trajectory], rewards: torch.Tensor, group: torch.Tensor,
                cfg: UpdateConfig, ref_model=None, per_step_metrics: bool = False,
                behaviour: Sequence[torch.Tensor] | None = None):
    """One RL step: advantages, old (and reference) log-probs, then PPO epochs over mini-batches.

    ``behaviour``: per trajectory the log-probs [R] of the policy that generated it when that is an older weight
    version (its rollout's ``Trajectory.logprobs``): the recomputed old log-probs become the proximal policy and
    each position is reweighted (decoupled PPO, ``soft_rl.losses.behaviour_weights``). None: on-policy.
    Returns the last mini-batch's metrics, or with ``per_step_metrics`` the gradient norm of every
    optimizer step."""
    dev = next(model.parameters()).device
    adv = compute_advantages(cfg.advantage, rewards, group).to(dev)
    per_draw = per_draw_ratio(cfg.multiplex_ratio)
    pad = pad_draws if per_draw else pad_logprobs
    # a kind that noises the input is scored at the inputs the rollout fed: rebuilt, in every forward of the step,
    # from the embedding as it is now (the rollout's weights)
    observed = model.get_input_embeddings().weight.detach().clone() \
        if any(noise_kind(t.sampling.noise).noises_input for t in trajs) else None
    with torch.no_grad():
        old = pad(teacher_forced_logprobs(model, trajs, cfg.density, per_draw=per_draw, observed_embedding=observed))
        ref = pad(teacher_forced_logprobs(ref_model, trajs, cfg.density, per_draw=per_draw,
                                          observed_embedding=observed)) if ref_model is not None else None
    mask = loss_mask(trajs).to(dev)
    beh = None if behaviour is None else pad_logprobs(list(behaviour)).to(dev)
    draws = pad_draws([draw_mask(t, cfg.density) for t in trajs]).to(dev) if per_draw else None
    n = len(trajs)
    chunks = torch.arange(n).chunk(cfg.mini_batches)
    metrics: dict[str, float] = {}
    norms: list[float] = []
    def mini_batch_loss(idx: torch.Tensor, agg: str):
        sub = [trajs[i] for i in idx.tolist()]
        lp_rows, ent_rows = teacher_forced_logprobs(model, sub, cfg.density, grad=True, with_entropy=True,
                                                    per_draw=per_draw, observed_embedding=observed)
        logp = pad(lp_rows)
        R = logp.shape[1]
        J = logp.shape[2] if per_draw else None
        cut = (slice(None), slice(0, R)) if J is None else (slice(None), slice(0, R), slice(0, J))
        return ppo_policy_loss(
            logp, old[idx][cut], adv[idx], mask[idx, :R], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=agg, ref_logp=None if ref is None else ref[idx][cut],
            kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, entropy=pad_logprobs(ent_rows), entropy_coef=cfg.entropy_coef,
            draw_mask=None if draws is None else draws[idx][cut],
            behaviour_logp=None if beh is None else beh[idx, :R], is_cap=cfg.is_cap, is_band=cfg.is_band)

    for _ in range(cfg.ppo_epochs):
        for idx in chunks:
            optimizer.zero_grad(set_to_none=True)
            if cfg.agg in PER_MICRO_BATCH_AGGREGATIONS:
                # verl 0.4: loss = sum over micro-batches of token-mean(micro-batch) / number of micro-batches
                if cfg.micro_batch_seqs is None:
                    raise ValueError(f"agg={cfg.agg!r} needs micro_batch_seqs")
                micro = idx.split(cfg.micro_batch_seqs)
                for mi in micro:
                    loss, m = mini_batch_loss(mi, "token-mean")
                    (loss / len(micro)).backward()
            else:
                loss, m = mini_batch_loss(idx, cfg.agg)
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                metrics["skipped_steps"] = metrics.get("skipped_steps", 0.0) + 1
            metrics.update({k: float(v) for k, v in m.items()})
            metrics["grad_norm"] = float(grad_norm)
            norms.append(float(grad_norm))
    return norms if per_step_metrics else metrics
