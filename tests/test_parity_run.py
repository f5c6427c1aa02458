"""The parity probe's policy in real runs (soft_rl/sync_probe.py ParityPolicy, workers/driver.py): a healthy
bfloat16 run calibrates its own level and runs to the end; a run whose engines stop receiving weights after
calibration (a stale sync) stops at the first step that rolls out with stale weights."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

STEPS = 5


def _overrides(toy, out) -> list[str]:
    return [f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", f"trainer.out_dir={out}",
            f"trainer.steps={STEPS}", "trainer.eval_every=0", "trainer.save_every=0", "data.prompts_per_step=4",
            "rollout.n=4", "rollout.num_engines=1", "learner.world_size=1", "reward.num_actors=1",
            "rollout.max_new_tokens=24", "rollout.thinking_budget=12", "model.dtype=bfloat16",
            "learner.sync_probe_calibration_steps=2", "learner.lr=1e-3", "learner.lr_schedule=constant",
            # the weights move at every step whatever the rewards (the entropy bonus has a gradient of its own)
            "learner.entropy_coef=0.01"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from soft_rl.toy.init import toy_init

    path = tmp_path_factory.mktemp("parity") / "toy"
    toy_init(path, size="tiny", steps=30, minutes=1.0, log=lambda s: None)
    return path


def test_a_healthy_bf16_run_calibrates_and_is_not_stopped(ray_cluster, toy, tmp_path):
    from soft_rl.config import load_config
    from workers.driver import train

    logs: list[str] = []
    history = train(load_config("configs/tiny_cpu.yaml", _overrides(toy, tmp_path / "run")), log=logs.append,
                    progress=False)
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    line = [x for x in logs if "parity probe calibrated on steps 1-2" in x]
    assert len(line) == 1, logs
    # the weights moved (a real update each step), and the engines followed them: no later step strayed
    # from the calibrated level by the jump factor
    p = "rollout_vs_learner/mean_abs_logprob_diff_"
    level = max(h[p + "discrete"] for h in history[:2])
    assert all(h["learner/grad_norm"] > 0 for h in history)
    assert all(h[p + "discrete"] <= 10 * max(level, 1e-3) for h in history[2:])


def test_stale_weights_after_calibration_stop_the_run(ray_cluster, toy, tmp_path, monkeypatch):
    """The engines keep step 2's weights (their sync is skipped from then on) while the learners go on
    training: step 4's rollout is stale, and the policy stops the run there, naming the calibrated level."""
    from soft_rl.config import load_config
    from workers.driver import TrainingRun, train
    from workers.weight_sync import WeightSyncError

    real_sync = TrainingRun.sync_engines

    def stale_after_step_2(self):
        if self.done >= 3:  # the sync after update 3 (and later ones) does not happen
            return {}
        return real_sync(self)

    monkeypatch.setattr(TrainingRun, "sync_engines", stale_after_step_2)
    logs: list[str] = []
    with pytest.raises(WeightSyncError, match=r"step 4: the rollout engines' log-probs differ .*calibrated on "
                                              r"steps 1-2.*learner.sync_probe_jump=10"):
        train(load_config("configs/tiny_cpu.yaml", _overrides(toy, tmp_path / "run")), log=logs.append,
              progress=False)
    assert any("parity probe calibrated on steps 1-2" in x for x in logs)
