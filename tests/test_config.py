"""Config loading: presets load, bad input fails before anything starts, naming the key."""

from pathlib import Path

import pytest

from soft_rl.config import ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"tiny_cpu", "softgrpo_r1_distill_qwen_1p5b", "softgrpo_r1_distill_qwen_7b", "softgrpo_llama_3b",
            "grpo_r1_distill_qwen_1p5b"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_validate(preset):
    cfg = load_config(preset, ["model.path=/models/x"])
    assert cfg.model.path == "/models/x"
    # the resolved config round-trips through YAML
    dumped = ROOT / ".cache" / f"roundtrip-{preset.stem}.yaml"
    dumped.parent.mkdir(exist_ok=True)
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def test_paper_recipe_values():
    cfg = load_config(ROOT / "configs" / "softgrpo_r1_distill_qwen_1p5b.yaml", ["model.path=/m"])
    r, lr = cfg.rollout, cfg.learner
    assert (r.top_k, r.k, r.top_p, r.tau, r.noise_scale, r.n) == (5, 5, 0.95, 0.1, 1.0, 8)
    assert (lr.lr, lr.kl_coef, lr.kl_kind, lr.dual_clip, lr.mini_batches) == (1e-6, 0.001, "k3", 3.0, 2)
    base = load_config(ROOT / "configs" / "grpo_r1_distill_qwen_1p5b.yaml", ["model.path=/m"])
    assert base.rollout.soft is False and base.rollout.top_k == 5


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.stem.startswith(("softgrpo_", "grpo_"))],
                         ids=lambda p: p.stem)
def test_paper_presets_select_the_official_behaviour(preset):
    """Every documented deviation with an official alternative: the paper presets pick the official one."""
    from soft_rl.rewards import get_reward

    cfg = load_config(preset, ["model.path=/m"])
    r, lr = cfg.rollout, cfg.learner
    assert lr.density == "official"
    assert lr.loss_agg == "micro-batch-token-mean" and lr.micro_batch_seqs == (1 if "7b" in preset.stem else 2)
    assert cfg.reward.name == "math_strict"
    get_reward(cfg.reward.name)  # registered
    assert (r.eval_temperature, r.eval_top_p, r.eval_top_k) == (0.6, 0.95, 5)
    ev = r.eval_sampling_params(seed=1)
    assert (ev.temperature, ev.answer_temperature, ev.top_p, ev.top_k) == (0.6, 0.6, 0.95, 5)
    assert r.sampling_params(seed=1).temperature == 1.0  # training keeps its own
    assert cfg.data.max_prompt_tokens == 1024
    # held-out files inside the repository, relative to its root (where soft-rl runs)
    assert cfg.data.eval_files and all((ROOT / f).is_file() and not Path(f).is_absolute() for f in cfg.data.eval_files)


def test_soft_tokens_preset_has_the_papers_method_settings():
    """Gaussian soft tokens' preset: the method keys of "Soft Tokens, Hard Truths" (tau 0.5 mixture, sigma = 0.33 x
    RMS(E), the input's Gaussian density, RLOO), and its requests carry sigma from the RMS the driver passes."""
    cfg = load_config(ROOT / "configs" / "soft_tokens_llama_3.1_8b.yaml", ["model.path=/m"])
    r, lr = cfg.rollout, cfg.learner
    p = r.sampling_params(seed=1, embedding_rms=0.02)
    assert (p.noise, p.tau, p.soft) == ("embedding_gaussian", 0.5, True)
    assert p.embedding_sigma == pytest.approx(0.33 * 0.02, rel=1e-7)
    assert (lr.density, lr.advantage, lr.kl_coef, lr.mini_batches) == ("exact", "rloo", 0.0, 1)


def test_multiplex_preset_has_the_official_training_settings():
    """Multiplex Thinking's preset: the official script's values (scripts/train.sh and the README's command,
    docs/design/multiplex-reference.md section 5), and the sampler it builds draws K = 3 from the whole
    vocabulary with probability weights and scores each draw with its own ratio."""
    cfg = load_config(ROOT / "configs" / "multiplex_r1_distill_qwen_7b.yaml", ["model.path=/m"])
    r, lr = cfg.rollout, cfg.learner
    p = r.sampling_params(seed=1)
    assert (p.noise, p.k, p.top_k, p.top_p, p.temperature, p.soft) == ("multiplex", 3, 0, 1.0, 1.0, True)
    assert (r.n, r.max_new_tokens, cfg.data.prompts_per_step, cfg.trainer.steps) == (8, 4096, 128, 300)
    assert (lr.lr, lr.mini_batches, lr.ppo_epochs, lr.kl_coef, lr.entropy_coef) == (1e-6, 1, 1, 0.0, 0.0)
    assert (lr.density, lr.multiplex_ratio, lr.advantage) == ("exact", "per_draw", "grpo")
    assert (lr.clip_low, lr.clip_high, lr.dual_clip) == (0.2, 0.2, 3.0)
    ev = r.eval_sampling_params(seed=1)
    assert (ev.temperature, ev.top_p, cfg.trainer.eval_n) == (1.0, 1.0, 4)
    assert cfg.data.eval_files and all((ROOT / f).is_file() for f in cfg.data.eval_files)


def test_eval_sampling_defaults_to_training_sampling():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    assert cfg.rollout.eval_sampling_params(3) == cfg.rollout.sampling_params(3)


@pytest.mark.parametrize("overrides,key", [
    (["rollout.temprature=0.5"], "rollout.temprature"),          # unknown key (typo)
    (["learner.lr=fast"], "learner.lr"),                          # wrong type
    (["rollout.n=1"], "rollout.n"),                               # inconsistent with GRPO
    (["learner.mini_batches=3"], "learner.mini_batches"),        # 8 prompts do not split in 3
    (["learner.world_size=3"], "learner.world_size"),            # 32 trajectories over 3 ranks
    (["rollout.tau=0"], "rollout"),                               # sampler validation
    (["learner.density=joint"], "learner.density"),
    (["learner.density=gumbel-max", "rollout.noise=dirichlet"], "learner.density"),  # scores Gumbel noise only
    (["rollout.noise=none"], "rollout.noise"),
    (["trainer.device=tpu"], "trainer.device"),
    (["learner.sync_transport=nccl"], "learner.sync_transport"),
    (["rollout.prefix_caching=salted"], "rollout.prefix_caching"),
    (["learner.sync_probe_tol=0"], "learner.sync_probe_tol"),
    (["learner.sync_probe_tol_soft=-1"], "learner.sync_probe_tol_soft"),
    (["learner.sync_bucket_mb=0"], "learner.sync_bucket_mb"),
    (["learner.micro_batch_seqs=0"], "learner.micro_batch_seqs"),
    (["learner.logit_chunk_tokens=0"], "learner.logit_chunk_tokens"),
    (["learner.loss_agg=token-sum"], "learner.loss_agg"),
    (["rollout.noise_scale=0"], "rollout"),                       # degenerate density; noise=none instead
    (["rollout.eval_top_p=1.5"], "rollout"),                      # eval sampler validated too
    (["data.max_prompt_tokens=0"], "data.max_prompt_tokens"),
    (["trainer.colocate=true", "rollout.num_engines=1"], "trainer.colocate"),  # 2 learner ranks, 1 engine
    (["trainer.colocate=true", "trainer.device=gpu"], "learner.sync_transport"),  # NCCL: one rank per GPU
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides)


def test_missing_model_path_and_unknown_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: /m\ntrainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="trainer.stepz"):
        load_config(bad)


@pytest.mark.parametrize("preset,shape", [("softgrpo_r1_distill_qwen_1p5b", "r1-distill-qwen-1.5b"),
                                          ("grpo_r1_distill_qwen_1p5b", "r1-distill-qwen-1.5b"),
                                          ("softgrpo_r1_distill_qwen_7b", "r1-distill-qwen-7b"),
                                          ("multiplex_r1_distill_qwen_7b", "r1-distill-qwen-7b"),
                                          ("soft_tokens_llama_3.1_8b", "llama-3.1-8b")])
def test_gpu_presets_recompute_activations_and_fit_an_80gb_gpu(preset, shape):
    """The paper presets run on 8 x 80 GB GPUs: activation recomputation on, and the memory plan
    (soft_rl/memory_plan.py, the model's shape from configs/shapes/) finds no GPU that overflows."""
    from soft_rl.memory_plan import check_plan

    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [f"model.path={ROOT / 'configs' / 'shapes' / shape}"])
    assert cfg.learner.gradient_checkpointing and cfg.learner.logit_chunk_tokens <= 1024
    assert check_plan(cfg, 80 * 2**30) is None


def test_every_toy_comparison_arm_loads_on_every_task():
    """bench/toy_compare.py's arms and task overrides are valid configs (a typo in an arm fails here, not an hour
    into a comparison), and each arm trains what its name says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_compare", ROOT / "bench" / "toy_compare.py")
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    for task, (_, task_overrides, _) in tc.TASKS.items():
        for arm, overrides in tc.ARMS.items():
            cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["model.path=/m", *task_overrides, *overrides])
            p = cfg.rollout.sampling_params(0, embedding_rms=1.0)
            assert p.soft == (arm != "grpo"), (task, arm)
            want = {"multiplex": "multiplex", "gaussian-soft": "embedding_gaussian"}.get(arm, "gumbel")
            assert p.noise == want, (task, arm)
