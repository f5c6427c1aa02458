"""Learner checkpoints: save + load + continue is bit-identical to an uninterrupted run; rotation;
the HF export loads in transformers and in vLLM with the learner's weights."""

import os

import pytest
import torch

from soft_rl.config import LearnerConfig
from soft_rl.losses import compute_advantages
from soft_rl.reference import generate, teacher_forced_logprobs
from soft_rl.sampling import SoftSamplingParams

pytestmark = pytest.mark.slow
ARCH = dict(hidden=128, heads=2, kv_heads=1, layers=2)  # head_dim 64: vLLM's CPU attention needs >= 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from soft_rl.tiny import build_model

    root = tmp_path_factory.mktemp("ckpt")
    model = build_model(root / "m", tiny_tokenizer, arch="qwen2", seed=5, **ARCH).eval()
    prompts = [list(tiny_tokenizer.encode(f"q{i}: {i} times {i}")) for i in range(4) for _ in range(2)]
    params = [SoftSamplingParams(seed=i, thinking_budget=3 + i % 3) for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=8, eos_token_ids=[], tokenizer=tiny_tokenizer)
    rewards = torch.tensor([1.0, 0.0] * 4)
    adv = compute_advantages("grpo", rewards, torch.arange(4).repeat_interleave(2))
    cfg = LearnerConfig(world_size=2, zero_stage=2, lr=1e-3, mini_batches=2, kl_coef=0.0, micro_batch_tokens=48)
    return root, trajs, adv, cfg


def rl_step(group, trajs, adv, mini_batches):
    old = group.logprobs(trajs)
    for idx in torch.arange(len(trajs)).chunk(mini_batches):
        ii = idx.tolist()
        group.train_mini_batch([trajs[i] for i in ii], adv[idx], [old[i] for i in ii])


def test_resume_is_bit_identical_and_rotation(ray_cluster, setup):
    from workers.learner import LearnerGroup

    root, trajs, adv, cfg = setup
    g = LearnerGroup(str(root / "m"), cfg)
    try:
        rl_step(g, trajs, adv, cfg.mini_batches)
        ckpt = g.save_checkpoint(str(root / "ckpts"), step=1, client_state={"data_pos": 8}, keep=2)
        rl_step(g, trajs, adv, cfg.mini_batches)
        uninterrupted = g.full_state_dict()
        g.save_checkpoint(str(root / "ckpts"), step=2, keep=2)

        g2 = LearnerGroup(str(root / "m"), cfg)  # a fresh group, as after a crash
        try:
            client = g2.load_checkpoint(ckpt)
            assert client["data_pos"] == 8 and client["step"] == 1
            rl_step(g2, trajs, adv, cfg.mini_batches)
            resumed = g2.full_state_dict()
        finally:
            g2.shutdown()
        g.save_checkpoint(str(root / "ckpts"), step=3, keep=2)
    finally:
        g.shutdown()
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name
    # the newest 2 are kept, and no temporary directory is left behind
    assert sorted(os.listdir(root / "ckpts")) == ["step-00000002", "step-00000003"]


def test_hf_export_loads_in_transformers_and_vllm(ray_cluster, setup, tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from workers.learner import LearnerGroup

    root, trajs, adv, cfg = setup
    g = LearnerGroup(str(root / "m"), cfg)
    try:
        rl_step(g, trajs, adv, cfg.mini_batches)
        learner_state = g.full_state_dict()
        learner_lp = g.logprobs(trajs[:2])
        out = g.export_hf(str(root / "export"), str(tiny_dir / "tokenizer"))
    finally:
        g.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, p in hf.named_parameters():
        assert torch.equal(p.detach(), learner_state[name]), name
    hf_lp = teacher_forced_logprobs(hf, trajs[:2])
    for a, b in zip(hf_lp, learner_lp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    from workers.vllm_soft import SoftEngine

    eng = SoftEngine(out, dtype="float32", enforce_eager=True, max_model_len=128, max_k=5, max_new_tokens=8)
    try:
        got = eng.generate([t.prompt_ids.tolist() for t in trajs[:2]], [t.sampling for t in trajs[:2]], 8)
    finally:
        eng.shutdown()
    ref = generate(hf, [t.prompt_ids.tolist() for t in trajs[:2]], [t.sampling for t in trajs[:2]],
                   max_new_tokens=8, eos_token_ids=[tiny_tokenizer.eos_token_id], tokenizer=tiny_tokenizer)
    for a, b in zip(got, ref, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
