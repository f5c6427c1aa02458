"""Learner settings that need no cluster: the learner actors' Ray options on GPU runs, the DeepSpeed config's
gradient accumulation dtype, and the HF export's shard plan."""

import pytest
import torch

from soft_rl.config import LearnerConfig


def test_gpu_learner_actors_get_expandable_segments_unless_the_user_set_the_allocator():
    from workers.learner import learner_actor_options

    bundle = {"num_gpus": 0.5, "scheduling_strategy": "bundle-3"}
    opts = learner_actor_options("gpu", 1.0, bundle, environ={})
    assert opts["runtime_env"] == {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                                "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}}
    assert opts["num_cpus"] == 1.0 and opts["num_gpus"] == 0.5 and opts["scheduling_strategy"] == "bundle-3"
    assert learner_actor_options("gpu", 1.0, None, environ={})["num_gpus"] == 1
    # the driver's value is forwarded as it is; one in the actor's own runtime_env wins over both
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert learner_actor_options("gpu", 1.0, None, environ=mine)["runtime_env"]["env_vars"] == mine
    own = {"runtime_env": {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.8", "X": "1"},
                           "working_dir": "."}}
    got = learner_actor_options("gpu", 1.0, own, environ=mine)["runtime_env"]
    assert got == {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.8", "X": "1",
                                "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}, "working_dir": "."}
    assert own["runtime_env"]["env_vars"] == {"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.8",
                                              "X": "1"}  # the caller's dict is not modified
    # CPU runs: no GPU, no allocator setting, nothing added
    cpu = learner_actor_options("cpu", 0.5, {"num_gpus": 0}, environ={})
    assert cpu == {"num_cpus": 0.5, "num_gpus": 0}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_learners_accumulate_gradients_in_float32_where_deepspeed_supports_it(stage, dtype):
    """ZeRO 2 and 3 (tests/test_learner_accumulation.py checks the effect); not stage 0 (DeepSpeed rejects it)
    nor 1 (its BF16_Optimizer path: see workers.learner.deepspeed_config); float32 runs need nothing."""
    from workers.learner import deepspeed_config

    cfg = deepspeed_config(LearnerConfig(zero_stage=stage), dtype)
    want = {"grad_accum_dtype": "fp32"} if dtype == "bfloat16" and stage >= 2 else None
    assert cfg.get("data_types") == want


def test_export_shard_plan_bounds_each_shard():
    from workers.learner import plan_shards

    f32, bf16 = torch.float32, torch.bfloat16
    tensors = [("a", (10,), f32), ("b", (20,), f32), ("c", (100,), bf16), ("d", (5,), f32), ("e", (1,), bf16)]
    assert plan_shards(tensors, 200) == [["a", "b"], ["c"], ["d", "e"]]  # 40 + 80; 200 alone; 20 + 2
    assert plan_shards(tensors, 10 ** 9) == [["a", "b", "c", "d", "e"]]
    assert plan_shards(tensors, 1) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # a tensor over the limit: its own
    with pytest.raises(ValueError, match="max_shard_bytes"):
        plan_shards(tensors, 0)
