"""The rollout's per-step device work (``SoftStateStore.sample_step`` and ``mixed_inputs``) captured in a
CUDA graph with host synchronisation forbidden, replayed over several steps, equals eager execution."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from soft_rl.engine_state import SoftStateStore
from soft_rl.sampling import SoftSamplingParams

V, H = 512, 64
REQUESTS = [SoftSamplingParams(seed=1), SoftSamplingParams(seed=2, thinking_budget=3),
            SoftSamplingParams(seed=3, noise="gaussian", noise_clamp=None),
            SoftSamplingParams(seed=4, soft=False, top_k=16, answer_top_k=16, thinking_budget=2)]


def test_engine_step_under_cuda_graph_capture_equals_eager(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    store = SoftStateStore(8, 16, 5, 4, device, V)
    slots_host = torch.tensor([store.allocate(p, [V - 2, V - 1], 16) for p in REQUESTS])
    hints = dict(store.step_hints(slots_host.numpy()), density="official")
    eager = copy.deepcopy(store)
    emb = torch.randn(V, H, device=device)
    embed = emb.__getitem__
    slots = slots_host.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    all_logits = [(torch.randn(len(REQUESTS), V, generator=g) * 3).to(device) for _ in range(6)]

    static_logits = torch.zeros(len(REQUESTS), V, device=device)
    static_steps = torch.zeros(len(REQUESTS), dtype=torch.int64, device=device)
    # warm-up on a side stream (allocator pools), as torch.cuda.graphs requires, on a throwaway copy
    warm = copy.deepcopy(store)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm.sample_step(static_logits, slots, static_steps, **hints)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the capture raises
    try:
        with torch.cuda.graph(graph):
            out = store.sample_step(static_logits, slots, static_steps, **hints)
            mixed = store.mixed_inputs(embed, slots, static_steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # capturing records the kernels without running them: the store is still at its initial state
    for step, logits in enumerate(all_logits):
        static_logits.copy_(logits)
        static_steps.fill_(step)
        graph.replay()
        ref = eager.sample_step(logits, slots, static_steps.clone(), **hints)
        ref_mixed = eager.mixed_inputs(embed, slots, static_steps.clone())
        for f in ("ids", "token", "is_soft", "kept"):
            assert torch.equal(getattr(out, f), getattr(ref, f)), (step, f)
        for f in ("noisy", "weights", "logprob"):
            torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixed, ref_mixed, rtol=1e-6, atol=1e-6)


def test_index_staging_goes_through_a_reused_pinned_buffer(device):
    """Per-step index vectors (audit item 11): pinned on CUDA, one buffer per call site, reused while it
    is large enough, equal values; the host tensor itself elsewhere."""
    from soft_rl.engine_state import IndexStaging

    stage = IndexStaging(device)
    a, b = np.arange(5), np.arange(10, 15)
    got = stage("sample", a, b)
    assert got.device.type == device.type and got.dtype == torch.int64
    assert got.cpu().tolist() == [a.tolist(), b.tolist()]
    if device.type != "cuda":
        assert not stage.buffers
        return
    buf = stage.buffers["sample"]
    assert buf.is_pinned()
    torch.cuda.set_sync_debug_mode("error")  # a pinned non-blocking copy never syncs
    try:
        stage("sample", a[:3], b[:3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stage.buffers["sample"].data_ptr() == buf.data_ptr()  # reused, not reallocated
    big = np.arange(5000)
    assert stage("sample", big, big).cpu()[1].tolist() == big.tolist()
    assert stage.buffers["sample"].numel() >= 10000 and "inputs" not in stage.buffers


def test_profile_step_peak_covers_a_real_step(device):
    """The worst-case step the engine runs inside vLLM's memory profiling (audit item 6) allocates at least
    as much as a real step of the same rows (here: soft rows with a small top-k, and a full-vocabulary
    discrete row)."""
    if device.type != "cuda":
        pytest.skip("allocator peaks need a CUDA device")
    Vbig, rows = 32768, 64
    store = SoftStateStore(rows, 8, 5, 4, device, Vbig)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    store.profile_step(rows)
    profiled = torch.cuda.max_memory_allocated() - base
    params = [SoftSamplingParams(seed=i, top_k=20) for i in range(rows - 1)]
    params.append(SoftSamplingParams(seed=99, soft=False, top_k=-1, answer_top_k=-1))
    slots_host = np.asarray([store.allocate(p, [1, 2], 8) for p in params])
    logits = torch.randn(rows, Vbig, device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    slots = torch.as_tensor(slots_host, device=device)
    store.sample_step(logits, slots, torch.zeros_like(slots), density="official", **store.step_hints(slots_host))
    real = torch.cuda.max_memory_allocated() - base
    print(f"profile_step peak {profiled / 2**20:.1f} MiB, real step peak {real / 2**20:.1f} MiB")
    assert profiled >= real
