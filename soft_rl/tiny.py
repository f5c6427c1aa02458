"""Tiny models built locally (no model hub): a byte-level BPE tokenizer and random Qwen2 / Llama.

Used by the tests, the benchmarks and the embedded default. The tokenizer is trained with the
``tokenizers`` library on text we generate, with the chat and think markers as single special
tokens and a ChatML chat template, and saved as a ``PreTrainedTokenizerFast`` directory that
transformers and vLLM load.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def default_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Arithmetic-flavoured text so that numbers, operators and LaTeX boxes get merges."""
    rnd = random.Random(seed)
    words = ["let", "us", "think", "step", "by", "the", "answer", "is", "so", "add", "then", "we", "get",
             "first", "next", "carry", "sum", "total", "final", "check", "value", "plus", "minus", "times"]
    out = []
    for _ in range(n):
        a, b = rnd.randint(0, 999), rnd.randint(0, 999)
        op = rnd.choice(["+", "-", "*"])
        w = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 10)))
        out.append(f"{w} {a} {op} {b} = {eval_op(a, op, b)} \\boxed{{{eval_op(a, op, b)}}}. </answer>")
    return out


def eval_op(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: Iterable[str] | None = None):
    """Train a byte-level BPE tokenizer and save it as an HF tokenizer directory; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str | Path, tokenizer, arch: str = "qwen2", *, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, seed: int = 0,
                tie_embeddings: bool = False, max_positions: int = 2048, dtype: str = "float32"):
    """A random-init Qwen2 or Llama causal LM saved with its tokenizer; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
                  tie_word_embeddings=tie_embeddings, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype=dtype)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    # Random init with std 0.02 gives nearly uniform next-token distributions; widen the output
    # layer so that sampling, truncation and the think marker are actually exercised.
    if not tie_embeddings:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    gen = out_dir / "generation_config.json"
    if gen.exists():  # keep vLLM from picking up sampling defaults we did not choose
        cfg = json.loads(gen.read_text())
        gen.write_text(json.dumps({k: v for k, v in cfg.items() if k.endswith("token_id") or k.startswith("_")}))
    return model
