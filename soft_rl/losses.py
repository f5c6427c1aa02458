"""Policy-gradient losses: per-position log-probs, GRPO advantages, PPO clip, KL, aggregation.

Pure torch on [B, R] tensors with a [B, R] response mask. Advantage estimators and loss
aggregations are registered by name so a config picks them and a new variant is one function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from soft_rl.densities import soft_logprob, soft_weights  # noqa: F401  (public API: soft_rl.losses.soft_logprob)


def discrete_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | torch.Tensor = 1.0):
    """log softmax(z / T)[x] over the full vocabulary: logits [..., V], tokens [...] -> [...]."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.dim() > 0:
        t = t.unsqueeze(-1)
    z = logits.float() / t
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, per position; with ``valid``, over the valid entries only.

    The policy entropy a step reports: over the full vocabulary at a discrete step; at a soft step
    over its K candidates (p-hat, the softmax of the K logits), which is all the lean learner computes.
    """
    z = logits.float()
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    p = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (p * z.masked_fill(p == 0, 0.0)).sum(-1)


# ---------------------------------------------------------------- advantages

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """Per-sample mean and unbiased std of the rewards of its group (group ids [N])."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    G = counts.shape[0]
    r = rewards.float()
    sums = torch.zeros(G, dtype=torch.float32, device=r.device).index_add_(0, inv, r)
    mean = sums / counts
    sq = torch.zeros(G, dtype=torch.float32, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
    # unbiased (n - 1) as torch.std; a group of one has std 0 (its advantage is then 0).
    std = torch.sqrt(sq / (counts - 1).clamp_min(1))
    return mean[inv], std[inv]


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps), unbiased std within each prompt's group."""
    mean, std = _group_stats(rewards, group)
    return (rewards.float() - mean) / (std + eps)


@register_advantage("grpo_no_std")
def grpo_mean_only_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = R_i - mean_G R (Dr.GRPO: no division by the group std)."""
    mean, _ = _group_stats(rewards, group)
    return rewards.float() - mean


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = R_i - mean_{j != i, j in G} R_j = n / (n - 1) * (R_i - mean_G R), the
    baseline each sample's group mates give (unbiased: it does not depend on the sample); a group of one gets 0.
    Used by Soft Tokens, Hard Truths (arXiv 2509.19170)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    n = counts[inv].to(torch.float32)
    mean, _ = _group_stats(rewards, group)
    return torch.where(n > 1, n / (n - 1).clamp_min(1.0) * (rewards.float() - mean), torch.zeros_like(mean))


def compute_advantages(name: str, rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6):
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](rewards, group, eps)


# ---------------------------------------------------------------- aggregation

LOSS_AGGREGATIONS: dict[str, Callable] = {}


def register_aggregation(name: str):
    def deco(fn):
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return deco


# Each aggregation returns (numerator, denominator) so that a batch split over micro-batches and
# data-parallel ranks aggregates exactly like the whole batch: sum(numerators) / sum(denominators).

@register_aggregation("token-mean")
def _token_mean(x, mask, norm_length=None):
    """sum over all tokens / number of tokens (every token weighs the same)."""
    m = mask.to(x.dtype)
    return (x * m).sum(), m.sum()


@register_aggregation("micro-batch-token-mean")
def _micro_batch_token_mean(x, mask, norm_length=None):
    """The official code's ``token-mean`` (verl 0.4): the token mean of each *micro-batch*, and the
    micro-batches averaged (each micro-loss divided by the gradient-accumulation count, gradients
    averaged over data-parallel ranks). Called on one micro-batch, it returns (its token mean, 1): the
    caller's denominator is the number of micro-batches in the mini-batch. Tokens in a short
    micro-batch weigh more than in a long one, so the update depends on how the mini-batch is cut
    (``learner.micro_batch_seqs``)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0), x.new_tensor(1.0)


# aggregations whose unit is a micro-batch (the mini-batch's denominator is the micro-batch count)
PER_MICRO_BATCH_AGGREGATIONS = frozenset({"micro-batch-token-mean"})


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(x, mask, norm_length=None):
    """mean over sequences of each sequence's token mean (every sequence weighs the same)."""
    m = mask.to(x.dtype)
    per_seq = (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    has = (m.sum(-1) > 0).to(x.dtype)
    return (per_seq * has).sum(), has.sum()


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(x, mask, norm_length=None):
    """mean over sequences of each sequence's token sum."""
    return (x * mask.to(x.dtype)).sum(), x.new_tensor(float(x.shape[0]))


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(x, mask, norm_length=None):
    """Dr.GRPO: sum over tokens / a constant length (default: the padded length R), mean over sequences."""
    L = float(norm_length if norm_length is not None else x.shape[-1])
    return (x * mask.to(x.dtype)).sum() / L, x.new_tensor(float(x.shape[0]))


def aggregate_parts(x: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None = None):
    """(numerator, denominator) of the aggregation ``mode``."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode](x, mask, norm_length)


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None = None) -> torch.Tensor:
    num, den = aggregate_parts(x, mask, mode, norm_length)
    return num / den.clamp_min(1.0)


# ---------------------------------------------------------------- KL

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", clamp: float = 10.0):
    """Per-token KL(pi || ref) estimators with d = ref_logp - logp:
    k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (low variance, >= 0), clamped to [-clamp, clamp].
    k3 is computed as expm1(d) - d: exp(d) - 1 - d loses every digit to cancellation for |d| near float32's
    epsilon and can come out negative (-1e-9 where policy and reference nearly agree); expm1 keeps it >= 0 up to
    one rounding, and the lower clamp at 0 removes that (the official code's exp(d) - d - 1 differs from it only
    by rounding)."""
    d = ref_logp.float() - logp.float()
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind in ("k3", "low_var_kl"):
        d = d.clamp(-20.0, 20.0)
        return (torch.expm1(d) - d).clamp(0.0, clamp)
    raise ValueError(f"unknown KL estimator {kind!r}; known: k1, k2, k3")


# ---------------------------------------------------------------- PPO / GRPO policy loss

def behaviour_weights(prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, *, cap: float = 2.0,
                      band: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO's behaviour correction (AReaL): the clipped ratio is taken against the proximal policy (the
    learners' recomputed log-probs), and each position is reweighted by how much likelier the proximal policy makes
    what the behaviour policy (the engine that generated it, an older weight version) sampled:

        w = min(exp(lp_prox - lp_behaviour), cap)                   truncated importance weight (TIS)
        w = 0 where exp(lp_prox - lp_behaviour) is outside band     masked importance sampling (MIS), optional

    A constant of the loss (no gradient). For a discrete position lp is log p(token); for a soft one it is the
    density of the stored values, and the weight is a likelihood ratio only where that density is one
    (``learner.density`` exact or gumbel-max): the official density is a masked mean over slots, and exp of its
    difference is a per-slot geometric-mean ratio, a surrogate. Either way the density is conditional on the stored
    slot ids, so a slot set the proximal policy would not have kept is not penalised by the weight.
    Returns (w, dict(log_w, capped, masked)), the masks bool."""
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    dtype = torch.promote_types(prox_logp.dtype, torch.float32)
    # float64 difference: two log-probs of a few hundred in size (soft steps) differ by O(1)
    log_w = (prox_logp.detach().double() - behaviour_logp.detach().double()).clamp(-20.0, 20.0)
    raw = torch.exp(log_w)
    w = raw.clamp(max=cap)
    masked = torch.zeros_like(raw, dtype=torch.bool)
    if band is not None:
        lo, hi = band
        if not 0 <= lo < hi:
            raise ValueError(f"the importance-weight band must be (lo, hi) with 0 <= lo < hi, got {band}")
        masked = (raw < lo) | (raw > hi)
        w = torch.where(masked, torch.zeros_like(w), w)
    return w.to(dtype), dict(log_w=log_w.to(dtype), capped=raw > cap, masked=masked)


BEHAVIOUR_METRICS = ("is_weight_mean", "is_weight_max", "is_abs_log_w", "is_capped_frac", "is_masked_frac")


def behaviour_metrics(w: torch.Tensor, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over the positions of ``mask`` [B, R]: the behaviour weights' mean and max, the mean |log w| (how far the
    batch is off-policy) and the fractions capped and masked (``behaviour_weights``)."""
    m = mask.bool()
    n = m.sum().clamp_min(1).float()
    values = ((w * m).sum() / n, torch.where(m, w, torch.zeros_like(w)).max(), (parts["log_w"].abs() * m).sum() / n,
              (parts["capped"] & m).sum().float() / n, (parts["masked"] & m).sum().float() / n)
    return {key: v.detach() for key, v in zip(BEHAVIOUR_METRICS, values, strict=True)}


def ppo_token_losses(logp, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, dual_clip=3.0, is_weight=None):
    """Per-token clipped surrogate (see ppo_policy_loss) and its intermediate terms; ``is_weight`` (the shape of
    ``logp``, or None): decoupled PPO's behaviour weight, multiplying each token's term (``behaviour_weights``)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(surr1, surr2)
    per_token = clipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        per_token = torch.where(advantages < 0, torch.minimum(clipped, -dual_clip * advantages), clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    return per_token, dict(log_ratio=log_ratio, ratio=ratio, surr1=surr1, surr2=surr2, clipped=clipped,
                           advantages=advantages)


def ppo_draw_losses(logp, old_logp, advantages, draw_mask, *, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                    is_weight=None):
    """Per-position loss [B, R] of per-draw log-probs [B, R, J] (``soft_rl.draws``): every draw its own clipped
    (and dual-clipped) ratio, the draws' terms summed (Multiplex Thinking's official loss):

        r_tj = exp(logp_tj - old_tj);   l_t = sum_j m_tj max(-A r_tj, -A clip(r_tj, 1 - eps_low, 1 + eps_high))
        (for A < 0 each term is min(., -c A) first)

    ``advantages`` [B] or [B, R]; ``draw_mask`` [B, R, J] bool; ``is_weight`` [B, R]: a position's behaviour weight
    (the rollout stores one log-prob per position, the draws' joint one), multiplying the draws' sum. Returns
    (l [B, R], the per-draw terms as ``ppo_token_losses`` names them)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    per_draw, parts = ppo_token_losses(logp, old_logp, advantages[..., None].expand_as(logp), clip_low=clip_low,
                                       clip_high=clip_high, dual_clip=dual_clip)
    out = (per_draw * draw_mask.to(per_draw.dtype)).sum(-1)
    return (out if is_weight is None else out * is_weight), parts


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    norm_length: int | None = None,
    draw_mask: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
    is_cap: float = 2.0,
    is_band: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with optional dual clip, KL and entropy terms; [B, R] in, scalar out.
    With ``draw_mask`` [B, R, J], ``logp``/``old_logp``/``ref_logp`` are per-draw [B, R, J] and each draw has its
    own ratio (``ppo_draw_losses``); the KL term takes the joint log-probs (the sum over draws).

    r = exp(logp - old_logp)
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))         (clip-higher when eps_high > eps_low)
    if A < 0: l = min(l, -c A)                                    (dual clip, c > 1)
    loss = agg(l) + beta * agg(KL(pi || ref)) - entropy_coef * agg(H)
    ``advantages`` may be [B] (broadcast over the response) or [B, R].
    ``behaviour_logp`` [B, R] (off-policy batches: the engine's log-probs of an older weight version; None: on-policy,
    no correction and no extra operation): ``old_logp`` is then the proximal policy, and each position's term is
    weighted by ``behaviour_weights(old, behaviour, cap=is_cap, band=is_band)`` (decoupled PPO).
    """
    w = w_parts = None
    if behaviour_logp is not None:
        prox = old_logp if draw_mask is None else old_logp.sum(-1)  # per position: the draws' joint log-prob
        w, w_parts = behaviour_weights(prox, behaviour_logp, cap=is_cap, band=is_band)
    if draw_mask is None:
        per_token, parts = ppo_token_losses(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                            dual_clip=dual_clip, is_weight=w)
        m = mask.float()
    else:
        per_token, parts = ppo_draw_losses(logp, old_logp, advantages, draw_mask, clip_low=clip_low,
                                           clip_high=clip_high, dual_clip=dual_clip, is_weight=w)
        m = mask.float()[..., None] * draw_mask.float()  # the metrics count draws
        logp = logp.sum(-1)
        ref_logp = None if ref_logp is None else ref_logp.sum(-1)
    log_ratio, ratio, surr1, surr2, clipped = (parts[k] for k in ("log_ratio", "ratio", "surr1", "surr2", "clipped"))
    advantages = parts["advantages"]
    loss = aggregate(per_token, mask, agg, norm_length)
    n = m.sum().clamp_min(1.0)
    metrics = {
        "pg_loss": loss.detach(),
        "clip_frac": ((surr2 > surr1).float() * m).sum().detach() / n,
        "dual_clip_frac": (((advantages < 0) & (clipped > -(dual_clip or float("inf")) * advantages)).float()
                           * m).sum().detach() / n,
        "approx_kl_old": ((-log_ratio) * m).sum().detach() / n,
        "ratio_mean": (ratio * m).sum().detach() / n,
    }
    if w is not None:
        metrics.update(behaviour_metrics(w, w_parts, mask))
    if ref_logp is not None and kl_coef:
        kl = aggregate(kl_penalty(logp, ref_logp, kl_kind), mask, agg, norm_length)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    if entropy is not None and entropy_coef:
        ent = aggregate(entropy, mask, agg, norm_length)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
