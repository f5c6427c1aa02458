"""One DeepSpeed ZeRO-2 learner step on one device through the learner's own code (``LearnerWorker``,
no Ray: NCCL world of one on a GPU) equals the single-process pure-torch update on the CPU."""

from __future__ import annotations

from dataclasses import asdict

import torch

from soft_rl.sampling import SoftSamplingParams
from tests.gpu.gpu_report import report


def test_zero2_learner_step_equals_the_single_process_update(device, tmp_path):
    import copy

    from soft_rl.config import LearnerConfig
    from soft_rl.learner_batch import pad_rows, split_by_token_budget
    from soft_rl.losses import aggregate_parts, compute_advantages
    from soft_rl.reference import generate
    from soft_rl.single_process import UpdateConfig, grpo_update
    from soft_rl.tiny import build_model, build_tokenizer
    from workers.learner import LearnerWorker, _free_port

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

    worker = LearnerWorker(0, 1, str(tmp_path / "m"), asdict(cfg), "float32", 0,
                           device="gpu" if device.type == "cuda" else "cpu")
    try:
        worker.init("127.0.0.1", _free_port())
        assert next(worker.engine.module.parameters()).device.type == device.type
        groups = split_by_token_budget(trajs, cfg.micro_batch_tokens, None)
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
        _, den = aggregate_parts(masks, masks, cfg.loss_agg, None)
        m = worker.train_mini_batch(micro, advs, olds, None, max(float(den), 1.0), None, lr=cfg.lr)
        state = worker.full_state_dict()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    worst = max((state[n] - p.detach()).abs().max().item() for n, p in ref_model.named_parameters())
    report(f"ZeRO-2 learner step on {device}: max |learner - single process| = {worst:.2e}, "
           f"grad norm {m['grad_norm']:.6f} vs {ref_norm:.6f}")
    assert m["skipped"] == 0 and abs(m["grad_norm"] - ref_norm) <= 1e-4 * ref_norm
    assert worst <= 1e-5
