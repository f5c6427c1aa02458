"""CPU proxies of GPU behaviour (audit in docs/design/gpu-audit.md).

* The rollout's per-step device work (``SoftStateStore.sample_step``: sampler, phase tracker, history;
  ``SoftStateStore.mixed_inputs``: the next soft inputs) compiles with ``torch.compile(fullgraph=True)``,
  which fails on any graph break, host synchronisation (``.item()``, ``.tolist()``, ``bool(tensor)``)
  included: on a GPU the same code then runs without host syncs and can be captured in a CUDA graph.
  Compiled and eager steps give equal tokens, noisy values, weights, log-probs and state. Dynamo
  traces ``.item()`` into a symbolic scalar rather than breaking the graph, so the same steps also run
  on the meta device, where any host read of a device value raises.
* The engine switches vLLM's Model Runner V2 off itself (the soft hooks live in the V1 runner).

The production wrapper of the step (``soft_rl.engine_step.EngineStep``: compiled per hints key with a dynamic
row count, or captured in CUDA graphs per row bucket) is tested in tests/test_engine_step.py and, on a GPU,
tests/gpu/test_engine_step_cuda_graph.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from soft_rl.densities import DENSITY_MODES
from soft_rl.engine_state import SoftStateStore
from soft_rl.sampling import SoftSamplingParams

V, WIDTH, MARKER = 48, 5, 3

# one of each kind of request a step can mix: soft with each noise, discrete, a thinking budget
REQUESTS = [
    SoftSamplingParams(seed=1),
    SoftSamplingParams(seed=2, noise="gaussian", noise_clamp=None, thinking_budget=3),
    SoftSamplingParams(seed=3, noise="dirichlet", noise_clamp=None, dirichlet_alpha=2.0),
    SoftSamplingParams(seed=4, noise="none", k=3),
    SoftSamplingParams(seed=5, soft=False, top_k=8, answer_top_k=8, thinking_budget=2),
    SoftSamplingParams(seed=6, temperature=0.7, answer_temperature=1.0, top_p=0.8),
    SoftSamplingParams(seed=7, noise="embedding_gaussian", tau=0.5, embedding_sigma=0.3),  # noise on the input
]
HIDDEN = 16


def _store() -> tuple[SoftStateStore, torch.Tensor]:
    store = SoftStateStore(8, 12, WIDTH, 4, "cpu", V, hidden_size=HIDDEN)
    slots = torch.tensor([store.allocate(p, [V - 3, V - 2, V - 1][:MARKER], 12) for p in REQUESTS])
    return store, slots


def _run(store, slots, step_fn, mix_fn, embed, steps=6, density="official"):
    g = torch.Generator().manual_seed(0)
    outs, mixes = [], []
    for s in range(steps):
        logits = torch.randn(len(slots), V, generator=g) * 3
        steps_t = torch.full((len(slots),), s, dtype=torch.int64)
        hints = store.step_hints(slots.numpy())
        outs.append(step_fn(logits, slots, steps_t, density=density, **hints))
        mixes.append(mix_fn(embed, slots, steps_t, hints["kinds"]))
    return outs, mixes


@pytest.mark.parametrize("density", DENSITY_MODES)
def test_engine_step_compiles_without_graph_breaks_and_equals_eager(density):
    torch._dynamo.reset()
    emb = torch.nn.Embedding(V, HIDDEN)
    embed = emb.weight.detach().__getitem__  # ids -> rows, as the model's embed_input_ids

    eager, slots = _store()
    compiled = copy.deepcopy(eager)
    e_out, e_mix = _run(eager, slots, eager.sample_step, eager.mixed_inputs, embed, density=density)
    # fullgraph=True raises on any graph break; aot_eager traces through AOTAutograd without a C++ compiler
    step = torch.compile(compiled.sample_step, fullgraph=True, backend="aot_eager")
    mix = torch.compile(compiled.mixed_inputs, fullgraph=True, backend="aot_eager")
    c_out, c_mix = _run(compiled, slots, step, mix, embed, density=density)

    saw_soft = saw_forced = False
    for a, b in zip(e_out, c_out, strict=True):
        for f in ("ids", "token", "is_soft", "kept"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        for f in ("noisy", "weights", "logprob", "token_logprob"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-6, atol=1e-6, msg=f)
        saw_soft |= bool(a.is_soft.any())
    for a, b in zip(e_mix, c_mix, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name in eager.t:
        assert torch.equal(eager.t[name], compiled.t[name]), name
    for name in eager.h:
        torch.testing.assert_close(eager.h[name], compiled.h[name], rtol=1e-6, atol=1e-6, msg=name)
    saw_forced = bool(eager.h["forced"].any())
    # the steps exercised what a real batch mixes: soft steps, forced marker tokens, the answer phase
    assert saw_soft and saw_forced and not bool(eager.t["thinking"][slots].all())


def test_profile_step_leaves_the_store_as_it_was():
    """The worst-case step run inside vLLM's memory profiling (audit item 6) changes nothing a later
    request sees: a store profiled once then used gives the outputs and the state of one never profiled."""
    emb = torch.nn.Embedding(V, HIDDEN)
    embed = emb.weight.detach().__getitem__
    plain = SoftStateStore(8, 12, WIDTH, 4, "cpu", V, hidden_size=HIDDEN)
    profiled = SoftStateStore(8, 12, WIDTH, 4, "cpu", V, hidden_size=HIDDEN)
    profiled.profile_step(8)
    assert profiled.free == plain.free and not profiled.n_steps.any() and not profiled.has_budget.any()
    outs = []
    for store in (plain, profiled):
        slots = torch.tensor([store.allocate(p, [V - 3, V - 2, V - 1], 12) for p in REQUESTS])
        outs.append(_run(store, slots, store.sample_step, store.mixed_inputs, embed))
    (a_out, a_mix), (b_out, b_mix) = outs
    for a, b in zip(a_out, b_out, strict=True):
        for f in dataclasses.fields(a):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    for a, b in zip(a_mix, b_mix, strict=True):
        assert torch.equal(a, b)
    for name in plain.t:
        active = slice(0, len(REQUESTS))
        assert torch.equal(plain.t[name][active], profiled.t[name][active]), name
    for name in plain.h:
        assert torch.equal(plain.h[name][: len(REQUESTS), :6], profiled.h[name][: len(REQUESTS), :6]), name


def _meta_steps(step_fn, steps: int = 3) -> None:
    """Engine steps with every tensor on the meta device: shapes and dtypes only, no values, so any read
    of a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, data-dependent shapes) raises."""
    store = SoftStateStore(8, 12, WIDTH, 4, "meta", V)
    slots = torch.tensor([store.allocate(p, [V - 3, V - 2, V - 1][:MARKER], 12) for p in REQUESTS])
    hints, dev = store.step_hints(slots.numpy()), slots.to("meta")
    embed = torch.empty(V, 16, device="meta").__getitem__
    for s in range(steps):
        steps_t = torch.full((len(REQUESTS),), s, dtype=torch.int64, device="meta")
        out = step_fn(store, torch.empty(len(REQUESTS), V, device="meta"), dev, steps_t, density="official", **hints)
        mixed = store.mixed_inputs(embed, dev, steps_t)
        assert out.token.shape == (len(REQUESTS),) and mixed.shape == (len(REQUESTS), 16)


def test_engine_step_reads_nothing_back_to_the_host():
    """The complement of fullgraph (which recent Dynamo passes for ``.item()`` by tracing it into a
    symbolic scalar): the step runs on meta tensors, so it makes no host read a GPU would sync on."""
    _meta_steps(lambda store, *a, **kw: store.sample_step(*a, **kw))


@pytest.mark.parametrize("read", ["item", "branch"])
def test_a_host_read_in_the_step_fails_the_proxies(read):
    """The proxies can fail: a step that reads a device value on the host does not pass them."""

    def synced_step(store, logits, slots, steps, **kw):
        if read == "item":  # a value read back, as the candidate width was before the hints
            kw["candidates"] = min(V, WIDTH + int(logits.argmax()))
        elif bool((logits > 0).any()):  # data-dependent control flow
            kw["has_budget"] = True
        return store.sample_step(logits, slots, steps, **kw)

    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)meta"):
        _meta_steps(synced_step, steps=1)
    if read == "branch":  # a graph break: fullgraph compilation refuses it
        torch._dynamo.reset()
        store, slots = _store()
        step = torch.compile(lambda *a, **kw: synced_step(store, *a, **kw), fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match="(?i)graph break|data.dependent"):
            _run(store, slots, step, store.mixed_inputs, torch.nn.Embedding(V, 4).weight.detach().__getitem__,
                 steps=1)


def test_engine_forces_vllm_v1_model_runner(monkeypatch, caplog):
    import vllm.envs as envs

    from workers.vllm_soft.engine import force_v1_model_runner

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert envs.VLLM_USE_V2_MODEL_RUNNER is True
    with caplog.at_level(logging.WARNING):
        force_v1_model_runner()
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    assert "overridden to 0" in caplog.text
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    force_v1_model_runner()  # unset (vLLM's default: V2 on GPU) -> 0 as well
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False


@pytest.mark.slow
def test_gpu_actor_layout_on_logical_gpus():
    """``trainer.device=gpu`` on a Ray cluster with 4 logical GPUs (tests/gpu_layout_check.py): the real
    driver, placement, rollout pool and learner group, with the engine and DeepSpeed replaced by
    recording stand-ins. Each engine holds its TP GPUs, each learner rank one, with distinct
    CUDA_VISIBLE_DEVICES, in the planned bundles, with the environment vLLM needs on a GPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    scenarios = {"tp1": ["rollout.num_engines=2", "rollout.tensor_parallel_size=1", "rollout.engine_step=cuda_graph"],
                 "tp2": ["rollout.num_engines=1", "rollout.tensor_parallel_size=2"],
                 "colocated": ["rollout.num_engines=2", "trainer.colocate=true", "learner.sync_transport=object_store"],
                 "eval": ["eval", 3, 1], "eval_tp2": ["eval", 1, 2]}
    script = Path(__file__).with_name("gpu_layout_check.py")
    # a GPU user's shell: without the vLLM-on-CPU settings this test session exports (they are forwarded)
    env = {k: v for k, v in os.environ.items() if not (k.startswith("VLLM_CPU_") or k == "VLLM_HOST_IP")}
    proc = subprocess.run([sys.executable, str(script), json.dumps(list(scenarios.values()))], capture_output=True,
                          text=True, timeout=600, env={**env, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == len(scenarios), proc.stdout[-2000:]
    for (name, _), run in zip(scenarios.items(), runs, strict=True):
        if name.startswith("eval"):  # soft-rl eval: engines placed like a run's, each on its own GPU(s)
            tp = 2 if name == "eval_tp2" else 1
            gpus = [g for e in run["engines"] for g in e["gpu_ids"]]
            assert len(gpus) == len(set(gpus)) == (3 if tp == 1 else 2), run
            for e in run["engines"]:
                assert e["cuda_visible_devices"] == ",".join(e["gpu_ids"]) and len(e["gpu_ids"]) == tp, e
                assert not [k for k in e["env"] if k.startswith("VLLM_CPU_") or k == "VLLM_HOST_IP"], e["env"]
                assert e["engine_kwargs"]["enforce_eager"] is False
                assert e["engine_kwargs"].get("distributed_executor_backend") == ("mp" if tp > 1 else None)
            assert run["bundles"] == [{"CPU": 1.0, "GPU": float(tp)}] * len(run["engines"])
            assert run["gpus_free_while_running"] == 4 - len(gpus) and run["gpus_free_after"] == 4
            continue
        engines, learners = run["engines"], run["learners"]
        tp = 2 if name == "tp2" else 1
        assert len(engines) == (1 if name == "tp2" else 2) and len(learners) == 2, name
        for e in engines:
            assert len(e["gpu_ids"]) == tp and e["cuda_visible_devices"] == ",".join(e["gpu_ids"]), (name, e)
            kw = e["engine_kwargs"]
            assert kw["tensor_parallel_size"] == tp and kw["hf_overrides"] == {"head_dtype": "float32"}
            assert kw.get("distributed_executor_backend") == ("mp" if tp > 1 else None), (name, kw)
            assert kw.get("enable_sleep_mode", False) == (name == "colocated") and kw["enforce_eager"] is False
            # a step's share of requests (16 prompts x 8 samples over the engines), the run's widest candidate set
            # (soft steps K = 5; discrete answer steps top-k 5), the configured engine step, and the run's
            # training and eval sampling settings to compile (capture) at start-up
            assert kw["max_num_seqs"] == 128 // len(engines) and kw["max_candidates"] == 5, (name, kw)
            assert kw["engine_step"] == ("cuda_graph" if name == "tp1" else "eager"), (name, kw)
            assert [p["k"] for p in kw["prepare_params"]] == [5, 5] and kw["prepare_params"][0]["soft"], (name, kw)
            # kept out of the KV cache for the sync: 2 buckets of 256 MB (+ NCCL's buffers for a broadcast)
            assert kw["sync_reserve_mb"] == (512 if name == "colocated" else 512 + 256), (name, kw)
            assert e["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
            assert not [k for k in e["env"] if k.startswith("VLLM_CPU_") or k == "VLLM_HOST_IP"], e["env"]
        for rank, lr in enumerate(learners):
            assert lr["rank"] == rank and lr["device"] == "gpu" and lr["backend"] == "nccl"
            assert len(lr["gpu_ids"]) == 1 and lr["cuda_visible_devices"] == lr["gpu_ids"][0], (name, lr)
        # one placement group holds the whole run
        assert len({a["placement_group"] for a in engines + learners}) == 1, name
        engine_gpus = [g for e in engines for g in e["gpu_ids"]]
        learner_gpus = [g for lr in learners for g in lr["gpu_ids"]]
        if name == "colocated":  # learner rank i shares engine i's GPU, each pair its own
            assert learner_gpus == engine_gpus and len(set(engine_gpus)) == 2
            assert run["bundles"] == [{"CPU": 2.0, "GPU": 1.0}] * 2
        else:  # four distinct GPUs: engines and learners never share one (so NCCL can join them)
            assert len(set(engine_gpus + learner_gpus)) == 4
            assert run["bundles"] == [{"CPU": 1.0, "GPU": float(tp)}] * len(engines) + [{"CPU": 1.0, "GPU": 1.0}] * 2
