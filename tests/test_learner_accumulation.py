"""bf16 learners accumulate the gradients of a mini-batch's micro-batches in float32 (DeepSpeed's
``grad_accum_dtype: fp32``, set by ``workers.learner.deepspeed_config`` at ZeRO 2 and 3): M identical
micro-batches give exactly M times one micro-batch's gradient, within the float32 accumulation bound, which
DeepSpeed's default (accumulation in bf16, the control) exceeds."""

from dataclasses import asdict

import pytest
import torch

from soft_rl.config import LearnerConfig
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams

pytestmark = pytest.mark.slow
M = 32  # micro-batches per mini-batch (the presets run 16-32)
U32 = 2.0 ** -24


@pytest.mark.parametrize("stage,offload", [(2, False), (3, True)], ids=["zero2", "zero3-offload"])
def test_bf16_micro_batch_gradients_accumulate_in_float32(ray_cluster, tiny_dir, tiny_tokenizer, stage, offload):
    """The float64 reference is M x g1, g1 one micro-batch's gradient as the optimizer receives it (bf16 values,
    so exact in float64). Summing M copies of a bf16 value in float32 errs by at most (M - 1) u32 x M |g1| (here
    exactly 0: k g1 needs 8 + log2(k) mantissa bits); in bf16 each partial sum rounds to 8 bits, so some
    elements miss by ~2^-9 relative, far above that bound."""
    import ray

    from tests.grad_accum_probe import AccumulationProbe
    from workers.learner import _free_port

    model_path = str(tiny_dir / "qwen2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = list(tiny_tokenizer.encode("q: 3 plus 4 is"))
    (traj,) = generate(model, [prompt], [SoftSamplingParams(seed=5, thinking_budget=4)], max_new_tokens=10,
                       eos_token_ids=[], tokenizer=tiny_tokenizer)
    cfg = LearnerConfig(world_size=1, zero_stage=stage, offload_optimizer=offload, offload_params=offload,
                        grad_clip=0.0, kl_coef=0.0, sync_timeout_s=120)
    results = {}
    for control in (False, True):
        probe = ray.remote(AccumulationProbe).options(num_cpus=0.5).remote(0, 1, model_path, asdict(cfg),
                                                                           "bfloat16", 0, "cpu")
        try:
            ray.get(probe.init.remote("127.0.0.1", _free_port(), control))
            (old,) = ray.get(probe.logprobs.remote([[traj]]))
            adv = torch.tensor([1.0])
            g1, _ = ray.get(probe.accumulated_gradient.remote([[traj]], [adv], [[old]]))
            g, buffers = ray.get(probe.accumulated_gradient.remote([[traj]] * M, [adv] * M, [[old]] * M))
        finally:
            ray.kill(probe)
        bound = (M - 1) * U32 * M * g1.abs()
        results[control] = ((g - M * g1).abs() - bound).max().item(), buffers, g1
        print(f"ZeRO-{stage} {'bf16 (control)' if control else 'fp32'} accumulation of {M}: max |g - M g1| = "
              f"{(g - M * g1).abs().max().item():.3g} (bound {bound.max().item():.3g}), buffers {buffers}")
    excess, buffers, g1 = results[False]
    assert g1.abs().max() > 0 and buffers == {"torch.float32"}, buffers
    assert excess <= 0, excess
    control_excess, control_buffers, _ = results[True]
    assert control_buffers == {"torch.bfloat16"}, control_buffers
    assert control_excess > 0  # bf16 accumulation (DeepSpeed's default) breaks the float32 bound
