"""Weight-sync benchmark: learner -> rollout engine through workers.weight_sync, vs a plain copy.

Bench model: Qwen2 architecture, 32k vocabulary, random init (built here). One learner rank (ZeRO-2)
and one rollout worker (vLLM CPU engine) on a local Ray cluster. In the same run it times
(a) ``sync_weights`` over both transports: ``object_store`` (gather on the learner, bucketed
object-store transfer, in-place reload in the engine) and ``broadcast`` (a gloo group of learner
rank 0 and the engine process, buckets streamed into the reload), and (b) an in-process copy of
the same bytes (``torch.Tensor.copy_`` of every tensor), and (c) the peak extra host memory of one
object-store sync as a ratio to the model's size.

Memory is the sum of the proportional set sizes (PSS, /proc/<pid>/smaps_rollup: shared pages split
among the processes that map them, so the shared-memory object store is counted once) of the processes
the sync involves: this driver, the learner and engine actors, and Ray's raylet (which holds the object
store), sampled every few milliseconds, minus the sum just before the sync. Before each sync every one
of them frees what its allocator caches (gc, ``malloc_trim``), so a sync does not profit from an earlier
one's freed-but-kept pages, and ``--warmup`` unmeasured syncs run first: the object store touches its
shared-memory pages once and reuses them after, so a process's first syncs read higher than its steady
state. The machine-wide figure this replaced (MemTotal - MemAvailable) counted every other process too
and read 0.71-2.01 on one idle machine. Printed: every sync's figure, their median and spread. Last
lines: ``sync_peak_host_mem_vs_model=<median>`` (with min and max), ``object_store_vs_memcpy=<r>``,
then ``sync_vs_memcpy=<r>`` for the default transport (broadcast).

    .venv/bin/python bench/weight_sync.py [--hidden 512 --layers 8 --vocab 32768 --repeats 5 --warmup 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_bench_model(out: Path, hidden: int, layers: int, vocab: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from soft_rl.tiny import build_tokenizer

    tok = build_tokenizer(out / "tok")  # the model gets the full bench vocabulary; ids past the tokenizer are unused
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=max(vocab, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), intermediate_size=4 * hidden,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return sum(p.numel() for p in model.parameters())


def pss(pids) -> int:
    """Sum of the proportional set sizes of ``pids`` in bytes (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def _trim(_self=None) -> int:
    """Free what this process's allocators cache; returns its pid (run in each actor via __ray_call__)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return os.getpid()


def raylet_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if "raylet" in (p.info["name"] or "") or any("raylet" in c for c in (p.info["cmdline"] or [])[:1])]


def peak_extra_memory(fn, pids):
    """(fn's result, the peak of the processes' summed PSS while fn ran minus its value before)."""
    import threading

    before, peak, done = pss(pids), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], pss(pids))
            time.sleep(0.003)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, max(peak[0], pss(pids)) - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured object-store syncs first (steady state)")
    ap.add_argument("--bucket-mb", type=float, default=64)
    args = ap.parse_args()

    import ray
    import torch

    from soft_rl.config import LearnerConfig
    from workers.learner import LearnerGroup
    from workers.rollout import RolloutPool
    from workers.weight_sync import BroadcastChannel, sync_weights

    tmp = Path(tempfile.mkdtemp(prefix="soft_rl_bench_sync_"))
    n_params = build_bench_model(tmp, args.hidden, args.layers, args.vocab)
    print(f"bench model: {n_params / 1e6:.1f}M parameters, vocab {args.vocab}", flush=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    learners = LearnerGroup(str(tmp / "model"), LearnerConfig(world_size=1, zero_stage=2, kl_coef=0.0))
    pool = RolloutPool(1, str(tmp / "model"), dict(dtype="float32", enforce_eager=True, max_model_len=256, max_k=5,
                                                   max_new_tokens=8), num_cpus_per_worker=1)
    try:
        state = learners.full_state_dict()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        dst = {k: torch.empty_like(v) for k, v in state.items()}
        channel = BroadcastChannel(learners, pool, bucket_mb=args.bucket_mb, timeout_s=600)
        times: dict[str, list[float]] = {"object_store": [], "broadcast": [], "memcpy": []}
        peaks: list[int] = []
        actors = [learners.actors[0], pool.workers[0]]

        def trimmed_pids() -> list[int]:
            return [_trim()] + ray.get([a.__ray_call__.remote(_trim) for a in actors]) + raylet_pids()

        for _ in range(args.warmup):  # the object store's shared-memory pages are touched once, then reused
            sync_weights(learners, pool, bucket_mb=args.bucket_mb, timeout_s=600)
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            t0 = time.perf_counter()
            for k, v in state.items():
                dst[k].copy_(v)
            times["memcpy"].append(time.perf_counter() - t0)
            pids = trimmed_pids()
            m, extra = peak_extra_memory(lambda: sync_weights(learners, pool, bucket_mb=args.bucket_mb, timeout_s=600),
                                         pids)
            times["object_store"].append(m["sync/total_s"])
            peaks.append(extra)
            b = sync_weights(learners, pool, bucket_mb=args.bucket_mb, timeout_s=600, channel=channel)
            times["broadcast"].append(b["sync/total_s"])
        med = {k: statistics.median(v) for k, v in times.items()}
        c = med["memcpy"]
        print(f"bytes={nbytes / 2**20:.1f}MiB buckets={m['sync/buckets']:.0f}/{b['sync/buckets']:.0f} "
              f"object_store_s={med['object_store']:.3f} "
              f"broadcast_s={med['broadcast']:.3f} memcpy_s={c:.4f} "
              f"broadcast_GBps={nbytes / med['broadcast'] / 1e9:.2f} memcpy_GBps={nbytes / c / 1e9:.2f}")
        print(f"object-store sync: peak extra host memory (PSS of driver, learner, engine, raylet) per sync: "
              f"{', '.join(f'{p / 2**20:.1f}' for p in peaks)} MiB for a {nbytes / 2**20:.1f} MiB model, "
              f"{args.bucket_mb:g} MiB buckets")
        ratios = [p / nbytes for p in peaks]
        print(f"sync_peak_host_mem_vs_model={statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
              f"max {max(ratios):.2f}, {len(ratios)} syncs)")
        print(f"object_store_vs_memcpy={med['object_store'] / c:.1f}")
        print(f"sync_vs_memcpy={med['broadcast'] / c:.1f}")
    finally:
        pool.shutdown()
        learners.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
