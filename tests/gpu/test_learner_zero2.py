"""One DeepSpeed ZeRO-2 learner step on one device through the learner's own code (``LearnerWorker``,
no Ray: NCCL world of one on a GPU) equals the single-process pure-torch update on the CPU."""

from __future__ import annotations

from dataclasses import asdict

import torch

from soft_rl.sampling import SoftSamplingParams
from tests.gpu.gpu_report import report


def _problem(tmp_path):
    """A tiny Qwen2, 8 soft-thinking trajectories with GRPO rewards, a learner config that cuts them into several
    micro-batches, and the single-process pure-torch update of the same batch on the CPU (the reference)."""
    import copy

    from soft_rl.config import LearnerConfig
    from soft_rl.reference import generate
    from soft_rl.single_process import UpdateConfig, grpo_update
    from soft_rl.tiny import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    model = build_model(tmp_path / "m", tok, arch="qwen2", seed=4).eval()
    prompts = [tok.encode(f"{i} plus {2 * i}") for i in range(8)]
    trajs = generate(model, prompts, [SoftSamplingParams(seed=i, thinking_budget=5) for i in range(8)],
                     max_new_tokens=10, eos_token_ids=[], tokenizer=tok)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 2)
    group = torch.arange(4).repeat_interleave(2)
    cfg = LearnerConfig(world_size=1, zero_stage=2, lr=1e-3, mini_batches=1, kl_coef=0.0, adam_eps=1e-4,
                        micro_batch_tokens=64, sync_timeout_s=120)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    (ref_norm,) = grpo_update(ref_model, opt, trajs, rewards, group, UpdateConfig(mini_batches=1),
                              per_step_metrics=True)
    return model, trajs, rewards, group, cfg, ref_model, ref_norm


def test_zero2_learner_step_equals_the_single_process_update(device, tmp_path):
    model, trajs, rewards, group, cfg, ref_model, ref_norm = _problem(tmp_path)
    m, state, _ = _learner_step(str(tmp_path / "m"), asdict(cfg), "float32",
                                "gpu" if device.type == "cuda" else "cpu", trajs, rewards, group,
                                expect_device=device.type)
    worst = max((state[n] - p.detach()).abs().max().item() for n, p in ref_model.named_parameters())
    report(f"ZeRO-2 learner step on {device}: max |learner - single process| = {worst:.2e}, "
           f"grad norm {m['grad_norm']:.6f} vs {ref_norm:.6f}")
    assert m["skipped"] == 0 and abs(m["grad_norm"] - ref_norm) <= 1e-4 * ref_norm
    assert worst <= 1e-5


def _learner_step(model_dir: str, cfg: dict, dtype: str, device: str, trajs, rewards, group,
                  expect_device: str | None = None):
    """One ``LearnerWorker`` step (world size 1) on ``trajs``, cut into micro-batches by the token budget;
    returns its metrics and the full state after the step. Run in a process of its own: DeepSpeed keeps its
    process groups for the life of the process, so a second learner in the same process cannot start."""
    from soft_rl.config import LearnerConfig
    from soft_rl.learner_batch import pad_rows, split_by_token_budget
    from soft_rl.losses import aggregate_parts, compute_advantages
    from workers.learner import LearnerWorker, _free_port

    c = LearnerConfig(**cfg)
    worker = LearnerWorker(0, 1, model_dir, cfg, dtype, 0, device=device)
    try:
        worker.init("127.0.0.1", _free_port())
        if expect_device is not None:
            assert next(worker.engine.module.parameters()).device.type == expect_device
        groups = split_by_token_budget(trajs, c.micro_batch_tokens, None)
        micro = [[trajs[i] for i in g] for g in groups]
        assert len(micro) > 1  # gradient accumulation over several micro-batches
        old_flat = worker.logprobs(micro)
        adv = compute_advantages("grpo", rewards, group)
        olds, advs, k = [], [], 0
        for g in groups:
            olds.append(old_flat[k:k + len(g)])
            advs.append(adv[list(g)])
            k += len(g)
        masks = pad_rows(torch.cat([(~t.forced).float() for t in trajs]), [t.num_tokens for t in trajs])
        _, den = aggregate_parts(masks, masks, c.loss_agg, None)
        m = worker.train_mini_batch(micro, advs, olds, None, max(float(den), 1.0), None, lr=c.lr)
        dtypes = {str(p.dtype) for p in worker.engine.module.parameters()}
        return m, worker.full_state_dict(), dtypes
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_bf16_zero2_learner_step_is_finite_and_tracks_the_float32_update(device, tmp_path):
    """One bf16 ZeRO-2 step through ``LearnerWorker`` (bf16 forward and backward, float32 head and gradient
    accumulation over several micro-batches, float32 master weights) against the single-process float32 update
    on the CPU: every weight and the gradient norm finite, nothing skipped; the gradient norm within 5% (bf16's
    relative rounding 2^-9 per stored activation and gradient, compounded over about ten such stages of a
    2-layer model, with margin), and the update's direction that of float32 (cosine > 0.9: Adam's first step is
    ~ lr sign(g), so elements whose gradient is within bf16 noise of 0 may flip; most may not)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    model, trajs, rewards, group, cfg, ref_model, ref_norm = _problem(tmp_path)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        m, state, dtypes = pool.submit(_learner_step, str(tmp_path / "m"), asdict(cfg), "bfloat16",
                                       "gpu" if device.type == "cuda" else "cpu", trajs, rewards, group).result()
    assert dtypes == {"torch.bfloat16"}
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    delta = torch.cat([(state[n] - start[n]).flatten() for n in start])
    ref_delta = torch.cat([(p.detach() - start[n]).flatten() for n, p in ref_model.named_parameters()])
    cos = torch.nn.functional.cosine_similarity(delta, ref_delta, dim=0).item()
    report(f"bf16 ZeRO-2 learner step on {device}: grad norm {m['grad_norm']:.6f} vs float32 {ref_norm:.6f}, "
           f"update cosine {cos:.4f}")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert m["skipped"] == 0 and abs(m["grad_norm"] - ref_norm) <= 0.05 * ref_norm
    assert cos > 0.9
