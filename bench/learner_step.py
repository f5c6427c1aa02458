"""Learner step: SofT-GRPO vs plain GRPO on the same bench model and the same tokens.

    PYTHONPATH=. .venv/bin/python bench/learner_step.py [--seqs 4] [--prompt 64] [--response 512] [--reps 3]

One learner training step = what ``workers.learner.LearnerWorker`` does for one micro-batch, in
process on a single rank without Ray or DeepSpeed: rebuild the detached mixed inputs
(``soft_rl.learner_batch.build_micro_batch``), run ``workers.learner.PolicyWithSoftHead``
(full-vocabulary log-probs at discrete positions in chunks, K logits at soft ones),
``soft_rl.lean_logprobs.head_logprobs``, the PPO surrogate (``soft_rl.losses.ppo_token_losses``,
token-mean through ``aggregate_parts``) and its backward. The optimizer update is left out: it is the
same for both variants.

Model: Qwen2 architecture, random init, fp32, 32,768-token vocabulary, ~64M parameters (hidden 512,
8 layers, 8/2 heads, MLP 2048, untied: the same shape as bench/rollout_throughput.py). No tokenizer
is needed: trajectories are synthetic tensors.

Batch: ``--seqs`` sequences (default 4, so that the whole run stays within ~5 minutes on 2 shared CPU
cores: a step takes 10-25 s) of ``--prompt`` prompt + ``--response`` response tokens, one micro-batch
(under the learner's default 16,384-token budget).
SofT-GRPO: the first half of every response is the thinking phase, soft (K = 5 distinct random ids,
y = log softmax(random logits over the K) + clamped Gumbel noise, all slots kept), the second half
discrete. GRPO: the same token sequences with every position discrete.

Time: both variants in this process, alternating (one warm-up each, then ``--reps`` timed steps
each); medians reported. Memory: each variant in a fresh child process (one step); its peak RSS
(VmHWM, reset after the build through /proc/self/clear_refs) minus its RSS after the model and the
trajectories are built. The last two lines are ``soft_vs_grpo_time`` and ``soft_vs_grpo_mem``
(SofT-GRPO / GRPO).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soft_rl.lean_logprobs import head_logprobs  # noqa: E402
from soft_rl.learner_batch import build_micro_batch, pad_rows  # noqa: E402
from soft_rl.losses import aggregate_parts, ppo_token_losses  # noqa: E402
from soft_rl.sampling import SoftSamplingParams  # noqa: E402
from soft_rl.trajectory import Trajectory  # noqa: E402
from workers.learner import PolicyWithSoftHead  # noqa: E402

VOCAB = 32768
K = 5
DENSITY = "official"
THREADS = 2


def build_policy(seed: int = 0) -> PolicyWithSoftHead:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=2048, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=VOCAB - 1, pad_token_id=0,
                      use_cache=False)
    hf = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # sharper next-token distributions than std-0.02 init (as soft_rl.tiny does)
        hf.lm_head.weight.mul_(8.0)
    return PolicyWithSoftHead(hf).train()


def synthetic_trajectories(n: int, prompt: int, response: int, seed: int = 0):
    """(SofT-GRPO, GRPO) trajectory lists over the same token sequences."""
    g = torch.Generator().manual_seed(seed)
    n_soft = response // 2
    soft_trajs, grpo_trajs = [], []
    for i in range(n):
        prompt_ids = torch.randint(0, VOCAB, (prompt,), generator=g)
        # soft steps: K distinct ids, y = log p-hat + clamped Gumbel noise, slots sorted by y (= by weight)
        ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(n_soft)])
        log_p = torch.log_softmax(2.0 * torch.randn(n_soft, K, generator=g), -1)
        u = torch.rand(n_soft, K, generator=g).clamp(1e-9, 1 - 1e-9)
        y = log_p + (-torch.log(-torch.log(u))).clamp(-1.5, 3.0)
        y, order = y.sort(-1, descending=True)
        ids = ids.gather(1, order)
        disc_tokens = torch.randint(0, VOCAB, (response - n_soft,), generator=g)
        tokens = torch.cat([ids[:, 0], disc_tokens])
        topk_ids = torch.cat([ids, disc_tokens[:, None].expand(-1, K)])
        noisy = torch.cat([y, torch.zeros(response - n_soft, K)])
        is_soft = torch.arange(response) < n_soft
        common = dict(prompt_ids=prompt_ids, tokens=tokens, logprobs=-torch.rand(response, generator=g),
                      forced=torch.zeros(response, dtype=torch.bool), kept=torch.ones(response, K, dtype=torch.bool),
                      n_think=n_soft, finish_reason="length")
        soft_trajs.append(Trajectory(topk_ids=topk_ids, noisy=noisy, is_soft=is_soft,
                                     sampling=SoftSamplingParams(k=K, top_k=K, seed=i), **common))
        grpo_trajs.append(Trajectory(topk_ids=tokens[:, None].expand(-1, K).clone(), noisy=torch.zeros(response, K),
                                     is_soft=torch.zeros(response, dtype=torch.bool),
                                     sampling=SoftSamplingParams(soft=False, k=K, top_k=K, seed=i), **common))
    adv = torch.randn(n, generator=g)
    return soft_trajs, grpo_trajs, adv


def train_step(policy: PolicyWithSoftHead, trajs, advantages: torch.Tensor) -> dict[str, float]:
    """Forward + backward of one micro-batch's policy loss, as the learner computes it; seconds per phase."""
    t0 = time.perf_counter()
    with torch.no_grad():
        mb = build_micro_batch(policy.hf.get_input_embeddings().weight.detach(), trajs, DENSITY)
    disc_scores, soft_logits = policy(mb.inputs_embeds, mb.attention_mask, mb.position_ids, mb.disc_rows,
                                      mb.soft_rows, mb.soft_ids, mb.disc_labels, mb.temperature[mb.order_full])
    flat = head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, full_vocab=mb.order_full,
                         noisy=mb.noisy,
                         temperature=mb.temperature, slots=mb.slots, density=DENSITY, noise=mb.noise)
    logp = pad_rows(flat, mb.lengths)
    old = logp.detach()  # first PPO epoch: old log-probs equal the current ones (ratio 1)
    mask = pad_rows(torch.cat([(~t.forced).float() for t in trajs]), mb.lengths)
    per_token, _ = ppo_token_losses(logp, old, advantages, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    num, den = aggregate_parts(per_token, mask, "token-mean")
    loss = num / den.clamp_min(1.0)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    policy.zero_grad(set_to_none=True)
    del disc_scores, soft_logits, flat, logp, per_token, loss
    return {"total": t2 - t0, "forward": t1 - t0, "backward": t2 - t1,
            "disc_rows": int(mb.disc_rows.numel()), "soft_rows": int(mb.soft_rows.numel())}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, args) -> None:
    """One step of one variant in this fresh process; prints a JSON line with its memory numbers."""
    torch.set_num_threads(THREADS)
    policy = build_policy()
    soft, grpo, adv = synthetic_trajectories(args.seqs, args.prompt, args.response)
    trajs = soft if variant == "soft" else grpo
    del soft, grpo
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False  # VmHWM then also covers the build (a lower bound on the step's delta is lost)
    r = train_step(policy, trajs, adv)
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "base_kb": base, "peak_kb": peak, "delta_kb": peak - base,
                      "hwm_reset": reset, "seconds": r["total"]}), flush=True)


def measure_memory(variant: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--seqs", str(args.seqs),
           "--prompt", str(args.prompt), "--response", str(args.response)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=["soft", "grpo"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return

    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    policy = build_policy()
    n_params = sum(p.numel() for p in policy.parameters())
    soft, grpo, adv = synthetic_trajectories(args.seqs, args.prompt, args.response)
    tokens = sum(t.prompt_ids.shape[0] + t.num_tokens - 1 for t in soft)
    print(f"model: Qwen2, {n_params / 1e6:.1f}M params, vocab {VOCAB}, fp32, {THREADS} threads", flush=True)
    print(f"batch: {args.seqs} x ({args.prompt} prompt + {args.response} response) tokens = {tokens} input "
          f"positions; soft: {sum(t.num_soft for t in soft)} soft + "
          f"{sum(t.num_tokens - t.num_soft for t in soft)} discrete scored positions, K={K}; "
          f"grpo: {sum(t.num_tokens for t in grpo)} discrete", flush=True)

    variants = {"soft": soft, "grpo": grpo}
    times: dict[str, list[dict]] = {v: [] for v in variants}
    for name, trajs in variants.items():  # warm-up
        r = train_step(policy, trajs, adv)
        print(f"  warm-up {name}: {r['total']:.2f}s", flush=True)
    for rep in range(args.reps):  # alternate, so that load on the shared machine hits both alike
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            r = train_step(policy, variants[name], adv)
            times[name].append(r)
            print(f"  rep {rep} {name}: total {r['total']:.2f}s (forward {r['forward']:.2f}s, "
                  f"backward {r['backward']:.2f}s; {r['disc_rows']} full-vocab rows, {r['soft_rows']} K-rows)",
                  flush=True)
    med = {v: {k: statistics.median(r[k] for r in times[v]) for k in ("total", "forward", "backward")}
           for v in variants}
    for v in variants:
        print(f"{v}: median step {med[v]['total']:.3f}s (forward {med[v]['forward']:.3f}s, "
              f"backward {med[v]['backward']:.3f}s) over {args.reps}", flush=True)
    del policy, soft, grpo, variants
    gc.collect()

    mem = {}
    for name in ("soft", "grpo"):
        mem[name] = measure_memory(name, args)
        m = mem[name]
        print(f"{name}: peak RSS delta {m['delta_kb'] / 1024:.1f} MiB (RSS after build {m['base_kb'] / 1024:.1f} "
              f"MiB, peak {m['peak_kb'] / 1024:.1f} MiB, HWM reset {m['hwm_reset']}; child step "
              f"{m['seconds']:.2f}s)", flush=True)
    print(f"total wall time {time.perf_counter() - t_start:.0f}s", flush=True)
    print(f"soft_vs_grpo_time={med['soft']['total'] / med['grpo']['total']:.3f}")
    print(f"soft_vs_grpo_mem={mem['soft']['delta_kb'] / mem['grpo']['delta_kb']:.3f}")


if __name__ == "__main__":
    main()
