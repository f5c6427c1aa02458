"""The sampler at production shape (1,024 rows x 152,064 vocabulary, Qwen2's) against a plain
softmax-and-sample of the same logits: time and peak memory, reported as ratios (no timing assertion);
the memory ratio is bounded, so a sampler that materialises many full-vocabulary copies fails."""

from __future__ import annotations

import torch

from soft_rl.rng import NoiseCounters
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample
from tests.gpu.gpu_report import report

ROWS, VOCAB = 1024, 152_064


def _timed(fn, device, repeats=10):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return sorted(times)[len(times) // 2], peak


def test_sampler_speed_and_memory_at_production_shape(device):
    rows = ROWS if device.type == "cuda" else 64  # the CPU dry run checks the code, not the cost
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, VOCAB, device=device, generator=g, dtype=torch.float32) * 3
    params = [SoftSamplingParams(seed=i, soft=i % 8 != 0) for i in range(rows)]
    batch = SamplingBatch.from_params(params, device=device, width=5)
    steps = torch.zeros(rows, dtype=torch.int64, device=device)

    def soft():
        return soft_sample(logits, batch, NoiseCounters(batch.seed, steps), candidates=5, kinds=("gumbel",))

    def plain():  # what vLLM's own sampler does at minimum: temperature, softmax, one categorical draw
        return torch.multinomial(torch.softmax(logits / 1.0, dim=-1), 1)

    t_soft, m_soft = _timed(soft, device)
    t_plain, m_plain = _timed(plain, device)
    logits_bytes = logits.numel() * logits.element_size()
    report(f"sampler {rows}x{VOCAB}: soft {t_soft * 1e3:.2f} ms, plain {t_plain * 1e3:.2f} ms, "
           f"soft_vs_plain_time={t_soft / t_plain:.2f}; peak extra memory soft {m_soft / 2**20:.0f} MiB, "
           f"plain {m_plain / 2**20:.0f} MiB ({m_soft / logits_bytes:.2f}x the logits)")
    if device.type == "cuda":
        # one float32 copy of the logits, a log-sum-exp and the top-C: at most a few logits-sized buffers
        assert m_soft <= 3 * logits_bytes, m_soft / logits_bytes
