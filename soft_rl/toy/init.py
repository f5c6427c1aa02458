"""``soft-rl toy-init OUT_DIR``: data, tokenizer and a warm-started tiny Qwen2, cached by argument hash.

Writes into OUT_DIR:

    train.jsonl, test.jsonl   the problems in the ``soft_rl.data`` format (``prompt`` chat list,
                              ``answer``; plus ``solution``, the gold response used for the warm start)
    model/                    HF directory: Qwen2 weights, tokenizer, chat template (transformers + vLLM)
    toy_init.json             settings, training log summary, measured held-out accuracy, wall time
    toy_init.stamp            hash of the arguments: a second call with the same ones returns the cache

Accuracy is measured on the first ``eval_problems`` held-out problems, one sample each, with the
paper's soft-thinking settings (T 1.0, top-k = K = 5, top-p 0.95, tau_g 0.1, Gumbel noise) through
``soft_rl.reference.generate`` and the ``toy`` reward, and also with discrete sampling (same T,
top-k, top-p) for comparison. Everything is deterministic for a seed unless the wall-clock cap
(``minutes``) cuts the training short, which the report records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from soft_rl.toy import pairsum
from soft_rl.toy.model import SIZES, build_model, build_tokenizer, save_hf_dir
from soft_rl.toy.task import ToyProblem, ToyTaskConfig, make_splits
from soft_rl.toy.warmstart import WarmStartConfig, warm_start

# Bump when the task, tokenizer, model or training recipe changes: invalidates every cache.
TOY_VERSION = 2
STAMP = "toy_init.stamp"
REPORT = "toy_init.json"
SHIPPED = Path(__file__).resolve().parent / "shipped"  # model/ + toy_init.json of `toy-init --rebuild` (seed 0)
SHIPPED_SEED = 0
TASKS = ("addition", "pairsum")  # soft_rl/toy/task.py, soft_rl/toy/pairsum.py
SHIPPED_DIRS = {"addition": SHIPPED, "pairsum": SHIPPED.with_name("shipped_pairsum")}
SPLITS = {"addition": make_splits, "pairsum": pairsum.make_splits}
BUDGETS = {"addition": 64, "pairsum": 48}  # generated tokens that hold a whole response (the evaluation's budget)


@dataclass(frozen=True)
class ToyRecipe:
    task: ToyTaskConfig | pairsum.PairSumConfig
    train: WarmStartConfig
    eval_problems: int
    vocab_size: int = 320


RECIPES = {
    "tiny": ToyRecipe(task=ToyTaskConfig(min_digits=1, max_digits=2, num_train=2000, num_test=64),
                      train=WarmStartConfig(steps=60, batch_size=32, lr=1e-2, warmup=10), eval_problems=16),
    # 800 steps: converged (held-out 0.96 with a careful teacher; 270 steps stopped on the steep part of the
    # learning curve, 0.12-0.20 by processor). A teacher slipping in 30% of columns leaves random mistakes.
    "default": ToyRecipe(task=ToyTaskConfig(min_digits=2, max_digits=4, num_train=20000, num_test=500),
                         train=WarmStartConfig(steps=800, batch_size=64, lr=3e-3, warmup=50, slip=0.3),
                         eval_problems=256),
}
# The pair-sum search: 3 to 7 digits (3 to 21 pairs), three tries (pairsum.MAX_TRIES); the teacher tries pairs in a
# random order and slips on 30% of its sums (as the addition teacher does on its columns: mistakes RL can remove).
PAIRSUM_RECIPES = {
    "tiny": ToyRecipe(task=pairsum.PairSumConfig(min_numbers=3, max_numbers=4, num_train=2000, num_test=64),
                      train=WarmStartConfig(steps=60, batch_size=32, lr=1e-2, warmup=10), eval_problems=16),
    # 1600 steps: at 800 the loss was still falling (0.34 -> 0.30 over the second half) and the model solved 0.22
    # of held-out problems where its teacher solves 0.34
    "default": ToyRecipe(task=pairsum.PairSumConfig(),
                         train=WarmStartConfig(steps=1600, batch_size=64, lr=3e-3, warmup=50, slip=0.3),
                         eval_problems=256),
}


def recipe_for(task: str, size: str) -> ToyRecipe:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    recipes = RECIPES if task == "addition" else PAIRSUM_RECIPES
    if size not in recipes:
        raise ValueError(f"size must be one of {sorted(recipes)}, got {size!r}")
    return recipes[size]


def args_hash(seed: int, size: str, minutes: float, steps: int | None, threads: int = 1,
              task: str = "addition") -> str:
    blob = json.dumps({"version": TOY_VERSION, "seed": seed, "size": size, "minutes": minutes, "steps": steps,
                       "threads": threads, **({} if task == "addition" else {"task": task}),
                       "recipe": dataclasses.asdict(recipe_for(task, size)),
                       "model": dataclasses.asdict(SIZES[size])},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_jsonl(path: Path, problems: list[ToyProblem] | list[pairsum.PairSumProblem]) -> None:
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.row()) + "\n")


def corpus(problems: list[ToyProblem]) -> list[str]:
    """Text the tokenizer is trained on: the chat roles, the prompt and the response of each problem."""
    return [f"user\n{p.messages()[0]['content']}\nassistant\n{p.response()}" for p in problems]


def heldout_accuracy(model, tokenizer, problems: list[ToyProblem], mode: str, seed: int,
                     max_new_tokens: int = 64, batch_size: int = 128) -> float:
    """Fraction of ``problems`` answered correctly (``toy`` reward), one sample each, paper settings."""
    from soft_rl.data import render_prompt
    from soft_rl.evaluation import EvalSettings, generate_hf
    from soft_rl.rewards import get_reward

    settings = EvalSettings.paper(mode=mode, n=1, max_new_tokens=max_new_tokens, seed=seed)
    prompts = [render_prompt(tokenizer, p.messages()) for p in problems]
    samples = generate_hf(model, tokenizer, prompts, [f"toy:{i}" for i in range(len(problems))], settings,
                          batch_size=batch_size)
    reward = get_reward("toy")
    return sum(reward(s[0].text, p.answer) for s, p in zip(samples, problems, strict=True)) / len(problems)


def shipped_model_dir(task: str = "addition") -> Path | None:
    """The warm-started default model of ``task`` shipped with soft-rl (``soft_rl/toy/shipped/`` for addition,
    ``shipped_pairsum/``), or None."""
    d = SHIPPED_DIRS[task]
    return d if (d / "model" / "model.safetensors").is_file() else None


def _use_shipped(out: Path, seed: int, t0: float, log: Callable[[str], None], task: str = "addition") -> dict:
    """Data from the task's seed plus a copy of the shipped model: the same start on every machine."""
    shipped = SHIPPED_DIRS[task]
    digest = "shipped-" + hashlib.sha256((shipped / "model" / "model.safetensors").read_bytes()).hexdigest()[:16]
    stamp, report_path = out / STAMP, out / REPORT
    if stamp.exists() and stamp.read_text().strip() == digest and report_path.exists():
        report = {**json.loads(report_path.read_text()), "cached": True}
        log(f"[toy-init] cache hit in {out} (the shipped model): held-out accuracy soft "
            f"{report['heldout_accuracy_soft']:.3f}, discrete {report['heldout_accuracy_discrete']:.3f}")
        return report
    stamp.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    train, test = SPLITS[task](seed, recipe_for(task, "default").task)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(shipped / "model", out / "model")
    report = {**json.loads((shipped / REPORT).read_text()), "source": "shipped", "args_hash": digest,
              "model_dir": str(out / "model"), "train_file": str(out / "train.jsonl"),
              "test_file": str(out / "test.jsonl"), "wall_seconds": time.time() - t0, "cached": False}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    stamp.write_text(digest + "\n")
    log(f"[toy-init] the shipped warm-started model (built on {report.get('built_on', '?')}; held-out accuracy "
        f"soft {report['heldout_accuracy_soft']:.3f}, discrete {report['heldout_accuracy_discrete']:.3f}) "
        f"and the task data in {out}; `soft-rl toy-init --rebuild` trains it here instead")
    return report


def toy_init(out_dir: str | Path, seed: int = 0, size: str = "default", minutes: float = 20.0,
             steps: int | None = None, threads: int = 1, log: Callable[[str], None] = print,
             rebuild: bool = False, task: str = "addition") -> dict:
    """Build (or reuse) the toy task in ``out_dir``; returns the report (also saved as toy_init.json).

    The default task (seed 0, size "default", the recipe's steps) uses the model shipped in
    ``soft_rl/toy/shipped/`` unless ``rebuild``: training is bit-identical from run to run on one
    machine but not across processors, so a shipped start is what makes every user's run the same.
    ``minutes`` caps the whole call (training stops early to leave time for saving and measuring);
    ``steps`` overrides the recipe's number of training steps. ``threads`` is torch's CPU thread count
    (part of the cache key: float reductions, hence the weights, may depend on it).
    """
    recipe = recipe_for(task, size)
    t0 = time.time()
    out = Path(out_dir)
    if not rebuild and seed == SHIPPED_SEED and size == "default" and steps is None and shipped_model_dir(task):
        return _use_shipped(out, seed, t0, log, task)
    digest = args_hash(seed, size, minutes, steps, threads, task)
    stamp, report_path = out / STAMP, out / REPORT
    if stamp.exists() and stamp.read_text().strip() == digest and report_path.exists() \
            and (out / "model" / "config.json").exists():
        report = json.loads(report_path.read_text())
        report["cached"] = True
        log(f"[toy-init] cache hit in {out} (args {digest}): held-out accuracy soft "
            f"{report['heldout_accuracy_soft']:.3f}, discrete {report['heldout_accuracy_discrete']:.3f}")
        return report
    stamp.unlink(missing_ok=True)  # a half-written directory must never look cached
    out.mkdir(parents=True, exist_ok=True)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_cfg = dataclasses.replace(recipe.train, steps=steps if steps is not None else recipe.train.steps)
        train, test = SPLITS[task](seed, recipe.task)
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "test.jsonl", test)
        tokenizer = build_tokenizer(corpus(train[:5000]), vocab_size=recipe.vocab_size)
        model = build_model(tokenizer, SIZES[size], seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[toy-init] {len(train)} train / {len(test)} held-out problems, vocab {len(tokenizer)}, "
            f"Qwen2 {n_params / 1e6:.2f}M params, {train_cfg.steps} steps")
        # Keep ~25% of the budget (at least 20 s) for measuring accuracy and saving.
        budget = minutes * 60.0
        train_cfg = dataclasses.replace(train_cfg, max_seconds=max(1.0, budget - max(20.0, 0.25 * budget)
                                                                   - (time.time() - t0)))
        train_log = warm_start(model, tokenizer, train, train_cfg, seed, log=log)
        save_hf_dir(model, tokenizer, out / "model")
        t1 = time.time()
        held = test[: recipe.eval_problems]
        acc_soft = heldout_accuracy(model, tokenizer, held, "soft", seed, BUDGETS[task])
        acc_discrete = heldout_accuracy(model, tokenizer, held, "discrete", seed, BUDGETS[task])
        report = {
            "args": {"seed": seed, "size": size, "minutes": minutes, "steps": steps, "threads": threads,
                     "task": task},
            "args_hash": digest,
            "version": TOY_VERSION, "model_dir": str(out / "model"), "train_file": str(out / "train.jsonl"),
            "test_file": str(out / "test.jsonl"), "num_params": n_params, "vocab_size": len(tokenizer),
            "model_size": dataclasses.asdict(SIZES[size]), "task": dataclasses.asdict(recipe.task),
            "warm_start": {**dataclasses.asdict(train_cfg), **train_log},
            "eval_problems": len(held), "heldout_accuracy_soft": acc_soft,
            "heldout_accuracy_discrete": acc_discrete, "eval_seconds": time.time() - t1,
            "eval_settings": "T=1.0 top_k=5 top_p=0.95 K=5 tau_g=0.1 gumbel, 1 sample/problem, toy reward, "
                             f"{BUDGETS[task]} new tokens",
            "wall_seconds": time.time() - t0, "cached": False, "source": "built",
            "built_on": f"{_processor()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        }
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        stamp.write_text(digest + "\n")
        log(f"[toy-init] held-out accuracy ({len(held)} problems, paper soft settings): {acc_soft:.3f}; "
            f"discrete sampling: {acc_discrete:.3f}; wall time {report['wall_seconds']:.0f}s")
        return report
    finally:
        torch.set_num_threads(saved_threads)


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
