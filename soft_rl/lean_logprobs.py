"""Memory-lean per-position log-probs from final hidden states (the learner's hot path).

The reference learner materialises a full-vocabulary softmax at every position. A soft step needs
only the K logits at its stored ids, z_k = h . W[i_k] (+ b[i_k]), because p-hat is a softmax over
those K; a discrete step needs log softmax(h W^T / T)[x], computed here in chunks of positions so
that at most ``chunk_tokens`` x V logits exist at a time. With half the positions soft, a SofT-GRPO
step therefore costs less logit memory than a plain GRPO step on the same tokens.
"""

from __future__ import annotations

import torch

from soft_rl.densities import RowNoise, soft_logprob, soft_logprob_rows
from soft_rl.losses import entropy_from_logits


def discrete_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              tokens: torch.Tensor, temperature: torch.Tensor, chunk_tokens: int = 1024):
    """log softmax(h W^T / T)[x] for hidden [N, H], tokens [N], temperature [N], in position chunks."""
    out = []
    for s in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[s: s + chunk_tokens]
        z = h @ weight.t()
        if bias is not None:
            z = z + bias
        z = z.float() / temperature[s: s + chunk_tokens, None]
        out.append(z.gather(1, tokens[s: s + chunk_tokens, None]).squeeze(1) - torch.logsumexp(z, dim=-1))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


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
        lp = discrete_logprobs_chunked(hidden[disc], weight, bias, tokens[disc], temperature[disc], chunk_tokens)
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
    disc_logits: torch.Tensor,
    soft_logits: torch.Tensor,
    *,
    is_soft: torch.Tensor,
    tokens: torch.Tensor,
    noisy: torch.Tensor,
    temperature: torch.Tensor,
    slots: torch.Tensor,
    density: str,
    noise: RowNoise,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """Log-probs [N] of N scored positions from the head outputs the learner's model returns:
    ``disc_logits`` [Nd, V] at the discrete positions and ``soft_logits`` [Ns, K] (logits at the stored
    ids) at the soft ones, both in position order. ``noise``: each of the N positions' request noise
    settings (``MicroBatch.noise``). With ``with_entropy``: (log-probs, entropies [N]), full-vocabulary
    at discrete positions, over the K density slots at soft ones (differentiable only
    with ``entropy_grad``: a metric-only entropy builds no graph)."""
    N = is_soft.shape[0]
    out = torch.zeros(N, dtype=torch.float32, device=is_soft.device)
    ent = torch.zeros(N, dtype=torch.float32, device=is_soft.device) if with_entropy else None
    disc = (~is_soft).nonzero().flatten()
    soft = is_soft.nonzero().flatten()
    if disc.numel():
        z = disc_logits.float() / temperature[disc, None]
        lp = z.gather(1, tokens[disc, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        out = out.index_put((disc,), lp)
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                ent = ent.index_put((disc,), entropy_from_logits(z))
    if soft.numel():
        z = soft_logits.float() / temperature[soft, None]
        lp = soft_logprob_rows(z, noisy[soft], density, noise.take(soft), slots[soft])
        out = out.index_put((soft,), lp.float())
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                ent = ent.index_put((soft,), entropy_from_logits(z, slots[soft]))
    return (out, ent) if with_entropy else out
