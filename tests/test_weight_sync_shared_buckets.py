"""Object-store weight sync under ZeRO 0-2 with several engines: learner rank 0 copies each bucket to the host
once per sync and every engine loads that one object (before, each engine pulled its own copy of every bucket,
so rank 0 gathered and copied the model once per engine per sync)."""

import pytest
import ray
import torch

from soft_rl.config import LearnerConfig
from soft_rl.losses import compute_advantages
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams

pytestmark = pytest.mark.slow
ARCH = dict(hidden=128, heads=2, kv_heads=1, layers=2)  # head_dim 64: vLLM's CPU attention needs >= 32


def test_two_engines_share_each_bucket_packed_once_per_sync(ray_cluster, tmp_path, tiny_tokenizer):
    from soft_rl.tiny import build_model
    from workers.learner import LearnerGroup
    from workers.rollout import RolloutPool, RolloutRequest
    from workers.weight_sync import WeightSyncError, check_parity, sync_weights

    model = build_model(tmp_path / "m", tiny_tokenizer, arch="qwen2", seed=11, **ARCH).eval()
    prompts = [list(tiny_tokenizer.encode(f"p{i}: {i} and {i + 2}")) for i in range(2) for _ in range(2)]
    trajs = generate(model, prompts, [SoftSamplingParams(seed=i, thinking_budget=4) for i in range(len(prompts))],
                     max_new_tokens=8, eos_token_ids=[], tokenizer=tiny_tokenizer)
    probe = [RolloutRequest(prompts[i], SoftSamplingParams(seed=500 + i, thinking_budget=4), 8) for i in range(2)]
    learners = LearnerGroup(str(tmp_path / "m"), LearnerConfig(world_size=1, zero_stage=2, lr=1e-2, mini_batches=1,
                                                               kl_coef=0.0, sync_timeout_s=120))
    pool = RolloutPool(2, str(tmp_path / "m"), dict(dtype="float32", enforce_eager=True, max_model_len=128, max_k=5,
                                                    max_new_tokens=8), num_cpus_per_worker=0.5)
    rank0 = learners.actors[0]
    try:
        adv = compute_advantages("grpo", torch.tensor([1.0, 0.0] * 2), torch.arange(2).repeat_interleave(2))
        for step in range(2):
            learners.train_mini_batch(trajs, adv, learners.logprobs(trajs))
            with pytest.raises(WeightSyncError, match="parity probe failed"):
                check_parity(learners, pool, probe, 1e-4, 60)  # the engines still hold the previous weights
            before = ray.get(rank0.packed_bucket_count.remote())
            m = sync_weights(learners, pool, bucket_mb=0.05, timeout_s=60, probe=probe)  # probes both engines
            packed = ray.get(rank0.packed_bucket_count.remote()) - before
            assert m["sync/buckets"] > 3
            assert packed == m["sync/buckets"], (step, packed, m["sync/buckets"])  # once per sync, not per engine
            assert m["sync/probe_max_abs_diff"] <= 1e-4
            assert not ray.get(rank0.__ray_call__.remote(lambda self: self._bucket_refs))  # nothing left cached
    finally:
        pool.shutdown()
        learners.shutdown()
