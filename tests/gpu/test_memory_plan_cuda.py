"""The memory plan's learner terms (soft_rl/memory_plan.py ``learner_activations``) against
``torch.cuda.max_memory_allocated``: one ``PolicyWithSoftHead`` forward + backward of a random Qwen2-shaped
model (H 1024, 4 layers, 8 heads of 128 with 2 KV heads, V 32000) in bf16, with and without gradient
checkpointing, unpadded (HF passes no mask: FlashAttention with GQA) and padded (a mask: the memory-efficient
kernel, k/v repeated, the mask converted per layer), at two lengths.

The prediction uses ``attention_for("cuda", ...)``: what the plan assumes for a GPU run. This is where that
assumption meets the GPU's kernels (on the CPU, tests/test_memory_plan.py checks the same terms against
MemoryMeter with the CPU's SDPA). Tolerance: 5% of the peak + 16 MiB for what the formula leaves out on CUDA:
kernel-internal buffers (FlashAttention's float32 dq accumulator while a layer's attention backward runs;
cuBLAS workspaces are allocated by the warm-up run), the caching allocator's 512-byte rounding, [N]-sized
vectors. Every case runs twice and the second run is measured. Figures go to the GPU report.
"""

from __future__ import annotations

import pytest
import torch

from soft_rl.memory_plan import ModelShape, attention_for, learner_activations
from tests.gpu.gpu_report import report
from tests.test_memory_plan import run_micro_batch

TOL, SLACK = 0.05, 16 << 20


class CudaPeak:
    """``live`` and ``peak`` bytes allocated on the current CUDA device since the context started."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()

    @property
    def live(self) -> int:
        return torch.cuda.memory_allocated() - self.base

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() - self.base


def _model(device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


@pytest.fixture(scope="module")
def setup(device):
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU mode only checks this file's own code
    return _model(device, dtype), cuda


@pytest.mark.parametrize("rows,seq_len,padded,checkpointing,entropy_grad", [
    (1, 2048, False, False, False), (1, 2048, False, True, False), (1, 4096, False, False, True),
    (2, 1536, True, False, False), (2, 1536, True, True, False)])
def test_learner_peak_on_cuda_matches_the_plan(setup, device, rows, seq_len, padded, checkpointing, entropy_grad):
    from soft_rl.memory_meter import MemoryMeter

    hf, cuda = setup
    scale = 1 if cuda else 8  # the CPU mode runs shorter rows
    case = dict(rows=rows, seq_len=seq_len // scale, soft_frac=0.5, chunk=512 // scale, checkpointing=checkpointing,
                padded=padded, entropy_grad=entropy_grad)
    meter = CudaPeak if cuda else MemoryMeter
    run_micro_batch(hf, device=device, meter=meter(), **case)  # warm-up: kernels' handles and workspaces
    fwd, peak, scored, soft = run_micro_batch(hf, device=device, meter=meter(), **case)
    shape = ModelShape.from_config(hf.config.to_dict())
    b = next(hf.parameters()).element_size()
    att = attention_for(device.type, "sdpa", b, padded=padded and rows > 1, gqa=True)
    est = learner_activations(shape, rows=rows, seq_len=case["seq_len"], scored=scored, soft_scored=soft, k=5,
                              dtype_bytes_=b, attention=att, checkpointing=checkpointing, chunk_tokens=case["chunk"],
                              head_fp32=True, entropy_grad=entropy_grad)
    if cuda:
        from soft_rl import lean_logprobs

        probe = getattr(lean_logprobs, "_cuda_addmm_into_fp32", None)
        if probe is not None and not probe(device):  # this torch's addmm cannot write float32 from bf16:
            est.terms["head weight gradient"] += shape.vocab_size * shape.hidden_size * 4  # a [V, H] temporary
    report(f"memory plan on {torch.cuda.get_device_name(0) if cuda else 'cpu'}: {case} attention {att.name}: "
           f"forward {fwd / 2**20:.1f} MiB (plan {est.base / 2**20:.1f}), peak {peak / 2**20:.1f} MiB "
           f"(plan {est.peak / 2**20:.1f}, {est.peak_phase})")
    assert abs(est.base - fwd) <= TOL * fwd + SLACK, (est.base, fwd, est.terms)
    assert abs(est.peak - peak) <= TOL * peak + SLACK, (est.peak, peak, est.peak_phase, est.terms)
    # the test's power: the activations (or checkpoint inputs) are far above the tolerance, and in padded rows
    # the per-layer masks and repeated k/v (the difference to an unpadded prediction) too
    main = est.terms.get("activations", est.terms.get("checkpoint inputs"))
    assert main > 2 * (TOL * fwd + SLACK) or checkpointing
    if padded and not checkpointing:
        flat = learner_activations(shape, rows=rows, seq_len=case["seq_len"], scored=scored, soft_scored=soft, k=5,
                                   dtype_bytes_=b, attention=attention_for(device.type, "sdpa", b, False, True),
                                   checkpointing=False, chunk_tokens=case["chunk"], head_fp32=True)
        assert est.base - flat.base > 2 * (TOL * fwd + SLACK) or not cuda
