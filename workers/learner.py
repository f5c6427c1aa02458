"""DeepSpeed ZeRO learner actors: one data-parallel group computing the SofT-GRPO / GRPO update.

``LearnerGroup`` (driver side) owns N ``LearnerWorker`` Ray actors. Rank 0 picks its address and a
free port; all ranks join one torch.distributed group (gloo on CPU, NCCL on GPU) and wrap the policy
in a DeepSpeed engine (ZeRO stage 0-3, optional CPU offload, bf16 or fp32).

Exactness across ranks and micro-batches: the group computes each mini-batch's global loss
denominator (tokens or sequences, depending on the aggregation) and every micro-batch contributes
numerator / global denominator, times the world size to undo DeepSpeed's gradient averaging. So N
ranks x M micro-batches give the same update as one process on the whole mini-batch. Every rank
runs the same number of forwards (empty slots run a zero-weight dummy), because ZeRO-3 forwards
and ZeRO-2/3 backwards are collectives.

Forward: the detached soft inputs are rebuilt from the stored values with the embedding matrix
(under ZeRO-3 only that matrix is gathered); the head computes full-vocabulary logits at discrete
positions and only K logits (hidden . W[ids]) at soft positions.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta

import torch

try:
    import ray
except ModuleNotFoundError:  # LearnerWorker itself runs without Ray (tests/gpu on a machine without it)
    ray = None

from soft_rl.config import LearnerConfig
from soft_rl.draws import draw_mask, pad_draws, per_draw_ratio, split_draws
from soft_rl.lean_logprobs import head_logprobs, token_scores
from soft_rl.learner_batch import MicroBatch, build_micro_batch, pad_rows, split_by_token_budget
from soft_rl.losses import (
    BEHAVIOUR_METRICS,
    PER_MICRO_BATCH_AGGREGATIONS,
    aggregate_parts,
    behaviour_metrics,
    behaviour_weights,
    kl_penalty,
    ppo_draw_losses,
    ppo_token_losses,
)
from soft_rl.lr_schedule import set_learning_rate
from soft_rl.memory_plan import grads_accumulate_in_fp32
from soft_rl.noise_kinds import noise_kind
from soft_rl.noise_kinds.embedding_gaussian import embedding_rms
from soft_rl.trajectory import Trajectory
from workers.calls import get_all


def _noises_input(trajs: Sequence[Trajectory]) -> bool:
    """Whether any of these trajectories was drawn with a kind that noises the input (``NoiseKind.noises_input``)."""
    return any(noise_kind(t.sampling.noise).noises_input for t in trajs)


class PolicyWithSoftHead(torch.nn.Module):
    """An HF causal LM whose forward returns (logits at discrete positions, K logits at soft positions).

    Soft logits read K rows of the output matrix directly (hidden . W[ids]); under ZeRO-3 that matrix
    is registered as an external parameter of this wrapper, so DeepSpeed keeps it gathered for the
    whole forward and routes its gradient.
    """

    def __init__(self, hf_model, head_fp32: bool = True, logit_chunk_tokens: int = 2048, entropy_grad: bool = True):
        super().__init__()
        self.hf = hf_model
        self.head_fp32 = head_fp32  # logits in float32 whatever the model dtype (model.head_dtype)
        self.logit_chunk_tokens = logit_chunk_tokens  # full-vocabulary logits alive at a time: chunk x V
        # whether the loss differentiates the discrete positions' entropy (learner.entropy_coef != 0); without,
        # the entropy is a metric and the head's backward skips its vocabulary-sized gradient work
        self.entropy_grad = entropy_grad

    def backbone(self):
        return getattr(self.hf, self.hf.base_model_prefix)

    def forward(self, inputs_embeds, attention_mask, position_ids, disc_rows, soft_rows, soft_ids,
                disc_tokens, disc_temperature, input_noise_ids=None):
        """(log-probs of the labels [Nd, J] and entropies [Nd] of the positions scored through the full vocabulary,
        as one [Nd, J + 1] tensor, and logits [Ns, K] at the lean soft positions' stored ids). One tensor per kind:
        ZeRO-3 records a backward hook per output tensor that
        receives a gradient, and its module trace must not depend on whether the loss uses the entropy. With
        ``entropy_grad`` off the entropy row is non-differentiable, but the stacked tensor still receives the
        log-probs' gradient: the same outputs and trace either way.
        ``input_noise_ids`` [Ng, K] (micro-batches holding a kind that noises the input; possibly empty): a third
        output, the input embedding's rows at those ids [Ng, K, H] (differentiable), through the embedding module's
        own forward, so ZeRO-3 gathers and releases it as it does for a token input. Whether it is passed is a fact
        of the run (every trajectory's kind), so a run's module trace does not change between micro-batches."""
        h = self.backbone()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
        flat = h.reshape(-1, h.shape[-1])
        head = self.hf.get_output_embeddings()
        up = self.head_fp32 and flat.dtype != torch.float32
        hs, ws = flat[soft_rows], head.weight[soft_ids]  # K gathered rows per position: cheap to upcast
        if up:
            hs, ws = hs.float(), ws.float()
        soft_logits = torch.einsum("nh,nkh->nk", hs, ws)
        if head.bias is not None:
            soft_logits = soft_logits + head.bias[soft_ids].to(soft_logits.dtype)
        disc = token_scores(flat[disc_rows], head.weight, head.bias, disc_tokens, disc_temperature,
                            chunk_tokens=self.logit_chunk_tokens, upcast=self.head_fp32, entropy_grad=self.entropy_grad)
        lp, ent = disc
        scores = torch.cat([lp if lp.dim() == 2 else lp[:, None], ent[:, None]], -1)
        if input_noise_ids is None:
            return scores, soft_logits
        rows = self.hf.get_input_embeddings()(input_noise_ids.reshape(-1)).view(*input_noise_ids.shape, -1)
        return scores, soft_logits, rows


class _NonFiniteStepGuard:
    """Mixin for a torch optimizer: skip (and count) a step whose gradients are not finite on any rank.

    DeepSpeed calls the client optimizer's step on its (flattened, partitioned) fp32 parameters after
    clipping (under ZeRO-3 once per sub-group, on every rank alike); a non-finite global norm leaves
    non-finite gradients there, which we detect collectively so that every rank skips together.
    """

    skipped = 0

    def _all_ranks_finite(self) -> bool:
        # one flag for all ranks; NCCL reduces only CUDA tensors (the gradients may be on the host: offload)
        dist = torch.distributed.is_initialized()
        on_gpu = dist and torch.distributed.get_backend() == "nccl"
        finite = torch.ones(1, device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    # a sum is finite iff every term is (short of overflowing float32, > 3e38: no usable
                    # gradient either), without isfinite's [numel] bool temporary; no host sync per tensor
                    finite.mul_(torch.isfinite(p.grad.sum()).to(finite.device))
        if dist:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return finite.item() >= 1

    def step(self, closure=None):
        if not self._all_ranks_finite():
            self.skipped += 1
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return None
        return super().step(closure)


class GuardedAdamW(_NonFiniteStepGuard, torch.optim.AdamW):
    """torch AdamW with the collective non-finite-step guard: the learner's optimizer on the CPU and on the
    GPU (the exactness tests compare it with a single-process torch update)."""


@functools.cache
def guarded_cpu_adam_class() -> type:
    """DeepSpeed's vectorised CPU Adam in AdamW mode (decoupled weight decay, as ``torch.optim.AdamW``) with the
    collective non-finite-step guard: the optimizer of GPU runs whose optimizer state is offloaded to the host
    (``learner.offload_optimizer``), where torch's AdamW would step the model's fp32 master copy at a few
    seconds per step at 7B. Its C++ op is JIT-built on first use (g++ and ninja, cached in
    TORCH_EXTENSIONS_DIR). A class built on demand: ``deepspeed`` is imported only inside the learner."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class GuardedCPUAdam(_NonFiniteStepGuard, DeepSpeedCPUAdam):
        def __init__(self, params, *, lr, betas, eps, weight_decay):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True,
                             bias_correction=True)

    return GuardedCPUAdam


def make_optimizer(params, cfg: LearnerConfig, device: str) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed steps: DeepSpeed's CPU Adam for an offloaded optimizer on a GPU run, torch
    AdamW otherwise (CPU-only runs keep torch's update, which the exactness tests reproduce)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if device == "gpu" and cfg.offload_optimizer and cfg.zero_stage > 0:
        return guarded_cpu_adam_class()(params, **kw)
    return GuardedAdamW(params, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


EXPORT_SHARD_BYTES = 2 << 30  # safetensors shard size of an HF export: the host memory rank 0 holds while writing


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty(0, dtype=dtype).element_size()


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers a state dict holds (non-persistent ones, e.g. rotary tables, are not)."""
    out = []
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def plan_shards(tensors: Sequence[tuple[str, Sequence[int], torch.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names of at most ``max_shard_bytes`` each (a larger tensor alone)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def deepspeed_config(cfg: LearnerConfig, dtype: str) -> dict:
    """The DeepSpeed config of a learner rank.

    Gradient accumulation over a mini-batch's micro-batches (DeepSpeed 0.19.8; ``grad_accum_dtype`` unset
    means the model dtype): in bf16 ZeRO-2 adds each micro-batch's reduced gradient into bf16 partition
    buffers (``all_grad_tensors``; offloaded: ``accumulated_grads_in_cpu``) and ZeRO-3 into a bf16
    ``grad_partitions_flat_buffer``, so 16-32 micro-batches lose up to log2(M) bits of an 8-bit mantissa.
    With ``grad_accum_dtype: fp32`` ZeRO-2 accumulates into a float32 partition buffer (its "compact"
    buffer, offloaded or not) and ZeRO-3 into a float32 flat buffer: each micro-batch's gradient is still
    computed and reduced in bf16, the sum is float32. Set for bf16 at stages 2 and 3 only: at stage 1 it
    selects DeepSpeed's BF16_Optimizer, which with ``managed_gradient_accumulation: false`` reported twice
    the gradient norm of the other paths on the same batch (checked on the CPU, world size 1), and stage 0
    (plain data parallel) rejects it; there gradients accumulate in the bf16 ``param.grad``.
    """
    zero: dict = {"stage": cfg.zero_stage, "overlap_comm": False}
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params and cfg.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary: variable micro-batch counts
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # CPU runs step torch AdamW on offloaded state (make_optimizer)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if grads_accumulate_in_fp32(cfg.zero_stage, dtype):
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


class LearnerWorker:
    """One data-parallel rank (a Ray actor; see ``LearnerGroup``)."""

    def __init__(self, rank: int, world_size: int, model_path: str, cfg: dict, dtype: str = "float32",
                 seed: int = 0, device: str = "cpu", head_dtype: str = "float32"):
        self.rank, self.world_size = rank, world_size
        self.head_fp32 = head_dtype == "float32"
        self.model_path, self.cfg, self.dtype, self.seed = model_path, LearnerConfig(**cfg), dtype, seed
        self.device = device
        self.backend = "nccl" if device == "gpu" else "gloo"  # the DP group's and the weight broadcast's
        self.engine = None
        self.ref = None
        # the input embedding at the weights the rollout ran with, taken when a step's old log-probs are computed,
        # for trajectories of a kind that noises the input: their inputs, and the density's observations, are
        # rebuilt from it in every forward of the step (a gathered [V, H] copy on each rank while such runs train)
        self._observed_embedding: torch.Tensor | None = None
        self._bucket_refs: dict[tuple[int, int], list] = {}  # object-store sync: (sync, bucket) -> [ref, readers left]
        self.buckets_packed = 0

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def init(self, addr: str, port: int) -> int:
        """Join the data-parallel group and load the policy (and reference) model; returns the number of
        parameter elements this rank held right after loading (ZeRO-3: its partition only)."""
        # DeepSpeed JIT-builds its C++ ops with the first `ninja` on PATH; a different one (venv vs system)
        # invalidates the build cache and costs a full rebuild, so always use this interpreter's.
        venv_bin = os.path.dirname(sys.executable)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != venv_bin:
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        import deepspeed

        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(self.world_size))
        deepspeed.init_distributed(dist_backend=self.backend, rank=self.rank, world_size=self.world_size,
                                   verbose=False, timeout=timedelta(seconds=self.cfg.sync_timeout_s))
        torch.manual_seed(self.seed)
        c = self.cfg
        ds_config = deepspeed_config(c, self.dtype)
        if c.zero_stage == 3:
            # transformers builds the model inside deepspeed.zero.Init while this object lives: each rank
            # allocates only its partition and the checkpoint is copied in tensor by tensor, so no rank
            # ever holds the whole model (in bf16 runs the fp32 master starts from the bf16 weights).
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_loading = HfDeepSpeedConfig(ds_config)
        hf = self._load_hf()
        loaded = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in hf.parameters())
        if c.gradient_checkpointing:  # non-reentrant: the soft inputs are detached embeddings
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = PolicyWithSoftHead(hf, self.head_fp32, c.logit_chunk_tokens, entropy_grad=bool(c.entropy_coef))
        opt = make_optimizer(self.policy.parameters(), c, self.device)
        self.optimizer = opt
        self.engine, *_ = deepspeed.initialize(model=self.policy, optimizer=opt, config=ds_config)
        self._register_head(self.engine.module)
        self.compute_dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        if c.kl_coef:
            ref = PolicyWithSoftHead(self._load_hf(), self.head_fp32, c.logit_chunk_tokens, entropy_grad=False).eval()
            ref.requires_grad_(False)
            if c.zero_stage == 3:
                ref_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                           "bf16": {"enabled": self.dtype == "bfloat16"}, "steps_per_print": 1 << 30}
                self.ref, *_ = deepspeed.initialize(model=ref, config=ref_cfg)
                self._register_head(self.ref.module)
            else:  # on the learner's device (it stayed on the host before: audit item 10)
                self.ref = ref.to(device=self._device(), dtype=self.compute_dtype)
        return loaded

    def _load_hf(self):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        hf.config.use_cache = False
        return hf

    def _register_head(self, module: PolicyWithSoftHead) -> None:
        import deepspeed

        w = module.hf.get_output_embeddings().weight
        if hasattr(w, "ds_id"):  # ZeRO-3: the soft head reads W outside the LM head's own forward
            deepspeed.zero.register_external_parameter(module, w)

    # ------------------------------------------------------------------ forward

    @contextmanager
    def _whole_embedding(self, module=None):
        """The input embedding matrix (of ``module``, default the policy's), detached and whole while the context
        lasts: under ZeRO-3 a gather of that matrix only (a collective: every rank enters it)."""
        import deepspeed

        if module is None:
            module = self.engine.module if hasattr(self.engine, "module") else self.engine
        emb = module.hf.get_input_embeddings().weight
        with torch.no_grad(), deepspeed.zero.GatheredParameters([emb], enabled=hasattr(emb, "ds_id")):
            yield emb.detach()

    def _micro_batch(self, module, trajs: Sequence[Trajectory]) -> MicroBatch:
        """Rebuild the detached soft inputs; under ZeRO-3 gather only the embedding matrix."""
        if _noises_input(trajs):
            if self._observed_embedding is None:
                raise RuntimeError("trajectories of a kind that noises the input need the rollout-time embedding: "
                                   "compute the step's old log-probs (logprobs(..., 'policy')) before training on them")
            return build_micro_batch(self._observed_embedding, trajs, self.cfg.density)
        with self._whole_embedding(module) as emb:
            return build_micro_batch(emb, trajs, self.cfg.density)

    def embedding_rms(self) -> float:
        """RMS of the policy's input embedding now (``soft_rl.noise_kinds.embedding_gaussian.embedding_rms``): what
        sets the input noise's sigma of the requests the next rollout sends (a collective under ZeRO-3)."""
        with self._whole_embedding() as emb:
            return embedding_rms(emb)

    def _snapshot_embedding(self, micro_batches: list[list[Trajectory]]) -> None:
        """Keep the input embedding as it is now (the rollout's weights: old log-probs are computed before the
        step's first update), when the step holds a kind that noises the input; drop it otherwise."""
        if not any(_noises_input(trajs) for trajs in micro_batches):
            self._observed_embedding = None
            return
        with self._whole_embedding() as emb:
            self._observed_embedding = emb.clone()

    def _forward(self, engine, trajs: Sequence[Trajectory], with_entropy: bool = False, entropy_grad: bool = False,
                 per_draw: bool = False):
        """Per-position log-probs (flat, trajectory after trajectory) of a non-empty micro-batch, and the
        trajectory lengths; with ``with_entropy`` the log-probs are a (log-probs, entropies) pair; with
        ``per_draw`` they are per-draw, [N, J] (``soft_rl.draws``)."""
        module = engine.module if hasattr(engine, "module") else engine
        mb = self._micro_batch(module, trajs)
        noised = None if mb.input_noise_rows is None else mb.soft_ids[mb.input_noise_rows]
        disc_scores, soft_logits, *rows = engine(mb.inputs_embeds.to(self.compute_dtype), mb.attention_mask,
                                                 mb.position_ids, mb.disc_rows, mb.soft_rows, mb.soft_ids,
                                                 mb.disc_labels, mb.temperature[mb.order_full], noised)
        return head_logprobs(disc_scores, soft_logits, is_soft=mb.order_is_soft, full_vocab=mb.order_full,
                             noisy=mb.noisy, temperature=mb.temperature, slots=mb.slots, density=self.cfg.density,
                             noise=mb.noise, with_entropy=with_entropy, entropy_grad=entropy_grad,
                             per_draw=per_draw, embedding=mb.embedding_observation(rows[0] if rows else None)), \
            mb.lengths

    def _filler_forward(self, engine, micro_batches: list[list[Trajectory]]) -> torch.Tensor:
        """A zero-weight forward for a rank with fewer micro-batches than the others.

        ZeRO-3 forwards (parameter gathers, and its cross-rank check of the recorded module trace)
        and ZeRO-2/3 backwards are collectives, so every rank runs the same number. The filler reruns
        this rank's first trajectory, so its module trace is that of a real micro-batch.
        """
        real = [mb for mb in micro_batches if mb]
        if not real:
            raise RuntimeError("a learner rank received no trajectories; send at least world_size trajectories")
        flat, _ = self._forward(engine, real[0][:1])
        return 0.0 * flat.sum()

    @torch.no_grad()
    def logprobs(self, micro_batches: list[list[Trajectory]], which: str = "policy",
                 per_draw: bool = False) -> list[torch.Tensor]:
        """Log-probs of every trajectory, [R] each (with ``per_draw`` [R, J]: ``soft_rl.draws``), with the current
        policy or the frozen reference."""
        engine = self.engine if which == "policy" else self.ref
        if engine is None:
            raise RuntimeError("no reference model: it exists only when learner.kl_coef > 0")
        if which == "policy":
            self._snapshot_embedding(micro_batches)
        engine.eval() if hasattr(engine, "eval") else None
        out: list[torch.Tensor] = []
        for trajs in micro_batches:
            if not trajs:
                self._filler_forward(engine, micro_batches)
                continue
            flat, lengths = self._forward(engine, trajs, per_draw=per_draw)
            out += [x.cpu() for x in (split_draws(flat, trajs) if per_draw else flat.split(lengths))]
        return out

    def train_mini_batch(self, micro_batches: list[list[Trajectory]], advantages: list[torch.Tensor],
                         old: list[list[torch.Tensor]], ref: list[list[torch.Tensor]] | None,
                         denominator: float, norm_length: int | None, lr: float | None = None,
                         behaviour: list[list[torch.Tensor]] | None = None, is_cap: float = 2.0,
                         is_band: tuple[float, float] | None = None) -> dict[str, float]:
        """Accumulate every micro-batch's share of the global loss, then one optimizer step (at ``lr``, the
        schedule's rate for this RL step, when given). ``behaviour``: per micro-batch the behaviour log-probs [R]
        of each trajectory, for a batch generated by an older weight version: ``old`` is then the proximal policy
        and each position is reweighted (decoupled PPO, ``soft_rl.losses.behaviour_weights``)."""
        c = self.cfg
        if lr is not None:
            set_learning_rate(self.optimizer, lr)
        self.engine.train()
        sums = {"pg": 0.0, "kl": 0.0, "clip": 0.0, "tokens": 0.0, "draws": 0.0, "logratio": 0.0, "entropy": 0.0,
                **dict.fromkeys(BEHAVIOUR_METRICS, 0.0)}
        for i, trajs in enumerate(micro_batches):
            if not trajs:
                self.engine.backward(self._filler_forward(self.engine, micro_batches), scale_wrt_gas=False)
                continue
            per_draw = per_draw_ratio(c.multiplex_ratio)
            (flat, flat_ent), lengths = self._forward(self.engine, trajs, with_entropy=True,
                                                      entropy_grad=bool(c.entropy_coef), per_draw=per_draw)
            ent = pad_rows(flat_ent, lengths)
            dev = ent.device  # the inputs below arrive from Ray on the host
            mask = pad_rows(torch.cat([(~t.forced).float() for t in trajs]).to(dev), lengths)
            w = None
            if behaviour is not None:  # off-policy: the proximal policy is old, the behaviour the engine's
                old_rows = old[i] if not per_draw else [o.sum(-1) if o.dim() == 2 else o for o in old[i]]
                w, w_parts = behaviour_weights(pad_rows(torch.cat(old_rows).to(dev), lengths),
                                               pad_rows(torch.cat(behaviour[i]).to(dev), lengths), cap=is_cap,
                                               band=is_band)
                n_tok = float(mask.sum())
                for key, value in behaviour_metrics(w, w_parts, mask).items():
                    # the max over micro-batches; the others as token sums, so that ranks and micro-batches add up
                    sums[key] = max(sums[key], float(value)) if key == "is_weight_max" \
                        else sums[key] + float(value) * n_tok
            if per_draw:  # one ratio per draw (soft_rl.draws), the draws' clipped terms summed per position
                logp_rows = split_draws(flat, trajs)
                if any(o.dim() != 2 and lp.shape[1] > 1 for o, lp in zip(old[i], logp_rows, strict=True)):
                    raise ValueError("learner.multiplex_ratio=per_draw needs per-draw old log-probs "
                                     "(logprobs(..., per_draw=True))")
                logp = pad_draws(logp_rows)
                old_lp = pad_draws(old[i]).to(dev)
                draws = pad_draws([draw_mask(t, c.density) for t in trajs]).to(dev)
                per_token, parts = ppo_draw_losses(logp, old_lp, advantages[i].to(dev), draws, clip_low=c.clip_low,
                                                   clip_high=c.clip_high, dual_clip=c.dual_clip, is_weight=w)
                counted = mask[..., None] * draws  # the clip and ratio metrics count draws
                logp = logp.sum(-1)  # the joint log-prob, for the KL term
            else:
                logp = pad_rows(flat, lengths)
                old_lp = pad_rows(torch.cat(old[i]).to(dev), lengths)
                per_token, parts = ppo_token_losses(logp, old_lp, advantages[i].to(dev), clip_low=c.clip_low,
                                                    clip_high=c.clip_high, dual_clip=c.dual_clip, is_weight=w)
                counted = mask
            num, _ = aggregate_parts(per_token, mask, c.loss_agg, norm_length)
            loss = num / denominator
            if ref is not None and c.kl_coef:
                ref_lp = pad_rows(torch.cat(ref[i]).to(dev), lengths)
                kl_num, _ = aggregate_parts(kl_penalty(logp, ref_lp, c.kl_kind), mask, c.loss_agg, norm_length)
                loss = loss + c.kl_coef * kl_num / denominator
                sums["kl"] += float(kl_num)
            # entropy bonus: loss -= entropy_coef * agg(H) (the per-token entropy is always reported)
            ent_num, _ = aggregate_parts(ent, mask, c.loss_agg, norm_length)
            if c.entropy_coef:
                loss = loss - c.entropy_coef * ent_num / denominator
            sums["entropy"] += float((ent.detach() * mask).sum())
            # DeepSpeed averages gradients over the data-parallel ranks; the loss is a global sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            sums["pg"] += float(num)
            sums["clip"] += float(((parts["surr2"] > parts["surr1"]).float() * counted).sum())
            sums["tokens"] += float(mask.sum())
            sums["draws"] += float(counted.sum())
            sums["logratio"] += float((parts["log_ratio"].abs() * counted).sum())
        skipped_before = self.optimizer.skipped
        self.engine.step()
        sums["skipped"] = float(self.optimizer.skipped - skipped_before)
        sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return sums

    # ------------------------------------------------------------------ weights

    @contextmanager
    def _gathered(self, names: Sequence[str]):
        """These HF-named parameters, whole while the context lasts (under ZeRO-3 a collective: every rank
        gathers them, and only them)."""
        import deepspeed

        params = dict(self.engine.module.hf.named_parameters())
        ps = [params[n] for n in names]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(ps, enabled=any(hasattr(p, "ds_id") for p in ps)):
            yield ps

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """HF-named full float32 tensors on rank 0 (None elsewhere); every rank joins the gathers (ZeRO-3:
        one parameter at a time), only rank 0 keeps copies."""
        out = {}
        for name, _ in self.engine.module.hf.named_parameters():
            with self._gathered([name]) as (p,):
                if self.rank == 0:
                    out[name] = p.detach().to(device="cpu", dtype=torch.float32, copy=True)
        return out if self.rank == 0 else None

    def weight_bucket_ref(self, sync_id: int, index: int, names: list[str], readers: int) -> list:
        """Bucket ``index`` of object-store sync ``sync_id`` for one of ``readers`` engines (ZeRO 0-2, rank 0
        only): ``[ref]``, the object ref nested in a list so that Ray hands it over unresolved. The first
        request packs the bucket (``weight_bucket``) and puts it into the object store once; every engine
        gets the same object, and rank 0 drops its reference after the ``readers``-th request (the engines'
        references keep it until they have loaded it). A newer ``sync_id`` drops what an older, unfinished
        sync left (an engine that died mid-sync never asks for the rest)."""
        if self.rank != 0:
            raise RuntimeError("weight_bucket_ref is served by learner rank 0 (ZeRO 0-2: it holds full weights)")
        if readers < 1:
            raise ValueError(f"weight_bucket_ref: readers must be >= 1, got {readers}")
        cache = self._bucket_refs
        for key in [k for k in cache if k[0] != sync_id]:
            del cache[key]
        entry = cache.get((sync_id, index))
        if entry is None:
            entry = cache[(sync_id, index)] = [ray.put(self.weight_bucket(names)), readers]
            self.buckets_packed += 1
        entry[1] -= 1
        if entry[1] <= 0:
            del cache[(sync_id, index)]
        return [entry[0]]

    def packed_bucket_count(self) -> int:
        """How many object-store buckets this rank has packed (``weight_bucket_ref``), over its life."""
        return self.buckets_packed

    def weight_bucket(self, names: list[str]) -> list[tuple[str, torch.Tensor]] | None:
        """One object-store bucket: these HF-named full weights in the model dtype on the host, from rank
        0 (other ranks return None). Under ZeRO-3 a collective: every rank gathers the bucket's
        parameters, and only they (one bucket at a time, never the whole model)."""
        with self._gathered(names) as ps:
            if self.rank != 0:
                return None
            # a copy: ZeRO's parameters are views of one flat buffer, and a view pickles its whole storage
            return [(n, p.detach().to(device="cpu", dtype=self.compute_dtype, copy=True))
                    for n, p in zip(names, ps, strict=True)]

    # broadcast transport (workers.weight_broadcast): learner rank 0 is rank 0 of the sync group

    def weight_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(HF name, full shape, dtype) of every parameter, in the order ``broadcast_weights`` sends them."""
        from workers.weight_broadcast import tensor_spec

        out = []
        for name, p in self.engine.module.hf.named_parameters():
            _, shape, dtype = tensor_spec(name, p)
            out.append((name, tuple(p.ds_shape) if hasattr(p, "ds_shape") else shape, dtype))  # ZeRO-3: full shape
        return out

    def _device(self) -> torch.device:
        """This rank's device: its one GPU (Ray sets CUDA_VISIBLE_DEVICES), or the host."""
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else torch.device("cpu")

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float) -> int:
        from workers.weight_broadcast import close_group, open_group

        if self.rank != 0:
            raise RuntimeError("only learner rank 0 joins the weight broadcast group")
        close_group(getattr(self, "_weight_group", None))
        self._weight_group = None
        self._weight_group = open_group(self.backend, host, port, 0, world_size, timeout_s, self._device())
        return 0

    def broadcast_weights(self, layout) -> int:
        """Send every bucket of ``layout`` within the group's sync deadline; all ranks call it (ZeRO-3 gathers each
        bucket's parameters collectively), rank 0 packs and broadcasts. When the broadcast fails (a dead or hung
        engine: ``WeightGroupError``, the group torn down), rank 0 still joins the remaining gathers, so that the
        learners' own group stays in step, and raises afterwards."""
        from workers.weight_broadcast import abort_group, pack, send, sync_deadline

        group = getattr(self, "_weight_group", None)
        if self.rank == 0 and group is None:
            raise RuntimeError("broadcast_weights before join_weight_group")
        deadline = sync_deadline(group) if self.rank == 0 else None
        sent, error = 0, None
        for bucket in layout:
            with self._gathered(bucket.names) as ps:
                if self.rank == 0 and error is None:
                    try:
                        send(group, pack(bucket, ps, self._device()), deadline)
                        sent += len(ps)
                    except Exception as e:  # noqa: BLE001 - raised once the gathers are done
                        error = e
                        abort_group(group, f"learner rank 0 failed: {e}")  # the engines stop waiting (if not done)
        if error is not None:
            raise error
        return sent

    def leave_weight_group(self) -> None:
        """Tear the group down explicitly (``abort``; a failed NCCL group is not left to its destructor)."""
        from workers.weight_broadcast import close_group

        close_group(getattr(self, "_weight_group", None))
        self._weight_group = None

    def placement(self) -> dict:
        from workers.placement import placement_info

        return placement_info()

    def release_memory(self) -> None:
        """Return cached device memory to the driver before colocated engines wake into the same GPU."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def skipped_steps(self) -> int:
        return self.optimizer.skipped

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, tmp_dir: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (model, optimizer, scheduler) + RNG states into ``tmp_dir`` (all ranks)."""
        state = dict(client_state, torch_rng=torch.get_rng_state(), skipped=self.optimizer.skipped)
        self.engine.save_checkpoint(tmp_dir, tag="state", client_state=state)
        torch.distributed.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        _, client = self.engine.load_checkpoint(ckpt_dir, tag="state")
        if client is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {ckpt_dir}")
        torch.set_rng_state(client.pop("torch_rng"))
        self.optimizer.skipped = client.pop("skipped", 0)
        return client

    def export_hf(self, out_dir: str, tokenizer_dir: str | None, max_shard_bytes: int = EXPORT_SHARD_BYTES) -> int:
        """Write the policy as an HF model directory (all ranks call it; rank 0 writes; returns the files
        written, 0 on other ranks).

        No rank builds a model: every rank joins the per-parameter gathers (collectives under ZeRO-3) in
        the same order, and rank 0 writes safetensors shards of at most ``max_shard_bytes`` as it goes (a
        larger tensor gets its own), so it holds about one shard on the host, plus
        ``model.safetensors.index.json`` when there are several. Weights in the compute dtype (a bf16 run
        exports bf16) and the config's ``dtype`` says so; the config itself, the generation config and the
        tokenizer come from the model directory (``tokenizer_dir`` when given), not from a model object.
        Tied input/output embeddings are one parameter, written once under the input embedding's name,
        as transformers' ``save_pretrained`` does. (Building the model on rank 0 alone, as before, entered
        zero.Init's collectives under ZeRO-3 that the other ranks never joined: a hang.)"""
        import shutil
        from pathlib import Path

        from safetensors.torch import save_file

        hf = self.engine.module.hf
        dtype = self.compute_dtype
        tensors = [(n, tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape), dtype)
                   for n, p in hf.named_parameters()]
        tensors += [(n, tuple(b.shape), b.dtype) for n, b in _persistent_buffers(hf)]
        shards = plan_shards(tensors, max_shard_bytes)
        out = Path(out_dir)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        buffers = dict(_persistent_buffers(hf))
        files = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for file, names in zip(files, shards, strict=True):
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                if name in buffers:  # never partitioned
                    shard[name] = buffers[name].detach().to(device="cpu", copy=True)
                    continue
                with self._gathered([name]) as (p,):
                    if self.rank == 0:
                        shard[name] = p.detach().to(device="cpu", dtype=dtype, copy=True)
            if self.rank == 0:
                save_file(shard, str(out / file), metadata={"format": "pt"})
            del shard
        if self.rank != 0:
            return 0
        if len(shards) > 1:
            total = sum(_nbytes(shape, dt) for _, shape, dt in tensors)
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(self.model_path)
        config.dtype = dtype
        config.save_pretrained(out)
        if (Path(self.model_path) / "generation_config.json").exists():
            shutil.copyfile(Path(self.model_path) / "generation_config.json", out / "generation_config.json")
        AutoTokenizer.from_pretrained(tokenizer_dir or self.model_path).save_pretrained(out)
        return len(files)


# Environment of learner actors on GPU runs: the caching allocator grows segments in place instead of
# fragmenting on the variable-length micro-batches (the chunked head's [chunk, V] buffers, activations); and no
# flight-recorder dump on an NCCL error: an aborted weight-broadcast group (workers/weight_broadcast.py) would
# otherwise set torch's process-wide dump flag, and the DeepSpeed group's heartbeat monitor would then end a
# healthy learner.
LEARNER_GPU_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def learner_actor_options(device: str, num_cpus: float, options: dict | None = None,
                          environ: dict[str, str] | None = None) -> dict:
    """Ray options of one learner actor: its CPUs, one GPU on GPU runs, ``options`` (e.g. its placement
    bundle) on top; on GPU runs ``LEARNER_GPU_ENV`` in its runtime_env's env_vars. A value the user set wins:
    one in ``options``' runtime_env, else one in the driver's environment (``environ``, default os.environ),
    which is forwarded as it is."""
    environ = os.environ if environ is None else environ
    out = {"num_cpus": num_cpus, "num_gpus": 1 if device == "gpu" else 0, **(options or {})}
    if device == "gpu":
        runtime_env = dict(out.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        for key, default in LEARNER_GPU_ENV.items():
            env_vars.setdefault(key, environ.get(key, default))
        out["runtime_env"] = {**runtime_env, "env_vars": env_vars}
    return out


class LearnerGroup:
    """Driver-side handle of N learner ranks."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, dtype: str = "float32", seed: int = 0,
                 device: str = "cpu", num_cpus_per_actor: float = 0.5, norm_length: int | None = None,
                 actor_options: list[dict] | None = None, head_dtype: str = "float32"):
        """``actor_options``: per-rank Ray options (e.g. a colocation bundle, see workers.placement);
        ``head_dtype``: model.head_dtype (float32: logits in float32 whatever the model dtype)."""
        self.cfg, self.norm_length = cfg, norm_length
        n = cfg.world_size
        if actor_options is not None and len(actor_options) != n:
            raise ValueError(f"{len(actor_options)} actor_options for {n} learner ranks")
        actor = ray.remote(LearnerWorker)
        self.actors = [actor.options(**learner_actor_options(device, num_cpus_per_actor,
                                                             actor_options[r] if actor_options else None))
                       .remote(r, n, model_path, asdict(cfg), dtype, seed, device, head_dtype) for r in range(n)]
        addr, port = ray.get(self.actors[0].address.remote())
        # parameter elements each rank held right after loading (ZeRO-3: its partition, not the model)
        self.loaded_elements = ray.get([a.init.remote(addr, port) for a in self.actors])

    def _shard(self, trajs: Sequence[Trajectory]) -> tuple[list[list[list[Trajectory]]], list[list[list[int]]]]:
        """Contiguous shards per rank, each cut into micro-batches by the token budget and padded
        with empty micro-batches to a common count."""
        n = len(self.actors)
        bounds = [round(r * len(trajs) / n) for r in range(n + 1)]
        per_rank_idx = [list(range(bounds[r], bounds[r + 1])) for r in range(n)]
        micro_idx = []
        for idx in per_rank_idx:
            groups = split_by_token_budget([trajs[i] for i in idx], self.cfg.micro_batch_tokens,
                                           self.cfg.micro_batch_seqs) if idx else []
            micro_idx.append([[idx[j] for j in g] for g in groups])
        if len(trajs) < n:
            raise ValueError(f"{len(trajs)} trajectories for {n} learner ranks: every rank needs at least one")
        m = max(len(g) for g in micro_idx)
        micro_idx = [g + [[] for _ in range(m - len(g))] for g in micro_idx]
        return [[[trajs[i] for i in mb] for mb in g] for g in micro_idx], micro_idx

    def logprobs(self, trajs: Sequence[Trajectory], which: str = "policy",
                 per_draw: bool = False) -> list[torch.Tensor]:
        shards, idx = self._shard(trajs)
        results = get_all([a.logprobs.remote(s, which, per_draw) for a, s in zip(self.actors, shards, strict=True)])
        out: list[torch.Tensor | None] = [None] * len(trajs)
        for r, res in enumerate(results):
            flat_idx = [i for mb in idx[r] for i in mb]
            for i, lp in zip(flat_idx, res, strict=True):
                out[i] = lp
        return out  # type: ignore[return-value]

    def train_mini_batch(self, trajs: Sequence[Trajectory], advantages: torch.Tensor, old: Sequence[torch.Tensor],
                         ref: Sequence[torch.Tensor] | None = None, lr: float | None = None,
                         behaviour: Sequence[torch.Tensor] | None = None, is_cap: float = 2.0,
                         is_band: tuple[float, float] | None = None) -> dict[str, float]:
        """One optimizer step on ``trajs``; ``behaviour`` (per trajectory, or None when on-policy): the log-probs
        of the older policy that generated them (decoupled PPO, see ``LearnerWorker.train_mini_batch``)."""
        shards, idx = self._shard(trajs)
        if self.cfg.loss_agg in PER_MICRO_BATCH_AGGREGATIONS:  # the mean of the micro-batches' own means
            den = float(sum(1 for rank in idx for mb in rank if mb))
        else:  # the whole mini-batch's denominator, so that N ranks x M micro-batches equal one batch
            masks = pad_rows(torch.cat([(~t.forced).float() for t in trajs]), [t.num_tokens for t in trajs])
            _, den = aggregate_parts(masks, masks, self.cfg.loss_agg, self.norm_length)
            den = max(float(den), 1.0)
        calls = []
        for a, r in zip(self.actors, range(len(self.actors)), strict=True):
            adv = [advantages[mb] if mb else torch.zeros(0) for mb in idx[r]]
            o = [[old[i] for i in mb] for mb in idx[r]]
            rf = None if ref is None else [[ref[i] for i in mb] for mb in idx[r]]
            bh = None if behaviour is None else [[behaviour[i] for i in mb] for mb in idx[r]]
            calls.append(a.train_mini_batch.remote(shards[r], adv, o, rf, den, self.norm_length, lr, bh, is_cap,
                                                   is_band))
        parts = get_all(calls)
        tokens = max(sum(p["tokens"] for p in parts), 1.0)
        draws = max(sum(p["draws"] for p in parts), 1.0)  # = tokens, but with one ratio per draw
        return {
            "pg_loss": sum(p["pg"] for p in parts) / den,
            "kl": sum(p["kl"] for p in parts) / den,
            "entropy": sum(p["entropy"] for p in parts) / tokens,  # token mean over the sampled tokens
            "clip_frac": sum(p["clip"] for p in parts) / draws,
            "abs_log_ratio": sum(p["logratio"] for p in parts) / draws,
            "grad_norm": parts[0]["grad_norm"],
            "skipped_steps": parts[0]["skipped"],
            **({} if behaviour is None else {
                key: max(p[key] for p in parts) if key == "is_weight_max" else sum(p[key] for p in parts) / tokens
                for key in BEHAVIOUR_METRICS}),
        }

    def placement(self) -> list[dict]:
        return ray.get([a.placement.remote() for a in self.actors])

    def embedding_rms(self) -> float:
        """The policy's input-embedding RMS (every rank takes part: a ZeRO-3 gather), rank 0's value."""
        return get_all([a.embedding_rms.remote() for a in self.actors])[0]

    def release_memory(self) -> None:
        ray.get([a.release_memory.remote() for a in self.actors])

    def bucket_layout(self, bucket_mb: float) -> list:
        """The sync's bucket plan (``workers.weight_broadcast.plan_buckets``) of rank 0's weights."""
        from workers.weight_broadcast import plan_buckets

        return plan_buckets(ray.get(self.actors[0].weight_specs.remote()), bucket_mb)

    def weight_buckets(self, bucket_mb: float) -> tuple[list, list, list]:
        """Object refs of the weights, bucket by bucket (``LearnerWorker.weight_bucket``: rank 0, model dtype,
        the broadcast's bucket plan), the refs of the other ranks' part (wait on them), and the plan. Every
        rank joins each bucket, as ZeRO-3's gathers are collectives (under ZeRO 0-2 the engines pull from
        rank 0 instead: ``RolloutWorker.pull_weight_buckets``). The refs go to the engines as they are."""
        layout = self.bucket_layout(bucket_mb)
        refs, others = [], []
        for b in layout:
            rs = [a.weight_bucket.remote(b.names) for a in self.actors]
            refs.append(rs[0])
            others += rs[1:]
        return refs, others, layout

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # a collective under ZeRO-3: every rank gathers, rank 0 alone keeps (and returns) copies
        return get_all([a.full_state_dict.remote() for a in self.actors])[0]

    def save_checkpoint(self, root: str, step: int, client_state: dict | None = None, keep: int = 3) -> str:
        """Atomic checkpoint ``root/step-<N>``: written into a temporary directory, then renamed;
        only the newest ``keep`` are kept. ``client_state`` carries the driver's state."""
        import shutil
        from pathlib import Path

        from soft_rl.checkpoints import write_manifest

        root_p = Path(root)
        root_p.mkdir(parents=True, exist_ok=True)
        final = root_p / f"step-{step:08d}"
        tmp = root_p / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        state = dict(client_state or {}, step=step)
        get_all([a.save_checkpoint.remote(str(tmp), state) for a in self.actors])
        write_manifest(tmp, step)  # last: a directory without it is skipped as incomplete (soft_rl/checkpoints.py)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        # rotation among this step and older ones (a newer directory is another attempt's: left alone)
        for old in sorted(p for p in root_p.glob("step-*") if p.name <= final.name)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return str(final)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        return get_all([a.load_checkpoint.remote(ckpt_dir) for a in self.actors])[0]

    def export_hf(self, out_dir: str, tokenizer_dir: str | None = None,
                  max_shard_bytes: int = EXPORT_SHARD_BYTES) -> str:
        """``LearnerWorker.export_hf`` on every rank (rank 0 writes ``out_dir``)."""
        get_all([a.export_hf.remote(out_dir, tokenizer_dir, max_shard_bytes) for a in self.actors])
        return out_dir

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
