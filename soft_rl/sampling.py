"""The soft-thinking sampler (SofT-GRPO rollout, reference order), batched over rows.

For a row in the thinking (soft) phase, exactly the reference order (docs/design/softgrpo-reference.md §1.2):

    p   = softmax(z / T)                         temperature, full softmax
    p1  = topk_renorm(p, top_k)                  top-k
    p2  = top_p_renorm(p1, top_p)                top-p (keep the prefix whose exclusive cumsum < top_p)
    p3  = min_p_renorm(p2, min_p)                min-p (drop entries < min_p * max)
    q   = topK(p3, K) / sum                      the K slots, renormalised
    l   = log(q + 1e-6)
    g   = clamp(Gumbel(0, 1), -1.5, 3)
    y   = l + lambda * g                         stored ("noisy")
    w   = softmax(y / tau_g)                     the next input is sum_k w_k E[i_k]
    sort slots by w (descending); emitted token = argmax_k y_k

Implementation note: every truncation keeps a prefix of the tokens sorted by p, and every
renormalisation cancels in q, so q only needs the top-C logits (C = max(K, top_k)) plus the
full-vocabulary log-normaliser: no full sort and no full renormalised vector. Slots that top-p or
min-p emptied hold the next most likely tokens with q = 0, which makes the stored ids well defined
(the reference's "arbitrary zero-probability tokens" are not reproducible across engines).

Rows in the answer (discrete) phase sample x ~ p3 computed with the answer-phase parameters and get
one-hot weights [1, 0, ..., 0] on ids [x, x, ..., x]. Noise kinds: gumbel (the method), dirichlet
and gaussian (the paper's ablations), none (plain soft thinking, y = l), multiplex (K i.i.d. draws) and
embedding_gaussian (y = log q, w = softmax(y / tau), and sigma eps added to the next input where it is mixed:
``input_offsets``).

All randomness comes from ``soft_rl.rng``: a pure function of each row's (seed, step), so a
trajectory is reproducible whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from soft_rl import rng
from soft_rl.densities import density_mode, density_slots, soft_logprob
from soft_rl.noise_kinds import EPS_LOG, GUMBEL_CLAMP, NOISE_CODES, NOISE_KINDS, NOISES, DrawContext, rows_where
from soft_rl.noise_kinds.embedding_gaussian import input_noise, rollout_logprob


@dataclass
class SoftSamplingParams:
    """Per-request sampling parameters (one generation request).

    Thinking-phase settings apply until the think-end marker, answer-phase ones after it; an unset
    answer-phase value inherits the thinking-phase one. top_k <= 0 disables top-k.
    """

    soft: bool = True  # soft thinking on/off (off: ordinary token sampling in both phases)
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.95
    min_p: float = 0.0
    answer_temperature: float | None = None
    answer_top_k: int | None = None
    answer_top_p: float | None = None
    answer_min_p: float | None = None
    k: int = 5  # K, the number of soft slots
    tau: float = 0.1  # Gumbel-softmax temperature tau_g
    noise: str = "gumbel"
    noise_scale: float = 1.0  # lambda
    noise_clamp: tuple[float, float] | None = GUMBEL_CLAMP  # None: unclamped Gumbel noise
    dirichlet_alpha: float = 1.0
    # noise=embedding_gaussian: sigma, the standard deviation of the noise on each coordinate of the next input
    # (rollout.embedding_noise x RMS of the policy's embedding at the weight version that generates the request)
    embedding_sigma: float = 0.0
    think_end: str = "</think>"
    thinking_budget: int | None = None  # max thinking steps before the marker is forced
    seed: int = 0

    def __post_init__(self):
        for name in ("answer_temperature", "answer_top_k", "answer_top_p", "answer_min_p"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(self, name[len("answer_"):]))
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        for name in ("temperature", "answer_temperature"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0 (greedy decoding is not a sampling policy; use a small temperature)")
        for name in ("top_p", "answer_top_p"):
            if not 0 < getattr(self, name) <= 1:
                bad(name, "must be in (0, 1]")
        for name in ("min_p", "answer_min_p"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        if self.k < 1:
            bad("k", "must be >= 1")
        if not self.tau > 0:
            bad("tau", "must be > 0")
        if self.noise not in NOISE_KINDS:
            bad("noise", f"must be one of {NOISE_KINDS}")
        if not self.noise_scale > 0:
            # lambda = 0 makes every stored value a function of the logits: the Gumbel/Gaussian density
            # degenerates (log 0 in the exact density, a constant in the official one: no gradient).
            bad("noise_scale", "must be > 0; for noise-free soft thinking (evaluation only) use noise='none'")
        if self.noise_clamp is not None and not self.noise_clamp[0] < self.noise_clamp[1]:
            bad("noise_clamp", "must be (low, high) with low < high, or None")
        if not self.dirichlet_alpha > 0:
            bad("dirichlet_alpha", "must be > 0")
        if self.soft and NOISES[self.noise].noises_input and not self.embedding_sigma > 0:
            bad("embedding_sigma", f"must be > 0 for noise={self.noise!r} (set it from the policy's embedding: "
                "soft_rl.noise_kinds.embedding_gaussian.embedding_sigma)")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            bad("thinking_budget", "must be >= 0 or None")
        if not self.think_end:
            bad("think_end", "must be a non-empty marker string")


@dataclass
class SamplingBatch:
    """Per-row tensors of a batch of requests, shape [B] each.

    ``thinking`` is the row's phase (thinking-phase or answer-phase sampling parameters); ``is_soft``
    whether the row's step is a soft step (soft thinking on and still thinking).
    """

    is_soft: torch.Tensor
    thinking: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    answer_temperature: torch.Tensor
    answer_top_k: torch.Tensor
    answer_top_p: torch.Tensor
    answer_min_p: torch.Tensor
    k: torch.Tensor
    tau: torch.Tensor
    noise: torch.Tensor  # codes, see NOISE_CODES
    noise_scale: torch.Tensor
    clamp_lo: torch.Tensor  # -inf / +inf when unclamped
    clamp_hi: torch.Tensor
    dirichlet_alpha: torch.Tensor
    embedding_sigma: torch.Tensor
    seed: torch.Tensor
    width: int = field(default=0)  # K_max: width of the per-step id/value arrays

    @classmethod
    def from_params(cls, params: list[SoftSamplingParams], device="cpu", width: int | None = None):
        def col(fn, dtype):
            return torch.tensor([fn(p) for p in params], dtype=dtype, device=device)

        inf = float("inf")
        kmax = max(p.k for p in params)
        if width is not None and width < kmax:
            raise ValueError(f"a request asks for k={kmax} soft slots but the engine holds width={width}")
        return cls(
            is_soft=col(lambda p: p.soft, torch.bool),
            thinking=torch.ones(len(params), dtype=torch.bool, device=device),
            temperature=col(lambda p: p.temperature, torch.float32),
            top_k=col(lambda p: p.top_k, torch.int64),
            top_p=col(lambda p: p.top_p, torch.float32),
            min_p=col(lambda p: p.min_p, torch.float32),
            answer_temperature=col(lambda p: p.answer_temperature, torch.float32),
            answer_top_k=col(lambda p: p.answer_top_k, torch.int64),
            answer_top_p=col(lambda p: p.answer_top_p, torch.float32),
            answer_min_p=col(lambda p: p.answer_min_p, torch.float32),
            k=col(lambda p: p.k, torch.int64),
            tau=col(lambda p: p.tau, torch.float32),
            noise=col(lambda p: NOISE_CODES[p.noise], torch.int64),
            noise_scale=col(lambda p: p.noise_scale, torch.float32),
            clamp_lo=col(lambda p: -inf if p.noise_clamp is None else p.noise_clamp[0], torch.float32),
            clamp_hi=col(lambda p: inf if p.noise_clamp is None else p.noise_clamp[1], torch.float32),
            dirichlet_alpha=col(lambda p: p.dirichlet_alpha, torch.float32),
            embedding_sigma=col(lambda p: p.embedding_sigma, torch.float32),
            seed=col(lambda p: p.seed, torch.int64),
            width=width or kmax,
        )

    def select(self, rows: torch.Tensor) -> SamplingBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return SamplingBatch(**{n: (v[rows] if isinstance(v, torch.Tensor) else v) for n, v in kw.items()})


@dataclass
class SampleOutput:
    """One decode step for B rows. ids/noisy/weights: [B, K]; the rest [B]."""

    ids: torch.Tensor  # int64, slots sorted by weight; discrete rows: [x, x, ..., x]
    noisy: torch.Tensor  # float32, y (gumbel/none) or x (dirichlet/gaussian); 0 for discrete rows
    weights: torch.Tensor  # float32, mixture weights of the next input; one-hot for discrete rows
    token: torch.Tensor  # int64, emitted id (argmax y for soft rows)
    is_soft: torch.Tensor  # bool
    logprob: torch.Tensor  # float32, soft: density of the step; discrete: log p(token)
    token_logprob: torch.Tensor  # float32, full-vocabulary log p(token) at the row's temperature
    kept: torch.Tensor  # bool [B, K], slots the truncation kept (q > 0); slot 0 only for discrete rows


TIE_WINDOW = 16  # stable_topk: candidates beyond the c-th that take part in ordering ties


def stable_topk(z: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``c`` largest of ``z`` [B, V] per row, sorted descending, equal values by ascending index, so a
    request's slots do not depend on the candidate width its batch-mates set (``torch.topk`` picks and
    orders ties arbitrarily; bf16 logits tie often: 29% of rows at the top 5 in a CPU dry run).

    A ``topk`` of ``c + TIE_WINDOW`` (the fast kernel), then an exact (value desc, index asc) order inside
    that window: the result is the tie-stable one whenever fewer than TIE_WINDOW + 1 values equal the c-th
    (or the window covers the vocabulary). Exact alternatives (one topk over int64 or float64 keys that
    carry the index) cost 5-9x a plain topk on the CPU, from their full-vocabulary temporaries.
    """
    V = z.shape[-1]
    w = min(V, c + TIE_WINDOW)
    vals, idx = torch.topk(z, w, dim=-1)
    by_index = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, by_index), idx.gather(-1, by_index)
    by_value = vals.argsort(dim=-1, descending=True, stable=True)
    return vals.gather(-1, by_value)[..., :c], idx.gather(-1, by_value)[..., :c]


def truncate_sorted(p: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """Keep-mask over probabilities ``p`` [B, C] sorted descending (the top C of the vocabulary).

    Applies top-k, then top-p on the top-k-renormalised distribution, then min-p, in that order.
    Renormalisation constants are not applied: they cancel in every later ratio.
    """
    rank = torch.arange(p.shape[-1], device=p.device)
    keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    pk = p * keep
    # top-p acts on p1 = pk / S_k; S_k = 1 when top-k is off (the full softmax already sums to 1).
    s_k = torch.where(top_k > 0, pk.sum(-1), torch.ones_like(top_p))
    exclusive = torch.cumsum(pk, -1) - pk
    keep = keep & ((exclusive < top_p[:, None] * s_k[:, None]) | (top_p[:, None] >= 1.0))
    # min-p is relative to the largest kept probability, which is p[:, 0] (rank 0 is always kept).
    keep = keep & (p >= min_p[:, None] * p[:, :1])
    return keep


def soft_sample(
    logits: torch.Tensor,
    params: SamplingBatch,
    generator: rng.NoiseCounters,
    force_token: torch.Tensor | None = None,
    density: str = "official",
    *,
    candidates: int | None = None,
    kinds: tuple[str, ...] | None = None,
    hidden_size: int | None = None,
) -> SampleOutput:
    """Sample one decode step for every row of ``logits`` [B, V] (see the module docstring).

    ``generator`` gives each row's (seed, step). ``force_token`` [B] (-1 = none) makes a row emit
    that token as a discrete step (thinking budget forcing the think-end marker).
    ``density`` picks the soft log-prob reported per step (a ``DENSITIES`` mode), computed with
    ``soft_logprob`` from the temperature-scaled logits at the stored ids, exactly as the learner will.

    ``candidates`` (the top-C width, >= K and >= every active top_k, or V) and ``kinds`` (the noise
    kinds that may occur) are static hints for engines: given both, the function makes no
    data-dependent host synchronisation, so it can run inside a captured device graph. Without them
    they are read from the batch. ``hidden_size``: the model's H, needed by rows of a kind that noises the input
    (``NoiseKind.noises_input``), whose step log-prob is that of the H-dimensional input noise.
    """
    B, V = logits.shape
    dev = logits.device
    K = params.width
    forced = torch.zeros(B, dtype=torch.bool, device=dev) if force_token is None else force_token >= 0
    soft = params.is_soft & params.thinking & ~forced
    think = params.thinking  # a forced token is a thinking-phase token (scored at the thinking temperature)
    T = torch.where(think, params.temperature, params.answer_temperature)
    top_k = torch.where(think, params.top_k, params.answer_top_k)
    top_p = torch.where(think, params.top_p, params.answer_top_p)
    min_p = torch.where(think, params.min_p, params.answer_min_p)

    zt = logits.to(torch.float32, copy=True).div_(T[:, None])  # one [B, V] buffer, not two (same values)
    log_norm = torch.logsumexp(zt, dim=-1)  # log sum_v exp(z_v / T)

    if kinds is None:
        kinds = tuple(name for name, code in NOISE_CODES.items() if bool((params.noise == code).any()))
    # Candidate width: K slots for soft rows; the whole kept prefix for discrete rows and for soft rows whose kind
    # draws its slots from the kept set.
    if candidates is not None:
        C = min(V, candidates)
    elif bool(((~soft & ~forced) | (soft & rows_where(params.noise, kinds, lambda kind: kind.samples_kept_set)))
               .logical_and(top_k <= 0).any()):
        C = V
    else:
        C = min(V, max(K, int(top_k.max().item()) if B else K))
    top_vals, top_idx = stable_topk(zt, C)  # sorted descending, ties by token id
    p = torch.exp(top_vals - log_norm[:, None])
    keep = truncate_sorted(p, top_k, top_p, min_p)
    p_kept = p * keep

    # ---- soft rows: K slots, noise, weights
    slot = torch.arange(K, device=dev)
    valid = slot[None, :] < params.k[:, None]
    step_seed, step = generator.seed, generator.step
    top = slot.expand(B, K)
    pos = _by_kind(params, kinds, lambda kind: top if kind.draw_slots is None
                   else kind.draw_slots(p_kept, step_seed, step, K), top)  # each row's K slots among the candidates
    q = p_kept.gather(1, pos) * valid
    q = q / q.sum(-1, keepdim=True)
    ctx = DrawContext(q=q, ell=torch.log(q + EPS_LOG), valid=valid, scale=params.noise_scale[:, None],
                      clamp_lo=params.clamp_lo[:, None], clamp_hi=params.clamp_hi[:, None],
                      alpha=params.dirichlet_alpha[:, None], seed=step_seed, step=step)
    y = _by_kind(params, kinds, lambda kind: kind.draw(ctx), q)  # each row's stored values, drawn by its kind
    y = torch.where(valid, y, torch.zeros_like(y))
    ids = top_idx.gather(1, pos)
    w = _weights_by_kind(y, params, valid, kinds)
    # Sort slots by weight (descending); ties keep slot order. Padding slots have w = 0. Kinds that keep their draw
    # order (and emit slot 0) are left as drawn.
    sorts = rows_where(params.noise, kinds, lambda kind: kind.sorts_slots)
    order = torch.where(sorts[:, None], torch.argsort(w.masked_fill(~valid, -1.0), dim=-1, descending=True,
                                                      stable=True), top)
    ids, y, valid_sorted = ids.gather(1, order), y.gather(1, order), valid.gather(1, order)
    kept = (q > 0).gather(1, order)
    w = _weights_by_kind(y, params, valid_sorted, kinds)  # recomputed from the stored values, as the learner will
    emitted_slot = torch.where(sorts, y.masked_fill(~valid_sorted, float("-inf")).argmax(-1), 0)
    soft_token = ids.gather(1, emitted_slot[:, None]).squeeze(1)

    # ---- discrete rows: x ~ p_kept (exponential race: argmax p / E is an exact categorical draw)
    expo = rng.exponential(step_seed, step, C, rng.STREAM_CATEGORICAL)
    disc_token = top_idx.gather(1, (p_kept / expo).argmax(-1, keepdim=True)).squeeze(1)
    token = torch.where(soft, soft_token, disc_token)
    if force_token is not None:
        token = torch.where(forced, force_token, token)

    token_logprob = zt.gather(1, token[:, None]).squeeze(1) - log_norm
    logprob = token_logprob
    z_at_ids = zt.gather(1, ids)
    clamp = (params.clamp_lo, params.clamp_hi)
    for name in kinds:
        if NOISES[name].noises_input and name in density_mode(density).noises:
            if hidden_size is None:
                raise ValueError(f"noise={name!r} noises the H-dimensional input: pass soft_sample(hidden_size=H)")
            lp = rollout_logprob(step_seed, step, params.embedding_sigma, hidden_size).float()
        elif name not in density_mode(density).noises:
            # a kind this density does not score (none, deterministic given the logits, or an evaluation
            # request's noise under gumbel-max): no density; the learner refuses to train such a row
            lp = torch.zeros_like(logprob)
        else:
            lp = soft_logprob(z_at_ids, y, density, params.noise_scale, noise=name,
                              valid=density_slots(valid_sorted, kept, density),
                              clamp=clamp, dirichlet_alpha=params.dirichlet_alpha, log_norm=log_norm)
        logprob = torch.where(soft & (params.noise == NOISE_CODES[name]), lp, logprob)

    out = SampleOutput(ids=ids, noisy=y, weights=w, token=token, is_soft=soft, logprob=logprob,
                       token_logprob=token_logprob, kept=kept)
    return to_discrete(out, ~soft)


def to_discrete(out: SampleOutput, rows: torch.Tensor) -> SampleOutput:
    """Turn the selected rows of a step into discrete steps: one-hot weights on ids [x, x, ..., x],
    stored values 0, and the full-vocabulary log p(x) as the step's log-prob."""
    B, K = out.ids.shape
    one_hot = (torch.arange(K, device=out.ids.device)[None, :] == 0).float().expand(B, K)
    r = rows[:, None]
    return SampleOutput(
        ids=torch.where(r, out.token[:, None].expand(B, K), out.ids),
        noisy=torch.where(r, torch.zeros_like(out.noisy), out.noisy),
        weights=torch.where(r, one_hot, out.weights),
        token=out.token,
        is_soft=out.is_soft & ~rows,
        logprob=torch.where(rows, out.token_logprob, out.logprob),
        token_logprob=out.token_logprob,
        kept=torch.where(r, one_hot > 0, out.kept),
    )


def _by_kind(params: SamplingBatch, kinds: tuple[str, ...], fn, like: torch.Tensor) -> torch.Tensor:
    """``fn(kind)`` [B, K] on the rows drawn with each noise kind in ``kinds`` (0 on rows of other kinds). Every
    kind's branch is computed on the whole batch and selected per row: no data-dependent indexing, so the step stays
    one static graph."""
    out = torch.zeros_like(like)
    for name in kinds:
        out = torch.where((params.noise == NOISE_CODES[name])[:, None], fn(NOISES[name]), out)
    return out


def _weights_by_kind(y, params: SamplingBatch, valid, kinds):
    return _by_kind(params, kinds, lambda kind: kind.weights(y, params.tau, valid), y.float())


def mix_embeddings(embedding_weight: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """e = sum_k w_k E[i_k] (+ offset) with w renormalised to sum 1; one-hot weights give exactly E[x].

    ids, weights: [..., K]; returns [..., H] in the embedding's dtype (accumulated in float32).
    """
    return mix_rows(embedding_weight[ids], weights, offset)


def mix_rows_f32(rows: torch.Tensor, weights: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k rows_k (+ offset) in float32 for already gathered embedding rows [..., K, H] (w renormalised to
    sum 1): an elementwise product and a sum over K, not a matmul, so its rounding does not depend on the batch
    shape and the rollout's inputs and the learner's rebuilt inputs are bit-identical. ``offset`` [..., H] float32:
    the input noise of a kind that noises the input (``input_offsets``; 0 leaves the sum's bits unchanged)."""
    w = weights.float()
    w = w / w.sum(-1, keepdim=True)
    out = (w.unsqueeze(-1) * rows.float()).sum(-2)
    return out if offset is None else out + offset


def mix_rows(rows: torch.Tensor, weights: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``mix_rows_f32`` returned in the rows' dtype: the input the model reads."""
    return mix_rows_f32(rows, weights, offset).to(rows.dtype)


def input_offsets(noise: torch.Tensor, is_soft: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                  sigma: torch.Tensor, hidden: int, kinds: tuple[str, ...]) -> torch.Tensor | None:
    """sigma eps [N, H] float32 to add to the inputs after generated steps ``step`` [N] of N requests (noise codes,
    seeds, sigmas [N]), on their soft steps of a kind that noises the input (``NoiseKind.noises_input``), 0 on the
    other rows; None when no kind in ``kinds`` (those present, a host-side fact) noises the input."""
    if not any(NOISES[name].noises_input for name in kinds):
        return None
    on = is_soft & rows_where(noise, kinds, lambda kind: kind.noises_input)
    scale = torch.where(on, sigma.float(), torch.zeros_like(sigma, dtype=torch.float32))
    return scale[:, None] * input_noise(seed, step, hidden)
