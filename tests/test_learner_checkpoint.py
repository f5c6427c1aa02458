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


def test_zero3_export_of_two_ranks_is_sharded_bf16_and_loads_in_transformers(ray_cluster, setup, tiny_dir,
                                                                             tiny_tokenizer):
    """ZeRO-3 at world size 2 (the presets' stage; before, rank 0 alone built a model inside zero.Init's
    collectives and the export hung until the group timeout): a bf16 run with tied input/output embeddings
    exports several safetensors shards plus their index, a bf16 config, the generation config and the
    tokenizer; transformers loads it with the learners' gathered weights, bit for bit, tied as before."""
    import json

    from transformers import AutoModelForCausalLM

    from soft_rl.tiny import build_model
    from workers.learner import LearnerGroup

    root, trajs, adv, _ = setup
    path = root / "tied"
    build_model(path, tiny_tokenizer, arch="qwen2", seed=6, tie_embeddings=True, **ARCH)
    cfg = LearnerConfig(world_size=2, zero_stage=3, lr=1e-3, mini_batches=2, kl_coef=0.0, micro_batch_tokens=48,
                        sync_timeout_s=120)
    g = LearnerGroup(str(path), cfg, dtype="bfloat16")
    try:
        rl_step(g, trajs, adv, cfg.mini_batches)
        learner_state = g.full_state_dict()
        out = g.export_hf(str(root / "export3"), str(tiny_dir / "tokenizer"), max_shard_bytes=100_000)
    finally:
        g.shutdown()
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "generation_config.json" in files
    index = json.loads((root / "export3" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    config = json.loads((root / "export3" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    initial = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert {n for n, _ in hf.named_parameters()} == learner_state.keys()
    moved = 0.0
    for (name, p), (_, p0) in zip(hf.named_parameters(), initial.named_parameters(), strict=True):
        assert torch.equal(p.detach().float(), learner_state[name]), name  # bf16 values, exact in float32
        moved = max(moved, (p.detach().float() - p0.detach()).abs().max().item())
    assert moved > 1e-3  # the export holds the trained weights, not the checkpoint it started from
