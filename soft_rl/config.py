"""Typed run configuration: dataclasses with defaults and docs, merged with YAML and key=value overrides.

``load_config("configs/X.yaml", ["rollout.tau=0.25", ...])`` returns a validated ``Config``. Unknown
keys and wrong types fail in OmegaConf's struct mode (the error names the key); ``validate`` then
checks cross-field consistency before any actor starts. The defaults are the paper's 1.5B recipe
(docs/design/softgrpo-reference.md §3) except where a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from soft_rl.densities import DENSITIES, trainable_noises
from soft_rl.draws import MULTIPLEX_RATIOS
from soft_rl.engine_step import ENGINE_STEP_MODES
from soft_rl.losses import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS
from soft_rl.lr_schedule import LR_SCHEDULES
from soft_rl.noise_kinds import NOISES
from soft_rl.noise_kinds.embedding_gaussian import EMBEDDING_NOISE, sigma_from_rms
from soft_rl.noise_kinds.multiplex import MULTIPLEX_UNIFORM, MULTIPLEX_WEIGHTS, weighted_kind
from soft_rl.sampling import SoftSamplingParams

# the values of rollout.noise: every registered kind but the variants another key selects
ROLLOUT_NOISES = [name for name in NOISES if name != MULTIPLEX_UNIFORM.name]


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class ModelConfig:
    path: str = MISSING  # local HF directory (no hub downloads)
    dtype: str = "bfloat16"  # bfloat16 | float32 (learner compute and rollout engine)
    max_model_len: int = 12000
    # the LM head's output dtype in the engine and the learner: float32 (vLLM's setting for RL consistency)
    # or "model" (the model dtype, cheaper, less consistent in bf16)
    head_dtype: str = "float32"


@dataclass
class RolloutConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    n: int = 8  # samples per prompt (the GRPO group)
    max_new_tokens: int = 8192
    soft: bool = True  # False: discrete-token GRPO baseline
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.95
    min_p: float = 0.0
    answer_temperature: float | None = None  # None: same as the thinking phase
    answer_top_k: int | None = None
    answer_top_p: float | None = None
    answer_min_p: float | None = None
    k: int = 5  # soft slots K
    tau: float = 0.1  # Gumbel-softmax temperature tau_g
    # a soft_rl.noise_kinds kind: gumbel | dirichlet | gaussian | none | multiplex | embedding_gaussian
    noise: str = "gumbel"
    # noise=multiplex: the next input weighs the K draws by their probabilities renormalised over the draws (prob)
    # or equally (uniform: the official enable_unweighting)
    multiplex_weights: str = "prob"
    noise_scale: float = 1.0  # lambda
    noise_clamp: list[float] | None = field(default_factory=lambda: [-1.5, 3.0])
    dirichlet_alpha: float = 1.0
    # noise=embedding_gaussian: the input noise's standard deviation per coordinate, as a fraction of the RMS of
    # the policy's input embedding (0.33: "Soft Tokens, Hard Truths"); tau is the mixture's softmax temperature
    embedding_noise: float = EMBEDDING_NOISE
    think_end: str = "</think>"
    thinking_budget: int | None = None
    kv_cache_gb: int = 1  # CPU engines (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.6
    prefix_caching: str = "prompt"  # prompt (share prompt KV blocks, never generated ones) | off
    # requests an engine runs at once (vLLM's max_num_seqs; it also sizes the soft state and the sampler's
    # profiled worst case). None: ceil(data.prompts_per_step * n / num_engines), what a step sends each engine
    max_num_seqs: int | None = None
    # how the engine runs its per-step soft-thinking device work (soft_rl/engine_step.py): auto (GPU: compiled
    # and captured in CUDA graphs per row bucket; CPU: compiled) | eager | compiled | cuda_graph
    engine_step: str = "auto"
    # Evaluation during training: each one set replaces that setting in both phases (None: as in training).
    # The paper presets use the official validation settings (T 0.6, top-p 0.95, top-k 5).
    eval_temperature: float | None = None
    eval_top_p: float | None = None
    eval_top_k: int | None = None

    def engine_max_num_seqs(self, prompts_per_step: int) -> int:
        """Requests one engine runs at once: ``max_num_seqs``, else the share of a step's batch it receives."""
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        return -(-prompts_per_step * self.n // self.num_engines)

    def eval_sampling_params(self, seed: int, embedding_rms: float | None = None) -> SoftSamplingParams:
        """The held-out evaluation's sampling: the training sampler with the eval_* overrides."""
        p = self.sampling_params(seed, embedding_rms)
        for name, value in (("temperature", self.eval_temperature), ("top_p", self.eval_top_p),
                            ("top_k", self.eval_top_k)):
            if value is not None:
                setattr(p, name, value)
                setattr(p, "answer_" + name, value)
        p.validate()
        return p

    @property
    def noise_kind(self) -> str:
        """The registered noise kind (soft_rl.noise_kinds) the sampler runs: ``noise``, with the variant a
        method's own key picks (``multiplex_weights=uniform``: ``multiplex_uniform``)."""
        return weighted_kind(self.noise, self.multiplex_weights)

    @property
    def noises_input(self) -> bool:
        """Whether the soft steps' noise is on the next input (its sigma needs the policy's embedding RMS)."""
        return self.soft and NOISES[self.noise_kind].noises_input

    def sampling_params(self, seed: int, embedding_rms: float | None = None) -> SoftSamplingParams:
        """One request's sampling. ``embedding_rms``: the RMS of the policy's input embedding at the weights that
        will run the request, which sets the input noise's sigma when the kind noises the input (required then)."""
        sigma = 0.0
        if self.noises_input:
            if embedding_rms is None:
                raise ValueError(f"rollout.noise={self.noise} noises the input: its sigma needs the policy's embedding "
                                 "RMS (sampling_params(seed, embedding_rms=...))")
            sigma = sigma_from_rms(embedding_rms, self.embedding_noise)
        return SoftSamplingParams(
            soft=self.soft, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            answer_temperature=self.answer_temperature, answer_top_k=self.answer_top_k,
            answer_top_p=self.answer_top_p, answer_min_p=self.answer_min_p, k=self.k, tau=self.tau,
            noise=self.noise_kind, noise_scale=self.noise_scale,
            noise_clamp=None if self.noise_clamp is None else tuple(self.noise_clamp),
            dirichlet_alpha=self.dirichlet_alpha, embedding_sigma=sigma, think_end=self.think_end,
            thinking_budget=self.thinking_budget, seed=seed)


@dataclass
class LearnerConfig:
    world_size: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    lr: float = 1e-6
    lr_schedule: str = "constant"  # constant | cosine | linear (soft_rl/lr_schedule.py), a function of the RL step
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the decaying schedules end at min_lr_ratio * lr
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 2  # optimizer steps per RL step
    micro_batch_tokens: int = 16384  # token budget per micro-batch (bounds peak memory)
    micro_batch_seqs: int | None = None  # also at most this many sequences per micro-batch (verl's micro-batch size)
    logit_chunk_tokens: int = 2048  # positions whose full-vocabulary logits exist at once (forward and backward)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward (less memory)
    density: str = "official"  # official | exact | gumbel-max (soft_rl/densities.py DENSITIES)
    # steps of a kind scored per draw (rollout.noise=multiplex): per_draw (one clipped ratio per draw, the draws'
    # terms summed: the official Multiplex Thinking loss) | joint (one ratio per step, of the draws' joint
    # probability). Other kinds have one score per step either way.
    multiplex_ratio: str = "per_draw"
    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.001  # 0 disables the KL term and the reference model
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    sync_transport: str = "broadcast"  # broadcast (torch.distributed group: NCCL/gloo) | object_store (Ray)
    sync_bucket_mb: int = 256
    sync_timeout_s: float = 600.0
    sync_probe: bool = True  # fail when a rollout's log-probs disagree with the learners' (a bad weight sync)
    # the parity probe's policy (soft_rl/sync_probe.py ParityPolicy): the healthy mean |engine - learner| log-prob
    # gap is calibrated on the first sync_probe_calibration_steps steps (0: hard bounds only); later a gap above
    # sync_probe_jump x that level stops the run, and at any step one above the hard bounds
    sync_probe_calibration_steps: int = 3
    sync_probe_jump: float = 10.0
    sync_probe_tol: float | None = None  # hard bound, discrete positions; None: the default for the dtype
    sync_probe_tol_soft: float | None = None  # hard bound, soft positions; None: the default for the dtype


@dataclass
class RewardConfig:
    name: str = "math"  # math | math_strict (official) | math_whole | numeric | format | toy | module:function
    num_actors: int = 2
    timeout_s: float = 10.0
    # an actor that has not answered for its chunk's samples x (timeout_s + 1) + hang_s seconds is hung:
    # it is replaced and the chunk scored again (workers/reward.py)
    hang_s: float = 60.0


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    prompts_per_step: int = 64
    max_prompt_tokens: int = 1024
    on_error: str = "raise"  # raise | skip (malformed rows)
    shuffle: bool = False


@dataclass
class TrainerConfig:
    steps: int = 629
    eval_every: int = 40
    eval_n: int = 1
    save_every: int = 200
    keep_checkpoints: int = 3
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | gpu
    colocate: bool = False  # learner rank i and engine i share a placement bundle (one GPU); see workers/placement.py
    export_final: bool = False  # write the trained weights as an HF directory, <out_dir>/final_model, at the end
    # restarts allowed per actor kind over the run (workers/recovery.py); one more loss stops the run with an
    # error naming the actor and the cause
    max_restarts: dict[str, int] = field(default_factory=lambda: {"engine": 8, "reward": 8, "learner": 4})
    # SIGTERM -> checkpoint -> exit code 75 within this many seconds (Slurm's default KillWait is 30 s)
    preempt_grace_s: float = 25.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- key=value overrides, type-checked, then validated."""
    base = OmegaConf.structured(Config)
    try:
        layers = [base]
        if path is not None:
            layers.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must be key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"config key(s) {missing} must be set")
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key '{key}': {e.msg if hasattr(e, 'msg') else e}".split("\n")[0]) from e
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {why}")


def validate(cfg: Config) -> None:
    """Cross-field checks that would otherwise fail late, inside an actor."""
    r, lr, d, t = cfg.rollout, cfg.learner, cfg.data, cfg.trainer
    _check(cfg.model.dtype in ("bfloat16", "float32"), "model.dtype", "must be bfloat16 or float32")
    _check(r.noise in ROLLOUT_NOISES, "rollout.noise", f"must be one of {list(ROLLOUT_NOISES)}")
    _check(r.multiplex_weights in MULTIPLEX_WEIGHTS, "rollout.multiplex_weights",
           f"must be one of {list(MULTIPLEX_WEIGHTS)}")
    _check(r.embedding_noise > 0, "rollout.embedding_noise", "must be > 0 (the input noise's sigma / RMS of E)")
    try:
        r.sampling_params(seed=0, embedding_rms=1.0)  # any RMS: the rest of the request is what is checked
        r.eval_sampling_params(seed=0, embedding_rms=1.0)
    except ValueError as e:
        raise ConfigError(f"config key 'rollout': {e}") from e
    _check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _check(r.n >= 2, "rollout.n", "GRPO needs at least 2 samples per prompt")
    _check(r.num_engines >= 1 and r.tensor_parallel_size >= 1, "rollout.num_engines",
           "engines and tensor_parallel_size must be >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.prefix_caching in ("prompt", "off"), "rollout.prefix_caching", "must be prompt or off")
    _check(r.max_num_seqs is None or r.max_num_seqs >= 1, "rollout.max_num_seqs", "must be >= 1 or null")
    _check(r.engine_step in ENGINE_STEP_MODES, "rollout.engine_step", f"must be one of {list(ENGINE_STEP_MODES)}")
    _check(r.noise_clamp is None or len(r.noise_clamp) == 2, "rollout.noise_clamp", "must be [low, high] or null")
    _check(cfg.model.head_dtype in ("float32", "model"), "model.head_dtype", "must be float32 or model")
    _check(lr.world_size >= 1, "learner.world_size", "must be >= 1")
    _check(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage", "must be 0, 1, 2 or 3")
    _check(lr.density in DENSITIES, "learner.density", f"must be one of {list(DENSITIES)}")
    _check(not r.soft or not NOISES[r.noise].trainable or r.noise_kind in DENSITIES[lr.density].noises,
           "learner.density", f"{lr.density} scores {' and '.join(DENSITIES[lr.density].noises)} noise only, but "
           f"rollout.noise is {r.noise}")
    _check(lr.multiplex_ratio in MULTIPLEX_RATIOS, "learner.multiplex_ratio",
           f"must be one of {list(MULTIPLEX_RATIOS)}")
    _check(lr.advantage in ADVANTAGE_ESTIMATORS, "learner.advantage", f"must be one of {sorted(ADVANTAGE_ESTIMATORS)}")
    _check(lr.loss_agg in LOSS_AGGREGATIONS, "learner.loss_agg", f"must be one of {sorted(LOSS_AGGREGATIONS)}")
    _check(lr.micro_batch_seqs is None or lr.micro_batch_seqs >= 1, "learner.micro_batch_seqs", "must be >= 1 or null")
    _check(lr.logit_chunk_tokens >= 1, "learner.logit_chunk_tokens", "must be >= 1")
    _check(lr.lr > 0, "learner.lr", "must be > 0")
    _check(lr.lr_schedule in LR_SCHEDULES, "learner.lr_schedule", f"must be one of {list(LR_SCHEDULES)}")
    _check(lr.lr_warmup_steps >= 0, "learner.lr_warmup_steps", "must be >= 0")
    _check(0.0 <= lr.min_lr_ratio <= 1.0, "learner.min_lr_ratio", "must be in [0, 1]")
    _check(lr.kl_kind in ("k1", "k2", "k3", "low_var_kl"), "learner.kl_kind", "must be k1, k2 or k3")
    _check(lr.dual_clip is None or lr.dual_clip > 1, "learner.dual_clip", "must be > 1 or null")
    _check(len(lr.betas) == 2, "learner.betas", "must be [beta1, beta2]")
    _check(lr.sync_transport in ("broadcast", "object_store"), "learner.sync_transport",
           "must be broadcast or object_store")
    _check(lr.sync_bucket_mb > 0 and lr.sync_timeout_s > 0, "learner.sync_bucket_mb",
           "bucket size and sync timeout must be > 0")
    _check(lr.sync_probe_tol is None or lr.sync_probe_tol > 0, "learner.sync_probe_tol", "must be > 0 or null")
    _check(lr.sync_probe_tol_soft is None or lr.sync_probe_tol_soft > 0, "learner.sync_probe_tol_soft",
           "must be > 0 or null")
    _check(lr.sync_probe_calibration_steps >= 0, "learner.sync_probe_calibration_steps", "must be >= 0")
    _check(lr.sync_probe_jump > 1, "learner.sync_probe_jump", "must be > 1")
    _check(not (r.soft and not NOISES[r.noise].trainable), "rollout.noise",
           f"noise={r.noise} has no density: training needs one of {list(trainable_noises())} (or set "
           "rollout.soft=false)")
    batch = d.prompts_per_step * r.n
    _check(d.prompts_per_step % lr.mini_batches == 0, "learner.mini_batches",
           f"must divide data.prompts_per_step={d.prompts_per_step} (whole GRPO groups per mini-batch)")
    _check((batch // lr.mini_batches) % lr.world_size == 0, "learner.world_size",
           f"each mini-batch of {batch // lr.mini_batches} trajectories must split evenly over {lr.world_size} ranks")
    if t.colocate:
        _check(r.num_engines == lr.world_size, "trainer.colocate",
               f"pairs each learner rank with one engine: needs rollout.num_engines ({r.num_engines}) == "
               f"learner.world_size ({lr.world_size})")
        _check(r.tensor_parallel_size == 1, "trainer.colocate", "needs rollout.tensor_parallel_size=1")
    if t.device != "auto":
        validate_device(cfg, t.device)
    _check(d.on_error in ("raise", "skip"), "data.on_error", "must be raise or skip")
    _check(t.device in ("auto", "cpu", "gpu"), "trainer.device", "must be auto, cpu or gpu")
    _check(t.steps >= 0 and t.eval_every >= 0 and t.save_every >= 0, "trainer.steps", "counts must be >= 0")
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
    from soft_rl.faults import ACTOR_KINDS

    for kind, n in t.max_restarts.items():
        _check(kind in ACTOR_KINDS, f"trainer.max_restarts.{kind}", f"unknown actor kind; known: {list(ACTOR_KINDS)}")
        _check(n >= 0, f"trainer.max_restarts.{kind}", "must be >= 0")
    _check(t.preempt_grace_s > 0, "trainer.preempt_grace_s", "must be > 0")
    _check(cfg.reward.hang_s > 0, "reward.hang_s", "must be > 0")
    _check(cfg.reward.timeout_s > 0 and cfg.reward.num_actors >= 1, "reward.timeout_s",
           "timeout must be > 0 and num_actors >= 1")


def validate_device(cfg: Config, device: str) -> None:
    """Checks that depend on the device: from validate() for cpu/gpu, and again by the driver once
    trainer.device=auto is resolved against the cluster."""
    _check(not (cfg.trainer.colocate and device == "gpu" and cfg.learner.sync_transport == "broadcast"),
           "learner.sync_transport", "colocated GPU engines need object_store (NCCL cannot hold two ranks on one GPU)")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
