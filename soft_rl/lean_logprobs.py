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
from soft_rl.noise_kinds.embedding_gaussian import EmbeddingObservation


def _head_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (a, b in the model dtype): on CUDA straight into float32
    (no float32 copy of a vocabulary-sized operand), elsewhere by upcasting the operands."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_FP32_ADDMM_INTO_FP32: dict[torch.device, bool] = {}


def _cuda_addmm_into_fp32(device: torch.device) -> bool:
    """Whether this torch's CUDA ``addmm(acc, a, b, out_dtype=float32, out=acc)`` takes a float32 ``acc`` with
    bf16/fp16 ``a``, ``b`` (newer releases; older ones require ``acc`` in the operands' dtype). Probed once."""
    if device not in _FP32_ADDMM_INTO_FP32:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FP32_ADDMM_INTO_FP32[device] = True
        except (RuntimeError, TypeError):
            _FP32_ADDMM_INTO_FP32[device] = False
    return _FP32_ADDMM_INTO_FP32[device]


def _head_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, upcast: bool) -> None:
    """acc (float32) += a @ b, in place: accumulated in float32 with ``upcast``, else rounded to the operands'
    dtype first (as the forward's logits are). No [rows, cols] temporary where the kernel allows it (float32
    operands; CUDA with an addmm that writes float32 from bf16/fp16 operands)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not upcast:
        acc.add_(a @ b)
    elif a.is_cuda and _cuda_addmm_into_fp32(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


class _TokenScores(torch.autograd.Function):
    """(log softmax(z / T)[x], entropy of softmax(z / T)) with z = h W^T + b, over the full vocabulary, in
    chunks of positions: neither the forward nor the saved state holds more than ``chunk`` x V logits.
    The backward recomputes each chunk's logits (like activation checkpointing of the head alone).

    Gradients with u = z / T, p = softmax(u), lse = logsumexp(u), E[u] = sum_v p_v u_v:
        d lp / d u_v = [v = x] - p_v
        d H / d u_v  = -p_v (u_v - E[u])           (H = lse - E[u])
    and d / d z = (d / d u) / T.

    Memory per chunk of c positions (float32 [c, V] buffers, everything else is O(c + V) or the inputs):
    the forward holds 2 (u, exp(u - max)); the backward 1 without the entropy's gradient (u becomes p, then
    the gradient, in place) and 2 with it (u and p), plus a [c, V] copy in the weight dtype when that is
    not float32 (half a buffer for bf16). Across chunks the backward keeps the float32 weight gradient
    [V, H] (accumulated in place) and returns it in the weight dtype (a second [V, H] copy at the end
    when that is not float32). ``entropy_grad=False`` marks the entropy non-differentiable: a metric,
    whose zero gradient costs nothing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk: int, upcast: bool, entropy_grad: bool):
        N = hidden.shape[0]
        lp = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)  # [N, J]: J labels per position
        ent, lse, mean_u = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            u = _TokenScores.scaled_logits(hidden[s:e], weight, bias, temperature[s:e], upcast)
            m = u.amax(-1)
            u.sub_(m[:, None])  # y = u - max(u) <= 0, in place
            q = torch.exp(u)  # exp(y): the unnormalised softmax
            z = q.sum(-1)
            log_z = z.log()
            mean_y = q.mul_(u).sum(-1) / z  # E[y] = sum_v q_v y_v / z, the product in q's buffer
            del q
            lse[s:e] = m + log_z  # logsumexp(u) = max + log sum exp(y)
            mean_u[s:e] = m + mean_y
            lp[s:e] = u.gather(1, tokens[s:e]) - log_z[:, None]  # y_x - log z = u_x - lse, per label
            ent[s:e] = log_z - mean_y  # H = lse - E[u] = log z - E[y]
            del u
        ctx.save_for_backward(hidden, weight, bias, tokens, temperature, lse, mean_u)
        ctx.chunk, ctx.upcast, ctx.entropy_grad = chunk, upcast, entropy_grad
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool) -> torch.Tensor:
        """float32 logits [n, V] of one chunk: accumulated in float32 with ``upcast`` (model.head_dtype)."""
        z = _head_mm(h, weight.t()) if upcast else (h @ weight.t()).float()
        return z if bias is None else z.add_(bias)

    @staticmethod
    def scaled_logits(h, weight, bias, temperature, upcast: bool) -> torch.Tensor:
        """u = z / T [n, V] in float32, one new buffer (the matmul's output, then in place)."""
        return _TokenScores.logits(h, weight, bias, upcast).div_(temperature[:, None])

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tokens, temperature, lse, mean_u = ctx.saved_tensors
        chunk, upcast = ctx.chunk, ctx.upcast
        with_ent = ctx.entropy_grad and g_ent is not None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and not with_ent) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        N = hidden.shape[0]
        if g_lp is None:
            g_lp = torch.zeros(tokens.shape, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h, t = hidden[s:e], temperature[s:e]
            a_x = g_lp[s:e].float() / t[:, None]  # upstream d/d lp per label, times d u / d z = 1 / T
            a = a_x if a_x.shape[1] == 1 else a_x.sum(-1, keepdim=True)  # the labels' total: their -p_v terms add up
            g = _TokenScores.scaled_logits(h, weight, bias, t, upcast)  # u
            if with_ent:
                p = torch.sub(g, lse[s:e, None]).exp_()
                b = (g_ent[s:e].float() / t)[:, None]
                # d L / d z_v = ([v = x] - p_v) a - p_v (u_v - E[u]) b = -p_v (a + b (u_v - E[u])) + [v = x] a
                g.sub_(mean_u[s:e, None]).mul_(b).add_(a).mul_(p).neg_()
                del p
            else:
                g.sub_(lse[s:e, None]).exp_().mul_(-a)  # u -> p -> -p a, in place
            g.scatter_add_(1, tokens[s:e], a_x)  # + [v = x_j] a_j (a label given twice counts twice)
            if need_b:
                grad_b.add_(g.sum(0))
            if weight.dtype != torch.float32:
                g = g.to(weight.dtype)  # the float32 gradient is freed here: half a buffer for bf16
            if need_h:
                if upcast or g.dtype == torch.float32:
                    grad_h[s:e] = _head_mm(g, weight)  # copied into the hidden dtype
                else:
                    grad_h[s:e] = g @ weight
            if need_w:
                _head_addmm_(grad_w, g.t(), h, upcast)  # grad_w += g^T h
            del g
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                 temperature: torch.Tensor, *, chunk_tokens: int = 2048, upcast: bool = True,
                 entropy_grad: bool = True):
    """Full-vocabulary (log-probs [N], entropies [N]) of tokens [N] at hidden states [N, H] under the head
    (weight [V, H], bias [V]) at per-position temperatures [N], at most ``chunk_tokens`` x V logits alive
    at a time, forward and backward. ``tokens`` [N, J] scores J labels per position (log-probs [N, J]) with one
    log-sum-exp, as a Multiplex step's K draws need; a label may repeat. ``upcast``: logits accumulated in
    float32 whatever the model dtype.
    ``entropy_grad=False``: the entropies are a metric (non-differentiable), so the backward skips their
    gradient's vocabulary-sized work."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    labels = tokens[:, None] if tokens.dim() == 1 else tokens
    lp, ent = _TokenScores.apply(hidden, weight, bias, labels, temperature.float(), int(chunk_tokens), bool(upcast),
                                 bool(entropy_grad))
    return (lp.squeeze(1) if tokens.dim() == 1 else lp), ent


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
        lp, _ = token_scores(hidden[disc], weight, bias, tokens[disc], temperature[disc], chunk_tokens=chunk_tokens,
                             entropy_grad=False)
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
    full_vocab: torch.Tensor | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    per_draw: bool = False,
    embedding: EmbeddingObservation | None = None,
):
    """Log-probs [N] of N scored positions from the head outputs the learner's model returns:
    ``disc_scores`` = (log-probs [Nd] or [Nd, J], entropies [Nd]) at the positions scored through the full
    vocabulary (``token_scores``; a pair, or one [Nd, J + 1] tensor with the entropies last) and
    ``soft_logits`` [Ns, K] (logits at the stored ids) at the other soft ones, both in position order.
    ``full_vocab`` [N]: the positions of ``disc_scores`` (default: the discrete ones); a soft one among them (a
    kind scored through the full vocabulary) is scored by its density from its J = K labels' log-probabilities.
    ``noise``: each of the N positions' request noise settings (``MicroBatch.noise``). With
    ``with_entropy``: (log-probs, entropies [N]), full-vocabulary at full positions, over the K
    density slots at lean soft ones (differentiable only with ``entropy_grad``: a metric-only entropy
    builds no graph). With ``per_draw``: per-draw log-probs [N, J] (``soft_rl.draws``): at a soft position of a
    full-vocabulary kind its valid draws' log p(i_j) (0 at the others), elsewhere the one score in column 0.
    ``embedding``: the observation of the lean soft positions of a kind that noises the input, in their order
    (``MicroBatch.embedding_observation``)."""
    N = is_soft.shape[0]
    full_vocab = ~is_soft if full_vocab is None else full_vocab
    ent = torch.zeros(N, dtype=torch.float32, device=is_soft.device) if with_entropy else None
    full = full_vocab.nonzero().flatten()
    lean = (is_soft & ~full_vocab).nonzero().flatten()
    d_lp = d_ent = None
    if full.numel():
        if isinstance(disc_scores, torch.Tensor):
            d_lp, d_ent = disc_scores[:, :-1], disc_scores[:, -1]
        else:
            d_lp, d_ent = disc_scores
        d_lp = d_lp.float() if d_lp.dim() == 2 else d_lp.float()[:, None]
    J = d_lp.shape[1] if per_draw and d_lp is not None else 1
    out = torch.zeros(N, J, dtype=torch.float32, device=is_soft.device)
    if full.numel():
        lp = d_lp[:, :1].expand(-1, J).masked_fill(torch.arange(J, device=d_lp.device) > 0, 0.0)
        # column 0: a discrete position's token (its labels are copies of it)
        soft_full = is_soft[full]
        if bool(soft_full.any()):  # host sync only in batches holding such a kind
            rows = full[soft_full]
            if per_draw:  # each valid draw's log p(i_j)
                scored = torch.where(slots[rows], d_lp[soft_full], torch.zeros_like(d_lp[soft_full]))
            else:
                scored = soft_logprob_rows(d_lp[soft_full], noisy[rows], density, noise.take(rows), slots[rows],
                                           log_norm=torch.zeros(rows.numel(), device=d_lp.device))[:, None]
            lp = lp.index_put((soft_full.nonzero().flatten(),), scored.float())
        out = out.index_put((full,), lp)
        if with_entropy:
            ent = ent.index_put((full,), d_ent if entropy_grad else d_ent.detach())
    if lean.numel():
        z = soft_logits.float() / temperature[lean, None]
        lp = soft_logprob_rows(z, noisy[lean], density, noise.take(lean), slots[lean], embedding=embedding)
        out = out.index_put((lean, torch.zeros_like(lean)), lp.float())
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                ent = ent.index_put((lean,), entropy_from_logits(z, slots[lean]))
    out = out if per_draw else out[:, 0]
    return (out, ent) if with_entropy else out
