"""The memory-lean learner path (K gathered logits at soft positions, chunked full softmax at discrete
ones) equals the naive full-vocabulary computation, values and gradients."""

import pytest
import torch

from soft_rl.densities import density_slots
from soft_rl.lean_logprobs import position_logprobs_lean
from soft_rl.reference import build_inputs_embeds, generate, position_logprobs
from soft_rl.sampling import SoftSamplingParams


@pytest.mark.parametrize("density", ["official", "exact"])
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
    from soft_rl.lean_logprobs import head_logprobs
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
            disc_logits = h[mb.disc_rows] @ head.weight.t()
            soft_logits = torch.einsum("nh,nkh->nk", h[mb.soft_rows], head.weight[mb.soft_ids])
            got = head_logprobs(disc_logits, soft_logits, is_soft=mb.order_is_soft, tokens=mb.tokens, noisy=mb.noisy,
                                temperature=mb.temperature, slots=mb.slots, density=density, noise=mb.noise)
            want = []
            for t in trajs:
                P, R = t.prompt_ids.shape[0], t.num_tokens
                x = build_inputs_embeds(model.get_input_embeddings().weight, t)[None]
                want.append(position_logprobs(model(inputs_embeds=x).logits[0, P - 1: P - 1 + R], t, density))
        torch.testing.assert_close(pad_rows(got, mb.lengths), pad_rows(torch.cat(want), mb.lengths), atol=2e-5,
                                   rtol=1e-6)
