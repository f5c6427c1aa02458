"""Supervised warm start: teacher forcing on prompt + thought + answer, loss on the response only.

The teacher may be sloppy (``WarmStartConfig.slip``): each column's sum is off by one with that
probability, afresh at every visit, so the model learns the procedure *and* a per-column slip rate: a
converged, stable starting point whose mistakes are random, the kind RL removes.

    loss = - sum_{t in response} log p(x_t | x_<t) / #response tokens        (per batch, token mean)

Examples are tokenised exactly as a rollout sees them: the rendered chat prompt (ending with
``<think>\\n``) followed by the response tokens and EOS, so the model learns to emit ``</think>`` and
EOS itself. AdamW with linear warm-up and cosine decay; a wall-clock cap stops early (recorded).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from soft_rl.data import render_prompt
from soft_rl.toy.task import ToyProblem


@dataclass(frozen=True)
class WarmStartConfig:
    steps: int = 270
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_frac: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_seconds: float | None = None  # wall-clock cap (None: none)
    slip: float = 0.0  # the teacher's per-column slip rate (ToyProblem.worked); drawn afresh at every visit


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) with labels -100 outside the response."""
    L = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), L, dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for b, (ids, p) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attn[b, : len(ids)] = 1
        labels[b, p: len(ids)] = input_ids[b, p: len(ids)]
    return input_ids, attn, labels


def response_loss(model, input_ids, attn, labels) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=-100)


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def warm_start(model, tokenizer, problems: Sequence[ToyProblem], cfg: WarmStartConfig, seed: int,
               log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place; returns {"steps", "first_loss", "final_loss" (mean of the last 20 steps),
    "seconds", "stopped_by_time"}."""
    torch.manual_seed(seed)
    rnd = random.Random(f"warm-start-{seed}")
    prompts = [render_prompt(tokenizer, p.messages()) for p in problems]

    def example(i: int) -> tuple[list[int], int]:
        """(token ids of prompt + response + EOS, prompt length); with ``cfg.slip`` the teacher's slips are
        drawn afresh at every visit."""
        ids = list(tokenizer.encode(problems[i].response(rnd, cfg.slip), add_special_tokens=False))
        return prompts[i] + ids + [tokenizer.eos_token_id], len(prompts[i])

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    order: list[int] = []
    ema = first = None
    recent: list[float] = []
    step = 0
    stopped_by_time = False
    for step in range(cfg.steps):
        if cfg.max_seconds is not None and time.time() - t0 > cfg.max_seconds:
            stopped_by_time = True
            break
        if len(order) < cfg.batch_size:
            order = list(range(len(problems)))
            rnd.shuffle(order)
        batch = [example(order.pop()) for _ in range(cfg.batch_size)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = response_loss(model, *collate(batch, tokenizer.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = loss.item()
        first = value if first is None else first
        recent = [*recent[-19:], value]
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % 100 == 0 or step == 0:
            log(f"[toy-init] step {step + 1}/{cfg.steps} loss {ema:.4f} lr {lr_at(step, cfg):.2e} "
                f"{time.time() - t0:.0f}s")
    else:
        step = cfg.steps
    model.eval()
    return {"steps": step, "first_loss": first, "final_loss": sum(recent) / len(recent) if recent else None,
            "seconds": time.time() - t0, "stopped_by_time": stopped_by_time}
