"""SofT-GRPO's score estimators on a one-step bandit, with soft-rl's own sampler and densities (soft_rl/bandit.py).

    .venv/bin/python bench/estimator_bandit.py [--seeds 400] [--max-steps 600] [--lr 0.05] [--out DIR]

Token 0 is right; q starts at 0.7 / 0.15 / 0.15 (3 slots) or 0.7 / 0.075 x 4 (5 slots); every step draws 8
rollouts with the paper's training sampler (T 1.0, top-p 0.95, tau_g 0.1, Gumbel noise clamped to [-1.5, 3]),
R = 1 iff token 0 is emitted, GRPO advantages, Adam. Estimators: ``discrete`` (token sampling, GRPO) and
SofT-GRPO with each density mode (official, exact, gumbel-max). Reported:

- steps until softmax(theta)_0 > 0.95: median and 90th percentile over ``--seeds`` independent runs (runs that
  never get there count as ``--max-steps`` + 1, and are counted);
- at the starting logits, each estimator's mean (R - E[R]) grad log p against the true gradient of E[R] (closed
  form or central differences with common random numbers, soft_rl.bandit.true_gradient): size (|mean| / |true|,
  projected on the true direction), cosine, per-sample signal-to-noise ratio, for R = emitted token and for
  R = token 0's mixture weight (the reward that depends on the whole mixture, where gumbel-max's bias shows);
- gumbel-max's bias: (its mean - the exact density's mean) relative to |true|, with a standard error, per reward.

Writes ``results.json`` and ``table.md`` under ``--out``; the last two lines are
``gumbel_max_vs_discrete_steps=<ratio of median steps, 3-slot start>`` and ``official_vs_discrete_steps=<same>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soft_rl.bandit import ESTIMATORS, Bandit, estimate, start_logits, steps_to_confidence, true_gradient  # noqa: E402

STARTS = {"3-slot": 3, "5-slot": 5}
Q0 = 0.7


def quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def learning_speed(args) -> dict:
    rows = {}
    for start, vocab in STARTS.items():
        bandit = Bandit.paper(vocab)
        for est in ESTIMATORS:
            t0 = time.perf_counter()
            steps = steps_to_confidence(bandit, est, Q0, seeds=args.seeds, lr=args.lr, max_steps=args.max_steps)
            rows[f"{start}/{est}"] = {"median": quantile(steps, 0.5), "p90": quantile(steps, 0.9),
                                      "never": int((steps > args.max_steps).sum()), "seconds": time.perf_counter() - t0}
            r = rows[f"{start}/{est}"]
            print(f"{start:7s} {est:11s} steps to q0>0.95: median {r['median']:6.1f}  p90 {r['p90']:6.1f}  "
                  f"never {r['never']}  ({r['seconds']:.1f} s)", flush=True)
    return rows


def at_fixed_logits(args) -> dict:
    rows = {}
    for start, vocab in STARTS.items():
        theta = start_logits(Q0, vocab)
        for reward in ("emitted", "mixture"):
            bandit = Bandit.paper(vocab, reward)
            truths = {soft: true_gradient(bandit, theta, soft=soft, n=args.truth_samples) for soft in (True, False)}
            means = {}
            for est in ESTIMATORS:
                soft = est != "discrete"
                truth, truth_se = truths[soft]
                e = estimate(bandit, theta, est, args.samples, seed0=1)
                means[est] = e
                unit = truth / truth.norm()
                rows[f"{start}/{reward}/{est}"] = r = {
                    "size": float(e["mean"] @ unit / truth.norm()),
                    "cosine": float(e["mean"] @ truth / (e["mean"].norm() * truth.norm())),
                    "snr": e["snr"], "true_norm": float(truth.norm()),
                    "size_se": math.sqrt(float((e["se"] * unit).pow(2).sum() + (truth_se * unit).pow(2).sum()))
                    / float(truth.norm())}
                print(f"{start:7s} {reward:8s} {est:11s} size {r['size']:.3f} +- {r['size_se']:.3f}  "
                      f"cosine {r['cosine']:.4f}  snr {r['snr']:.3f}", flush=True)
            # gumbel-max against the exact density on the same rollouts (same seeds): the difference of their means
            # is gumbel-max's bias relative to exact (clamp atoms aside, exact is unbiased)
            truth = truths[True][0]
            diff = means["gumbel-max"]["mean"] - means["exact"]["mean"]
            se = (means["gumbel-max"]["se"].pow(2) + means["exact"]["se"].pow(2)).sqrt()
            rows[f"{start}/{reward}/gumbel-max bias"] = b = {
                "vs_exact": float(diff @ truth / truth.norm() ** 2), "se": float(se.norm() / truth.norm()),
                "vs_truth": rows[f"{start}/{reward}/gumbel-max"]["size"] - 1.0}
            print(f"{start:7s} {reward:8s} gumbel-max bias along the true gradient: {b['vs_truth']:+.3f} of it "
                  f"(vs exact {b['vs_exact']:+.3f} +- {b['se']:.3f})", flush=True)
    return rows


def table(speed: dict, fixed: dict, args) -> str:
    lines = [f"Bandit, paper sampler, {args.seeds} runs per cell, Adam lr {args.lr}, group 8; steps until "
             f"q_0 > 0.95 (median / 90th percentile; runs that never got there in {args.max_steps} steps).", "",
             "| estimator | 3-slot median | 3-slot p90 | 3-slot never | 5-slot median | 5-slot p90 | 5-slot never |",
             "|---|---|---|---|---|---|---|"]
    for est in ESTIMATORS:
        a, b = speed[f"3-slot/{est}"], speed[f"5-slot/{est}"]
        lines.append(f"| {est} | {a['median']:.0f} | {a['p90']:.0f} | {a['never']} | {b['median']:.0f} | "
                     f"{b['p90']:.0f} | {b['never']} |")
    lines += ["", f"At the starting logits ({args.samples} samples; true gradient from {args.truth_samples}): size "
              "= mean estimate projected on the true gradient / |true gradient| (+- standard error), cosine, "
              "per-sample signal-to-noise ratio.", "",
              "| start | reward | estimator | size | cosine | SNR |", "|---|---|---|---|---|---|"]
    for key, r in fixed.items():
        start, reward, est = key.split("/")
        if est.endswith("bias"):
            continue
        lines.append(f"| {start} | {reward} | {est} | {r['size']:.3f} +- {r['size_se']:.3f} | {r['cosine']:.4f} | "
                     f"{r['snr']:.3f} |")
    lines += ["", "gumbel-max's bias along the true gradient (its size - 1; and against the exact density on the same "
              "rollouts):", "", "| start | reward | vs truth | vs exact |", "|---|---|---|---|"]
    for key, r in fixed.items():
        if key.endswith("bias"):
            start, reward, _ = key.split("/")
            lines.append(f"| {start} | {reward} | {r['vs_truth']:+.3f} | {r['vs_exact']:+.3f} +- {r['se']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400, help="independent training runs per estimator and start")
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=100_000, help="rollouts per estimate at fixed logits")
    ap.add_argument("--truth-samples", type=int, default=400_000, help="rollouts per finite-difference side")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "estimator_bandit"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fixed = at_fixed_logits(args)
    speed = learning_speed(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "steps": speed, "fixed_logits": fixed},
                                                 indent=1))
    (out / "table.md").write_text(table(speed, fixed, args))
    print(table(speed, fixed, args))
    d = speed["3-slot/discrete"]["median"]
    print(f"gumbel_max_vs_discrete_steps={speed['3-slot/gumbel-max']['median'] / d:.2f}")
    print(f"official_vs_discrete_steps={speed['3-slot/official']['median'] / d:.2f}")


if __name__ == "__main__":
    main()
