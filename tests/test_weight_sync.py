"""Learner -> rollout weight sync: engine matches the learner after a sync, a stale or corrupted sync
is caught by the parity probe, a hung or dead engine times out with a clear error."""

import copy
import time

import pytest
import ray
import torch

from soft_rl.config import LearnerConfig
from soft_rl.losses import compute_advantages
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams

pytestmark = pytest.mark.slow
ARCH = dict(hidden=128, heads=2, kv_heads=1, layers=2)


def test_sync_probe_and_corruption(ray_cluster, tmp_path, tiny_tokenizer):
    from soft_rl.tiny import build_model
    from workers.learner import LearnerGroup
    from workers.rollout import RolloutPool, RolloutRequest
    from workers.weight_sync import BroadcastChannel, WeightSyncError, check_parity, make_buckets, sync_weights

    model = build_model(tmp_path / "m", tiny_tokenizer, arch="qwen2", seed=9, **ARCH).eval()
    prompts = [list(tiny_tokenizer.encode(f"p{i}: {i} and {i + 1}")) for i in range(4) for _ in range(2)]
    params = [SoftSamplingParams(seed=i, thinking_budget=4) for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=8, eos_token_ids=[], tokenizer=tiny_tokenizer)
    probe = [RolloutRequest(prompts[i], SoftSamplingParams(seed=1000 + i, thinking_budget=4), 8) for i in range(2)]

    learners = LearnerGroup(str(tmp_path / "m"), LearnerConfig(world_size=2, zero_stage=3, lr=1e-2, mini_batches=1,
                                                               kl_coef=0.0, sync_timeout_s=120))
    pool = RolloutPool(1, str(tmp_path / "m"), dict(dtype="float32", enforce_eager=True, max_model_len=128,
                                                    max_k=5, max_new_tokens=8), num_cpus_per_worker=0.5)
    try:
        assert check_parity(learners, pool, probe, 1e-4, 60) <= 1e-4  # same initial weights
        adv = compute_advantages("grpo", torch.tensor([1.0, 0.0] * 4), torch.arange(4).repeat_interleave(2))
        old = learners.logprobs(trajs)
        learners.train_mini_batch(trajs, adv, old)
        with pytest.raises(WeightSyncError, match="parity probe failed on rollout worker 0"):
            check_parity(learners, pool, probe, 1e-4, 60)  # the engine still has the old weights
        m = sync_weights(learners, pool, bucket_mb=0.05, timeout_s=60, probe=probe)
        assert m["sync/buckets"] > 3 and m["sync/probe_max_abs_diff"] <= 1e-4
        # fresh rollouts after the sync: engine log-probs == learner log-probs on the new weights
        got = pool.generate([RolloutRequest(p.prompt_ids, SoftSamplingParams(seed=77, thinking_budget=4), 8)
                             for p in probe])
        for a, t in zip(learners.logprobs(got), got, strict=True):
            assert (a - t.logprobs).abs().max() <= 1e-4
        # a corrupted bucket is detected
        state = learners.full_state_dict()
        name = next(n for n in state if "mlp" in n)
        state[name] = state[name] + 0.05 * torch.randn_like(state[name])
        with pytest.raises(WeightSyncError, match="parity probe failed"):
            sync_weights(learners, pool, state=state, timeout_s=60, probe=probe)

        # broadcast transport (gloo group: learner rank 0 + the engine), ZeRO-3 gathers bucket by bucket
        channel = BroadcastChannel(learners, pool, bucket_mb=0.05, timeout_s=60)
        assert len(channel.layout) > 3
        learners.train_mini_batch(trajs, adv, learners.logprobs(trajs))
        with pytest.raises(WeightSyncError, match="parity probe failed"):
            check_parity(learners, pool, probe, 1e-4, 60)
        for _ in range(2):  # the group is opened once and reused
            m = sync_weights(learners, pool, timeout_s=60, probe=probe, channel=channel)
            assert m["sync/probe_max_abs_diff"] <= 1e-4 and m["sync/buckets"] == len(channel.layout)
        assert channel.open
        got = pool.generate([RolloutRequest(p.prompt_ids, SoftSamplingParams(seed=78, thinking_budget=4), 8)
                             for p in probe])
        for a, t in zip(learners.logprobs(got), got, strict=True):
            assert (a - t.logprobs).abs().max() <= 1e-4
        # a wrong name mapping on the receiving side (two same-shaped MLP weights swapped) is caught
        wrong = copy.deepcopy(channel.layout)
        where = {n: (i, j) for i, b in enumerate(wrong) for j, n in enumerate(b.names)}
        (ia, ja), (ib, jb) = where["model.layers.0.mlp.gate_proj.weight"], where["model.layers.0.mlp.up_proj.weight"]
        wrong[ia].names[ja], wrong[ib].names[jb] = wrong[ib].names[jb], wrong[ia].names[ja]
        ray.get([pool.workers[0].receive_weights.remote(wrong)]
                + [a.broadcast_weights.remote(channel.layout) for a in learners.actors])
        with pytest.raises(WeightSyncError, match="parity probe failed"):
            check_parity(learners, pool, probe, 1e-4, 60)
        sync_weights(learners, pool, timeout_s=60, probe=probe, channel=channel)  # and a good sync repairs it
    finally:
        pool.shutdown()
        learners.shutdown()
    assert [len(b) for b in make_buckets({"a": torch.zeros(4), "b": torch.zeros(300000)}, 0.5)] == [1, 1]


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
@pytest.mark.parametrize("mode", ["hang", "dead"])
def test_hung_or_dead_engine_fails_clearly(ray_cluster, mode, transport):
    from tests.sync_stubs import StubLearner, StubWorker
    from workers.weight_sync import BroadcastChannel, WeightSyncError, sync_weights

    class Pool:
        workers = [ray.remote(num_cpus=0)(StubWorker).remote(mode)]

    class Learners:
        actors = [ray.remote(num_cpus=0)(StubLearner).remote()]

    ray.get([Pool.workers[0].num_ranks.remote(), Learners.actors[0].weight_specs.remote()])  # started
    channel = None
    if transport == "broadcast":
        channel = BroadcastChannel(Learners, Pool, timeout_s=2)
        channel._open()
    if mode == "dead":
        ray.kill(Pool.workers[0])
    t0 = time.time()
    with pytest.raises(WeightSyncError, match="rollout worker 0 (did not finish|died)"):
        if channel is None:
            sync_weights(None, Pool, state={"w": torch.zeros(3)}, timeout_s=2)
        else:
            sync_weights(Learners, Pool, timeout_s=2, channel=channel)
    assert time.time() - t0 < 30
    assert channel is None or not channel.open  # reopened by the next sync
    ray.kill(Pool.workers[0])
    ray.kill(Learners.actors[0])
