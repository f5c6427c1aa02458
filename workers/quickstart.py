"""`soft-rl quickstart`: the README's main job, a short distributed SofT-GRPO run on the embedded default.

1. ``soft-rl toy-init .cache/toy`` (cached after the first call): the toy task and a warm-started tiny Qwen2.
2. A local Ray cluster with the dashboard on 127.0.0.1 (its URL is printed), Prometheus when Debian's
   ``prometheus`` is installed: ``train(..., dashboard=True)``, the same as ``soft-rl train --dashboard``
   (:func:`workers.cluster.init_ray`); both are stopped when the run ends.
3. ``configs/tiny_cpu.yaml``: 2 soft-thinking vLLM rollout engines, 2 DeepSpeed ZeRO-2 learners,
   2 reward actors; held-out toy pass@1 is evaluated before and after training.
4. The last line is exactly ``toy pass@1: before=<x> after=<y>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def run(toy_dir: str = ".cache/toy", out_dir: str = "runs/quickstart", overrides: list[str] | None = None,
        dashboard: bool = True) -> tuple[float, float]:
    from soft_rl.config import load_config
    from soft_rl.toy import toy_init
    from workers.driver import train

    t0 = time.time()
    toy = Path(toy_dir)
    toy_init(toy)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", [
        f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]",
        f"data.eval_files=[{toy / 'test.jsonl'}]", f"trainer.out_dir={out_dir}", *(overrides or [])])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    print(f"[quickstart] logs and metrics: {Path(out_dir).resolve()} (metrics.jsonl, config.yaml); "
          f"checkpoints: {Path(out_dir).resolve() / 'checkpoints'}", flush=True)
    # train() starts the local cluster with the dashboard and Prometheus, prints their URLs, stops them at the end
    history = train(cfg, log=lambda s: print(s, flush=True), dashboard=dashboard)
    evals = [r["eval/pass@1"] for r in history if "eval/pass@1" in r]
    before, after = evals[0], evals[-1]
    print(f"[quickstart] {cfg.trainer.steps} SofT-GRPO steps, {time.time() - t0:.0f}s in all", flush=True)
    print(f"toy pass@1: before={before:.3f} after={after:.3f}", flush=True)
    return before, after
