"""Memory-lean per-position log-probs from final hidden states (the learner's hot path).

The reference learner materialises a full-vocabulary softmax at every position. A soft step needs
only the K logits at its stored ids, z_k = h . W[i_k] (+ b[i_k]), because p-hat is a softmax over
those K; a discrete step needs log softmax(h W^T / T)[x], computed here in chunks of positions so
that at most ``chunk_tokens`` x V logits exist at a time, in the forward and in the backward (which
recomputes them: ``token_scores``). With half the positions soft, a SofT-GRPO
step therefore costs less logit memory than a plain GRPO step on the same tokens.
"""

from __future__ import annotations

import torch

from soft_rl.densities import RowNoise, soft_logprob, soft_logprob_rows
from soft_rl.losses import entropy_from_logits


def _head_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (a, b in the model dtype): on CUDA straight into float32
    (no float32 copy of a vocabulary-sized operand), elsewhere by upcasting the operands."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _TokenScores(torch.autograd.Function):
    """(log softmax(z / T)[x], entropy of softmax(z / T)) with z = h W^T + b, over the full vocabulary, in
    chunks of positions: neither the forward nor the saved state holds more than ``chunk`` x V logits.
    The backward recomputes each chunk's logits (like activation checkpointing of the head alone).

    Gradients with u = z / T, p = softmax(u), lse = logsumexp(u), E[u] = sum_v p_v u_v:
        d lp / d u_v = [v = x] - p_v
        d H / d u_v  = -p_v (u_v - E[u])           (H = lse - E[u])
    and d / d z = (d / d u) / T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk: int, upcast: bool):
        N = hidden.shape[0]
        lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse, mean_u = torch.empty_like(lp), torch.empty_like(lp)
        for s in range(0, N, chunk):
            u = _TokenScores.logits(hidden[s: s + chunk], weight, bias, upcast) / temperature[s: s + chunk, None]
            lse[s: s + chunk] = torch.logsumexp(u, -1)
            p = torch.exp(u - lse[s: s + chunk, None])
            mean_u[s: s + chunk] = (p * u).sum(-1)
            lp[s: s + chunk] = u.gather(1, tokens[s: s + chunk, None]).squeeze(1) - lse[s: s + chunk]
        ctx.save_for_backward(hidden, weight, bias, tokens, temperature, lse, mean_u)
        ctx.chunk, ctx.upcast = chunk, upcast
        return lp, lse - mean_u

    @staticmethod
    def logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool) -> torch.Tensor:
        """float32 logits [n, V] of one chunk: accumulated in float32 with ``upcast`` (model.head_dtype)."""
        z = _head_mm(h, weight.t()) if upcast else (h @ weight.t()).float()
        return z if bias is None else z + bias.float()

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tokens, temperature, lse, mean_u = ctx.saved_tensors
        chunk, upcast = ctx.chunk, ctx.upcast
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s: s + chunk], temperature[s: s + chunk, None]
            u = _TokenScores.logits(h, weight, bias, upcast) / t
            p = torch.exp(u - lse[s: s + chunk, None])
            g = -p * (g_lp[s: s + chunk, None] + g_ent[s: s + chunk, None] * (u - mean_u[s: s + chunk, None]))
            g.scatter_add_(1, tokens[s: s + chunk, None], g_lp[s: s + chunk, None])
            g = g / t  # d / d z
            gm = g.to(weight.dtype)
            if need_h:
                grad_h[s: s + chunk] = (_head_mm(gm, weight) if upcast else gm @ weight).to(h.dtype)
            if need_w:
                grad_w += _head_mm(gm.t().contiguous(), h) if upcast else (gm.t() @ h).float()
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                 temperature: torch.Tensor, *, chunk_tokens: int = 2048, upcast: bool = True):
    """Full-vocabulary (log-probs [N], entropies [N]) of tokens [N] at hidden states [N, H] under the head
    (weight [V, H], bias [V]) at per-position temperatures [N], at most ``chunk_tokens`` x V logits alive
    at a time, forward and backward. ``upcast``: logits accumulated in float32 whatever the model dtype."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _TokenScores.apply(hidden, weight, bias, tokens, temperature.float(), int(chunk_tokens), bool(upcast))


def gathered_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor):
    """z[n, k] = h_n . W[ids[n, k]] (+ b[ids[n, k]]): only K output rows per position, [N, K]."""
    z = torch.einsum("nh,nkh->nk", hidden, weight[ids])
    if bias is not None:
        z = z + bias[ids]
    return z


def position_logprobs_lean(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    tokens: torch.Tensor,
    topk_ids: torch.Tensor,
    noisy: torch.Tensor,
    is_soft: torch.Tensor,
    temperature: torch.Tensor,
    slots: torch.Tensor,
    density: str,
    noise: str,
    noise_scale: float | torch.Tensor = 1.0,
    clamp: tuple[float, float] | None = (-1.5, 3.0),
    dirichlet_alpha: float | torch.Tensor = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Log-probs [N] of N scored positions (flattened over the batch) from their hidden states [N, H].

    Soft positions: soft_logprob over the K gathered logits / T at ``topk_ids`` with ``slots`` the
    slots entering the density; discrete positions: the full-vocabulary token log-prob.
    """
    N = hidden.shape[0]
    out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    disc = (~is_soft).nonzero().flatten()
    soft = is_soft.nonzero().flatten()
    if disc.numel():
        lp, _ = token_scores(hidden[disc], weight, bias, tokens[disc], temperature[disc], chunk_tokens=chunk_tokens)
        out = out.index_put((disc,), lp)
    if soft.numel():
        z = gathered_logits(hidden[soft], weight, bias, topk_ids[soft]).float() / temperature[soft, None]
        per_row = [torch.as_tensor(v, device=hidden.device) for v in (noise_scale, dirichlet_alpha)]
        scale, alpha = (v[soft] if v.dim() > 0 else v for v in per_row)
        lp = soft_logprob(z, noisy[soft], density, scale, noise=noise, valid=slots[soft], clamp=clamp,
                          dirichlet_alpha=alpha)
        out = out.index_put((soft,), lp)
    return out


def head_logprobs(
    disc_scores: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    soft_logits: torch.Tensor,
    *,
    is_soft: torch.Tensor,
    noisy: torch.Tensor,
    temperature: torch.Tensor,
    slots: torch.Tensor,
    density: str,
    noise: RowNoise,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """Log-probs [N] of N scored positions from the head outputs the learner's model returns:
    ``disc_scores`` = (log-probs, entropies) [Nd] at the discrete positions (``token_scores``; a pair
    or stacked [2, Nd]) and
    ``soft_logits`` [Ns, K] (logits at the stored ids) at the soft ones, both in position order.
    ``noise``: each of the N positions' request noise settings (``MicroBatch.noise``). With
    ``with_entropy``: (log-probs, entropies [N]), full-vocabulary at discrete positions, over the K
    density slots at soft ones (differentiable only with ``entropy_grad``: a metric-only entropy
    builds no graph)."""
    N = is_soft.shape[0]
    out = torch.zeros(N, dtype=torch.float32, device=is_soft.device)
    ent = torch.zeros(N, dtype=torch.float32, device=is_soft.device) if with_entropy else None
    disc = (~is_soft).nonzero().flatten()
    soft = is_soft.nonzero().flatten()
    if disc.numel():
        d_lp, d_ent = disc_scores
        out = out.index_put((disc,), d_lp.float())
        if with_entropy:
            ent = ent.index_put((disc,), d_ent if entropy_grad else d_ent.detach())
    if soft.numel():
        z = soft_logits.float() / temperature[soft, None]
        lp = soft_logprob_rows(z, noisy[soft], density, noise.take(soft), slots[soft])
        out = out.index_put((soft,), lp.float())
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                ent = ent.index_put((soft,), entropy_from_logits(z, slots[soft]))
    return (out, ent) if with_entropy else out
