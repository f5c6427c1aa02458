"""Weight-sync parity probe: the engine-vs-learner log-prob gaps of a healthy run, per dtype.

    .venv/bin/python bench/probe_gaps.py [--steps 6] [--dtypes float32 bfloat16]

Runs ``soft-rl train`` on the toy task (the shipped warm start, configs/tiny_cpu.yaml shrunk to
1 engine, 1 ZeRO-2 learner, 8 prompts x 8 samples per step) for ``--steps`` steps in each dtype with
the probe's check off, and prints each step's mean |engine - learner| log-prob at discrete and at soft
positions (``soft_rl.sync_probe.LogprobGaps``), then per dtype the largest over the steps beside the
default tolerance (``soft_rl.sync_probe.DEFAULT_TOLERANCES``) as ``<dtype>_margin_discrete=<tol / gap>``
and ``<dtype>_margin_soft=<tol / gap>``. Those tolerances were set from this script's bfloat16 output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    from soft_rl.config import load_config
    from soft_rl.sync_probe import DEFAULT_TOLERANCES
    from soft_rl.toy.init import toy_init
    from workers.cluster import init_ray
    from workers.driver import train

    init_ray()
    tmp = Path(tempfile.mkdtemp(prefix="probe_gaps_"))
    toy = tmp / "toy"
    toy_init(toy, log=lambda s: None)
    for dtype in args.dtypes:
        overrides = [f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]",
                     f"trainer.steps={args.steps}", "trainer.eval_every=0", "trainer.save_every=0",
                     "data.prompts_per_step=8", "rollout.num_engines=1", "learner.world_size=1",
                     "reward.num_actors=1", f"model.dtype={dtype}", "learner.sync_probe=false",
                     f"trainer.out_dir={tmp / dtype}"]
        history = train(load_config("configs/tiny_cpu.yaml", overrides), log=lambda s: None)
        p = "rollout_vs_learner/"
        worst = {"discrete": 0.0, "soft": 0.0}
        for rec in history:
            if p + "mean_abs_logprob_diff_soft" not in rec:
                continue
            d, s = rec[p + "mean_abs_logprob_diff_discrete"], rec[p + "mean_abs_logprob_diff_soft"]
            d_max, s_max = rec[p + "max_abs_logprob_diff_discrete"], rec[p + "max_abs_logprob_diff_soft"]
            print(f"{dtype} step {rec['step']}: mean gap discrete {d:.3g} (max {d_max:.3g}), "
                  f"soft {s:.3g} (max {s_max:.3g})", flush=True)
            worst = {"discrete": max(worst["discrete"], d), "soft": max(worst["soft"], s)}
        tol = dict(zip(("discrete", "soft"), DEFAULT_TOLERANCES[dtype], strict=True))
        for kind in ("discrete", "soft"):
            print(f"{dtype}_worst_{kind}={worst[kind]:.3g} tolerance={tol[kind]:g}")
            print(f"{dtype}_margin_{kind}={tol[kind] / max(worst[kind], 1e-12):.3g}", flush=True)


if __name__ == "__main__":
    main()
