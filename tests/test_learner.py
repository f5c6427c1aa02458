"""DeepSpeed learner actors end at the same parameters as a single-process pure-torch update."""

import copy

import pytest
import torch

from soft_rl.config import LearnerConfig
from soft_rl.losses import compute_advantages
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams
from soft_rl.single_process import UpdateConfig, grpo_update

pytestmark = pytest.mark.slow


def make_batch(model, tok, soft: bool, n_prompts=4, n=4):
    prompts = [list(tok.encode(f"q{i}: {i} plus {2 * i} is")) for i in range(n_prompts) for _ in range(n)]
    params = [SoftSamplingParams(seed=100 + i, soft=soft, thinking_budget=4 + i % 3, answer_temperature=0.8)
              for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=10, eos_token_ids=[], tokenizer=tok)
    g = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 2, (len(trajs),), generator=g).float()
    group = torch.arange(n_prompts).repeat_interleave(n)
    return trajs, rewards, group


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("soft", [True, False], ids=["softgrpo", "grpo"])
def test_two_ranks_match_single_process(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage, soft):
    from transformers import AutoModelForCausalLM

    from workers.learner import LearnerGroup

    path = str(tiny_dir / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    trajs, rewards, group = make_batch(model, tiny_tokenizer, soft)
    # Adam's eps sets how strongly gradient rounding noise is amplified in elements whose gradient is
    # ~0 (there m / sqrt(v) is ~ +-1 whatever the noise); 1e-4 keeps the comparison well conditioned.
    cfg = LearnerConfig(world_size=2, zero_stage=zero_stage, lr=1e-3, mini_batches=2, kl_coef=0.0,
                        micro_batch_tokens=64, weight_decay=0.01, adam_eps=1e-4, sync_timeout_s=120)
    # single process, pure torch
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    steps = 2
    ref_norms = []
    for _ in range(steps):
        ref_norms.append(grpo_update(ref_model, opt, trajs, rewards, group, UpdateConfig(mini_batches=cfg.mini_batches),
                                     per_step_metrics=True))
    # two DeepSpeed ranks
    learners = LearnerGroup(path, cfg)
    try:
        adv = compute_advantages("grpo", rewards, group)
        for step in range(steps):
            old = learners.logprobs(trajs)
            for j, idx in enumerate(torch.arange(len(trajs)).chunk(cfg.mini_batches)):
                ii = idx.tolist()
                m = learners.train_mini_batch([trajs[i] for i in ii], adv[idx], [old[i] for i in ii])
                assert m["skipped_steps"] == 0
                # the gradient itself (before clipping) matches: catches loss-scale errors Adam would hide
                assert m["grad_norm"] == pytest.approx(ref_norms[step][j], rel=1e-4)
        state = learners.full_state_dict()
    finally:
        learners.shutdown()
    worst = max((state[n] - p.detach()).abs().max().item() for n, p in ref_model.named_parameters())
    moved = max((state[n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3  # the update really changed the weights
    assert worst <= 1e-5, worst
