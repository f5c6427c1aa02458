"""The HF reference: on-policy consistency with the teacher-forced forward, the phase machine, and
reproducibility."""

import pytest
import torch

from soft_rl.data import render_prompt
from soft_rl.densities import DENSITY_MODES, density_mode
from soft_rl.phase import PhaseTracker
from soft_rl.reference import build_inputs_embeds, encode_marker, generate, teacher_forced_logprobs
from soft_rl.sampling import SampleOutput, SoftSamplingParams


def chat_prompts(tok, n):
    return [render_prompt(tok, [{"role": "user", "content": f"what is {i} + {3 * i}?"}]) for i in range(n)]


MIXED = [
    SoftSamplingParams(seed=1),  # the paper's training sampler
    SoftSamplingParams(seed=2, temperature=0.6, top_k=30, k=30, tau=0.5),
    SoftSamplingParams(seed=3, noise="dirichlet", tau=1.0),
    SoftSamplingParams(seed=4, noise="gaussian", tau=1.0),
    SoftSamplingParams(seed=5, thinking_budget=6, answer_temperature=0.8, answer_top_k=10),
    SoftSamplingParams(seed=6, think_end="</answer>", thinking_budget=4),  # a 3-token marker
    SoftSamplingParams(seed=7, soft=False, thinking_budget=5),  # plain CoT request
    SoftSamplingParams(seed=8, noise_clamp=None, noise_scale=0.5, k=3),
]


@pytest.mark.parametrize("density", DENSITY_MODES)
def test_on_policy_consistency(tiny_hf, tiny_tokenizer, density):
    """Rollout log-probs == teacher-forced log-probs on the same weights, so the PPO ratio is 1 (each density
    mode on the requests whose noise it scores)."""
    _, model = tiny_hf
    params = [p for p in MIXED if not p.soft or p.noise in density_mode(density).noises]
    prompts = chat_prompts(tiny_tokenizer, len(params))
    trajs = generate(model, prompts, params, max_new_tokens=24, eos_token_ids=[tiny_tokenizer.eos_token_id],
                     tokenizer=tiny_tokenizer, density=density)
    rescored = teacher_forced_logprobs(model, trajs, density)
    n_soft = n_disc = 0
    for t, lp in zip(trajs, rescored, strict=True):
        assert torch.isfinite(lp).all()
        diff = (lp - t.logprobs).abs()
        if t.sampling.noise == "gumbel":
            assert diff.max().item() <= 1e-5
        else:
            # The Dirichlet/Gaussian ablation densities are stiff (sigma = 0.05) and reach |L| ~ 100,
            # where one float32 ulp is ~8e-6: there the agreement is relative.
            assert (diff / t.logprobs.abs().clamp_min(1.0)).max().item() <= 1e-5
            assert (diff[~t.is_soft] <= 1e-5).all()
        n_soft += int(t.is_soft.sum())
        n_disc += int((~t.is_soft).sum())
    assert n_soft > 50 and n_disc > 20  # both kinds of positions were checked


def test_phase_switch_budget_and_multi_token_marker(tiny_hf, tiny_tokenizer):
    _, model = tiny_hf
    marker = encode_marker(tiny_tokenizer, "</answer>")
    assert len(marker) == 3
    params = [SoftSamplingParams(seed=11, think_end="</answer>", thinking_budget=5),
              SoftSamplingParams(seed=12, thinking_budget=7)]
    trajs = generate(model, chat_prompts(tiny_tokenizer, 2), params, max_new_tokens=20, eos_token_ids=[],
                     tokenizer=tiny_tokenizer)
    t0, t1 = trajs
    # 5 soft thinking steps, then the 3 marker tokens forced as discrete steps, then the answer
    assert t0.tokens[5:8].tolist() == marker and t0.forced[5:8].all() and not t0.forced[:5].any()
    assert t0.n_think == 8
    assert t0.is_soft[:5].all() and not t0.is_soft[5:].any()
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")
    marker_at = (t1.tokens == think_end).nonzero().flatten()
    assert t1.n_think == int(marker_at[0]) + 1 <= 8
    assert not t1.is_soft[t1.n_think - 1:].any() and t1.is_soft[: t1.n_think - 1].all()
    # the answer-phase steps are one-hot on the emitted token
    assert torch.equal(t0.topk_ids[8:], t0.tokens[8:, None].expand(-1, t0.topk_ids.shape[1]))


def test_tracker_detects_marker_on_tail_and_switches_once():
    marker = [7, 8, 9]
    tr = PhaseTracker([marker, [5]], [None, None])
    stream = [[7, 5], [8, 1], [9, 5], [7, 2], [8, 3], [9, 4]]
    ends = []
    for toks in stream:
        tok = torch.tensor(toks)
        out = SampleOutput(ids=tok[:, None].repeat(1, 2), noisy=torch.ones(2, 2), weights=torch.full((2, 2), 0.5),
                           token=tok, is_soft=torch.tensor([True, True]), logprob=torch.zeros(2),
                           token_logprob=torch.full((2,), -1.0), kept=torch.ones(2, 2, dtype=torch.bool))
        rec, was_thinking, _ = tr.advance(out)
        ends.append((was_thinking & ~tr.thinking).tolist())
        if was_thinking[0] and not tr.thinking[0]:
            assert not rec.is_soft[0] and rec.logprob[0] == -1.0 and rec.weights[0].tolist() == [1.0, 0.0]
    # row 0 switches when 7, 8, 9 completes (step 3) and never again; row 1 at its first 5
    assert [e[0] for e in ends] == [False, False, True, False, False, False]
    assert [e[1] for e in ends] == [True, False, False, False, False, False]
    assert tr.n_think.tolist() == [3, 1]


def test_trajectory_independent_of_batch_composition(tiny_hf, tiny_tokenizer):
    _, model = tiny_hf
    prompts = chat_prompts(tiny_tokenizer, 4)
    params = [SoftSamplingParams(seed=20 + i, thinking_budget=8) for i in range(4)]
    eos = [tiny_tokenizer.eos_token_id]
    together = generate(model, prompts, params, max_new_tokens=16, eos_token_ids=eos, tokenizer=tiny_tokenizer)
    alone = generate(model, prompts[2:3], params[2:3], max_new_tokens=16, eos_token_ids=eos,
                     tokenizer=tiny_tokenizer)[0]
    assert together[2].tokens.tolist() == alone.tokens.tolist()
    torch.testing.assert_close(together[2].noisy, alone.noisy, atol=1e-5, rtol=0)
    other_seed = generate(model, prompts[2:3], [SoftSamplingParams(seed=99, thinking_budget=8)],
                          max_new_tokens=16, eos_token_ids=eos, tokenizer=tiny_tokenizer)[0]
    assert other_seed.tokens.tolist() != alone.tokens.tolist()


def test_soft_inputs_change_the_model_input(tiny_hf, tiny_tokenizer):
    """Control: the rebuilt soft inputs are not the plain token embeddings of the emitted ids."""
    _, model = tiny_hf
    t = generate(model, chat_prompts(tiny_tokenizer, 1), [SoftSamplingParams(seed=5, tau=1.0)], max_new_tokens=8,
                 eos_token_ids=[tiny_tokenizer.eos_token_id], tokenizer=tiny_tokenizer)[0]
    E = model.get_input_embeddings().weight
    x = build_inputs_embeds(E, t)
    P = t.prompt_ids.shape[0]
    assert torch.equal(x[:P], E[t.prompt_ids])
    plain = E[t.tokens[:-1]]
    assert (x[P:] - plain).abs().max() > 1e-3
    lp_soft = teacher_forced_logprobs(model, [t])[0]
    assert (lp_soft - t.logprobs).abs().max() <= 1e-5


def test_plain_request_logprobs_are_token_logprobs(tiny_hf, tiny_tokenizer):
    _, model = tiny_hf
    p = SoftSamplingParams(seed=3, soft=False, temperature=0.9, thinking_budget=4, answer_temperature=0.7)
    t = generate(model, chat_prompts(tiny_tokenizer, 1), [p], max_new_tokens=12,
                 eos_token_ids=[tiny_tokenizer.eos_token_id], tokenizer=tiny_tokenizer)[0]
    assert not t.is_soft.any()
    ids = torch.cat([t.prompt_ids, t.tokens])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, t.prompt_ids.shape[0] - 1: -1]
    temps = t.position_temperatures()
    ref = torch.log_softmax(logits / temps[:, None], -1).gather(1, t.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(t.logprobs, ref, atol=1e-5, rtol=0)
