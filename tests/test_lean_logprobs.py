"""The memory-lean learner path (K gathered logits at soft positions, chunked full softmax at discrete
ones) equals the naive full-vocabulary computation, values and gradients."""

import pytest
import torch

from soft_rl.densities import DENSITY_MODES, density_slots
from soft_rl.lean_logprobs import position_logprobs_lean
from soft_rl.reference import build_inputs_embeds, generate, position_logprobs
from soft_rl.sampling import SoftSamplingParams


@pytest.mark.parametrize("density", DENSITY_MODES)
def test_lean_equals_naive_values_and_gradients(tiny_hf, tiny_tokenizer, density):
    _, model = tiny_hf
    prompts = [list(tiny_tokenizer.encode(f"question {i}: 12 + {i} =")) for i in range(4)]
    params = [SoftSamplingParams(seed=i, thinking_budget=5 + i, answer_temperature=0.7) for i in range(4)]
    trajs = generate(model, prompts, params, max_new_tokens=14, eos_token_ids=[], tokenizer=tiny_tokenizer)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()

    def run(lean: bool):
        model.zero_grad()
        total, values = 0.0, []
        for t in trajs:
            x = build_inputs_embeds(emb, t)[None]
            P, R = t.prompt_ids.shape[0], t.num_tokens
            if lean:
                h = model.model(inputs_embeds=x).last_hidden_state[0, P - 1: P - 1 + R]
                lp = position_logprobs_lean(
                    h, head.weight, head.bias, tokens=t.tokens, topk_ids=t.topk_ids, noisy=t.noisy,
                    is_soft=t.is_soft, temperature=t.position_temperatures(),
                    slots=density_slots(t.slot_valid(), t.kept, density), density=density, noise="gumbel",
                    chunk_tokens=3)
            else:
                logits = model(inputs_embeds=x).logits[0, P - 1: P - 1 + R]
                lp = position_logprobs(logits, t, density)
            values.append(lp.detach())
            total = total + lp.sum()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return values, grads

    lean_v, lean_g = run(True)
    naive_v, naive_g = run(False)
    assert sum(int(t.is_soft.sum()) for t in trajs) > 10 and sum(int((~t.is_soft).sum()) for t in trajs) > 10
    for a, b in zip(lean_v, naive_v, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-6)
    assert lean_g.keys() == naive_g.keys()
    for n in naive_g:
        torch.testing.assert_close(lean_g[n], naive_g[n], atol=1e-4, rtol=1e-4, msg=n)
    model.zero_grad()


def test_micro_batch_of_mixed_noise_settings_scores_each_request_with_its_own(tiny_hf, tiny_tokenizer):
    """One learner micro-batch holding requests drawn with different noise kinds, lambdas, clamps and
    Dirichlet alphas: the lean head path (build_micro_batch -> head_logprobs) equals the HF reference's
    per-trajectory scoring, which uses each request's own settings."""
    from soft_rl.lean_logprobs import head_logprobs, token_scores
    from soft_rl.learner_batch import build_micro_batch, pad_rows

    _, model = tiny_hf
    settings = [dict(noise="gumbel"), dict(noise="gumbel", noise_scale=0.5, noise_clamp=None),
                dict(noise="gaussian", noise_scale=1.5), dict(noise="dirichlet", dirichlet_alpha=2.0)]
    prompts = [list(tiny_tokenizer.encode(f"question {i}: 3 + {i} =")) for i in range(len(settings))]
    params = [SoftSamplingParams(seed=20 + i, thinking_budget=8, **kw) for i, kw in enumerate(settings)]
    trajs = generate(model, prompts, params, max_new_tokens=12, eos_token_ids=[], tokenizer=tiny_tokenizer)
    assert all(t.num_soft > 2 for t in trajs)
    head = model.get_output_embeddings()
    for density in ("official", "exact"):
        with torch.no_grad():
            mb = build_micro_batch(model.get_input_embeddings().weight, trajs, density)
            h = model.model(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                            position_ids=mb.position_ids).last_hidden_state.reshape(-1, head.weight.shape[1])
            disc = ~mb.order_is_soft
            disc_scores = token_scores(h[mb.disc_rows], head.weight, None, mb.tokens[disc], mb.temperature[disc])
            soft_logits = torch.einsum("nh,nkh->nk", h[mb.soft_rows], head.weight[mb.soft_ids])
            got = head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, noisy=mb.noisy,
                                temperature=mb.temperature, slots=mb.slots, density=density, noise=mb.noise)
            want = []
            for t in trajs:
                P, R = t.prompt_ids.shape[0], t.num_tokens
                x = build_inputs_embeds(model.get_input_embeddings().weight, t)[None]
                want.append(position_logprobs(model(inputs_embeds=x).logits[0, P - 1: P - 1 + R], t, density))
        torch.testing.assert_close(pad_rows(got, mb.lengths), pad_rows(torch.cat(want), mb.lengths), atol=2e-5,
                                   rtol=1e-6)


def _head_problem(N=37, H=16, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g),
            torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g) + 0.5, torch.randn(2, N, generator=g))


def test_multiplex_steps_are_scored_through_the_full_vocabulary_head(tiny_hf, tiny_tokenizer):
    """A micro-batch mixing Multiplex (both weightings), Gumbel and discrete requests under density=exact: the
    Multiplex soft steps go through the chunked full-vocabulary head with their K draws as labels (the Gumbel ones
    through the lean head), and the log-probs and entropies equal the HF reference's per-trajectory scoring
    (position_logprobs: sum_j log softmax(z / T)[i_j] at a Multiplex step)."""
    from soft_rl.lean_logprobs import head_logprobs, token_scores
    from soft_rl.learner_batch import build_micro_batch, pad_rows
    from soft_rl.reference import position_entropy

    _, model = tiny_hf
    settings = [dict(noise="multiplex", k=3, top_k=-1, top_p=0.9), dict(noise="gumbel"),
                dict(noise="multiplex_uniform", k=3, top_k=8, temperature=1.3), dict(soft=False)]
    prompts = [list(tiny_tokenizer.encode(f"question {i}: 3 + {i} =")) for i in range(len(settings))]
    params = [SoftSamplingParams(seed=40 + i, thinking_budget=8, **kw) for i, kw in enumerate(settings)]
    trajs = generate(model, prompts, params, max_new_tokens=12, eos_token_ids=[], tokenizer=tiny_tokenizer,
                     density="exact")
    assert all(t.num_soft > 2 for t in trajs[:3])
    head = model.get_output_embeddings()
    with torch.no_grad():
        mb = build_micro_batch(model.get_input_embeddings().weight, trajs, "exact")
        assert mb.disc_labels.shape[1] == mb.soft_ids.shape[1] > 1  # K labels per full-vocabulary position
        assert int((mb.order_is_soft & mb.order_full).sum()) == trajs[0].num_soft + trajs[2].num_soft
        h = model.model(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                        position_ids=mb.position_ids).last_hidden_state.reshape(-1, head.weight.shape[1])
        disc_scores = token_scores(h[mb.disc_rows], head.weight, None, mb.disc_labels, mb.temperature[mb.order_full])
        soft_logits = torch.einsum("nh,nkh->nk", h[mb.soft_rows], head.weight[mb.soft_ids])
        got, got_ent = head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, full_vocab=mb.order_full,
                                     noisy=mb.noisy, temperature=mb.temperature, slots=mb.slots, density="exact",
                                     noise=mb.noise, with_entropy=True)
        want, want_ent = [], []
        for t in trajs:
            P, R = t.prompt_ids.shape[0], t.num_tokens
            x = build_inputs_embeds(model.get_input_embeddings().weight, t)[None]
            logits = model(inputs_embeds=x).logits[0, P - 1: P - 1 + R]
            want.append(position_logprobs(logits, t, "exact"))
            want_ent.append(position_entropy(logits, t, "exact"))
    torch.testing.assert_close(pad_rows(got, mb.lengths), pad_rows(torch.cat(want), mb.lengths), atol=2e-5,
                               rtol=1e-6)
    torch.testing.assert_close(pad_rows(got_ent, mb.lengths), pad_rows(torch.cat(want_ent), mb.lengths), atol=2e-5,
                               rtol=1e-6)
    # the rollout's own log-prob of a Multiplex step is the same joint draw log-probability
    t = trajs[0]
    torch.testing.assert_close(t.logprobs[t.is_soft], torch.cat(want)[: t.num_tokens][t.is_soft], atol=2e-5,
                               rtol=1e-6)
    # per draw (learner.multiplex_ratio=per_draw): each valid draw's own log p(i_j) at a Multiplex step, the one
    # score in column 0 elsewhere (Gumbel and discrete trajectories: J = 1), as the reference scores them; the
    # draws sum to the joint log-probs above
    from soft_rl.draws import draw_count, draw_mask, split_draws

    with torch.no_grad():
        per = head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, full_vocab=mb.order_full,
                            noisy=mb.noisy, temperature=mb.temperature, slots=mb.slots, density="exact",
                            noise=mb.noise, per_draw=True)
        rows = split_draws(per, trajs)
        width = trajs[0].topk_ids.shape[1]  # the arrays' K (5, the Gumbel request's), wider than k = 3
        assert [r.shape[1] for r in rows] == [draw_count(t) for t in trajs] == [width, 1, width, 1]
        assert bool((draw_mask(trajs[0], "exact")[trajs[0].is_soft].sum(-1) == 3).all())
        for t, r, w in zip(trajs, rows, want, strict=True):
            P, R = t.prompt_ids.shape[0], t.num_tokens
            x = build_inputs_embeds(model.get_input_embeddings().weight, t)[None]
            ref = position_logprobs(model(inputs_embeds=x).logits[0, P - 1: P - 1 + R], t, "exact", per_draw=True)
            torch.testing.assert_close(r, ref, atol=2e-5, rtol=1e-6)
            torch.testing.assert_close(r.sum(-1), w, atol=2e-5, rtol=1e-6)
            assert bool((r[~draw_mask(t, "exact")] == 0).all())
    soft0 = rows[0][trajs[0].is_soft][:, :3]
    assert bool((soft0 < 0).all()) and bool((soft0[:, 1:] != soft0[:, :1]).any())  # k scores per step, not copies


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_token_scores_equal_the_full_softmax_values_and_gradients(chunk):
    """token_scores (chunked forward, recomputing backward) against log_softmax and the entropy of one
    float64 full-vocabulary softmax, with both outputs in the loss (random upstream weights)."""
    from soft_rl.lean_logprobs import token_scores

    h, W, b, x, T, up = _head_problem()

    def run(chunked: bool):
        hh, ww, bb = (t.clone().double().requires_grad_() for t in (h, W, b))
        if chunked:
            lp, ent = token_scores(hh.float(), ww.float(), bb.float(), x, T, chunk_tokens=chunk)
        else:
            logp = torch.log_softmax((hh @ ww.T + bb) / T.double()[:, None], -1)
            lp, ent = logp.gather(1, x[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
        ((up[0].double() * lp).sum() + (up[1].double() * ent).sum()).backward()
        return [t.detach().double() for t in (lp, ent, hh.grad, ww.grad, bb.grad)]

    for got, want, name in zip(run(True), run(False), ["logprob", "entropy", "d h", "d W", "d b"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_token_scores_of_several_labels_per_position_equal_the_full_softmax(entropy_grad):
    """J = 3 labels per position (Multiplex's draws, one of them repeated in every row) through one chunked
    log-sum-exp: values and gradients equal float64 log_softmax gathered at each label, with a separate upstream
    weight per label (a repeated label's two gradients add up)."""
    from soft_rl.lean_logprobs import token_scores

    h, W, b, x, T, up = _head_problem()
    g = torch.Generator().manual_seed(9)
    labels = torch.stack([x, torch.randint(0, W.shape[0], x.shape, generator=g), x], -1)  # draws 0 and 2 repeat
    up_lp = torch.randn(labels.shape, generator=g)

    def run(chunked: bool):
        hh, ww, bb = (t.clone().double().requires_grad_() for t in (h, W, b))
        if chunked:
            lp, ent = token_scores(hh.float(), ww.float(), bb.float(), labels, T, chunk_tokens=5,
                                   entropy_grad=entropy_grad)
        else:
            logp = torch.log_softmax((hh @ ww.T + bb) / T.double()[:, None], -1)
            lp, ent = logp.gather(1, labels), -(logp.exp() * logp).sum(-1)
            if not entropy_grad:
                ent = ent.detach()
        loss = (up_lp.double() * lp).sum() + ((up[1].double() * ent).sum() if entropy_grad else 0.0)
        loss.backward()
        return [t.detach().double() for t in (lp, ent, hh.grad, ww.grad, bb.grad)]

    for got, want, name in zip(run(True), run(False), ["logprob", "entropy", "d h", "d W", "d b"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=name)


def test_chunked_token_scores_never_hold_the_full_logits():
    """Nothing of N x V elements is kept for the backward (the naive head keeps its logits: the probe
    sees them), and the forward's largest intermediate is one chunk x V."""
    from soft_rl.lean_logprobs import token_scores

    h, W, b, x, T, _ = _head_problem(N=64, V=211)
    h.requires_grad_()
    W.requires_grad_()

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = fn()
        out[0].sum().backward()
        return max(sizes)

    naive = largest_saved(lambda: torch.log_softmax((h @ W.T) / T[:, None], -1).max(-1))
    chunked = largest_saved(lambda: token_scores(h, W, None, x, T, chunk_tokens=8))
    assert naive >= 64 * 211
    assert chunked == max(h.numel(), W.numel())  # the inputs themselves, nothing vocabulary x positions


def test_token_scores_upcast_accumulates_bfloat16_weights_in_float32():
    """upcast (model.head_dtype=float32): bf16 hidden states and head give the float32 logits of the same
    bf16 values; without it the logits are rounded to bf16 first."""
    from soft_rl.lean_logprobs import token_scores

    h, W, _, x, T, _ = _head_problem(V=4000)
    hb, wb = h.bfloat16(), W.bfloat16()
    want = torch.log_softmax((hb.float() @ wb.float().T) / T[:, None], -1).gather(1, x[:, None]).squeeze(1)
    up, _ = token_scores(hb, wb, None, x, T, chunk_tokens=7, upcast=True)
    rounded, _ = token_scores(hb, wb, None, x, T, chunk_tokens=7, upcast=False)
    torch.testing.assert_close(up, want, atol=1e-5, rtol=1e-6)
    assert (rounded - want).abs().max() > 1e-3


U32 = 2.0 ** -24  # float32 unit roundoff


def _float64_head(h, W, b, x, T):
    """Reference (log-probs, entropies) of one plain full-vocabulary log_softmax in float64."""
    logp = torch.log_softmax((h @ W.T + b) / T[:, None], -1)
    return logp.gather(1, x[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _float32_error_bounds(h, W, b, x, T, up_lp, up_ent):
    """First-order worst-case errors of the float32 head against exact arithmetic, from float64 inputs and
    upstream gradients: a float32 sum of L terms errs by at most L u times the sum of the terms' magnitudes
    (Higham's gamma_L), each other operation by u relative.

    logits: u = (h . w + b) / T sums H + 1 terms, so |du| <= (H + 3) u (|h| |w| + |b|) / T =: e_u (per position,
    its worst vocabulary entry). log-prob y_x - log Z and entropy log Z - E[y] (y = u - max u, Z = sum exp y):
    the logits' error at most twice (the token's and the normaliser's), plus the V-term sums' gamma_V relative
    to their magnitudes (1 + max |y|). The softmax p = exp(y) / Z then errs relatively by e_p = 2 e_u + gamma_V
    (1 + max |y|), and so does each p-term of d L / d u_v = a ([v = x] - p_v) - b p_v (u_v - E[u]) (a, b: the
    upstream gradients / T); the weight, hidden and bias gradients sum N, V and N such terms times |h|, |W|, 1."""
    N, H = h.shape
    V = W.shape[0]
    u = (h @ W.T + b) / T[:, None]
    e_u = (H + 3) * U32 * ((h.abs() @ W.abs().T + b.abs()) / T[:, None]).max(-1).values  # [N]
    y_mag = 1 + (u - u.max(-1, keepdim=True).values).abs().max(-1).values  # [N]
    e_lp = 2 * e_u + (V + 4) * U32 * y_mag
    e_p = (2 * e_u + (V + 8) * U32 * y_mag)[:, None]
    p = torch.softmax(u, -1)
    a, c = (up_lp.abs() / T)[:, None], (up_ent.abs() / T)[:, None]
    p_terms = a * p + c * p * (u - (p * u).sum(-1, keepdim=True)).abs()  # the terms carrying p's error
    g_mag = p_terms + torch.zeros_like(p).scatter_(1, x[:, None], a)
    g_err = e_p * p_terms + 4 * U32 * g_mag  # per element of d L / d z
    return {"logprob": e_lp.max(), "entropy": (e_lp * y_mag).max(),
            "d h": (g_err @ W.abs() + (V + 1) * U32 * (g_mag @ W.abs())).max(),
            "d W": (g_err.T @ h.abs() + (N + 1) * U32 * (g_mag.T @ h.abs())).max(),
            "d b": (g_err.sum(0) + (N + 1) * U32 * g_mag.sum(0)).max()}


@pytest.mark.parametrize("entropy_in_loss", [True, False], ids=["entropy-gradient", "entropy-metric"])
@pytest.mark.parametrize("chunk", [5, 37, 1000])
def test_token_scores_gradients_equal_a_float64_full_softmax_with_and_without_the_entropy_term(entropy_in_loss, chunk):
    """Values and gradients of token_scores (float32, chunked, recomputing backward) equal plain autograd through a
    full-vocabulary float64 log_softmax, within the float32 error bound of ``_float32_error_bounds``; with the
    entropy as a metric only (``entropy_grad=False``: the learner's setting when learner.entropy_coef == 0) the
    entropy values are still exact, the entropy output carries no graph, and the gradients are those of the
    log-prob term alone. The bound is tight enough to fail: leaving the entropy term out of a loss that uses it
    is caught."""
    from soft_rl.lean_logprobs import token_scores

    h, W, b, x, T, up = _head_problem(N=37, H=16, V=101)
    up_lp, up_ent = up[0].double(), up[1].double() if entropy_in_loss else torch.zeros(37, dtype=torch.float64)

    def run(chunked: bool, entropy_grad: bool = True):
        hh, ww, bb = (t.clone().double().requires_grad_() for t in (h, W, b))
        if chunked:
            lp, ent = token_scores(hh.float(), ww.float(), bb.float(), x, T, chunk_tokens=chunk,
                                   entropy_grad=entropy_grad)
            assert ent.requires_grad == entropy_grad
        else:
            lp, ent = _float64_head(hh, ww, bb, x, T.double())
        loss = (up_lp * lp).sum()
        if entropy_grad:
            loss = loss + (up_ent * ent).sum()
        loss.backward()
        return {"logprob": lp, "entropy": ent, "d h": hh.grad, "d W": ww.grad, "d b": bb.grad}

    want = run(False)
    bounds = _float32_error_bounds(h.double(), W.double(), b.double(), x, T.double(), up_lp, up_ent)
    for entropy_grad in ([True, False] if not entropy_in_loss else [True]):
        got = run(True, entropy_grad)
        for name, w in want.items():
            err = (got[name].detach().double() - w.detach()).abs().max().item()
            assert err <= bounds[name].item(), (name, err, bounds[name].item())
    if entropy_in_loss:  # the control: dropping the entropy's gradient misses far more than the bound
        got = run(True, entropy_grad=False)
        got_loss_ent = (up_ent * got["entropy"]).sum()
        assert not got_loss_ent.requires_grad
        assert (got["d W"].double() - want["d W"]).abs().max() > 100 * bounds["d W"]


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["entropy-metric", "entropy-gradient"])
def test_token_scores_backward_peak_memory_stays_within_its_chunk_bound(entropy_grad):
    """The backward's peak live bytes (soft_rl.memory_meter counts every storage it allocates, autograd's
    included) stay within the bound the design gives, float32 weights:

        k x chunk x V x 4   (k = 1 without the entropy's gradient: u -> p -> gradient in place; k = 2 with it:
                             u and p; the old code held about 6, e.g. u, p, u - E[u], products, g / T, g^T)
      + 4 x (V x H + N x H) (the weight gradient, accumulated in place, and the hidden gradient)
      + 4 x 2V + 4 KiB      (the bias gradient and one [V] column sum; [chunk] row vectors)

    and the forward's within 2 x chunk x V x 4 + 4 KiB (u, exp(u - max))."""
    from soft_rl.lean_logprobs import token_scores
    from soft_rl.memory_meter import MemoryMeter

    N, H, V, chunk = 96, 32, 4099, 32
    h, W, b, x, T, _ = _head_problem(N=N, H=H, V=V)
    h, W, b = (t.requires_grad_() for t in (h, W, b))
    with MemoryMeter() as forward:
        lp, ent = token_scores(h, W, b, x, T, chunk_tokens=chunk, entropy_grad=entropy_grad)
        loss = lp.sum() + (ent.sum() if entropy_grad else 0.0)
    with MemoryMeter() as backward:
        loss.backward()
    buffer = chunk * V * 4
    assert forward.peak <= 2 * buffer + 4096, forward.peak / buffer
    bound = (2 if entropy_grad else 1) * buffer + 4 * (V * H + N * H) + 4 * 2 * V + 4096
    assert backward.peak <= bound, (backward.peak, bound)
    # the bound is not vacuous: the gradients themselves are most of what remains
    assert backward.peak >= 4 * (V * H + N * H) + (2 if entropy_grad else 1) * buffer * 0.9


def test_gaussian_soft_tokens_in_a_mixed_micro_batch_equal_the_reference(tiny_hf, tiny_tokenizer):
    """A micro-batch mixing Gaussian soft tokens (two of them), Gumbel, Multiplex and discrete requests: the
    Gaussian steps' observations and embedding rows line up with their lean rows (the learner's
    ``MicroBatch.embedding_observation``), and the log-probs equal the HF reference's per-trajectory scoring."""
    from soft_rl.lean_logprobs import head_logprobs, token_scores
    from soft_rl.learner_batch import build_micro_batch, pad_rows
    from soft_rl.noise_kinds.embedding_gaussian import embedding_sigma
    from soft_rl.reference import embedding_observation

    _, model = tiny_hf
    emb = model.get_input_embeddings().weight
    sigma = embedding_sigma(emb)
    settings = [dict(noise="gumbel"), dict(noise="embedding_gaussian", tau=0.5, k=4, embedding_sigma=sigma),
                dict(noise="multiplex", k=3, top_k=-1, top_p=0.9), dict(soft=False),
                dict(noise="embedding_gaussian", tau=0.2, k=5, top_k=8, embedding_sigma=2 * sigma)]
    prompts = [list(tiny_tokenizer.encode(f"question {i}: 5 + {i} =")) for i in range(len(settings))]
    params = [SoftSamplingParams(seed=70 + i, thinking_budget=8, **kw) for i, kw in enumerate(settings)]
    trajs = generate(model, prompts, params, max_new_tokens=12, eos_token_ids=[], tokenizer=tiny_tokenizer,
                     density="exact")
    assert trajs[1].num_soft > 1 and trajs[4].num_soft > 1
    head = model.get_output_embeddings()
    with torch.no_grad():
        mb = build_micro_batch(emb, trajs, "exact")
        assert mb.input_noise_rows.numel() == trajs[1].num_soft + trajs[4].num_soft
        h = model.model(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                        position_ids=mb.position_ids).last_hidden_state.reshape(-1, head.weight.shape[1])
        disc_scores = token_scores(h[mb.disc_rows], head.weight, None, mb.disc_labels, mb.temperature[mb.order_full])
        soft_logits = torch.einsum("nh,nkh->nk", h[mb.soft_rows], head.weight[mb.soft_ids])
        rows = emb[mb.soft_ids[mb.input_noise_rows]]
        got = head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, full_vocab=mb.order_full,
                            noisy=mb.noisy, temperature=mb.temperature, slots=mb.slots, density="exact",
                            noise=mb.noise, embedding=mb.embedding_observation(rows))
        want = []
        for t in trajs:
            P, R = t.prompt_ids.shape[0], t.num_tokens
            logits = model(inputs_embeds=build_inputs_embeds(emb, t)[None]).logits[0, P - 1: P - 1 + R]
            obs = embedding_observation(emb, emb, t) if t.sampling.noise == "embedding_gaussian" else None
            want.append(position_logprobs(logits, t, "exact", embedding=obs))
    torch.testing.assert_close(pad_rows(got, mb.lengths), pad_rows(torch.cat(want), mb.lengths), atol=2e-5,
                               rtol=2e-6)
    for t, w in zip(trajs, want, strict=True):  # and the rollout's own log-probs, Gaussian steps included
        torch.testing.assert_close(t.logprobs, w, atol=2e-5, rtol=2e-6)
