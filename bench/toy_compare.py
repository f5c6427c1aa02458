"""SofT-GRPO against discrete GRPO on the toy task: the paper's claim, on what a 2-core CPU can run.

    .venv/bin/python bench/toy_compare.py [--seeds 0 1 2] [--steps 100] [--problems 100] [--n 16]

For each seed, two `soft-rl train` runs from the same shipped warm start (`soft-rl toy-init`), with the
same budget, data order and rollout seeds (``configs/tiny_cpu.yaml``): ``rollout.soft=true``
(SofT-GRPO: soft thinking with Gumbel noise, the Gumbel density at soft steps) and ``rollout.soft=false``
(GRPO: token sampling in both phases). The start and every trained model are then evaluated on the first
``--problems`` held-out problems with ``--n`` samples each (T 1.0, top-k 5, top-p 0.95, tau_g 0.1), with
soft and with discrete decoding, as the paper does. Reported: pass@1 and unbiased pass@k for k = 1..n
(mean and standard deviation over seeds), as a table (``table.md``) and a PNG of the pass@k curves
(``pass_at_k.png``), all under ``--out``.

The soft tax of the whole RL step (rollout, reward, old log-probs, update, weight sync) is the mean
SofT-GRPO step time over the mean GRPO step time, both measured in this run; the last line is
``soft_step_vs_grpo_step=<ratio>`` (the official code pays about 3x).
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

METHODS = {"grpo": "rollout.soft=false", "softgrpo": "rollout.soft=true"}
DECODINGS = ("soft", "discrete")


def train_run(toy: Path, out: Path, method: str, seed: int, steps: int | None) -> list[dict]:
    from soft_rl.config import load_config
    from workers.driver import train

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", METHODS[method],
        f"trainer.seed={seed}", *([f"trainer.steps={steps}"] if steps else []), "trainer.eval_every=0",
        "trainer.save_every=0", f"trainer.out_dir={out}", "trainer.export_final=true"])
    return train(cfg, log=lambda s: print(f"  {s}", flush=True), progress=False)


def evaluate(model: Path, test: Path, decoding: str, problems: int, n: int, out: Path) -> list[int]:
    """Correct samples (of ``n``) per held-out problem."""
    from soft_rl.evaluation import EvalSettings
    from workers.eval import EvalRun, run_eval

    settings = EvalSettings(mode=decoding, n=n, temperature=1.0, top_k=5, top_p=0.95, k=5, tau=0.1, noise="gumbel",
                            max_new_tokens=64, seed=12345)
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
    """pass@k curves (mean over seeds) with Pillow: one line per (model, decoding)."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 900, 560, 70, 250, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    n = len(next(iter(curves.values()))[0])
    lo = min(min(statistics.fmean(c[k] for c in runs) for k in range(n)) for runs in curves.values())
    lo = max(0.0, (int(lo * 10) / 10.0))

    def xy(k: int, v: float) -> tuple[float, float]:
        return L + (W - L - R) * (k - 1) / max(n - 1, 1), T + (H - T - B) * (1 - (v - lo) / max(1 - lo, 1e-9))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(11):
        v = lo + (1 - lo) * i / 10
        _, y = xy(1, v)
        d.line([L - 4, y, L, y], fill="black")
        d.text((8, y - 6), f"{v:.2f}", fill="black")
    for k in range(1, n + 1):
        x, _ = xy(k, lo)
        d.line([x, H - B, x, H - B + 4], fill="black")
        d.text((x - 4, H - B + 8), str(k), fill="black")
    d.text(((W - R) / 2 - 20, H - 25), "k", fill="black")
    d.text((L, 12), title, fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
    for i, (name, runs) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        pts = [xy(k + 1, statistics.fmean(r[k] for r in runs)) for k in range(n)]
        d.line(pts, fill=c, width=3 if "discrete" in name else 2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=c)
        d.line([W - R + 15, T + 20 + 22 * i, W - R + 40, T + 20 + 22 * i], fill=c, width=3)
        d.text((W - R + 45, T + 14 + 22 * i), name, fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the preset's)")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems evaluated")
    ap.add_argument("--n", type=int, default=16, help="samples per held-out problem")
    ap.add_argument("--toy-dir", default=str(ROOT / ".cache" / "toy"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_compare"))
    args = ap.parse_args(argv)
    if args.steps is None:
        from soft_rl.config import load_config

        args.steps = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["model.path=x"]).trainer.steps
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    from soft_rl.toy import toy_init

    t0 = time.time()
    toy, out = Path(args.toy_dir), Path(args.out)
    toy_init(toy)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "start": {}, "trained": {}, "step_seconds": {m: [] for m in METHODS}}
    for decoding in DECODINGS:
        results["start"][decoding] = evaluate(toy / "model", toy / "test.jsonl", decoding, args.problems, args.n,
                                              out / "eval" / f"start-{decoding}")
    for seed in args.seeds:
        for method in METHODS:  # alternate methods so that machine load hits both alike
            run_dir = out / f"{method}-seed{seed}"
            print(f"[toy_compare] training {method}, seed {seed}, {args.steps} steps -> {run_dir}", flush=True)
            history = train_run(toy, run_dir, method, seed, args.steps)
            # the first step includes one-off warm-up (compilation, caches): left out of the step time
            results["step_seconds"][method] += [r["time/step"] for r in history[1:]]
            for decoding in DECODINGS:
                key = f"{method}/{decoding}"
                results["trained"].setdefault(key, []).append(
                    evaluate(run_dir / "final_model", toy / "test.jsonl", decoding, args.problems, args.n,
                             out / "eval" / f"{method}-seed{seed}-{decoding}"))
            (out / "results.json").write_text(json.dumps(results))

    n = args.n
    curves = {f"start/{dec}": [curve(c, n)] for dec, c in results["start"].items()}
    curves.update({key: [curve(c, n) for c in runs] for key, runs in results["trained"].items()})
    ks = [k for k in (1, 2, 4, 8, 16) if k <= n]
    header = "| model / decoding | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [f"Held-out: first {args.problems} toy problems, n = {n} samples each; mean +- sd over seeds "
             f"{args.seeds} ({args.steps} RL steps each).", "", header, "|" + "---|" * (len(ks) + 1)]
    for name, runs in curves.items():
        cells = []
        for k in ks:
            m, sd = mean_sd([r[k - 1] for r in runs])
            cells.append(f"{m:.3f} +- {sd:.3f}" if len(runs) > 1 else f"{m:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    all_k = ["", "pass@k for k = 1..n (mean over seeds):"] + [
        f"{name}: " + " ".join(f"{statistics.fmean(r[k] for r in runs):.3f}" for k in range(n))
        for name, runs in curves.items()]
    table = "\n".join(lines + all_k)
    (out / "table.md").write_text(table + "\n")
    plot(curves, out / "pass_at_k.png", f"toy task: unbiased pass@k, {args.problems} problems x {n} samples")
    soft_t = statistics.fmean(results["step_seconds"]["softgrpo"])
    grpo_t = statistics.fmean(results["step_seconds"]["grpo"])
    print(table)
    print(f"[toy_compare] {out / 'table.md'}, {out / 'pass_at_k.png'}; {time.time() - t0:.0f}s in all")
    print(f"mean step time: softgrpo {soft_t:.2f}s, grpo {grpo_t:.2f}s")
    print(f"soft_step_vs_grpo_step={soft_t / grpo_t:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
