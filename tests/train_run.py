"""A reduced but real `soft-rl train` run, shared by the `ray job submit` and Slurm tests.

    toy = make_toy(tmp_path / "toy")                 # ~4 s: toy data + a tiny Qwen2 (1 warm-start step)
    args = train_args(toy, tmp_path / "run")         # soft-rl train --config configs/tiny_cpu.yaml + overrides
    ... run `soft-rl train *args` on the cluster under test ...
    records = check_run(tmp_path / "run")            # metrics.jsonl, checkpoint, resolved config.yaml
    nodes = actor_placement(driver_output)           # the driver's "[train] actors by node: {...}" line

The run: 2 SofT-GRPO steps of 2 prompts x 2 samples, 1 vLLM rollout engine, 1 or 2 ZeRO-2 learners, 1 reward
actor (toy reward), 16 new tokens; a checkpoint at step 2. Actors ask for 0.5 (engine, learners) and 0 (reward)
CPUs: with 2 learners 1.5 in all, so on two 1-CPU Ray nodes they cannot all sit on one node.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
STEPS = 2
# Metric names the driver writes for every step (workers/driver.py); the run's outputs must have them.
STEP_KEYS = ("reward/mean", "reward/std", "reward/failures", "rollout/tokens", "rollout/soft_frac",
             "rollout_vs_learner/max_abs_logprob_diff", "learner/pg_loss", "learner/grad_norm", "time/rollout",
             "time/update", "time/sync", "time/step", "time/checkpoint", "tokens_per_s", "faults/total",
             "faults/engine_restarts", "faults/reward_restarts", "faults/learner_restarts")
PLACEMENT = "[train] actors by node: "


def make_toy(path: Path) -> Path:
    from soft_rl.toy.init import toy_init

    toy_init(path, size="tiny", steps=1, minutes=1.0, log=lambda s: None)
    return path


def overrides(toy: Path, out: Path, learners: int = 2) -> list[str]:
    return [f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", f"trainer.out_dir={out}",
            f"trainer.steps={STEPS}", f"trainer.save_every={STEPS}", "trainer.eval_every=0",
            "data.prompts_per_step=2", "rollout.n=2", "rollout.num_engines=1", f"learner.world_size={learners}",
            "reward.num_actors=1", "rollout.max_new_tokens=16", "rollout.thinking_budget=8"]


def train_args(toy: Path, out: Path, learners: int = 2) -> list[str]:
    """The arguments after `soft-rl train`."""
    return ["--config", str(CONFIG), *overrides(toy, out, learners)]


def check_run(out: Path, learners: int = 2) -> list[dict]:
    """Assert the run's outputs (step records, checkpoint, resolved config); returns the step records."""
    from soft_rl.config import load_config

    assert (out / "metrics.jsonl").is_file(), f"no metrics.jsonl in {out}: {sorted(p.name for p in out.iterdir())}"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    for rec in records:
        missing = [k for k in STEP_KEYS if k not in rec and not (k == "time/checkpoint" and rec["step"] < STEPS)]
        assert not missing, f"step {rec['step']} lacks {missing}: {sorted(rec)}"
        assert 0.0 <= rec["reward/mean"] <= 1.0 and rec["reward/failures"] == 0, rec
        assert rec["faults/total"] == 0 and "faults/events" not in rec, rec  # nothing was lost in these runs
        assert rec["rollout/tokens"] > 0 and 0.0 < rec["rollout/soft_frac"] <= 1.0, rec
        assert rec["rollout_vs_learner/max_abs_logprob_diff"] <= 1e-4, rec  # engine and learners agree
    ckpt = out / "checkpoints" / f"step-{STEPS:08d}"
    assert ckpt.is_dir() and list(ckpt.rglob("mp_rank_00_model_states.pt")), f"no checkpoint at {ckpt}"
    cfg = load_config(out / "config.yaml")  # the resolved config is saved with the run
    assert (cfg.trainer.steps, cfg.rollout.num_engines, cfg.learner.world_size, cfg.reward.num_actors) == \
        (STEPS, 1, learners, 1), cfg
    assert Path(cfg.trainer.out_dir) == out and cfg.rollout.max_new_tokens == 16
    return records


def actor_placement(text: str) -> dict:
    """The driver's placement record: {node id: {"ip", "labels", "actors": [{"class", "pid"}]}}."""
    lines = [ln for ln in text.splitlines() if PLACEMENT in ln]
    assert lines, f"the driver printed no '{PLACEMENT.strip()}' line; output:\n{text[-4000:]}"
    line = lines[-1]
    return json.loads(line[line.index(PLACEMENT) + len(PLACEMENT):])


def missing_actors(placement: dict, learners: int = 2) -> list[str]:
    """The run's actors (1 engine, the learners, 1 reward actor) not in the placement record."""
    want = Counter({"RolloutWorker": 1, "LearnerWorker": learners, "_RewardActor": 1})
    have = Counter(a["class"] for node in placement.values() for a in node["actors"])
    return sorted((want - have).elements())
