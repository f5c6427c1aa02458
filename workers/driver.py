"""The SofT-GRPO driver: rollout pool -> reward pool -> GRPO advantages -> learners -> weight sync.

    soft-rl train --config configs/tiny_cpu.yaml data.train_files=[.cache/toy/train.jsonl] key=value ...

One RL step, as the algorithm reads:

    prompts   <- the next data.prompts_per_step problems (in file order; the position is driver state)
    requests  <- each prompt rollout.n times, each with its own noise seed = f(seed, step, index)
    trajs     <- RolloutPool.generate(requests)                         (soft thinking in vLLM)
    rewards   <- RewardPool.score(decoded responses, gold answers)
    A         <- GRPO advantages per prompt group
    old       <- learners' log-probs before the update (never the rollout's)
    for each PPO epoch, each mini-batch: learners.train_mini_batch(...)
    sync_weights(learners, pool)          (parity: the next rollout is rescored by the learners)
    metrics   -> runs/<name>/metrics.jsonl

Every ``trainer.eval_every`` steps (and before the first) the held-out ``data.eval_files`` are
sampled ``trainer.eval_n`` times per problem with the rollout's own sampler and fixed per-problem
seeds, and pass@1 is logged. Every ``trainer.save_every`` steps the learners write an atomic
checkpoint with the driver state (step, data position); ``resume=True`` restores the newest one
and pushes its weights to the engines. The rollout noise seeds are a pure function of
(seed, step, index), so N steps + resume + M steps equals N + M steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from soft_rl.config import Config, load_config, to_yaml, validate_device
from soft_rl.data import Problem, filter_overlong, load_problems, render_prompt
from soft_rl.evaluation import response_text, sample_seed
from soft_rl.losses import compute_advantages
from soft_rl.lr_schedule import learning_rate
from soft_rl.sync_probe import LogprobGaps, default_tolerances


def step_seed(seed: int, step: int, index: int) -> int:
    """The noise seed of request ``index`` at RL step ``step`` (a pure function: reproducible, resumable)."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob("step-*"))
    return found[-1] if found else None


@dataclass
class RunData:
    train: list[Problem]
    eval: list[Problem]
    counts: dict[str, int]  # rows loaded, malformed rows skipped, prompts over data.max_prompt_tokens dropped


def load_run_data(cfg: Config, tok, log=print) -> RunData:
    """Training and held-out problems, with prompts longer than ``data.max_prompt_tokens`` (chat template
    included) dropped and counted, as verl's ``filter_overlong_prompts`` does."""
    d = cfg.data
    if not d.train_files:
        raise ValueError("config key 'data.train_files': at least one training file is needed")
    counts: dict[str, int] = {}
    kept: dict[str, list[Problem]] = {}
    for split, files in (("train", d.train_files), ("eval", d.eval_files)):
        reports = [load_problems(f, on_error=d.on_error) for f in files]
        loaded = [p for rep in reports for p in rep.problems]
        kept[split], dropped = filter_overlong(loaded, tok, d.max_prompt_tokens)
        counts.update({f"{split}/rows": len(loaded), f"{split}/skipped_malformed": sum(r.skipped for r in reports),
                       f"{split}/dropped_overlong": dropped})
        if dropped:
            log(f"[train] data: dropped {dropped} of {len(loaded)} {split} prompts longer than "
                f"data.max_prompt_tokens={d.max_prompt_tokens}")
    if not kept["train"]:
        raise ValueError(f"config key 'data.max_prompt_tokens': all {counts['train/rows']} training prompts are "
                         f"longer than {d.max_prompt_tokens} tokens")
    return RunData(kept["train"], kept["eval"], counts)


def evaluate(cfg: Config, tok, pool, rewards_pool, problems, RolloutRequest) -> dict[str, float]:
    """pass@1 over ``problems`` x ``trainer.eval_n`` samples (seeds fixed per problem and sample)."""
    r = cfg.rollout
    n = max(1, cfg.trainer.eval_n)
    requests, golds = [], []
    for i, p in enumerate(problems):
        for j in range(n):
            params = r.eval_sampling_params(sample_seed(cfg.trainer.seed, f"eval:{i}", j))
            requests.append(RolloutRequest(render_prompt(tok, p.prompt), params, r.max_new_tokens))
            golds.append(p.answer)
    trajs = pool.generate(requests)
    scores = rewards_pool.score([response_text(tok, t.tokens.tolist()) for t in trajs], golds)
    return {"eval/pass@1": sum(s > 0.5 for s in scores) / len(scores),
            "eval/mean_length": sum(t.num_tokens for t in trajs) / len(trajs)}


def train(cfg: Config, log=print, resume: bool = False, progress: bool = True, dashboard: bool = False,
          dashboard_port: int | None = None, prometheus_port: int = 9090) -> list[dict]:
    """Run (or with ``resume``, continue) training; returns the per-step metric records. Metrics go to
    runs/<name>/metrics.jsonl, TensorBoard (tb/), Ray metrics (Prometheus) and a progress bar.

    Ray: see :func:`workers.cluster.init_ray` (joins RAY_ADDRESS, else starts a local cluster; ``dashboard``
    adds the dashboard on 127.0.0.1 and a local Prometheus, stopped again when the run ends or fails)."""
    from transformers import AutoTokenizer

    from workers.cluster import init_ray

    out = Path(cfg.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    data = load_run_data(cfg, tok, log)
    (out / "data.json").write_text(json.dumps(data.counts, indent=1))
    session = init_ray(dashboard, dashboard_port=dashboard_port, prometheus_port=prometheus_port, log=log)
    try:
        return _train(cfg, tok, data.train, data.eval, out, log, resume, progress)
    finally:
        session.stop()


def _train(cfg: Config, tok, problems, eval_problems, out: Path, log, resume: bool, progress: bool) -> list[dict]:
    from workers.placement import resolve_device

    device = resolve_device(cfg.trainer.device)
    validate_device(cfg, device)
    actors = start_actors(cfg, device)
    try:
        return _run(cfg, tok, problems, eval_problems, out, log, resume, progress, actors.pool, actors.learners,
                    actors.rewards, sleep_engines=cfg.trainer.colocate and device == "gpu", device=device)
    finally:
        actors.shutdown()


@dataclass
class Actors:
    """The run's actors and their placement (``start_actors``)."""

    pool: object = None
    learners: object = None
    rewards: object = None
    layout: object = None

    def shutdown(self) -> None:
        try:
            for group in (self.pool, self.learners, self.rewards):
                if group is not None:
                    group.shutdown()
        finally:
            if self.layout is not None:
                self.layout.remove()


NCCL_BUFFERS_MB = 256  # NCCL's own buffers for one broadcast communicator (channels x NCCL_BUFFSIZE, with margin)


def sync_reserve_mb(lc) -> int:
    """GPU memory an engine keeps out of its KV cache for weight syncs, which allocate after start-up:
    a received bucket and the loader's copy of it, plus NCCL's buffers for the broadcast transport."""
    return 2 * lc.sync_bucket_mb + (NCCL_BUFFERS_MB if lc.sync_transport == "broadcast" else 0)


def start_actors(cfg: Config, device: str) -> Actors:
    """Rollout engines, learner ranks and reward actors, placed by ``workers.placement.plan_actors``
    (on GPU each engine holds its tensor-parallel GPUs and each learner rank one)."""
    from workers.learner import LearnerGroup
    from workers.placement import plan_actors
    from workers.reward import RewardPool
    from workers.rollout import RolloutPool

    r, lc = cfg.rollout, cfg.learner
    engine_kw = dict(dtype=cfg.model.dtype, enforce_eager=device != "gpu", max_model_len=cfg.model.max_model_len,
                     max_k=r.k, max_new_tokens=r.max_new_tokens, prefix_caching=r.prefix_caching)
    if cfg.model.head_dtype == "float32":  # vLLM's documented setting for RL consistency (a no-op in float32)
        engine_kw["hf_overrides"] = {"head_dtype": "float32"}
    engine_env = {}
    if device == "gpu":
        engine_kw["gpu_memory_utilization"] = r.gpu_memory_utilization
        engine_kw["sync_reserve_mb"] = sync_reserve_mb(lc)
        if cfg.trainer.colocate:
            engine_kw["enable_sleep_mode"] = True
    else:
        engine_env["VLLM_CPU_KVCACHE_SPACE"] = str(r.kv_cache_gb)
    engine_cpus, learner_cpus = (0.5, 0.5) if device == "cpu" else (1.0, 1.0)
    actors = Actors()
    try:
        actors.layout = layout = plan_actors(
            device, num_engines=r.num_engines, tensor_parallel_size=r.tensor_parallel_size, world_size=lc.world_size,
            colocate=cfg.trainer.colocate, engine_cpus=engine_cpus, learner_cpus=learner_cpus)
        actors.pool = RolloutPool(r.num_engines, cfg.model.path, {**engine_kw, **layout.engine_kwargs},
                                  tensor_parallel_size=r.tensor_parallel_size, num_cpus_per_worker=engine_cpus,
                                  env=engine_env, actor_options=layout.engine_options)
        actors.learners = LearnerGroup(cfg.model.path, lc, dtype=cfg.model.dtype, seed=cfg.trainer.seed,
                                       device=device, num_cpus_per_actor=learner_cpus, norm_length=r.max_new_tokens,
                                       actor_options=layout.learner_options, head_dtype=cfg.model.head_dtype)
        actors.rewards = RewardPool(num_actors=cfg.reward.num_actors, reward=cfg.reward.name,
                                    timeout_s=cfg.reward.timeout_s)
    except BaseException:
        actors.shutdown()
        raise
    return actors


def _run(cfg: Config, tok, problems, eval_problems, out: Path, log, resume: bool, progress: bool, pool, learners,
         rewards_pool, sleep_engines: bool, device: str) -> list[dict]:
    """The training loop over started actors. ``sleep_engines``: colocated GPU engines sleep while the
    learners work (freeing their GPU memory) and wake up for the weight sync."""
    from workers.rollout import RolloutRequest
    from workers.weight_sync import BroadcastChannel, WeightSyncError, sync_weights

    r, lc = cfg.rollout, cfg.learner
    channel = None
    if lc.sync_transport == "broadcast":
        channel = BroadcastChannel(learners, pool, bucket_mb=lc.sync_bucket_mb, timeout_s=lc.sync_timeout_s,
                                   device=device)

    # Parity check of every sync, at no extra cost: the learners rescore each rollout anyway (the old
    # log-probs), and an engine holding other weights than the learners shows up as a mean |engine -
    # learner| log-prob difference far above rounding. It runs before the batch is used.
    probe_tol = default_tolerances(cfg.model.dtype, lc.sync_probe_tol, lc.sync_probe_tol_soft)

    def sync_engines() -> dict[str, float]:
        if sleep_engines:  # colocated: the learners hand their cached GPU memory back before the engines wake
            learners.release_memory()
            pool.wake_up()
        return sync_weights(learners, pool, bucket_mb=lc.sync_bucket_mb, timeout_s=lc.sync_timeout_s, channel=channel)

    history: list[dict] = []
    start, pos = 0, 0
    ckpt_root = out / "checkpoints"

    from workers.telemetry import Telemetry

    telemetry = Telemetry(out, progress_total=cfg.trainer.steps, progress=progress)

    def record(rec: dict) -> None:
        history.append(rec)
        telemetry.log(rec["step"], rec)

    try:
        if resume:
            latest = latest_checkpoint(ckpt_root)
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root}")
            client = learners.load_checkpoint(str(latest))
            start, pos = int(client["step"]), int(client["data_pos"])
            sync_engines()
            log(f"[train] resumed from {latest} at step {start}")
        te = cfg.trainer
        if eval_problems and te.eval_every and start == 0:
            record({"step": 0, **evaluate(cfg, tok, pool, rewards_pool, eval_problems, RolloutRequest)})
            log(f"[train] eval before training: pass@1={history[-1]['eval/pass@1']:.3f}")
        for step in range(start, cfg.trainer.steps):
            t0 = time.perf_counter()
            batch = [problems[(pos + i) % len(problems)] for i in range(cfg.data.prompts_per_step)]
            pos += len(batch)
            requests = [RolloutRequest(render_prompt(tok, p.prompt), r.sampling_params(step_seed(cfg.trainer.seed,
                                                                                                  step, i * r.n + j)),
                                       r.max_new_tokens)
                        for i, p in enumerate(batch) for j in range(r.n)]
            trajs = pool.generate(requests)
            if sleep_engines:
                pool.sleep()
            t_roll = time.perf_counter()
            texts = [response_text(tok, t.tokens.tolist()) for t in trajs]
            golds = [p.answer for p in batch for _ in range(r.n)]
            rewards = torch.tensor(rewards_pool.score(texts, golds), dtype=torch.float32)
            t_rew = time.perf_counter()
            group = torch.arange(len(batch)).repeat_interleave(r.n)
            adv = compute_advantages(lc.advantage, rewards, group)
            old = learners.logprobs(trajs)
            ref = learners.logprobs(trajs, "ref") if lc.kl_coef else None
            gaps = LogprobGaps.measure(old, trajs)
            if lc.sync_probe and (bad := gaps.violation(*probe_tol)):
                raise WeightSyncError(
                    f"step {step + 1}: the rollout engines' log-probs differ from the learners' at {bad}: the "
                    "engines do not hold the learners' weights (a failed or partial weight sync, or a model/dtype "
                    "mismatch)")
            t_old = time.perf_counter()
            metrics: dict = {}
            lr = learning_rate(lc.lr, step, cfg.trainer.steps, schedule=lc.lr_schedule,
                               warmup_steps=lc.lr_warmup_steps, min_lr_ratio=lc.min_lr_ratio)
            for _ in range(lc.ppo_epochs):
                for idx in torch.arange(len(trajs)).chunk(lc.mini_batches):
                    ii = idx.tolist()
                    metrics = learners.train_mini_batch([trajs[i] for i in ii], adv[idx], [old[i] for i in ii],
                                                        None if ref is None else [ref[i] for i in ii], lr=lr)
            metrics["lr"] = lr
            t_upd = time.perf_counter()
            sync = sync_engines()
            t_end = time.perf_counter()
            n_tok = sum(t.num_tokens for t in trajs)
            rec = {
                "step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                "reward/failures": rewards_pool.failures(), "rollout/tokens": n_tok,
                "rollout/soft_frac": sum(t.num_soft for t in trajs) / max(n_tok, 1),
                "rollout/think_len": sum(t.n_think for t in trajs) / len(trajs),
                **gaps.metrics(),
                "time/rollout": t_roll - t0, "time/reward": t_rew - t_roll, "time/old_logprobs": t_old - t_rew,
                "time/update": t_upd - t_old, "time/sync": t_end - t_upd, "time/step": t_end - t0,
                "tokens_per_s": n_tok / max(t_roll - t0, 1e-9),
                **{f"learner/{k}": v for k, v in metrics.items()}, **sync,
            }
            if eval_problems and te.eval_every and (step + 1) % te.eval_every == 0:
                t_ev = time.perf_counter()
                rec.update(evaluate(cfg, tok, pool, rewards_pool, eval_problems, RolloutRequest))
                rec["time/eval"] = time.perf_counter() - t_ev
            if te.save_every and (step + 1) % te.save_every == 0:
                t_ck = time.perf_counter()
                learners.save_checkpoint(str(ckpt_root), step + 1, {"data_pos": pos}, keep=te.keep_checkpoints)
                rec["time/checkpoint"] = time.perf_counter() - t_ck
            record(rec)
            log(f"[train] step {step + 1}/{cfg.trainer.steps} reward={rec['reward/mean']:.3f} "
                f"soft_frac={rec['rollout/soft_frac']:.2f} step_s={rec['time/step']:.1f}"
                + (f" eval_pass@1={rec['eval/pass@1']:.3f}" if "eval/pass@1" in rec else ""))
            if step == start:  # every actor has worked by now
                log(f"[train] actors by node: {json.dumps(actor_placement())}")
                (out / "placement.json").write_text(json.dumps(
                    {"engines": pool.placement(), "learners": learners.placement()}, indent=1))
        if cfg.trainer.export_final:
            learners.export_hf(str((out / "final_model").resolve()), cfg.model.path)
            log(f"[train] final weights: {out / 'final_model'}")
    finally:
        telemetry.close()
    return history


def actor_placement() -> dict:
    """``{node id: {"ip", "labels", "actors": [{"class", "pid"}]}}`` for this job's live actors (from the GCS,
    so it works without the dashboard); {} when it cannot be read. Shows which node runs what."""
    try:
        import ray

        job = ray.get_runtime_context().get_job_id()
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        out: dict = {}
        for a in ray._private.state.actors().values():
            if a.get("State") != "ALIVE" or a.get("JobID") != job:
                continue
            nid = a["Address"]["NodeID"]
            node = out.setdefault(nid, {"ip": nodes.get(nid, {}).get("NodeManagerAddress"),
                                        "labels": {k: v for k, v in nodes.get(nid, {}).get("Labels", {}).items()
                                                   if not k.startswith("ray.io/")}, "actors": []})
            node["actors"].append({"class": a["ActorClassName"], "pid": a["Pid"]})
        return out
    except Exception:  # pragma: no cover - best effort, never stops a run
        return {}


def main(config: str | None, overrides: list[str], resume: bool = False, dashboard: bool = False,
         dashboard_port: int | None = None, prometheus_port: int = 9090) -> int:
    cfg = load_config(config, overrides)
    print(json.dumps(asdict(cfg.trainer)))
    train(cfg, resume=resume, dashboard=dashboard, dashboard_port=dashboard_port, prometheus_port=prometheus_port)
    return 0
