"""Soft-thinking RL methods against discrete GRPO on the toy tasks, all evaluated with one and the same sampler.

    .venv/bin/python bench/toy_compare.py [--tasks addition pairsum] [--arms grpo softgrpo-official ...]
        [--seeds 0 1 2] [--steps 100] [--problems 100] [--n 32] [--out DIR] [--arm NAME=key=value,key=value]
        [--report-only]

For each task, seed and arm, one `soft-rl train` run from the task's shipped warm start (`soft-rl toy-init
--task`), with the same budget, data order and rollout seeds (``configs/tiny_cpu.yaml`` plus the task's
overrides). Arms (``ARMS``; ``--arm`` adds one by name, e.g. a method registered later):

- ``grpo``: token sampling in both phases (``rollout.soft=false``);
- ``softgrpo-official`` / ``-exact`` / ``-gumbel-max``: soft thinking with Gumbel noise, soft steps scored by that
  density (``learner.density``);
- ``multiplex``: Multiplex Thinking (K = 3 draws per thinking step, one clipped ratio per draw);
- ``gaussian-soft``: Gaussian soft tokens (the tau 0.5 mixture of the K slots plus sigma eps on the next input,
  scored by the input's Gaussian density; RLOO advantages, as the paper trains it).

The start and every trained model are evaluated on the first ``--problems`` held-out problems with ``--n``
samples each and the same sampler for every arm (T 1.0, top-k 5, top-p 0.95, K 5, tau_g 0.1, Gumbel noise),
once with soft and once with discrete decoding; reported: unbiased pass@k for k = 1..n (mean and standard
deviation over seeds) as a table (``table.md``) and one plot per task (``pass_at_k_<task>.png``, matplotlib),
and the soft tax of each arm: its mean RL step time over GRPO's in this run (``soft_step_vs_grpo_step``).
Results accumulate in ``results.json`` under ``--out``: a run already there is not repeated, so the comparison
can be completed over several invocations; ``--report-only`` redraws the table and plots from it.

Why one sampler: the paper evaluated SofT-GRPO with its training sampler (T 1.0) and the discrete baselines at
T 0.6, and counted pass@k over the first k samples. A lower temperature alone moves pass@1 up and pass@k down,
and first-k counting has a variance the unbiased estimator avoids; either would credit the method with what the
sampler did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soft_rl.metrics import pass_at_k  # noqa: E402

ARMS = {
    "grpo": ["rollout.soft=false"],
    "softgrpo-official": ["rollout.soft=true", "learner.density=official"],
    "softgrpo-exact": ["rollout.soft=true", "learner.density=exact"],
    "softgrpo-gumbel-max": ["rollout.soft=true", "learner.density=gumbel-max"],
    # Multiplex Thinking with the paper's K = 3 and its official per-draw loss, on the toy's training sampler
    "multiplex": ["rollout.soft=true", "rollout.noise=multiplex", "rollout.k=3", "learner.density=exact",
                  "learner.multiplex_ratio=per_draw"],
    # Gaussian soft tokens with the paper's method keys: the tau 0.5 mixture, sigma = 0.33 x RMS(E), RLOO
    "gaussian-soft": ["rollout.soft=true", "rollout.noise=embedding_gaussian", "rollout.tau=0.5",
                      "rollout.embedding_noise=0.33", "learner.density=exact", "learner.advantage=rloo"],
}
# task -> (its toy-init directory under .cache, its preset overrides, its generation budget)
TASKS = {
    "addition": ("toy", [], 64),
    "pairsum": ("toy_pairsum", ["rollout.max_new_tokens=48"], 48),
}
DECODINGS = ("soft", "discrete")


def train_run(toy: Path, out: Path, overrides: list[str], seed: int, steps: int) -> list[dict]:
    from soft_rl.config import load_config
    from workers.driver import train

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", *overrides,
        f"trainer.seed={seed}", f"trainer.steps={steps}", "trainer.eval_every=0",
        "trainer.save_every=0", f"trainer.out_dir={out}", "trainer.export_final=true"])
    return train(cfg, log=lambda s: print(f"  {s}", flush=True), progress=False)


def evaluate(model: Path, test: Path, decoding: str, problems: int, n: int, max_new_tokens: int,
             out: Path) -> list[int]:
    """Correct samples (of ``n``) per held-out problem, with the one evaluation sampler."""
    from soft_rl.evaluation import EvalSettings
    from workers.eval import EvalRun, run_eval

    settings = EvalSettings(mode=decoding, n=n, temperature=1.0, top_k=5, top_p=0.95, k=5, tau=0.1, noise="gumbel",
                            max_new_tokens=max_new_tokens, seed=12345)
    report = run_eval(EvalRun(model=str(model), data=[str(test)], settings=settings, backend="vllm", out=str(out),
                              reward="toy", reward_actors=0, limit=problems, batch_size=512))
    (dataset,) = report.values()
    return [p["correct"] for p in dataset["problems"]]


def curve(correct: list[int], n: int) -> list[float]:
    """Unbiased pass@k for k = 1..n, averaged over problems."""
    return [sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """pass@k against k (log scale), one panel per decoding, one line per model (mean over seeds, +- sd band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DECODINGS), figsize=(12, 4.8), sharey=True)
    for ax, decoding in zip(axes, DECODINGS, strict=True):
        for name, runs in curves.items():
            model, dec = name.rsplit("/", 1)
            if dec != decoding:
                continue
            ks = list(range(1, len(runs[0]) + 1))
            mean = [statistics.fmean(r[k - 1] for r in runs) for k in ks]
            sd = [statistics.stdev(r[k - 1] for r in runs) if len(runs) > 1 else 0.0 for k in ks]
            line, = ax.plot(ks, mean, marker="o", markersize=3, label=model,
                            linestyle="--" if model == "start" else "-")
            ax.fill_between(ks, [max(0.0, m - d) for m, d in zip(mean, sd, strict=True)],
                            [min(1.0, m + d) for m, d in zip(mean, sd, strict=True)], color=line.get_color(),
                            alpha=0.15)  # +- sd over seeds, within [0, 1]
        ax.set_xscale("log", base=2)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("k")
        ax.set_title(f"{decoding} decoding")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("unbiased pass@k")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, args, out: Path) -> str:
    n = args.n
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= n]
    lines = [f"Held-out: first {args.problems} problems per task, n = {n} samples each, one sampler for every arm "
             f"(T 1.0, top-k 5, top-p 0.95, K 5, tau_g 0.1); mean +- sd over seeds ({args.steps} RL steps each).", ""]
    for task in args.tasks:
        res = results["tasks"].get(task)
        if not res:
            continue
        curves = {f"start/{dec}": [curve(c, n)] for dec, c in res["start"].items()}
        for arm in args.arms:
            for dec in DECODINGS:
                runs = [res["trained"][f"{arm}/seed{s}/{dec}"] for s in args.seeds
                        if f"{arm}/seed{s}/{dec}" in res["trained"]]
                if runs:
                    curves[f"{arm}/{dec}"] = [curve(c, n) for c in runs]
        lines += [f"### {task}", "", "| model / decoding | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|" + "---|" * (len(ks) + 2)]
        for name, runs in curves.items():
            cells = []
            for k in ks:
                m, sd = mean_sd([r[k - 1] for r in runs])
                cells.append(f"{m:.3f} +- {sd:.3f}" if len(runs) > 1 else f"{m:.3f}")
            lines.append(f"| {name} | {len(runs) if not name.startswith('start') else '-'} | " + " | ".join(cells)
                         + " |")
        steps = res["step_seconds"]
        if steps.get("grpo"):
            grpo_t = statistics.fmean(steps["grpo"])
            lines += ["", "Soft tax (mean RL step time over GRPO's, this run): " + ", ".join(
                f"{arm} {statistics.fmean(steps[arm]) / grpo_t:.3f}" for arm in args.arms if steps.get(arm))]
        lines.append("")
        plot(curves, out / f"pass_at_k_{task}.png", f"{task}: unbiased pass@k, {args.problems} problems x {n} samples")
    return "\n".join(lines)


def parse_arm(spec: str) -> tuple[str, list[str]]:
    name, _, overrides = spec.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--arm wants NAME=key=value[,key=value...], got {spec!r}")
    return name, overrides.split(",")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--arm", type=parse_arm, action="append", default=[], help="NAME=key=value,key=value: another arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the preset's)")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems evaluated")
    ap.add_argument("--n", type=int, default=32, help="samples per held-out problem")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "toy_compare"))
    ap.add_argument("--report-only", action="store_true",
                    help="redraw the table and plots from the results.json under --out without training anything")
    args = ap.parse_args(argv)
    arms = {**ARMS, **dict(args.arm)}
    args.arms = list(dict.fromkeys([*args.arms, *(name for name, _ in args.arm)]))
    unknown = [a for a in args.arms if a not in arms]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {sorted(arms)} (or add one with --arm)")
    if args.steps is None:
        from soft_rl.config import load_config

        args.steps = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["model.path=x"]).trainer.steps
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    from soft_rl.toy import toy_init

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    if args.report_only:  # the settings the stored runs were made with
        for key in ("n", "problems", "steps"):
            setattr(args, key, results.get("args", {}).get(key, getattr(args, key)))
    else:
        results["args"] = {k: v for k, v in vars(args).items() if k not in ("arm", "report_only")}
    for task in [] if args.report_only else args.tasks:
        cache, overrides, budget = TASKS[task]
        toy = ROOT / ".cache" / cache
        toy_init(toy, task=task)
        res = results["tasks"].setdefault(task, {"start": {}, "trained": {}, "step_seconds": {}})
        for decoding in DECODINGS:
            if decoding not in res["start"]:
                res["start"][decoding] = evaluate(toy / "model", toy / "test.jsonl", decoding, args.problems, args.n,
                                                  budget, ROOT / "runs" / "toy_compare" / task / f"start-{decoding}")
        for seed in args.seeds:
            for arm in args.arms:  # alternate arms so that machine load hits them alike
                if all(f"{arm}/seed{seed}/{dec}" in res["trained"] for dec in DECODINGS):
                    continue
                run_dir = ROOT / "runs" / "toy_compare" / task / f"{arm}-seed{seed}"
                print(f"[toy_compare] {task}: training {arm}, seed {seed}, {args.steps} steps -> {run_dir}", flush=True)
                history = train_run(toy, run_dir, [*overrides, *arms[arm]], seed, args.steps)
                # the first step includes one-off warm-up (compilation, caches): left out of the step time
                res["step_seconds"].setdefault(arm, []).extend(r["time/step"] for r in history[1:])
                for decoding in DECODINGS:
                    res["trained"][f"{arm}/seed{seed}/{decoding}"] = evaluate(
                        run_dir / "final_model", toy / "test.jsonl", decoding, args.problems, args.n, budget,
                        run_dir / f"eval-{decoding}")
                path.write_text(json.dumps(results))
    table = report(results, args, out)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"[toy_compare] {out / 'table.md'}; {time.time() - t0:.0f}s in all")
    for task in (t for t in args.tasks if t in results["tasks"]):
        steps = results["tasks"][task]["step_seconds"]
        grpo_t = statistics.fmean(steps["grpo"]) if steps.get("grpo") else None
        for arm in args.arms:
            if arm != "grpo" and grpo_t and steps.get(arm):
                print(f"{task}/{arm}: soft_step_vs_grpo_step={statistics.fmean(steps[arm]) / grpo_t:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
