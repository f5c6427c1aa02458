"""Per-sequence policy-gradient signal-to-noise ratio of each score estimator on the shipped toy model (no training).

    .venv/bin/python bench/gradient_snr.py [--prompts 192] [--n 8] [--seed 0] [--out DIR]

``--prompts`` training problems x ``--n`` rollouts each, soft (the paper's sampler: T 1.0, top-k = K = 5,
top-p 0.95, tau_g 0.1, Gumbel noise clamped to [-1.5, 3]) and discrete (the same T, top-k, top-p), from the
shipped warm start (``soft-rl toy-init``), through the HF reference sampler; ``toy`` reward, GRPO advantages per
prompt. For each estimator (discrete: the discrete rollouts' token scores; official, exact, gumbel-max: the soft
rollouts scored with that density) the per-sequence gradient g_j = A_j grad sum_t log p_t over the model's
parameters, restricted to one position type at a time:

- ``sum digits``: thinking positions that write a column's sum (the digits after ``=``), where the warm start
  slips and the reward is decided;
- ``other thinking``: the rest of the chain of thought (operand digits, carries, layout), which it copies
  confidently;
- ``answer``: the marker and everything after it (discrete in both methods).

SNR = |E g| / sqrt(E |g - E g|^2) per sample, |E g|^2 estimated without the mean's own noise
(|mean|^2 - var / (m - 1): a plug-in |mean| alone reads about 1 / sqrt(m) on pure noise); "no gradient"
where every g_j is 0 (a soft step with one kept slot has p-hat = 1 over it: no density moves there).
Also: each type's mean top-1 probability (how uncertain it is), the fraction of soft steps with 2 or more
kept slots and with a runner-up weight above 0.1, and each estimator's mean |g| per type (the effective
step size the density gives those positions).
Writes ``results.json`` and ``table.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ("sum digits", "other thinking", "answer")


def position_types(tokenizer, traj) -> dict[str, torch.Tensor]:
    """Boolean masks [R] of each type (see the module docstring), from the emitted tokens' text."""
    toks = traj.tokens.tolist()
    sums = torch.zeros(len(toks), dtype=torch.bool)
    line = ""
    for t, tok in enumerate(toks):
        piece = tokenizer.decode([tok])
        for ch in piece:
            if ch == "\n":
                line = ""
                continue
            if ch.isdigit() and "=" in line:
                sums[t] = True
            line += ch
    think = torch.arange(len(toks)) < traj.n_think - len(_marker(tokenizer, traj))
    return {"sum digits": think & sums, "other thinking": think & ~sums, "answer": ~think}


def _marker(tokenizer, traj) -> list[int]:
    from soft_rl.reference import encode_marker

    return encode_marker(tokenizer, traj.sampling.think_end)


def top1_probs(model, traj) -> torch.Tensor:
    """The model's top-1 probability at each generated position (inputs as generated: soft mixtures included)."""
    from soft_rl.reference import build_inputs_embeds

    with torch.no_grad():
        x = build_inputs_embeds(model.get_input_embeddings().weight, traj)[None]
        P, R = traj.prompt_ids.shape[0], traj.num_tokens
        logits = model(inputs_embeds=x).logits[0, P - 1: P - 1 + R]
        return torch.softmax(logits / traj.sampling.temperature, -1).max(-1).values


def rollouts(model, tokenizer, problems, n: int, soft: bool, seed: int):
    from soft_rl.data import render_prompt
    from soft_rl.losses import compute_advantages
    from soft_rl.reference import generate
    from soft_rl.rewards import get_reward
    from soft_rl.sampling import SoftSamplingParams

    prompts = [render_prompt(tokenizer, p.prompt) for p in problems for _ in range(n)]
    params = [SoftSamplingParams(seed=seed * 1_000_003 + i, soft=soft) for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=64, eos_token_ids=[tokenizer.eos_token_id],
                     tokenizer=tokenizer)
    reward = get_reward("toy")
    r = torch.tensor([reward(tokenizer.decode(t.tokens.tolist()), problems[i // n].answer)
                      for i, t in enumerate(trajs)])
    adv = compute_advantages("grpo", r, torch.arange(len(problems)).repeat_interleave(n))
    return trajs, r, adv


def gradient_stats(model, tokenizer, trajs, adv, density: str) -> dict:
    """Per type: SNR and mean |g| of g_j = A_j grad sum_{t in type} log p_t (running sums: no gradient is kept)."""
    from soft_rl.reference import teacher_forced_logprobs

    params = [p for p in model.parameters() if p.requires_grad]
    total = {c: None for c in TYPES}
    sq = dict.fromkeys(TYPES, 0.0)
    norm = dict.fromkeys(TYPES, 0.0)
    for traj, a in zip(trajs, adv.tolist(), strict=True):
        masks = position_types(tokenizer, traj)
        (lp,) = teacher_forced_logprobs(model, [traj], density, grad=True)
        for i, c in enumerate(TYPES):
            if a == 0.0 or not bool(masks[c].any()):
                g = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
            else:
                grads = torch.autograd.grad(a * lp[masks[c]].sum(), params, retain_graph=i < len(TYPES) - 1,
                                            allow_unused=True)
                g = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().double()
                               for x, p in zip(grads, params, strict=True)])
            total[c] = g if total[c] is None else total[c] + g
            sq[c] += float(g @ g)
            norm[c] += float(g.norm())
    m = len(trajs)
    out = {}
    for c in TYPES:
        mean = total[c] / m
        var = max(sq[c] / m - float(mean @ mean), 0.0)  # E|g - E g|^2 (plug-in)
        # |mean|^2 overstates |E g|^2 by var / m (the mean's own noise); unbiased: |mean|^2 - var / (m - 1)
        signal2 = float(mean @ mean) - var / (m - 1)
        out[c] = {"snr": max(signal2, 0.0) ** 0.5 / var**0.5 if var > 0 else None, "mean_norm": norm[c] / m,
                  "signal": max(signal2, 0.0) ** 0.5}
    return out


def soft_step_shape(trajs) -> dict:
    """Fraction of soft steps with >= 2 kept slots and with a runner-up mixture weight above 0.1."""
    from soft_rl.densities import soft_weights

    two = runner = total = 0
    for t in trajs:
        s = t.is_soft
        if not bool(s.any()):
            continue
        w = soft_weights(t.noisy[s], t.sampling.noise, t.sampling.tau, t.slot_valid()[s])
        two += int((t.kept[s].sum(-1) >= 2).sum())
        runner += int((w.topk(2, -1).values[:, 1] > 0.1).sum())
        total += int(s.sum())
    return {"soft_steps": total, "two_or_more_kept": two / total, "runner_up_above_0.1": runner / total}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--toy-dir", default=str(ROOT / ".cache" / "toy"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "gradient_snr"))
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.data import load_problems
    from soft_rl.densities import DENSITY_MODES
    from soft_rl.toy import toy_init

    t0 = time.time()
    toy = Path(args.toy_dir)
    toy_init(toy)
    tokenizer = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model", dtype=torch.float32).eval()
    problems = load_problems(toy / "train.jsonl").problems[: args.prompts]
    results: dict = {"args": vars(args), "estimators": {}, "rollouts": {}}
    for soft in (False, True):
        kind = "soft" if soft else "discrete"
        trajs, r, adv = rollouts(model, tokenizer, problems, args.n, soft, args.seed)
        conf = {c: [] for c in TYPES}
        for t in trajs:
            p1, masks = top1_probs(model, t), position_types(tokenizer, t)
            for c in TYPES:
                conf[c].append(p1[masks[c]])
        results["rollouts"][kind] = {
            "reward": float(r.mean()), "groups_with_signal": float((adv.view(-1, args.n) != 0).any(1).float().mean()),
            "positions": {c: int(sum(x.numel() for x in conf[c])) for c in TYPES},
            "top1_prob": {c: float(torch.cat(conf[c]).mean()) for c in TYPES},
            **(soft_step_shape(trajs) if soft else {})}
        print(f"{kind} rollouts: {results['rollouts'][kind]}", flush=True)
        for est in (DENSITY_MODES if soft else ("discrete",)):
            results["estimators"][est] = gradient_stats(model, tokenizer, trajs, adv, est if soft else "official")
            print(f"  {est:11s} " + "  ".join(f"{c}: snr {_snr(v['snr'])} |g| {v['mean_norm']:.3g}"
                                              for c, v in results["estimators"][est].items()), flush=True)
    results["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results, args))
    print(table(results, args))


def _snr(x: float | None) -> str:
    return "no gradient" if x is None else f"{x:.3f}"


def table(results: dict, args) -> str:
    ro = results["rollouts"]
    lines = [f"Shipped toy warm start, {args.prompts} training problems x {args.n} rollouts per method (seed "
             f"{args.seed}); mean reward soft {ro['soft']['reward']:.3f}, discrete {ro['discrete']['reward']:.3f}.",
             "", "Per-sequence policy-gradient SNR (|E g| / rms deviation, |E g| debiased for the sample mean's own "
             "noise; 0 where it is below that noise) and mean |g| by position type. With m = "
             f"{args.prompts * args.n} sequences an SNR is resolved to about 1 / sqrt(m) = "
             f"{(args.prompts * args.n) ** -0.5:.3f} (one standard error).", "",
             "| estimator | " + " | ".join(f"{c} SNR | {c} mean abs g" for c in TYPES) + " |",
             "|---|" + "---|---|" * len(TYPES)]
    for est, stats in results["estimators"].items():
        lines.append(f"| {est} | " + " | ".join(f"{_snr(stats[c]['snr'])} | {stats[c]['mean_norm']:.3g}"
                                                for c in TYPES) + " |")
    lines += ["", "| rollouts | " + " | ".join(f"{c}: positions, top-1 prob" for c in TYPES) + " |",
              "|---|" + "---|" * len(TYPES)]
    for kind in ("discrete", "soft"):
        lines.append(f"| {kind} | " + " | ".join(f"{ro[kind]['positions'][c]}, {ro[kind]['top1_prob'][c]:.3f}"
                                                 for c in TYPES) + " |")
    s = ro["soft"]
    lines += ["", f"Soft steps: {s['soft_steps']}; with 2 or more kept slots {s['two_or_more_kept']:.3f}; "
              f"with a runner-up weight above 0.1 {s['runner_up_above_0.1']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
