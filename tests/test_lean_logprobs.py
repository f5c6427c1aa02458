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
