"""``soft-rl eval``: n samples per problem, scored, one JSON report per dataset.

    problems  = soft_rl.data.load_problems(file)                        (chat prompt + gold answer)
    prompts   = the tokenizer's chat template with the generation prompt
    samples   = n per problem, sample j seeded by (seed, file, row, j)   (backend vllm: RolloutPool;
                                                                         backend hf: soft_rl.reference)
    rewards   = RewardPool (Ray actors), or one TimeoutScorer child process with reward_actors=0
    report    = soft_rl.evaluation.dataset_report -> OUT/<dataset>.json

Generation is clamped to the model's context: ``max_new_tokens`` becomes
``min(max_new_tokens, max_position_embeddings - longest prompt)`` (recorded in the report).

``EvalRun`` defaults to float32 weights and the ``math`` reward (last box, math-verify); ``soft-rl eval
--preset paper`` switches to the official standalone evaluation's bfloat16 and ``math_whole`` (math-verify
over the whole completion) unless ``--dtype`` / ``--reward`` are given (``resolve_eval_defaults``). The
report records both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from soft_rl.data import load_problems, render_prompt
from soft_rl.evaluation import (
    EvalSettings,
    Sample,
    checkpoint_embedding_rms,
    dataset_report,
    generate_hf,
    sample_requests,
    to_sample,
)


@dataclass
class EvalRun:
    model: str
    data: Sequence[str]
    settings: EvalSettings
    backend: str = "vllm"  # vllm | hf
    out: str = "runs/eval"
    reward: str = "math"  # soft-rl eval --preset paper: math_whole
    reward_actors: int = 2  # 0: score in one local child process (no Ray)
    reward_timeout_s: float = 10.0
    batch_size: int = 64  # samples per generation call (progress granularity; hf: the batch)
    num_engines: int = 1
    tensor_parallel_size: int = 1  # GPUs per engine (on a GPU cluster each engine holds its own)
    dtype: str = "float32"  # float32 | bfloat16 (soft-rl eval --preset paper: bfloat16)
    enforce_eager: bool | None = None  # vLLM: None = eager on CPU, graphs on GPU
    limit: int | None = None  # first N problems of each file
    on_error: str = "raise"  # malformed rows: raise | skip


def _context_limit(model_dir: str) -> int | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("max_position_embeddings")


class _HFGenerator:
    def __init__(self, run: EvalRun, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[run.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the reference generation runs on the model's device
        self.model = AutoModelForCausalLM.from_pretrained(run.model, dtype=dtype).to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = run.batch_size

    def __call__(self, prompts, keys, settings, progress) -> list[list[Sample]]:
        return generate_hf(self.model, self.tokenizer, prompts, keys, settings, batch_size=self.batch_size,
                           progress=progress)

    def close(self) -> None:
        pass


class _VLLMGenerator:
    """The rollout pool (``workers.rollout.RolloutPool``): one soft-thinking vLLM engine per actor, placed as the
    training run places its engines (``workers.placement.plan_actors``): on a GPU cluster each engine holds its
    ``tensor_parallel_size`` GPUs in one placement group, so two engines never share a GPU."""

    def __init__(self, run: EvalRun, tokenizer, max_new_tokens: int, max_model_len: int | None):
        from workers.placement import plan_actors, resolve_device
        from workers.rollout import RolloutPool

        _ensure_ray()
        device = resolve_device("auto")
        engine_kwargs = {"dtype": run.dtype, "max_k": run.settings.k, "max_new_tokens": max_new_tokens}
        if max_model_len is not None:
            engine_kwargs["max_model_len"] = max_model_len
        if run.enforce_eager is not None:
            engine_kwargs["enforce_eager"] = run.enforce_eager
        else:  # auto: CUDA graphs / compilation only pay off on a GPU
            engine_kwargs["enforce_eager"] = device != "gpu"
        self.layout = plan_actors(device, num_engines=run.num_engines, tensor_parallel_size=run.tensor_parallel_size,
                                  world_size=0, colocate=False, engine_cpus=1.0,
                                  learner_cpus=0.0)
        try:
            self.pool = RolloutPool(num_workers=run.num_engines, model_dir=run.model,
                                    engine_kwargs={**engine_kwargs, **self.layout.engine_kwargs},
                                    tensor_parallel_size=run.tensor_parallel_size,
                                    num_cpus_per_worker=1.0,
                                    actor_options=self.layout.engine_options)
        except BaseException:
            self.layout.remove()
            raise
        self.tokenizer = tokenizer
        self.batch_size = run.batch_size * run.num_engines

    def __call__(self, prompts, keys, settings, progress) -> list[list[Sample]]:
        from workers.rollout import RolloutRequest

        requests = sample_requests(keys, settings)
        out: list[list[Sample | None]] = [[None] * settings.n for _ in prompts]
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start: start + self.batch_size]
            trajs = self.pool.generate([RolloutRequest(list(prompts[i]), p, settings.max_new_tokens)
                                        for i, _, p in chunk])
            for (i, j, _), traj in zip(chunk, trajs, strict=True):
                out[i][j] = to_sample(self.tokenizer, traj)
            progress(len(chunk))
        return out  # type: ignore[return-value]

    def close(self) -> None:
        try:
            self.pool.shutdown()
        finally:
            self.layout.remove()


class _Scorer:
    """RewardPool (Ray actors) or, with 0 actors, one ``TimeoutScorer`` child of this process."""

    def __init__(self, run: EvalRun):
        from workers.reward import RewardPool, TimeoutScorer

        if run.reward_actors > 0:
            _ensure_ray()
            self.impl = RewardPool(num_actors=run.reward_actors, reward=run.reward, timeout_s=run.reward_timeout_s)
        else:
            self.impl = TimeoutScorer(run.reward, timeout_s=run.reward_timeout_s)

    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        return self.impl.score(responses, golds)

    def failures(self) -> int:
        return self.impl.failures()

    def close(self) -> None:
        if hasattr(self.impl, "shutdown"):
            self.impl.shutdown()
        else:
            self.impl.close()


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def _report_names(files: Sequence[str]) -> list[str]:
    """One JSON name per file: its stem, with a counter when two files share a stem."""
    names: list[str] = []
    for f in files:
        stem = Path(f).stem if Path(f).is_file() else Path(f).name
        name, i = stem, 1
        while name in names:
            i += 1
            name = f"{stem}-{i}"
        names.append(name)
    return names


def run_eval(run: EvalRun) -> dict[str, dict]:
    """Evaluate ``run.model`` on every file of ``run.data``; returns {dataset name: report}."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    t_start = time.time()
    settings = run.settings
    if run.backend not in ("vllm", "hf"):
        raise ValueError(f"backend must be 'vllm' or 'hf', got {run.backend!r}")
    if run.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {run.dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    datasets = []
    for f in run.data:
        loaded = load_problems(f, on_error=run.on_error)
        problems = loaded.problems[: run.limit] if run.limit is not None else loaded.problems
        if not problems:
            raise ValueError(f"{f}: no problems to evaluate")
        prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
        datasets.append((f, problems, prompts, loaded.skipped))
    longest = max(len(p) for _, _, prompts, _ in datasets for p in prompts)
    context = _context_limit(run.model)
    max_new = settings.max_new_tokens
    if context is not None:
        if longest >= context:
            raise ValueError(f"a prompt of {longest} tokens does not fit the model's context of {context}")
        max_new = min(max_new, context - longest)
    if settings.needs_embedding_rms and settings.embedding_rms is None:  # the input noise's sigma: from the model
        settings = EvalSettings(**{**settings.as_dict(), "embedding_rms": checkpoint_embedding_rms(run.model)})
    gen_settings = EvalSettings(**{**settings.as_dict(), "max_new_tokens": max_new})

    out_dir = Path(run.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = _HFGenerator(run, tokenizer) if run.backend == "hf" else _VLLMGenerator(run, tokenizer, max_new,
                                                                                        context)
    scorer = _Scorer(run)
    results: dict[str, dict] = {}
    try:
        for name, (f, problems, prompts, skipped) in zip(_report_names(run.data), datasets, strict=True):
            t0 = time.time()
            keys = [f"{Path(p.file).name}:{p.row}" for p in problems]
            with tqdm(total=len(problems) * settings.n, desc=f"eval {name}", unit="sample") as bar:
                samples = generator(prompts, keys, gen_settings, bar.update)
            t_gen = time.time() - t0
            failures_before = scorer.failures()
            flat = [s.text for ss in samples for s in ss]
            golds = [p.answer for p in problems for _ in range(settings.n)]
            scores = scorer.score(flat, golds)
            rewards = [scores[i * settings.n: (i + 1) * settings.n] for i in range(len(problems))]
            report = {
                "dataset": name, "file": str(f), "model": run.model, "backend": run.backend,
                "reward": run.reward, "dtype": run.dtype, "settings": settings.as_dict(),
                "max_new_tokens_used": max_new, "skipped_rows": skipped,
                **dataset_report(samples, rewards, [p.answer for p in problems], [p.row for p in problems]),
                "reward_failures": scorer.failures() - failures_before,
                "generation_seconds": t_gen, "seconds": time.time() - t0,
            }
            path = out_dir / f"{name}.json"
            path.write_text(json.dumps(report, indent=1) + "\n")
            results[name] = report
            ks = list(report["pass_at_k"])
            print(f"[eval] {name}: {report['num_problems']} problems x {settings.n} ({settings.mode}) "
                  f"pass@1={report['pass@1']:.4f} pass@{ks[-1]}={report['pass_at_k'][ks[-1]]:.4f} "
                  f"first-k pass@{ks[-1]}={report['first_k_pass_at_k'][ks[-1]]:.4f} "
                  f"mean len={report['mean_length']:.1f} -> {path}", flush=True)
    finally:
        scorer.close()
        generator.close()
    print(f"[eval] done in {time.time() - t_start:.0f}s", flush=True)
    return results
