"""Evaluation: the metric function against enumeration and hand-computed values; ``soft-rl eval`` end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest

from soft_rl.evaluation import PAPER_PRESET, EvalSettings, compute_metrics, ks_for, sample_requests, sample_seed


def even_length(response: str, gold: str) -> float:
    """A user reward for the end-to-end test: deterministic, and mixed on random text."""
    return 1.0 if len(response) % 2 == 0 else 0.0


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_metrics_hand_computed():
    outcomes = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
    lengths = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 4]]
    m = compute_metrics(outcomes, lengths)
    assert m["num_problems"] == 3 and m["n"] == 4 and m["num_correct"] == 4
    assert m["correct_counts"] == [1, 0, 3]
    assert m["pass@1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert list(m["pass_at_k"]) == [1, 2, 4]
    # c = 1 of 4: pass@2 = 1 - C(3,2)/C(4,2) = 1/2; c = 3: pass@2 = 1; c = 0: 0.
    assert m["pass_at_k"][2] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass_at_k"][4] == pytest.approx(2 / 3)
    # First-k (order matters): problem 0 is right at sample 1, problem 2 only from sample 2 on.
    assert m["first_k_pass_at_k"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(2 / 3)}
    assert m["mean_length"] == pytest.approx((100 + 20 + 10) / 12)
    assert m["mean_length_correct"] == pytest.approx((10 + 2 + 3 + 4) / 4)


def test_metrics_against_enumeration():
    rnd = random.Random(0)
    for n in (1, 3, 4, 6, 8):
        outcomes = [[rnd.random() < p for _ in range(n)] for p in (0.0, 0.1, 0.5, 0.9, 1.0)]
        lengths = [[rnd.randint(1, 50) for _ in range(n)] for _ in outcomes]
        m = compute_metrics(outcomes, lengths)
        assert list(m["pass_at_k"]) == ks_for(n) and ks_for(n)[-1] == n
        for k in ks_for(n):
            brute = sum(_brute_pass_at_k(o, k) for o in outcomes) / len(outcomes)
            assert m["pass_at_k"][k] == pytest.approx(brute, abs=1e-12)
            assert m["first_k_pass_at_k"][k] == sum(any(o[:k]) for o in outcomes) / len(outcomes)
        assert m["pass_at_k"][1] == pytest.approx(m["pass@1"])
        correct = [x for o, ln in zip(outcomes, lengths, strict=True) for ok, x in zip(o, ln, strict=True) if ok]
        assert m["mean_length_correct"] == (pytest.approx(sum(correct) / len(correct)) if correct else None)


def test_metrics_reject_ragged_input():
    with pytest.raises(ValueError, match="problem 1"):
        compute_metrics([[1, 0], [1]], [[1, 1], [1]])
    with pytest.raises(ValueError, match="lengths"):
        compute_metrics([[1, 0]], [[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="no problems"):
        compute_metrics([], [])


def test_ks_and_seeds():
    assert ks_for(32) == [1, 2, 4, 8, 16, 32] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]
    assert sample_seed(0, "a:1", 3) == sample_seed(0, "a:1", 3)
    seeds = {sample_seed(s, key, j) for s in (0, 1) for key in ("a:0", "a:1", "b:0") for j in range(8)}
    assert len(seeds) == 48 and all(0 <= x < 2**63 for x in seeds)
    reqs = sample_requests(["a:0", "a:1"], EvalSettings(n=3, seed=5))
    assert [(i, j) for i, j, _ in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert reqs[4][2].seed == sample_seed(5, "a:1", 1) and reqs[0][2].soft is True


def test_paper_preset_and_validation():
    s = EvalSettings.paper(mode="discrete")
    assert (s.n, s.temperature, s.top_k, s.top_p, s.k, s.tau, s.noise, s.max_new_tokens) == \
        (32, 1.0, 5, 0.95, 5, 0.1, "gumbel", 32768) == tuple(PAPER_PRESET[x] for x in (
            "n", "temperature", "top_k", "top_p", "k", "tau", "noise", "max_new_tokens"))
    assert s.params(7).soft is False and s.params(7).seed == 7
    with pytest.raises(ValueError, match="mode"):
        EvalSettings(mode="greedy")
    with pytest.raises(ValueError, match="tau"):
        EvalSettings(tau=0.0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """A freshly initialised (untrained) toy model and its held-out file: a tiny Qwen2 with the toy tokenizer."""
    from soft_rl.toy.init import toy_init

    out = tmp_path_factory.mktemp("toy")
    toy_init(out, size="tiny", steps=1, minutes=1.0, log=lambda s: None)
    return out


def test_eval_end_to_end_hf(toy_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.cli import main
    from soft_rl.data import load_problems, render_prompt
    from soft_rl.evaluation import response_text
    from soft_rl.reference import generate

    data = tmp_path / "two.jsonl"
    data.write_text("".join((toy_dir / "test.jsonl").read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(toy_dir / "model"), "--data", str(data), "--backend", "hf", "--n", "4",
            "--max-new-tokens", "12", "--reward", "tests.test_eval:even_length", "--reward-actors", "0",
            "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "two.json").read_text())
    assert report["num_problems"] == 2 and report["n"] == 4 and report["settings"]["seed"] == 3
    assert list(report["pass_at_k"]) == ["1", "2", "4"] == list(report["first_k_pass_at_k"])
    assert report["reward_failures"] == 0 and sum(report["finish_reasons"].values()) == 8
    probs = report["problems"]
    assert [p["correct"] for p in probs] == report["correct_counts"] == [sum(p["outcomes"]) for p in probs]
    assert report["pass@1"] == pytest.approx(sum(report["correct_counts"]) / 8)

    # Recompute every sample independently: same seeds, same order, same scores and lengths.
    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model", dtype=torch.float32).eval()
    problems = load_problems(data).problems
    settings = EvalSettings(n=4, max_new_tokens=12, seed=3)
    for p, row in zip(problems, probs, strict=True):
        assert row["answer"] == p.answer
        params = [settings.params(sample_seed(3, f"two.jsonl:{p.row}", j)) for j in range(4)]
        trajs = generate(model, [render_prompt(tok, p.prompt)] * 4, params, max_new_tokens=12,
                         eos_token_ids=[tok.eos_token_id], tokenizer=tok)
        assert row["lengths"] == [t.num_tokens for t in trajs]
        assert row["outcomes"] == [int(even_length(response_text(tok, t.tokens.tolist()), p.answer)) for t in trajs]
    lengths = [x for p in probs for x in p["lengths"]]
    assert all(1 <= x <= 12 for x in lengths) and report["mean_length"] == pytest.approx(sum(lengths) / 8)

    # Same seed, same report.
    main([*argv[:-1], str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "two.json").read_text())
    assert [p["outcomes"] for p in again["problems"]] == [p["outcomes"] for p in probs]
    assert [p["lengths"] for p in again["problems"]] == [p["lengths"] for p in probs]


def test_eval_gaussian_soft_tokens_reads_sigma_from_the_checkpoint(toy_dir, tmp_path):
    """``--noise embedding_gaussian``: sigma = --embedding-noise x the RMS of the checkpoint's input embedding (read
    from its safetensors), recorded in the report; the samples are the HF reference's with that sigma, and differ
    from those of another sigma (the input noise is really fed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.cli import main
    from soft_rl.data import load_problems, render_prompt
    from soft_rl.noise_kinds.embedding_gaussian import embedding_rms
    from soft_rl.reference import generate

    data = tmp_path / "two.jsonl"
    data.write_text("".join((toy_dir / "test.jsonl").read_text().splitlines(keepends=True)[:2]))
    base = ["eval", "--model", str(toy_dir / "model"), "--data", str(data), "--backend", "hf", "--n", "4",
            "--max-new-tokens", "16", "--reward", "tests.test_eval:even_length", "--reward-actors", "0", "--seed", "3",
            "--noise", "embedding_gaussian", "--tau", "0.5"]
    assert main([*base, "--embedding-noise", "0.5", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "two.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model", dtype=torch.float32).eval()
    rms = embedding_rms(model.get_input_embeddings().weight)
    assert report["settings"]["embedding_rms"] == rms and report["settings"]["embedding_noise"] == 0.5
    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    settings = EvalSettings(n=4, max_new_tokens=16, seed=3, noise="embedding_gaussian", tau=0.5, embedding_noise=0.5,
                            embedding_rms=rms)
    lengths = {}
    for sigma_scale in (1.0, 8.0):
        got = []
        for p in load_problems(data).problems:
            params = [dataclasses.replace(settings.params(sample_seed(3, f"two.jsonl:{p.row}", j)),
                                          embedding_sigma=settings.params(0).embedding_sigma * sigma_scale)
                      for j in range(4)]
            trajs = generate(model, [render_prompt(tok, p.prompt)] * 4, params, max_new_tokens=16,
                             eos_token_ids=[tok.eos_token_id], tokenizer=tok, density="exact")
            got.append(([t.num_tokens for t in trajs], [t.tokens.tolist() for t in trajs]))
        lengths[sigma_scale] = got
    assert [p["lengths"] for p in report["problems"]] == [g[0] for g in lengths[1.0]]
    assert lengths[8.0] != lengths[1.0]


@pytest.mark.slow
def test_eval_vllm_backend_matches_hf(toy_dir, tmp_path, ray_cluster):
    """`soft-rl eval --backend vllm` (RolloutPool + RewardPool on Ray) gives the hf backend's samples."""
    from soft_rl.cli import main

    data = tmp_path / "two.jsonl"
    data.write_text("".join((toy_dir / "test.jsonl").read_text().splitlines(keepends=True)[:2]))
    # Gumbel soft thinking, and Gaussian soft tokens (sigma from the checkpoint, the input noise fed by the engine)
    for name, extra in (("gumbel", []), ("gauss", ["--noise", "embedding_gaussian", "--tau", "0.5"])):
        common = ["eval", "--model", str(toy_dir / "model"), "--data", str(data), "--n", "4", "--max-new-tokens", "12",
                  "--reward", "tests.test_eval:even_length", "--seed", "5", *extra]
        assert main([*common, "--backend", "hf", "--reward-actors", "0", "--out", str(tmp_path / f"hf-{name}")]) == 0
        assert main([*common, "--backend", "vllm", "--reward-actors", "1", "--out",
                     str(tmp_path / f"vllm-{name}")]) == 0
        hf = json.loads((tmp_path / f"hf-{name}" / "two.json").read_text())
        vl = json.loads((tmp_path / f"vllm-{name}" / "two.json").read_text())
        assert [p["lengths"] for p in vl["problems"]] == [p["lengths"] for p in hf["problems"]], name
        assert [p["outcomes"] for p in vl["problems"]] == [p["outcomes"] for p in hf["problems"]], name
        assert vl["pass_at_k"] == hf["pass_at_k"] and vl["reward_failures"] == 0, name


def test_eval_dtype_and_reward_defaults(monkeypatch):
    """Plain eval: float32 + math; --preset paper: bfloat16 + math_whole (the official evaluation); flags win."""
    import workers.eval
    from soft_rl.cli import main
    from soft_rl.evaluation import resolve_eval_defaults

    assert resolve_eval_defaults(None) == {"dtype": "float32", "reward": "math"}
    assert resolve_eval_defaults("paper") == {"dtype": "bfloat16", "reward": "math_whole"}
    assert resolve_eval_defaults("paper", dtype="float32") == {"dtype": "float32", "reward": "math_whole"}
    assert resolve_eval_defaults("paper", reward="math_strict") == {"dtype": "bfloat16", "reward": "math_strict"}
    assert resolve_eval_defaults(None, dtype="bfloat16", reward="math_whole") == \
        {"dtype": "bfloat16", "reward": "math_whole"}
    with pytest.raises(ValueError, match="preset"):
        resolve_eval_defaults("papr")

    runs = []
    monkeypatch.setattr(workers.eval, "run_eval", runs.append)
    base = ["eval", "--model", "m", "--data", "d.json"]
    for extra, dtype, reward in [
        ([], "float32", "math"),
        (["--preset", "paper"], "bfloat16", "math_whole"),
        (["--preset", "paper", "--dtype", "float32", "--reward", "math"], "float32", "math"),
        (["--dtype", "bfloat16", "--reward", "math_strict"], "bfloat16", "math_strict"),
    ]:
        assert main([*base, *extra]) == 0
        assert (runs[-1].dtype, runs[-1].reward) == (dtype, reward), extra
    assert runs[1].settings.n == 32 and runs[0].settings.n == EvalSettings().n
    # a model without think tokens: a string marker the thinking budget forces, from the command line
    assert main([*base, "--think-end", "Final answer:", "--thinking-budget", "64"]) == 0
    p = runs[-1].settings.params(0)
    assert (p.think_end, p.thinking_budget) == ("Final answer:", 64)
    # Multiplex Thinking with uniform merge weights, as rollout.multiplex_weights=uniform trains it
    for extra, kind in ([[], "multiplex"], [["--multiplex-weights", "uniform"], "multiplex_uniform"]):
        assert main([*base, "--noise", "multiplex", "--k", "3", *extra]) == 0
        assert runs[-1].settings.params(0).noise == kind, extra
