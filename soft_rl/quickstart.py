"""`soft-rl quickstart`: a short SofT-GRPO run on the embedded default, in one process.

What exists so far: the core sampler, the HF soft-thinking reference rollout and the single-process
SofT-GRPO update. The quickstart builds a tiny tokenizer and Qwen2 model locally (cached), asks it
arithmetic questions, lets it think with soft tokens (Gumbel noise, tau_g, K slots) for a few steps
before the think-end marker is forced, and rewards answers that begin with a number. It prints the
held-out reward before and after training. The distributed run (vLLM rollout pool, DeepSpeed
learners, reward actors on Ray) replaces this loop as the rollout, learner and driver land.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import torch

from soft_rl.data import render_prompt
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams
from soft_rl.single_process import UpdateConfig, grpo_update


def _prompts(tok, n, seed):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.randint(0, 99), rnd.randint(0, 99)
        out.append(render_prompt(tok, [{"role": "user", "content": f"what is {a} + {b}?"}]))
    return out


def answer_reward(tok, traj) -> float:
    """1.0 when the answer (the text after the think-end marker) starts with a digit."""
    answer = tok.decode(traj.tokens[traj.n_think:].tolist(), skip_special_tokens=True)
    return 1.0 if re.match(r"\s*\d", answer) else 0.0


def _evaluate(model, tok, prompts, params, n):
    rewards = []
    for rep in range(n):
        ps = [SoftSamplingParams(**{**params, "seed": 10_000 * (rep + 1) + i}) for i in range(len(prompts))]
        trajs = generate(model, prompts, ps, max_new_tokens=params["thinking_budget"] + 5,
                         eos_token_ids=[tok.eos_token_id], tokenizer=tok)
        rewards += [answer_reward(tok, t) for t in trajs]
    return sum(rewards) / len(rewards)


def main(out_dir: str = ".cache/quickstart", steps: int = 12, prompts_per_step: int = 8, n: int = 8,
         seed: int = 0) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.tiny import build_model, build_tokenizer

    torch.manual_seed(seed)
    out = Path(out_dir)
    model_dir = out / "tiny-qwen2"
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer(out / "tokenizer")
        build_model(model_dir, tok, arch="qwen2", hidden=64, layers=2, seed=seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # no dropout in these models; eval() keeps rollout and learner forwards identical
    sampler = dict(temperature=1.0, top_k=5, top_p=0.95, k=5, tau=0.1, noise="gumbel", thinking_budget=6)
    held_out = _prompts(tok, 16, seed=12345)
    t0 = time.time()
    before = _evaluate(model, tok, held_out, sampler, n=4)
    print(f"[quickstart] model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params); "
          f"held-out reward before training: {before:.3f}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = UpdateConfig(density="official", mini_batches=2)
    for step in range(steps):
        prompts = _prompts(tok, prompts_per_step, seed=seed * 1000 + step)
        rep_prompts = [p for p in prompts for _ in range(n)]
        params = [SoftSamplingParams(**{**sampler, "seed": step * 100_000 + i}) for i in range(len(rep_prompts))]
        trajs = generate(model, rep_prompts, params, max_new_tokens=sampler["thinking_budget"] + 5,
                         eos_token_ids=[tok.eos_token_id], tokenizer=tok)
        rewards = torch.tensor([answer_reward(tok, t) for t in trajs])
        group = torch.arange(len(prompts)).repeat_interleave(n)
        m = grpo_update(model, opt, trajs, rewards, group, cfg)
        soft_frac = sum(t.num_soft for t in trajs) / sum(t.num_tokens for t in trajs)
        print(f"[quickstart] step {step + 1}/{steps} reward={rewards.mean():.3f} soft_frac={soft_frac:.2f} "
              f"loss={m['loss']:.4f} clip_frac={m['clip_frac']:.3f} grad_norm={m['grad_norm']:.3f}", flush=True)
    after = _evaluate(model, tok, held_out, sampler, n=4)
    print(f"[quickstart] {steps} SofT-GRPO steps in {time.time() - t0:.0f}s", flush=True)
    print(f"quickstart reward: before={before:.3f} after={after:.3f}", flush=True)
    return before, after
