"""Slow, obviously-correct soft-thinking with HuggingFace transformers: the reference for every fast path.

``generate`` is soft-thinking generation with a KV cache: prompts are prefilled as ordinary tokens,
then every decode step runs the core sampler (``soft_rl.sampling.soft_sample``) on the last logits
and feeds back sum_k w_k E[i_k] as the next ``inputs_embeds`` (one-hot for discrete steps, which is
exactly E[x]). The vLLM engine must reproduce it token for token.

``teacher_forced_logprobs`` is the learner-side forward: from the stored (ids, noisy, is_soft, token)
it rebuilds the detached mixed inputs and returns per-position log-probs with full logits (the
learner's memory-lean path is checked against it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soft_rl.densities import density_slots, soft_logprob, soft_weights
from soft_rl.draws import draw_mask, scores_per_draw
from soft_rl.losses import entropy_from_logits
from soft_rl.noise_kinds import NOISE_CODES, noise_kind
from soft_rl.noise_kinds.embedding_gaussian import EmbeddingObservation
from soft_rl.phase import PhaseTracker
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import (
    SamplingBatch,
    SoftSamplingParams,
    input_offsets,
    mix_embeddings,
    mix_rows_f32,
    soft_sample,
)
from soft_rl.trajectory import Trajectory


def encode_marker(tokenizer, marker: str) -> list[int]:
    ids = list(tokenizer.encode(marker, add_special_tokens=False))
    if not ids:
        raise ValueError(f"think-end marker {marker!r} encodes to no tokens")
    return ids


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SoftSamplingParams],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    markers: Sequence[Sequence[int]] | None = None,
    tokenizer=None,
    density: str = "official",
    width: int | None = None,
) -> list[Trajectory]:
    """Generate one trajectory per prompt (token-id lists) with per-request ``params``.

    Think-end markers are given as token ids, or encoded from ``params[i].think_end`` with
    ``tokenizer``. ``width`` is the K of the returned arrays (default: the largest request k).
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if markers is None:
        if tokenizer is None:
            raise ValueError("pass markers (token ids) or a tokenizer to encode params.think_end")
        markers = [encode_marker(tokenizer, p.think_end) for p in params]
    dev = model.device
    B = len(prompts)
    emb_w = model.get_input_embeddings().weight
    P = max(len(p) for p in prompts)
    input_ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    attn = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):  # left padding
        input_ids[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[b, P - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = pos[:, -1] + 1

    batch = SamplingBatch.from_params(list(params), dev, width)
    soft_enabled = batch.is_soft.clone()
    tracker = PhaseTracker(markers, [p.thinking_budget for p in params], dev)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    length = torch.zeros(B, dtype=torch.long, device=dev)
    n_think = torch.zeros(B, dtype=torch.long, device=dev)
    kinds = tuple(sorted({p.noise for p in params}))
    H = emb_w.shape[1]
    steps = []
    for t in range(max_new_tokens):
        for name, col in tracker.phase_columns(soft_enabled).items():
            setattr(batch, name, col)
        force = tracker.forced_tokens()
        step = torch.full((B,), t, device=dev)
        o = soft_sample(logits, batch, NoiseCounters(batch.seed, step), force_token=force, density=density,
                        hidden_size=H)
        o, was_thinking, forced = tracker.advance(o)
        steps.append((o, forced))
        length += active.long()
        n_think += (active & was_thinking).long()
        active = active & ~torch.isin(o.token, eos)
        if not bool(active.any()) or t == max_new_tokens - 1:
            break
        offset = input_offsets(batch.noise, o.is_soft, batch.seed, step, batch.embedding_sigma, H, kinds)
        emb = mix_embeddings(emb_w, o.ids, o.weights, offset)[:, None, :]
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=dev)], dim=1)
        out = model(inputs_embeds=emb, attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1

    def stack(name):
        return torch.stack([getattr(o, name) for o, _ in steps], dim=1).cpu()

    ids, noisy, tokens = stack("ids"), stack("noisy"), stack("token")
    is_soft, logprobs, kept = stack("is_soft"), stack("logprob"), stack("kept")
    forced_all = torch.stack([f for _, f in steps], dim=1).cpu()
    trajs = []
    for b in range(B):
        n = int(length[b])
        finished = bool(torch.isin(tokens[b, n - 1], eos.cpu())) if n else False
        trajs.append(Trajectory(
            prompt_ids=torch.tensor(list(prompts[b]), dtype=torch.long),
            tokens=tokens[b, :n].clone(), topk_ids=ids[b, :n].clone(), noisy=noisy[b, :n].clone(),
            is_soft=is_soft[b, :n].clone(), logprobs=logprobs[b, :n].clone(), forced=forced_all[b, :n].clone(),
            kept=kept[b, :n].clone(),
            n_think=int(n_think[b]), finish_reason="stop" if finished else "length", sampling=params[b],
        ))
    return trajs


def rebuild_weights(traj: Trajectory, device=None) -> torch.Tensor:
    """[R, K] input-mixture weights of every generated position, from the stored values only, computed on
    ``device`` (the learner's: the engine computes them on its GPU too, so both round alike; audit 13)."""
    dev = traj.noisy.device if device is None else torch.device(device)
    valid = traj.slot_valid().to(dev)
    w = soft_weights(traj.noisy.to(dev), traj.sampling.noise, traj.sampling.tau, valid)
    K = traj.topk_ids.shape[-1]
    one_hot = (torch.arange(K, device=dev) == 0).float().expand_as(w)
    return torch.where(traj.is_soft.to(dev)[:, None], w, one_hot)


def observed_inputs(embedding_weight: torch.Tensor, traj: Trajectory) -> torch.Tensor:
    """[R, H] float32: the input that followed each generated step, sum_k w_k E[i_k] rebuilt from the stored values,
    plus sigma eps on the soft steps of a kind that noises the input (regenerated from the request's counters)."""
    dev = embedding_weight.device
    s, R, H = traj.sampling, traj.num_tokens, embedding_weight.shape[1]
    col = torch.ones(R, dtype=torch.int64, device=dev)
    offset = input_offsets(col * NOISE_CODES[s.noise], traj.is_soft.to(dev), col * s.seed,
                           torch.arange(R, device=dev), col.float() * s.embedding_sigma, H, (s.noise,))
    ids, w = traj.topk_ids.to(dev), rebuild_weights(traj, dev)
    return mix_rows_f32(embedding_weight[ids], w, offset)


def build_inputs_embeds(embedding_weight: torch.Tensor, traj: Trajectory,
                        observed: torch.Tensor | None = None) -> torch.Tensor:
    """[P + R - 1, H]: prompt token embeddings, then the (detached) input after each step but the last.
    ``observed``: ``observed_inputs(embedding_weight, traj)`` when the caller has it already (a kind that noises the
    input: the density reads the same inputs)."""
    dev = embedding_weight.device
    prompt = embedding_weight[traj.prompt_ids.to(dev)]
    if noise_kind(traj.sampling.noise).noises_input:
        observed = observed_inputs(embedding_weight, traj) if observed is None else observed
        mixed = observed[:-1].to(embedding_weight.dtype)
    else:
        mixed = mix_embeddings(embedding_weight, traj.topk_ids[:-1].to(dev), rebuild_weights(traj, dev)[:-1])
    return torch.cat([prompt, mixed], dim=0).detach()


def embedding_observation(observed_embedding: torch.Tensor, embedding_weight: torch.Tensor, traj: Trajectory,
                          observed: torch.Tensor | None = None) -> EmbeddingObservation:
    """What the density of ``traj``'s soft steps (a kind that noises the input) is scored with: the inputs rebuilt
    from the rollout-time ``observed_embedding`` (``observed``: those inputs, when the caller has them already), the
    policy's ``embedding_weight`` rows at the stored ids (differentiable), sigma and tau."""
    dev = embedding_weight.device
    rows = traj.is_soft.nonzero().flatten()
    observed = observed_inputs(observed_embedding.detach(), traj) if observed is None else observed
    obs = observed[rows.to(observed.device)].to(dev)
    n, s = rows.numel(), traj.sampling
    return EmbeddingObservation(obs=obs, rows=embedding_weight[traj.topk_ids[rows].to(dev)],
                                sigma=torch.full((n,), s.embedding_sigma, dtype=torch.float32, device=dev),
                                tau=torch.full((n,), s.tau, dtype=torch.float32, device=dev))


def position_logprobs(logits: torch.Tensor, traj: Trajectory, density: str, per_draw: bool = False,
                      embedding: EmbeddingObservation | None = None) -> torch.Tensor:
    """Per-position log-probs [R] from the logits [R, V] that scored each generated position; with ``per_draw``
    the per-draw log-probs [R, J] (``soft_rl.draws``). ``embedding``: the trajectory's soft steps' observation, for a
    kind that noises the input (``embedding_observation``)."""
    s = traj.sampling
    zt = logits.float() / traj.position_temperatures().to(logits.device)[:, None]
    if per_draw:
        if not scores_per_draw(traj):
            return position_logprobs(logits, traj, density, embedding=embedding)[:, None]
        mask = draw_mask(traj, density).to(logits.device)
        ids = torch.where(traj.is_soft.to(logits.device)[:, None], traj.topk_ids.to(logits.device),
                          traj.tokens.to(logits.device)[:, None])
        draws = torch.log_softmax(zt, -1).gather(1, ids)
        return torch.where(mask, draws, torch.zeros_like(draws))
    discrete = torch.log_softmax(zt, -1).gather(1, traj.tokens.to(logits.device)[:, None]).squeeze(1)
    if not noise_kind(s.noise).trainable or not bool(traj.is_soft.any()):
        return discrete
    ids = traj.topk_ids.to(logits.device)
    clamp = s.noise_clamp
    valid = density_slots(traj.slot_valid(), traj.kept, density).to(logits.device)
    if noise_kind(s.noise).noises_input:  # scored on the soft steps only: the observation exists there
        rows = traj.is_soft.to(logits.device).nonzero().flatten()
        soft = soft_logprob(zt.gather(1, ids)[rows], traj.noisy.to(logits.device)[rows], density, s.noise_scale,
                            noise=s.noise, valid=valid[rows], clamp=clamp, embedding=embedding)
        return discrete.index_put((rows,), soft.to(discrete.dtype))
    soft = soft_logprob(zt.gather(1, ids), traj.noisy.to(logits.device), density, s.noise_scale, noise=s.noise,
                        valid=valid, clamp=clamp, dirichlet_alpha=s.dirichlet_alpha, log_norm=torch.logsumexp(zt, -1))
    return torch.where(traj.is_soft.to(logits.device), soft, discrete)


def position_entropy(logits: torch.Tensor, traj: Trajectory, density: str) -> torch.Tensor:
    """Per-position policy entropy [R]: full vocabulary of softmax(z / T) at discrete positions, the K
    density slots (p-hat) at soft ones (see ``soft_rl.losses.entropy_from_logits``)."""
    zt = logits.float() / traj.position_temperatures().to(logits.device)[:, None]
    full = entropy_from_logits(zt)
    if not bool(traj.is_soft.any()) or noise_kind(traj.sampling.noise).scores_full_vocab:
        return full
    valid = density_slots(traj.slot_valid(), traj.kept, density).to(logits.device)
    soft = entropy_from_logits(zt.gather(1, traj.topk_ids.to(logits.device)), valid)
    return torch.where(traj.is_soft.to(logits.device), soft, full)


def teacher_forced_logprobs(model, trajs: Sequence[Trajectory], density: str = "official",
                            grad: bool = False, with_entropy: bool = False, per_draw: bool = False,
                            observed_embedding: torch.Tensor | None = None):
    """Learner-side per-position log-probs of each trajectory (right-padded batch, full logits);
    with ``with_entropy`` also the per-position entropies: (log-probs, entropies); with ``per_draw`` per-draw
    log-probs [R, J] (``soft_rl.draws``). ``observed_embedding``: the embedding the rollout ran with (default: the
    model's); the inputs are rebuilt from it, and a kind that noises the input is scored at those inputs."""
    emb_w = model.get_input_embeddings().weight
    observed = emb_w.detach() if observed_embedding is None else observed_embedding
    # the inputs after each step, once per trajectory of a kind that noises the input (its inputs and its density)
    inputs = [observed_inputs(observed, t) if noise_kind(t.sampling.noise).noises_input else None for t in trajs]
    seqs = [build_inputs_embeds(observed, t, x) for t, x in zip(trajs, inputs, strict=True)]
    L = max(s.shape[0] for s in seqs)
    H = emb_w.shape[1]
    dev = emb_w.device
    x = torch.zeros(len(seqs), L, H, dtype=emb_w.dtype, device=dev)
    attn = torch.zeros(len(seqs), L, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        x[b, : s.shape[0]] = s
        attn[b, : s.shape[0]] = 1
    with torch.set_grad_enabled(grad):
        logits = model(inputs_embeds=x, attention_mask=attn).logits
        out, ent = [], []
        for b, t in enumerate(trajs):
            P, R = t.prompt_ids.shape[0], t.num_tokens
            obs = None if inputs[b] is None else embedding_observation(observed, emb_w, t, inputs[b])
            out.append(position_logprobs(logits[b, P - 1: P - 1 + R], t, density, per_draw, obs))
            if with_entropy:
                ent.append(position_entropy(logits[b, P - 1: P - 1 + R], t, density))
    return (out, ent) if with_entropy else out
