"""Tensor parallelism: a TP=2 soft-thinking engine (two vLLM worker processes, gloo on CPU).

* its soft trajectories equal the HF reference (the soft state and the noise are per process, so the
  two ranks must sample identically);
* both worker processes join a broadcast weight-sync group (ranks 1 and 2; this test process is
  rank 0, standing in for learner rank 0), receive new weights bucket by bucket, and then generate
  exactly what HF generates with those weights;
* the object-store path streams the weights to both worker processes through a spool of bucket files
  (at most two on disk at a time), with the same result.
"""

from __future__ import annotations

import copy
import socket
import threading

import pytest
import torch

from tests.test_vllm_soft import ENGINE_KW, STEPS, assert_same, exact_reference, mixed_params, prompts_for, reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_setup(tmp_path_factory):
    from soft_rl.tiny import build_model, build_tokenizer
    from workers.vllm_soft import SoftEngine

    root = tmp_path_factory.mktemp("vllm_tp")
    tok = build_tokenizer(root / "tokenizer")
    # 2 KV heads so that each of the two ranks holds one
    model = build_model(root / "qwen2", tok, arch="qwen2", seed=13, hidden=128, heads=2, kv_heads=2, layers=2).eval()
    eng = SoftEngine(str(root / "qwen2"), tensor_parallel_size=2, **ENGINE_KW)
    yield {"tokenizer": tok, "qwen2": (root / "qwen2", model)}, eng
    eng.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_hf_reference(tp_setup):
    models, eng = tp_setup
    assert eng.num_ranks == 2
    params = mixed_params(seed0=40)
    prompts = prompts_for(models["tokenizer"], len(params))
    got = eng.generate(prompts, params, max_new_tokens=STEPS)
    # The all-reduce of TP=2 sums partial matmuls in another order than TP=1: a different float32 rounding,
    # under the same error model (assert_same) as the HF float32 reference and the TP=1 engine.
    ref = exact_reference(models, "qwen2", prompts, params)
    assert_same(ref.hf32, ref, "TP module HF float32")
    assert_same(got, ref, "vLLM TP=2")


def _perturbed(models, seed):
    """A copy of the TP test model with every weight moved by 0.05 x N(0, 1) (a weight sync has something to
    carry), and its parameters by name."""
    new = copy.deepcopy(models["qwen2"][1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return new, dict(new.named_parameters())


def _generates_like_hf(models, eng, new, seed0, label):
    """The TP=2 engine, now holding ``new``'s weights, generates what the float64 reference of ``new`` does (and
    the HF float32 reference too), within assert_same's error model. Returns (got, prompts, params)."""
    updated = {"tokenizer": models["tokenizer"], "qwen2": (models["qwen2"][0], new.eval())}
    params = mixed_params(seed0=seed0)[:6]
    prompts = prompts_for(models["tokenizer"], len(params))
    got = eng.generate(prompts, params, max_new_tokens=STEPS)
    ref = exact_reference(updated, "qwen2", prompts, params)
    assert_same(ref.hf32, ref, f"{label}, HF float32")
    assert_same(got, ref, f"{label}, vLLM TP=2")
    return got, prompts, params


def test_tp2_broadcast_weight_sync(tp_setup):
    from workers.weight_broadcast import open_group, pack, plan_buckets, send

    models, eng = tp_setup
    new, state = _perturbed(models, seed=5)
    layout = plan_buckets([(n, tuple(p.shape), "float32") for n, p in state.items()], bucket_mb=0.05)
    assert len(layout) > 3
    port, errors = _free_port(), []

    def learner_rank0():
        try:
            group = open_group("gloo", "127.0.0.1", port, 0, 3, timeout_s=60)
            ready.wait(60)
            for b in layout:
                send(group, pack(b, [state[n].detach() for n in b.names], "cpu"))
        except Exception as e:  # surfaced below
            errors.append(e)

    ready = threading.Event()
    sender = threading.Thread(target=learner_rank0)
    sender.start()
    assert sorted(eng.join_weight_group("127.0.0.1", port, 1, 3, "gloo", 60)) == [1, 2]  # one rank per process
    ready.set()
    received = eng.receive_weights(layout)
    sender.join(60)
    assert not errors, errors
    assert received == len(state)
    got, prompts, params = _generates_like_hf(models, eng, new, 60, "synced weights")
    old = reference(models, "qwen2", prompts, params)
    assert any(a.tokens.tolist() != b.tokens.tolist() for a, b in zip(got, old, strict=True))  # weights changed


def test_tp2_spooled_weight_update(tp_setup):
    """The object-store path of a TP=2 engine (every restart sync goes there): the stream reaches both worker
    processes through bucket files in /dev/shm, at most two on disk at a time, none left behind; the engine then
    generates exactly what HF generates with the sent weights."""
    import glob

    models, eng = tp_setup
    new, state = _perturbed(models, seed=7)
    nbytes = sum(p.numel() * p.element_size() for p in state.values())
    before = set(glob.glob("/dev/shm/soft_rl_spool_*"))
    assert eng.update_weights(iter(state.items()), spool_mb=0.05) == len(state)
    stats = eng.spool_stats
    assert stats["files"] > 5 and stats["tensors"] == len(state) and stats["bytes"] == nbytes, stats
    assert stats["peak_files"] <= 2, stats  # the whole model is never on disk at once
    assert stats["max_file_bytes"] * 4 < nbytes, stats
    assert set(glob.glob("/dev/shm/soft_rl_spool_*")) == before  # the spool is gone
    _generates_like_hf(models, eng, new, 80, "spooled weights")


def test_tp2_worker_process_death_marks_the_engine_failed(tp_setup):
    """SIGKILL of one tensor-parallel worker process mid-generate: the generate raises, the engine says it failed,
    and its rollout actor reports itself unhealthy, so the run replaces the actor (workers/recovery.py).
    Runs last in this module: the engine is unusable afterwards."""
    import os
    import signal
    import time

    import psutil

    from soft_rl.sampling import SoftSamplingParams
    from workers.rollout import RolloutRequest, RolloutWorker

    models, eng = tp_setup
    victim = next(p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::Worker_TP1")
    start = victim.cpu_times().user + victim.cpu_times().system

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while victim.cpu_times().user + victim.cpu_times().system - start < 0.05 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)

    worker = RolloutWorker.__new__(RolloutWorker)
    worker.engine, worker.model_dir, worker.generated, worker.engine_error = eng, "tp2", 0, None
    assert worker.health()["ok"] and not eng.failed()
    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    params = [SoftSamplingParams(seed=i, top_k=5, k=4, tau=0.5) for i in range(8)]
    with pytest.raises(Exception):  # noqa: B017 - vLLM raises a RuntimeError naming the worker's error
        worker.generate([RolloutRequest(p, s, STEPS) for p, s in zip(prompts_for(models["tokenizer"], 8), params,
                                                                        strict=True)] * 8)
    killer.join()
    deadline = time.monotonic() + 10
    while not eng.failed() and time.monotonic() < deadline:  # the executor's monitor thread marks it
        time.sleep(0.05)
    health = worker.health()
    assert eng.failed() and not health["ok"] and health["error"], health
