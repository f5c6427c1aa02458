"""Weight-sync parity probe: the engine-vs-learner log-prob gaps of a healthy run, per dtype.

    .venv/bin/python bench/probe_gaps.py [--steps 6] [--dtypes float32 bfloat16]

Runs ``soft-rl train`` on the toy task (the shipped warm start, configs/tiny_cpu.yaml shrunk to
1 engine, 1 ZeRO-2 learner, 8 prompts x 8 samples per step) for ``--steps`` steps in each dtype with
the probe's check off, and prints each step's mean |engine - learner| log-prob at discrete and at soft
positions (``soft_rl.sync_probe.LogprobGaps``). Then, per dtype and kind, what the run's parity policy
(``soft_rl.sync_probe.ParityPolicy`` with the config's defaults) makes of them: the level it calibrates on
the first steps, ``<dtype>_drift_<kind>=<largest later gap / level>`` (the policy stops a run at
``learner.sync_probe_jump``, 10: a healthy run must stay well below it) and
``<dtype>_hard_margin_<kind>=<hard bound / largest gap>``.
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
    from soft_rl.sync_probe import LogprobGaps, ParityPolicy
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
        cfg = load_config("configs/tiny_cpu.yaml", overrides)
        lc = cfg.learner
        policy = ParityPolicy.for_run(dtype, lc.sync_probe_tol, lc.sync_probe_tol_soft,
                                      lc.sync_probe_calibration_steps, lc.sync_probe_jump)
        later = {"discrete": 0.0, "soft": 0.0}
        worst = {"discrete": 0.0, "soft": 0.0}
        for rec in history:
            if p + "mean_abs_logprob_diff_soft" not in rec:
                continue
            d, s = rec[p + "mean_abs_logprob_diff_discrete"], rec[p + "mean_abs_logprob_diff_soft"]
            d_max, s_max = rec[p + "max_abs_logprob_diff_discrete"], rec[p + "max_abs_logprob_diff_soft"]
            print(f"{dtype} step {rec['step']}: mean gap discrete {d:.3g} (max {d_max:.3g}), "
                  f"soft {s:.3g} (max {s_max:.3g})", flush=True)
            was_calibrated = policy.calibrated
            verdict = policy.check(rec["step"], LogprobGaps(d, d_max, s, s_max, 0.0, 0.0))
            if verdict:
                print(f"{dtype} step {rec['step']}: the policy would stop this healthy run: {verdict}", flush=True)
            if was_calibrated:
                later = {"discrete": max(later["discrete"], d), "soft": max(later["soft"], s)}
            worst = {"discrete": max(worst["discrete"], d), "soft": max(worst["soft"], s)}
        print(policy.describe())
        for i, kind in enumerate(("discrete", "soft")):
            level = policy.level[i] if policy.level else float("nan")
            print(f"{dtype}_level_{kind}={level:.3g}")
            print(f"{dtype}_drift_{kind}={later[kind] / max(level, 1e-30):.3g}")
            print(f"{dtype}_hard_margin_{kind}={policy.hard[i] / max(worst[kind], 1e-30):.3g}", flush=True)


if __name__ == "__main__":
    main()
