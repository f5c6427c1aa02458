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
checkpoint with the driver state (step, data position); ``resume=True`` restores the newest complete
one and pushes its weights to the engines (``"auto"``: only if there is one). The rollout noise seeds
are a pure function of (seed, step, index), so N steps + resume + M steps equals N + M steps.

Faults: every phase goes through ``workers.recovery.Recovery``, which replaces a lost engine, reward
actor or learner group and redoes what was lost, so that the run stays bit-identical to one without
the fault (README, "Faults and preemption"). SIGTERM makes the run checkpoint and raise ``Preempted``
at its next safe point (``soft_rl.faults.Preemption``; the CLI exits with ``EXIT_PREEMPTED``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from soft_rl.checkpoints import usable_checkpoints
from soft_rl.config import Config, load_config, to_yaml, validate_device
from soft_rl.data import Problem, filter_overlong, load_problems, render_prompt
from soft_rl.draws import joint_logprob, per_draw_ratio
from soft_rl.evaluation import response_text, sample_seed
from soft_rl.faults import EXIT_PREEMPTED, FaultLog, Preempted, Preemption
from soft_rl.losses import compute_advantages
from soft_rl.lr_schedule import learning_rate
from soft_rl.memory_plan import candidate_width, plan_for_config, sync_reserve_mb
from soft_rl.replay import StepBatch, StepBatchStore
from soft_rl.sync_probe import LogprobGaps, ParityPolicy
from workers.calls import is_actor_loss
from workers.residency import EngineResidency
from workers.rollout import RolloutRequest
from workers.weight_sync import BroadcastChannel, WeightSyncError, sync_weights


def step_seed(seed: int, step: int, index: int) -> int:
    """The noise seed of request ``index`` at RL step ``step`` (a pure function: reproducible, resumable)."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


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


def evaluate(cfg: Config, tok, pool, rewards_pool, problems, embedding_rms: float | None = None) -> dict[str, float]:
    """pass@1 over ``problems`` x ``trainer.eval_n`` samples (seeds fixed per problem and sample); ``embedding_rms``:
    the policy's, for a kind that noises the input (``RolloutConfig.sampling_params``)."""
    r = cfg.rollout
    n = max(1, cfg.trainer.eval_n)
    requests, golds = [], []
    for i, p in enumerate(problems):
        for j in range(n):
            params = r.eval_sampling_params(sample_seed(cfg.trainer.seed, f"eval:{i}", j), embedding_rms)
            requests.append(RolloutRequest(render_prompt(tok, p.prompt), params, r.max_new_tokens))
            golds.append(p.answer)
    trajs = pool.generate(requests)
    scores = rewards_pool.score([response_text(tok, t.tokens.tolist()) for t in trajs], golds)
    return {"eval/pass@1": sum(s > 0.5 for s in scores) / len(scores),
            "eval/mean_length": sum(t.num_tokens for t in trajs) / len(trajs)}


def train(cfg: Config, log=print, resume: bool | str = False, progress: bool = True, dashboard: bool = False,
          dashboard_port: int | None = None, prometheus_port: int = 9090, on_phase=None) -> list[dict]:
    """Run (or continue) training; returns the per-step metric records. Metrics go to runs/<name>/metrics.jsonl,
    TensorBoard (tb/), Ray metrics (Prometheus) and a progress bar.

    ``resume``: False (start from step 0), True (continue from the newest complete checkpoint in
    ``trainer.out_dir``; there must be one) or ``"auto"`` (continue if there is one, else start). After SIGTERM
    the run writes a checkpoint and raises ``soft_rl.faults.Preempted`` (the CLI exits with ``EXIT_PREEMPTED``).
    ``on_phase(phase, step, actors)``, if given, is called as each phase of a step begins (tools and tests:
    the fault tests kill actors from it). Ray: see :func:`workers.cluster.init_ray` (joins RAY_ADDRESS, else
    starts a local cluster; ``dashboard`` adds the dashboard on 127.0.0.1 and a local Prometheus)."""
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
        return _train(cfg, tok, data, out, log, resume, progress, on_phase)
    finally:
        session.stop()


def _train(cfg: Config, tok, data: RunData, out: Path, log, resume, progress: bool, on_phase) -> list[dict]:
    from workers.placement import resolve_device

    device = resolve_device(cfg.trainer.device)
    validate_device(cfg, device)
    if device == "gpu":
        check_memory_plan(cfg, log)
    preemption = Preemption(cfg.trainer.preempt_grace_s).install()  # from here on SIGTERM means: save and stop
    graceful = True
    try:
        actors = start_actors(cfg, device)
        try:
            run = TrainingRun(cfg, tok, data, out, log, actors, device, preemption, progress, on_phase)
            return run.run(resume)
        except Preempted:
            graceful = False  # the node is going away: no waiting for busy engines to shut down
            raise
        finally:
            actors.shutdown(graceful)
    finally:
        preemption.uninstall()


class MemoryPlanError(ValueError):
    """A GPU of the run would run out of memory (soft_rl/memory_plan.py); the message names the keys to change."""


def gpu_memory_bytes(timeout_s: float = 120.0) -> int | None:
    """Total memory of one of the cluster's GPUs (a one-GPU Ray task reads it), None if no GPU answers in time."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory() -> int:
        return int(torch.cuda.get_device_properties(0).total_memory)

    ref = total_memory.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return ray.get(ref)


def check_memory_plan(cfg: Config, log=print) -> None:
    """``soft-rl plan`` before any actor starts: log the per-GPU memory plan, and stop with ``MemoryPlanError``
    (naming the keys to change) when a GPU would overflow."""
    gpu = gpu_memory_bytes()
    if gpu is None:
        log("[train] WARNING: no GPU answered within 120 s: the memory plan was not checked")
        return
    plan = plan_for_config(cfg, gpu)
    (Path(cfg.trainer.out_dir) / "memory_plan.txt").write_text(plan.render() + "\n")
    if msg := plan.overflow_message():
        raise MemoryPlanError(f"{msg}\n(the whole plan: {Path(cfg.trainer.out_dir) / 'memory_plan.txt'}; "
                              "`soft-rl plan --config ...` prints it without starting anything)")
    log(f"[train] memory plan for {gpu / 2**30:.0f} GiB GPUs: fits ({Path(cfg.trainer.out_dir) / 'memory_plan.txt'})")


@dataclass
class Actors:
    """The run's actors and their placement (``start_actors``); ``make_learners`` starts a learner group
    where the run's is placed (a lost rank's group is replaced by a new one: ``workers.recovery``)."""

    pool: object = None
    learners: object = None
    rewards: object = None
    layout: object = None
    make_learners: object = None

    def shutdown(self, graceful: bool = True) -> None:
        try:
            for group in (self.pool, self.learners, self.rewards):
                if group is not None:
                    if group is self.pool:
                        group.shutdown(graceful)
                    else:
                        group.shutdown()
        finally:
            if self.layout is not None:
                self.layout.remove()


def run_max_candidates(cfg: Config) -> int:
    """The widest candidate set any request of this run samples from (training and held-out evaluation): the
    engine profiles its sampler at this width instead of the whole vocabulary and refuses wider requests."""
    vocab = int(json.loads((Path(cfg.model.path) / "config.json").read_text())["vocab_size"])
    return candidate_width(cfg, vocab)


def engine_settings(cfg: Config, device: str) -> tuple[dict, dict]:
    """(keyword arguments of every rollout engine, environment of its actor) for a run on ``device``."""
    r, lc = cfg.rollout, cfg.learner
    engine_kw = dict(dtype=cfg.model.dtype, enforce_eager=device != "gpu", max_model_len=cfg.model.max_model_len,
                     max_k=r.k, max_new_tokens=r.max_new_tokens, prefix_caching=r.prefix_caching,
                     # what a step sends one engine: sizes vLLM's batch, the soft state and the profiled sampler
                     max_num_seqs=r.engine_max_num_seqs(cfg.data.prompts_per_step),
                     max_candidates=run_max_candidates(cfg), engine_step=r.engine_step,
                     # the engines report each soft step's log-prob in the learners' density: the PPO ratio's
                     # old log-probs and the parity probe compare like with like
                     density=lc.density,
                     # the run's own steps are compiled (GPU: captured) at start-up, inside vLLM's memory profiling
                     # (any embedding RMS: these size the engine's candidates, they are never generated)
                     prepare_params=[r.sampling_params(0, 1.0), r.eval_sampling_params(0, 1.0)])
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
    return engine_kw, engine_env


def start_actors(cfg: Config, device: str) -> Actors:
    """Rollout engines, learner ranks and reward actors, placed by ``workers.placement.plan_actors``
    (on GPU each engine holds its tensor-parallel GPUs and each learner rank one)."""
    from workers.learner import LearnerGroup
    from workers.placement import plan_actors
    from workers.reward import RewardPool
    from workers.rollout import RolloutPool

    r, lc = cfg.rollout, cfg.learner
    engine_kw, engine_env = engine_settings(cfg, device)
    engine_cpus, learner_cpus = (0.5, 0.5) if device == "cpu" else (1.0, 1.0)
    actors = Actors()
    try:
        actors.layout = layout = plan_actors(
            device, num_engines=r.num_engines, tensor_parallel_size=r.tensor_parallel_size, world_size=lc.world_size,
            colocate=cfg.trainer.colocate, engine_cpus=engine_cpus, learner_cpus=learner_cpus)
        actors.pool = RolloutPool(r.num_engines, cfg.model.path, {**engine_kw, **layout.engine_kwargs},
                                  tensor_parallel_size=r.tensor_parallel_size, num_cpus_per_worker=engine_cpus,
                                  env=engine_env, actor_options=layout.engine_options)

        def make_learners():
            return LearnerGroup(cfg.model.path, lc, dtype=cfg.model.dtype, seed=cfg.trainer.seed, device=device,
                                num_cpus_per_actor=learner_cpus, norm_length=r.max_new_tokens,
                                actor_options=layout.learner_options, head_dtype=cfg.model.head_dtype)

        actors.make_learners = make_learners
        actors.learners = make_learners()
        actors.rewards = RewardPool(num_actors=cfg.reward.num_actors, reward=cfg.reward.name,
                                    timeout_s=cfg.reward.timeout_s, hang_s=cfg.reward.hang_s)
    except BaseException:
        actors.shutdown()
        raise
    return actors


@dataclass
class Learned:
    """The learners' work of one step: metrics, the engine-vs-learner log-prob gaps, and its timing."""

    metrics: dict
    gaps: LogprobGaps
    old_s: float
    update_s: float


class TrainingRun:
    """One run over started actors: the step loop and its phases. Faults are handled by ``self.recovery``
    (``workers.recovery``), preemption by ``self.preemption`` (``soft_rl.faults``); the loop reads as the
    algorithm (module docstring). ``sleep_engines``: colocated GPU engines sleep while the learners work
    (freeing their GPU memory) and wake up for the weight sync."""

    def __init__(self, cfg: Config, tok, data: RunData, out: Path, log, actors: Actors, device: str,
                 preemption: Preemption, progress: bool = True, on_phase=None):
        from workers.recovery import Recovery
        from workers.telemetry import Telemetry

        self.cfg, self.tok, self.problems, self.eval_problems = cfg, tok, data.train, data.eval
        self.out, self.log, self.actors, self.device = out, log, actors, device
        self.sleep_engines = cfg.trainer.colocate and device == "gpu"
        self.on_phase = on_phase or (lambda phase, step, actors: None)
        self.ckpt_root = out / "checkpoints"
        self.done, self.pos = 0, 0  # learner updates done (= steps completed); data position after them
        self.pending: dict | None = None  # the record of a step whose eval a preemption cut short
        self.saved_step: int | None = None  # newest checkpoint's step
        self.checkpoint_s = 0.0  # how long the last checkpoint took
        self.history: list[dict] = []
        self.channel = None
        self._open_channel()
        # Parity check of every sync, at no extra cost: the learners rescore each rollout anyway (the old
        # log-probs), and an engine holding other weights than the learners shows up as a mean |engine -
        # learner| log-prob difference far above the run's own healthy level, calibrated on its first steps
        # (soft_rl/sync_probe.py). It runs before the batch is used.
        lc = cfg.learner
        self.parity = ParityPolicy.for_run(cfg.model.dtype, lc.sync_probe_tol, lc.sync_probe_tol_soft,
                                           lc.sync_probe_calibration_steps, lc.sync_probe_jump)
        self.batches = StepBatchStore(out / "replay")
        self.preemption = preemption
        self.faults = FaultLog(dict(cfg.trainer.max_restarts), log)
        self.residency = EngineResidency(actors, enabled=self.sleep_engines)
        self.recovery = Recovery(actors, self.faults, preemption, make_learners=actors.make_learners,
                                 replay=self._replay, ckpt_root=self.ckpt_root, sync_one=self._sync_one,
                                 sync_all=self.sync_engines, residency=self.residency,
                                 on_learners_replaced=self._open_channel, log=log)
        self.telemetry = Telemetry(out, progress_total=cfg.trainer.steps, progress=progress)

    # ------------------------------------------------------------------ the run

    def run(self, resume) -> list[dict]:
        te = self.cfg.trainer
        try:
            self.start(resume)
            for step in range(self.done, te.steps):
                self.step(step)
            if te.export_final:
                final = str((self.out / "final_model").resolve())
                self.recovery.retry("export", lambda: self.actors.learners.export_hf(final, self.cfg.model.path),
                                    learners_at=self.done, uses=("learner",))
                self.log(f"[train] final weights: {final}")
        except Preempted:
            self.save_for_preemption()
            raise
        finally:
            self.telemetry.close()
        return self.history

    def load_newest_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that is complete (``soft_rl.checkpoints``) and loads; one whose files are all
        there but do not load (corrupt content) is skipped with a warning naming it, as an incomplete one is,
        and the learner group is started anew before the next (a load that failed on some ranks can leave the
        others half-loaded or waiting in a collective)."""
        for ckpt in usable_checkpoints(self.ckpt_root, self.log):
            try:
                return ckpt, self.actors.learners.load_checkpoint(str(ckpt))
            except Exception as e:  # noqa: BLE001 - any load failure: the next older checkpoint is tried
                if is_actor_loss(e):
                    raise
                self.log(f"[train] WARNING: skipping checkpoint {ckpt}: it does not load: {str(e).splitlines()[0]}")
                self.actors.learners.shutdown()
                self.actors.learners = self.actors.make_learners()
                self._open_channel()
        return None

    def start(self, resume) -> None:
        loaded = self.load_newest_checkpoint() if resume else None
        if resume is True and loaded is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        if loaded is not None:
            latest, client = loaded
            self.done = self.saved_step = int(client["step"])
            self.pos, self.pending = int(client["data_pos"]), client.get("pending_record")
            self.recovery.own_checkpoints.add(latest.name)
            self.recovery.retry("sync", self.sync_engines, learners_at=self.done, uses=("learner", "engine"))
            self.log(f"[train] resumed from {latest} at step {self.done}")
        elif resume == "auto":
            self.log(f"[train] --resume auto: no checkpoint under {self.ckpt_root}, starting at step 0")
        self.batches.drop_after(self.done)
        self.batches.prune(through=self.done)
        te = self.cfg.trainer
        if self.pending is not None:  # preempted during this step's eval: finish the step's record
            rec, self.pending = self.pending, None
            self.finish_step(rec)
        elif self.eval_problems and te.eval_every and self.done == 0:
            self.record({"step": 0, **self.evaluate()})
            self.log(f"[train] eval before training: pass@1={self.history[-1]['eval/pass@1']:.3f}")

    def step(self, step: int) -> None:
        """RL step ``step + 1``: rollout, rewards, update, weight sync, then eval / checkpoint / record."""
        cfg, r = self.cfg, self.cfg.rollout
        self.recovery.step = step + 1
        t0 = time.perf_counter()
        problems = [self.problems[(self.pos + i) % len(self.problems)] for i in range(cfg.data.prompts_per_step)]
        rms = self.embedding_rms()
        requests = [RolloutRequest(render_prompt(self.tok, p.prompt),
                                   r.sampling_params(step_seed(cfg.trainer.seed, step, i * r.n + j), rms),
                                   r.max_new_tokens)
                    for i, p in enumerate(problems) for j in range(r.n)]
        self.on_phase("rollout", step + 1, self.actors)
        trajs = self.recovery.generate(requests)
        self.residency.sleep()  # colocated GPU engines hand the GPU to the learners (otherwise nothing)
        t_roll = time.perf_counter()
        self.on_phase("reward", step + 1, self.actors)
        texts = [response_text(self.tok, t.tokens.tolist()) for t in trajs]
        golds = [p.answer for p in problems for _ in range(r.n)]
        batch = StepBatch(trajs, torch.tensor(self.recovery.score(texts, golds), dtype=torch.float32), len(problems))
        t_rew = time.perf_counter()
        self.batches.save(step + 1, batch)  # a rebuilt learner group replays this step from it
        self.on_phase("update", step + 1, self.actors)
        learned = self.recovery.retry("update", lambda: self.learn(step, batch), learners_at=step, uses=("learner",))
        self.done, self.pos = step + 1, self.pos + len(problems)
        t_upd = time.perf_counter()
        self.on_phase("sync", step + 1, self.actors)
        sync = self.recovery.retry("sync", self.sync_engines, learners_at=step + 1, uses=("learner", "engine"))
        t_end = time.perf_counter()
        n_tok = sum(t.num_tokens for t in trajs)
        rewards = batch.rewards
        self.finish_step({
            "step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
            "reward/failures": self.actors.rewards.failures(), "rollout/tokens": n_tok,
            "rollout/soft_frac": sum(t.num_soft for t in trajs) / max(n_tok, 1),
            "rollout/think_len": sum(t.n_think for t in trajs) / len(trajs),
            **learned.gaps.metrics(),
            "time/rollout": t_roll - t0, "time/reward": t_rew - t_roll, "time/old_logprobs": learned.old_s,
            "time/update": learned.update_s, "time/sync": t_end - t_upd, "time/step": t_end - t0,
            "tokens_per_s": n_tok / max(t_roll - t0, 1e-9),
            **{f"learner/{k}": v for k, v in learned.metrics.items()}, **sync,
        })

    def finish_step(self, rec: dict) -> None:
        """Eval and checkpoint when due, then the step's record (with its faults) to every sink."""
        te, step = self.cfg.trainer, rec["step"]
        if self.eval_problems and te.eval_every and step % te.eval_every == 0 and "eval/pass@1" not in rec:
            self.pending = rec  # a preemption during the eval saves it, and the resumed run finishes it
            self.on_phase("eval", step, self.actors)
            t_ev = time.perf_counter()
            rec.update(self.evaluate())
            rec["time/eval"] = time.perf_counter() - t_ev
            self.pending = None
        if te.save_every and step % te.save_every == 0:
            self.on_phase("checkpoint", step, self.actors)
            rec["time/checkpoint"] = self.checkpoint()
        rec.update(self.faults.step_metrics())
        self.record(rec)
        self.log(f"[train] step {step}/{te.steps} reward={rec['reward/mean']:.3f} "
                 f"soft_frac={rec['rollout/soft_frac']:.2f} step_s={rec.get('time/step', 0.0):.1f}"
                 + (f" eval_pass@1={rec['eval/pass@1']:.3f}" if "eval/pass@1" in rec else "")
                 + (f" faults={len(rec['faults/events'])}" if "faults/events" in rec else ""))
        if len([h for h in self.history if h["step"] > 0]) == 1:  # every actor has worked by now
            self.log(f"[train] actors by node: {json.dumps(actor_placement())}")
            (self.out / "placement.json").write_text(json.dumps(
                {"engines": self.actors.pool.placement(), "learners": self.actors.learners.placement()}, indent=1))
        self.preemption.check()  # SIGTERM during the learners' work: stop here, this step saved

    # ------------------------------------------------------------------ the phases

    def learn(self, step: int, batch: StepBatch, check_parity: bool = True) -> Learned:
        """The learners' part of step ``step + 1``: old (and reference) log-probs, the parity probe, and the PPO
        epochs over the mini-batches. A pure function of the learners' state and ``batch`` (so replayable; a
        replay skips the parity probe, which judged this batch when it first ran)."""
        lc, learners, trajs = self.cfg.learner, self.actors.learners, batch.trajs
        t0 = time.perf_counter()
        adv = compute_advantages(lc.advantage, batch.rewards, batch.group)
        old = learners.logprobs(trajs, per_draw=per_draw_ratio(lc.multiplex_ratio))
        ref = learners.logprobs(trajs, "ref") if lc.kl_coef else None
        gaps = LogprobGaps.measure([joint_logprob(lp) for lp in old], trajs)
        if lc.sync_probe and check_parity:
            self.check_parity(step + 1, gaps)
        t_old = time.perf_counter()
        metrics: dict = {}
        lr = learning_rate(lc.lr, step, self.cfg.trainer.steps, schedule=lc.lr_schedule,
                           warmup_steps=lc.lr_warmup_steps, min_lr_ratio=lc.min_lr_ratio)
        for _ in range(lc.ppo_epochs):
            for idx in torch.arange(len(trajs)).chunk(lc.mini_batches):
                ii = idx.tolist()
                metrics = learners.train_mini_batch([trajs[i] for i in ii], adv[idx], [old[i] for i in ii],
                                                    None if ref is None else [ref[i] for i in ii], lr=lr)
        metrics["lr"] = lr
        return Learned(metrics, gaps, t_old - t0, time.perf_counter() - t_old)

    def check_parity(self, step: int, gaps: LogprobGaps) -> None:
        """Stop the run (``WeightSyncError``) when step ``step``'s engine-vs-learner gaps say the engines do not
        hold the learners' weights; log the parity policy once its calibration is done."""
        was_calibrated = self.parity.calibrated
        if bad := self.parity.check(step, gaps):
            raise WeightSyncError(
                f"step {step}: the rollout engines' log-probs differ from the learners' at {bad}: the engines do "
                "not hold the learners' weights (a failed or partial weight sync, or a model/dtype mismatch)")
        if self.parity.calibrated and not was_calibrated:
            self.log(f"[train] {self.parity.describe()}")

    def _replay(self, step: int) -> None:
        self.learn(step - 1, self.batches.load(step), check_parity=False)

    def sync_engines(self) -> dict[str, float]:
        lc = self.cfg.learner
        self.residency.wake()  # colocated: the learners hand their cached GPU memory back, the engines wake
        return sync_weights(self.actors.learners, self.actors.pool, bucket_mb=lc.sync_bucket_mb,
                            timeout_s=lc.sync_timeout_s, channel=self.channel)

    def _sync_one(self, i: int) -> None:
        """A restarted engine gets the learners' weights (and the broadcast group is opened anew next sync)."""
        from workers.recovery import sync_one_engine

        if self.channel is not None and self.channel.open:
            self.channel.close()
        lc = self.cfg.learner
        sync_one_engine(self.actors.learners, self.actors.pool, i, lc.sync_bucket_mb, lc.sync_timeout_s)

    def _open_channel(self) -> None:
        lc = self.cfg.learner
        if self.channel is not None and self.channel.open:
            self.channel.close()
        if lc.sync_transport == "broadcast":
            self.channel = BroadcastChannel(self.actors.learners, self.actors.pool, bucket_mb=lc.sync_bucket_mb,
                                            timeout_s=lc.sync_timeout_s, device=self.device)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.cfg, self.tok, self.recovery, self.recovery, self.eval_problems, self.embedding_rms())

    def embedding_rms(self) -> float | None:
        """The policy's input-embedding RMS now, when the run's kind noises the input (it sets the requests' sigma;
        the engines hold the same weights), else None."""
        if not self.cfg.rollout.noises_input:
            return None
        return self.recovery.retry("embedding_rms", lambda: self.actors.learners.embedding_rms(), learners_at=self.done,
                                   uses=("learner",))

    def checkpoint(self) -> float:
        """Write a checkpoint of the learners' state (``self.done`` updates) with the driver's; returns seconds."""
        t0 = time.perf_counter()
        te, done = self.cfg.trainer, self.done
        client = {"data_pos": self.pos, **({"pending_record": self.pending} if self.pending else {})}
        self.recovery.retry("checkpoint", lambda: self.actors.learners.save_checkpoint(
            str(self.ckpt_root), done, client, keep=te.keep_checkpoints), learners_at=done, uses=("learner",))
        self.saved_step = done
        self.recovery.own_checkpoints.add(f"step-{done:08d}")
        self.batches.prune(through=done)
        self.checkpoint_s = time.perf_counter() - t0
        return self.checkpoint_s

    def save_for_preemption(self) -> None:
        """After SIGTERM: a checkpoint of the last consistent state (the learners never stop mid-update), unless
        the newest checkpoint already is that state or the grace period would run out while writing it."""
        left = self.preemption.time_left()
        if self.saved_step == self.done and self.pending is None:
            self.log(f"[train] preempted: the newest checkpoint (step {self.done}) holds the run's state; exiting")
        elif left < 1.5 * self.checkpoint_s + 1.0:
            self.log(f"[train] WARNING: preempted with {left:.0f}s of trainer.preempt_grace_s left, less than a "
                     f"checkpoint takes ({self.checkpoint_s:.0f}s): exiting without one; --resume continues from "
                     f"step {self.saved_step or 0}")
        else:
            try:
                self.checkpoint()
                self.log(f"[train] preempted: checkpoint of step {self.done} written "
                         f"({self.checkpoint_s:.1f}s); `--resume auto` continues the run")
            except Exception as e:  # noqa: BLE001 - the learners may be going down with the cluster
                self.log(f"[train] WARNING: preempted, and the checkpoint of step {self.done} failed ({e}); "
                         f"--resume continues from step {self.saved_step or 0}")

    def record(self, rec: dict) -> None:
        self.history.append(rec)
        self.telemetry.log(rec["step"], rec)


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


def main(config: str | None, overrides: list[str], resume: bool | str = False, dashboard: bool = False,
         dashboard_port: int | None = None, prometheus_port: int = 9090) -> int:
    """``soft-rl train``; returns the exit code: 0, or ``EXIT_PREEMPTED`` after a SIGTERM was handled."""
    cfg = load_config(config, overrides)
    print(json.dumps(asdict(cfg.trainer)))
    try:
        train(cfg, resume=resume, dashboard=dashboard, dashboard_port=dashboard_port, prometheus_port=prometheus_port)
    except Preempted:
        print(f"[train] preempted: exit code {EXIT_PREEMPTED}", flush=True)
        return EXIT_PREEMPTED
    return 0
