"""The toy task's tokenizer and model, built locally.

Tokenizer: byte-level BPE trained on the toy corpus, like ``soft_rl.tiny.build_tokenizer``, but
every digit is its own token (digit-by-digit arithmetic is much easier to learn when a number is
not split into arbitrary multi-digit pieces). ``<think>``, ``</think>`` and the ChatML markers are
single special tokens; the chat template is ``soft_rl.tiny.CHAT_TEMPLATE``, whose generation prompt
ends with ``<think>\\n``.

Model: a small Qwen2 causal LM (``SIZES``), randomly initialised with transformers' defaults. Head
dimension 32: the smallest vLLM's CPU attention supports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from soft_rl.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES = {
    "tiny": ModelSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
    "default": ModelSize(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=256),
}
MAX_POSITIONS = 512


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 320):
    """A ``PreTrainedTokenizerFast`` trained on ``corpus`` (not saved; ``save_pretrained`` it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, size: ModelSize, seed: int):
    """A random-init Qwen2ForCausalLM in float32 (untied input/output embeddings)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                      intermediate_size=size.intermediate, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype="float32")
    return Qwen2ForCausalLM(cfg)


def save_hf_dir(model, tokenizer, out_dir: str | Path) -> None:
    """Model + tokenizer + chat template; the generation config keeps only token ids (no sampling
    defaults that vLLM or transformers would silently apply)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        cfg = json.loads(gen.read_text())
        gen.write_text(json.dumps({k: v for k, v in cfg.items() if k.endswith("token_id") or k.startswith("_")}))
