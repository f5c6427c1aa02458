"""DeepSpeed learner actors end at the same parameters as a single-process pure-torch update."""

import copy

import pytest
import torch

from soft_rl.config import LearnerConfig
from soft_rl.densities import DENSITY_MODES
from soft_rl.losses import compute_advantages
from soft_rl.lr_schedule import set_learning_rate
from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams
from soft_rl.single_process import UpdateConfig, grpo_update

pytestmark = pytest.mark.slow


def make_batch(model, tok, soft: bool, n_prompts=4, n=4, budget=lambda i: 4 + i % 3, density="official",
               **sampling):
    prompts = [list(tok.encode(f"q{i}: {i} plus {2 * i} is")) for i in range(n_prompts) for _ in range(n)]
    params = [SoftSamplingParams(seed=100 + i, soft=soft, thinking_budget=budget(i), answer_temperature=0.8,
                                 **sampling) for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=10, eos_token_ids=[], tokenizer=tok, density=density)
    g = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 2, (len(trajs),), generator=g).float()
    group = torch.arange(n_prompts).repeat_interleave(n)
    return trajs, rewards, group


def _compare_with_single_process(tiny_dir, tok, zero_stage: int, soft: bool, kl_coef: float = 0.0,
                                 entropy_coef: float = 0.0, batch_kw=None, rollout_parity: bool = False,
                                 behaviour_arch: str | None = None, is_band=None, **learner_kw):
    """k optimizer steps on 2 DeepSpeed ranks vs the pure-torch single-process update, same batch.
    ``behaviour_arch``: the batch comes from another model (an off-policy batch), whose rollout log-probs are the
    behaviour policy of a decoupled PPO update on both sides."""
    from transformers import AutoModelForCausalLM

    from soft_rl.reference import teacher_forced_logprobs
    from workers.learner import LearnerGroup

    path = str(tiny_dir / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = model if behaviour_arch is None else \
        AutoModelForCausalLM.from_pretrained(str(tiny_dir / behaviour_arch), dtype=torch.float32).eval()
    trajs, rewards, group = make_batch(gen, tok, soft, **(batch_kw or {}))
    behaviour = None if behaviour_arch is None else [t.logprobs for t in trajs]
    # Adam's eps sets how strongly gradient rounding noise is amplified in elements whose gradient is
    # ~0 (there m / sqrt(v) is ~ +-1 whatever the noise); 1e-4 keeps the comparison well conditioned.
    cfg = LearnerConfig(**{**dict(world_size=2, zero_stage=zero_stage, lr=1e-3, mini_batches=2, kl_coef=kl_coef,
                                  entropy_coef=entropy_coef, micro_batch_tokens=64, weight_decay=0.01,
                                  adam_eps=1e-4, sync_timeout_s=120, logit_chunk_tokens=7), **learner_kw})
    # independent entropy reference at the initial weights: full HF logits, token mean per mini-batch
    with torch.no_grad():
        _, ents = teacher_forced_logprobs(model, trajs, with_entropy=True, density=cfg.density)
    chunks = torch.arange(len(trajs)).chunk(cfg.mini_batches)
    ent0 = [sum(float((ents[i] * ~trajs[i].forced).sum()) for i in idx.tolist())
            / sum(int((~trajs[i].forced).sum()) for i in idx.tolist()) for idx in chunks]
    # single process, pure torch (the reference model is the frozen initial policy)
    ref_model = copy.deepcopy(model)
    frozen = copy.deepcopy(model) if kl_coef else None
    opt = torch.optim.AdamW(ref_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    steps = 2
    ucfg = UpdateConfig(mini_batches=cfg.mini_batches, kl_coef=kl_coef, entropy_coef=entropy_coef, agg=cfg.loss_agg,
                        micro_batch_seqs=cfg.micro_batch_seqs, density=cfg.density,
                        multiplex_ratio=cfg.multiplex_ratio, is_band=is_band)
    # a per-step learning rate (the driver's schedule) that the learners must apply, not their cfg.lr
    lrs = [cfg.lr, 0.4 * cfg.lr]
    ref_norms = []
    for step in range(steps):
        set_learning_rate(opt, lrs[step])
        ref_norms.append(grpo_update(ref_model, opt, trajs, rewards, group, ucfg, ref_model=frozen,
                                     per_step_metrics=True, behaviour=behaviour))
    # two DeepSpeed ranks
    learners = LearnerGroup(path, cfg)
    kls, metrics = [], []
    try:
        # ZeRO-3 loads each rank's partition only (zero.Init); ZeRO-2 ranks hold the whole model
        total = sum(p.numel() for p in model.parameters())
        if zero_stage == 3:
            assert max(learners.loaded_elements) < 0.55 * total, (learners.loaded_elements, total)
        else:
            assert learners.loaded_elements == [total] * 2
        adv = compute_advantages("grpo", rewards, group)
        if rollout_parity:  # before any update the learners score every position as the rollout did: ratio 1
            for t, lp in zip(trajs, learners.logprobs(trajs), strict=True):
                torch.testing.assert_close(lp, t.logprobs, atol=2e-5, rtol=1e-6)
        for step in range(steps):
            old = learners.logprobs(trajs, per_draw=cfg.multiplex_ratio == "per_draw")
            ref = learners.logprobs(trajs, "ref") if kl_coef else None
            for j, idx in enumerate(chunks):
                ii = idx.tolist()
                m = learners.train_mini_batch([trajs[i] for i in ii], adv[idx], [old[i] for i in ii],
                                              None if ref is None else [ref[i] for i in ii], lr=lrs[step],
                                              behaviour=None if behaviour is None else [behaviour[i] for i in ii],
                                              is_band=is_band)
                assert m["skipped_steps"] == 0
                metrics.append(m)
                # the gradient itself (before clipping) matches: catches loss-scale errors Adam would hide
                assert m["grad_norm"] == pytest.approx(ref_norms[step][j], rel=1e-4)
                if step == 0 and j == 0:
                    assert m["entropy"] == pytest.approx(ent0[0], rel=1e-5)
                kls.append(m["kl"])
        state = learners.full_state_dict()
        learners.release_memory()  # what the driver calls before colocated engines wake (a no-op on the CPU)
    finally:
        learners.shutdown()
    worst = max((state[n] - p.detach()).abs().max().item() for n, p in ref_model.named_parameters())
    moved = max((state[n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3  # the update really changed the weights
    assert worst <= 1e-5, worst
    if behaviour_arch is not None:
        return metrics
    return kls, ref_norms


def test_official_micro_batch_token_mean_matches_single_process(ray_cluster, tiny_dir, tiny_tokenizer):
    """verl 0.4's token-mean (each micro-batch's token mean, averaged over micro-batches) on 2 ZeRO-2 ranks
    equals the single-process update that computes it literally, micro-batch by micro-batch; micro-batches
    of unequal token counts make it differ from the global token mean (checked, so the test can fail)."""
    from transformers import AutoModelForCausalLM

    budget = lambda i: 4 if i % 4 == 0 else None  # noqa: E731 - one forced marker per 4: unequal micro-batches
    _, norms = _compare_with_single_process(tiny_dir, tiny_tokenizer, 2, True, batch_kw=dict(budget=budget),
                                            loss_agg="micro-batch-token-mean", micro_batch_seqs=2,
                                            micro_batch_tokens=4096)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "qwen2"), dtype=torch.float32)
    trajs, rewards, group = make_batch(model, tiny_tokenizer, True, budget=budget)
    counts = [int((~t.forced).sum()) for t in trajs]
    assert len(set(counts)) > 1, counts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    global_mean = grpo_update(model, opt, trajs, rewards, group, UpdateConfig(mini_batches=2), per_step_metrics=True)
    assert abs(global_mean[0] - norms[0][0]) > 1e-3 * norms[0][0], (global_mean, norms)


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("soft", [True, False], ids=["softgrpo", "grpo"])
def test_two_ranks_match_single_process(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage, soft):
    _compare_with_single_process(tiny_dir, tiny_tokenizer, zero_stage, soft)


@pytest.mark.parametrize("density", [d for d in DENSITY_MODES if d != "official"])
def test_density_modes_match_single_process(ray_cluster, tiny_dir, tiny_tokenizer, density):
    """The other density modes (the official one is every other test's) through 2 ZeRO-2 ranks: the learners
    score soft steps with the configured density, as the pure-torch update does."""
    _compare_with_single_process(tiny_dir, tiny_tokenizer, 2, True, density=density)


@pytest.mark.parametrize("noise,ratio", [("multiplex", "per_draw"), ("multiplex_uniform", "joint")])
def test_multiplex_matches_single_process_and_the_rollout(ray_cluster, tiny_dir, tiny_tokenizer, noise, ratio):
    """Multiplex steps (scored through the full-vocabulary head, K draws as labels, density=exact) on 2 ZeRO-3
    ranks, with one ratio per draw (the official loss) or the joint ratio: before an update the learners' joint
    log-probs equal the rollout's at every position, and two steps equal the pure-torch update."""
    _compare_with_single_process(tiny_dir, tiny_tokenizer, 3, True, density="exact", rollout_parity=True,
                                 multiplex_ratio=ratio,
                                 batch_kw=dict(density="exact", noise=noise, k=3, top_k=-1, top_p=0.9))


def test_kl_reference_and_entropy_bonus_match_single_process(ray_cluster, tiny_dir, tiny_tokenizer):
    """ZeRO-3 with the frozen reference model (k3 KL) and an entropy bonus, SofT-GRPO."""
    kls, _ = _compare_with_single_process(tiny_dir, tiny_tokenizer, 3, True, kl_coef=0.05, entropy_coef=0.01)
    # Before the first step the policy and the reference hold the same weights: their float32 log-probs differ
    # only by the two forwards' rounding (|d| ~ 1e-7), and the k3 estimate expm1(d) - d ~ d^2 / 2 is ~1e-14 at
    # most; after a step (lr 1e-3) it is orders of magnitude above that.
    assert 0.0 <= kls[0] < 1e-12 and min(kls[1:]) > 1e-8, kls


@pytest.mark.parametrize("zero_stage,offload", [(2, dict(offload_optimizer=True)),
                                                (3, dict(offload_optimizer=True, offload_params=True))],
                         ids=["zero2-offload-optimizer", "zero3-offload-all"])
def test_offload_matches_single_process(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage, offload):
    _compare_with_single_process(tiny_dir, tiny_tokenizer, zero_stage, True, **offload)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_gradient_checkpointing_matches_single_process(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage):
    """Recomputed activations (learner.gradient_checkpointing, non-reentrant: the soft inputs are
    detached) give the same update; under ZeRO-3 the recompute gathers the layers again."""
    _compare_with_single_process(tiny_dir, tiny_tokenizer, zero_stage, True, gradient_checkpointing=True)


def test_bf16_learner_tracks_fp32(ray_cluster, tiny_dir, tiny_tokenizer):
    """bf16 compute (DeepSpeed bf16, fp32 master weights): log-probs within bf16 precision of fp32, and
    an update moves the weights the same way as the fp32 learner (cosine of the two updates)."""
    from transformers import AutoModelForCausalLM

    from workers.learner import LearnerGroup

    path = str(tiny_dir / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    trajs, rewards, group = make_batch(model, tiny_tokenizer, True)
    cfg = LearnerConfig(world_size=2, zero_stage=2, lr=1e-3, mini_batches=1, kl_coef=0.0, micro_batch_tokens=256,
                        sync_timeout_s=120)
    adv = compute_advantages("grpo", rewards, group)
    deltas, lps = {}, {}
    for dtype in ("float32", "bfloat16"):
        learners = LearnerGroup(path, cfg, dtype=dtype)
        try:
            lps[dtype] = learners.logprobs(trajs)
            m = learners.train_mini_batch(trajs, adv, lps[dtype])
            assert m["skipped_steps"] == 0 and m["grad_norm"] > 0
            state = learners.full_state_dict()
        finally:
            learners.shutdown()
        deltas[dtype] = torch.cat([(state[n] - p.detach()).flatten() for n, p in model.named_parameters()])
    worst = max((a - b).abs().max().item() for a, b in zip(lps["float32"], lps["bfloat16"], strict=True))
    assert 0 < worst < 0.25, worst  # bf16 rounding, not garbage (log-probs are O(1-10))
    cos = torch.nn.functional.cosine_similarity(deltas["float32"], deltas["bfloat16"], dim=0).item()
    assert cos > 0.9, cos


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_embedding_gaussian_matches_single_process_and_the_rollout(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage):
    """Gaussian soft tokens (the density of the noised input, density=exact) on 2 ranks: before an update the
    learners' log-probs equal the rollout's, and two steps of two mini-batches each (the second scored at the
    rollout-time embedding after the first moved it) equal the pure-torch update. ZeRO-3 gathers the untied input
    embedding through its module for the density's rows."""
    from transformers import AutoModelForCausalLM

    from soft_rl.noise_kinds.embedding_gaussian import embedding_sigma

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "qwen2"), dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    sigma = embedding_sigma(model.get_input_embeddings().weight)
    _compare_with_single_process(tiny_dir, tiny_tokenizer, zero_stage, True, density="exact", rollout_parity=True,
                                 batch_kw=dict(density="exact", noise="embedding_gaussian", embedding_sigma=sigma, k=4,
                                               tau=0.5, top_k=8))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_off_policy_batch_matches_single_process(ray_cluster, tiny_dir, tiny_tokenizer, zero_stage):
    """Decoupled PPO on an off-policy batch (generated by another model: the behaviour policy, its rollout
    log-probs): the learners' recomputed log-probs are the proximal policy, each position weighted by
    min(exp(prox - behaviour), 2), masked outside [0.05, 20]; 2 ranks equal the single-process update over 2 steps
    of 2 mini-batches, and the weights are really in play (capped and masked positions, weights below 1)."""
    metrics = _compare_with_single_process(tiny_dir, tiny_tokenizer, zero_stage, True, density="exact",
                                           behaviour_arch="llama", is_band=(0.05, 20.0),
                                           batch_kw=dict(density="exact"))
    assert all(0 < m["is_weight_mean"] < 2 and m["is_weight_max"] <= 2.0 for m in metrics), metrics
    assert max(m["is_capped_frac"] for m in metrics) > 0 and max(m["is_masked_frac"] for m in metrics) > 0, metrics
    assert min(m["is_abs_log_w"] for m in metrics) > 0.1, metrics
