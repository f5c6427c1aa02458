"""The driver end to end on the toy task: 2 rollout engines, 2 ZeRO-2 learners, 2 reward actors."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_train_two_steps_on_toy(ray_cluster, tmp_path):
    from soft_rl.cli import main
    from soft_rl.config import load_config
    from soft_rl.toy.init import toy_init
    from workers.driver import train

    toy = tmp_path / "toy"
    toy_init(toy, size="tiny", steps=1, minutes=1.0, log=lambda s: None)
    out = tmp_path / "run"
    overrides = [f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", "trainer.steps=2",
                 "data.prompts_per_step=4", f"trainer.out_dir={out}", "rollout.max_new_tokens=24",
                 "rollout.thinking_budget=12", "trainer.colocate=true", "learner.entropy_coef=0.001"]
    history = train(load_config("configs/tiny_cpu.yaml", overrides + ["trainer.export_final=true"]),
                    log=lambda s: None)
    # the trained weights as an HF directory: loadable, and not the initial ones
    import torch
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final_model").state_dict()
    start = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    assert final.keys() == start.keys() and any(not torch.equal(final[k], start[k]) for k in final)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines == json.loads(json.dumps(history))
    for rec in lines:
        assert 0.0 <= rec["reward/mean"] <= 1.0 and rec["reward/failures"] == 0
        assert 0.0 < rec["rollout/soft_frac"] < 1.0  # soft thinking, then a discrete answer
        assert rec["rollout_vs_learner/max_abs_logprob_diff"] <= 1e-4  # engine and learner agree
        assert rec["learner/skipped_steps"] == 0 and rec["learner/grad_norm"] >= 0  # all-zero rewards: 0
        assert rec["rollout/tokens"] > 0 and rec["time/step"] > 0
        assert rec["learner/entropy"] > 0 and rec["sync/mb"] > 0  # entropy metric; broadcast sync (default)
        assert rec["rollout_vs_learner/mean_abs_logprob_diff"] <= 1e-5
        # the probe measures discrete and soft positions apart (both present: soft thinking, then an answer)
        assert rec["rollout_vs_learner/mean_abs_logprob_diff_discrete"] <= 1e-5
        assert rec["rollout_vs_learner/mean_abs_logprob_diff_soft"] <= 1e-5
    # colocation: learner rank i and engine i were placed in one placement group (bundle i each)
    where = json.loads((out / "placement.json").read_text())
    groups = {a["placement_group"] for a in where["engines"] + where["learners"]}
    assert len(where["engines"]) == len(where["learners"]) == 2 and len(groups) == 1 and None not in groups
    assert load_config(out / "config.yaml").trainer.steps == 2  # the resolved config is saved with the run
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    # the parity check fails loudly (a tolerance no rollout can meet stands in for a broken sync)
    from workers.weight_sync import WeightSyncError

    with pytest.raises(WeightSyncError, match="step 1: the rollout engines' log-probs differ .* at discrete positions"):
        bad = ["learner.sync_probe_tol=1e-30", "trainer.steps=1", "rollout.num_engines=1", "learner.world_size=1",
               "trainer.colocate=false", f"trainer.out_dir={out}-bad"]
        train(load_config("configs/tiny_cpu.yaml", overrides + bad), log=lambda s: None)
    # bad config fails before any actor starts, naming the key
    with pytest.raises(Exception, match="rollout.temprature"):
        main(["train", "--config", "configs/tiny_cpu.yaml", "rollout.temprature=0.5"])


@pytest.mark.parametrize("density", ["exact", "gumbel-max"])
def test_engines_score_soft_steps_in_the_learners_density(ray_cluster, tmp_path, density):
    """``learner.density`` reaches the engines too: their reported soft log-probs (the PPO ratio's old log-probs)
    equal the learners' in every density mode, not only the default one (an engine left at "official" differs
    by about 1 per soft position and the parity probe stops the run)."""
    from soft_rl.config import load_config
    from soft_rl.toy.init import toy_init
    from workers.driver import train

    toy = tmp_path / "toy"
    toy_init(toy, size="tiny", steps=1, minutes=1.0, log=lambda s: None)
    history = train(load_config("configs/tiny_cpu.yaml", [
        f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]", "trainer.steps=1",
        "data.prompts_per_step=4", f"trainer.out_dir={tmp_path / 'run'}", "rollout.max_new_tokens=24",
        "rollout.thinking_budget=12", "rollout.num_engines=1", "learner.world_size=1", "trainer.eval_every=0",
        f"learner.density={density}"]), log=lambda s: None)
    (rec,) = history
    assert 0.0 < rec["rollout/soft_frac"] < 1.0
    assert rec["rollout_vs_learner/mean_abs_logprob_diff_soft"] <= 1e-5, rec


def _model_states(ckpt_dir):
    import torch

    files = sorted(ckpt_dir.rglob("mp_rank_00_model_states.pt"))
    assert files, f"no model states under {ckpt_dir}"
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("noise", ["gumbel", "embedding_gaussian"])
def test_resume_equals_uninterrupted(ray_cluster, tmp_path, noise):
    """2 steps == 1 step + checkpoint + resume + 1 step (bit-exact on CPU), with eval and KL on; SofT-GRPO, and
    Gaussian soft tokens (whose requests carry sigma from the learners' embedding at each step, and whose steps the
    learners score at the rollout-time inputs: the engines' log-probs equal theirs, and the resumed run's sigma
    and update are the uninterrupted one's)."""
    import torch

    from soft_rl.config import load_config
    from soft_rl.toy.init import toy_init
    from workers.driver import train

    toy = tmp_path / "toy"
    toy_init(toy, size="tiny", steps=30, minutes=1.0, log=lambda s: None)

    def cfg(out, steps):
        return load_config("configs/tiny_cpu.yaml", [
            f"model.path={toy / 'model'}", f"data.train_files=[{toy / 'train.jsonl'}]",
            f"data.eval_files=[{toy / 'test.jsonl'}]", "trainer.eval_every=2", "trainer.eval_n=1",
            f"trainer.steps={steps}", "trainer.save_every=1", "data.prompts_per_step=4", f"trainer.out_dir={out}",
            "rollout.max_new_tokens=24", "rollout.thinking_budget=12", "rollout.num_engines=1",
            "learner.kl_coef=0.01", "learner.lr=1e-3", *method])

    method = [] if noise == "gumbel" else [f"rollout.noise={noise}", "rollout.tau=0.5", "learner.density=exact",
                                           "learner.advantage=rloo"]

    full = train(cfg(tmp_path / "full", 2), log=lambda s: None)
    first = train(cfg(tmp_path / "part", 1), log=lambda s: None)
    second = train(cfg(tmp_path / "part", 2), log=lambda s: None, resume=True)
    assert [r["step"] for r in full] == [0, 1, 2] and "eval/pass@1" in full[0] and "eval/pass@1" in full[2]
    assert [r["step"] for r in first] == [0, 1] and [r["step"] for r in second] == [2]
    assert "learner/kl" in full[1] and full[1]["learner/kl"] >= 0
    # the preset's cosine schedule is a function of the step, so the resumed step uses the decayed rate
    assert full[2]["learner/lr"] == pytest.approx(1e-4) and full[1]["learner/lr"] == pytest.approx(1e-3)
    keys = ["reward/mean", "rollout/tokens", "learner/pg_loss", "learner/kl", "learner/grad_norm", "eval/pass@1",
            "learner/lr"]
    assert {k: second[0][k] for k in keys} == {k: full[2][k] for k in keys}
    if noise != "gumbel":  # soft steps really ran, and the engines scored them as the learners do
        assert all(0 < r["rollout/soft_frac"] < 1 for r in full[1:])
        assert all(r["rollout_vs_learner/mean_abs_logprob_diff_soft"] <= 1e-4 for r in full[1:]), full
    a = _model_states(tmp_path / "full" / "checkpoints" / "step-00000002")
    b = _model_states(tmp_path / "part" / "checkpoints" / "step-00000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
