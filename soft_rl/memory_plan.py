"""GPU memory plan of a run (``soft-rl plan``): what each GPU holds, item by item, before anything starts.

``plan_for_config(cfg, gpu_bytes)`` reads the model's shape from ``<model.path>/config.json``
(``ModelShape``; a shape directory such as configs/shapes/r1-distill-qwen-7b needs nothing else) and
estimates, per GPU:

* a learner rank: the DeepSpeed ZeRO state by stage and offload, DeepSpeed's own buffers, the longest
  micro-batch's activations (with or without gradient checkpointing), the chunked LM head's
  temporaries, the KL reference model, CUDA context and NCCL;
* a rollout engine GPU: weights / TP, the soft state store, the profiling peak vLLM subtracts from its
  budget (its forward, its sampler, our sampler's worst case, the weight-sync reserve), CUDA graphs, and
  what is left for the KV cache;
* a colocated GPU (learner rank i and engine i share it): the learner's peak next to the sleeping engine,
  and the learner's resident state next to the awake engine's whole budget.

``MemoryPlan.overflow_message()`` names each GPU role that would overflow, by how much, and the config
keys that change it; ``check_plan(cfg, gpu_bytes)`` returns that message (None: it fits).

What is measured and what is estimated (each row's formula says which):
* activations and the LM head's temporaries follow the operators HF Qwen2/Llama layers and
  ``soft_rl.lean_logprobs.token_scores`` run, counted tensor by tensor; tests/test_memory_plan.py checks
  them against ``soft_rl.memory_meter.MemoryMeter`` on the CPU, tests/gpu/test_memory_plan_cuda.py against
  ``torch.cuda.max_memory_allocated`` in bfloat16 on a GPU;
* the soft sampler's profiled worst case is a fit to MemoryMeter measurements of
  ``SoftStateStore.sample_step`` (rows x vocabulary x candidates), plus what the meter cannot see on CUDA;
* DeepSpeed's buffers are its 0.19.8 defaults (deepspeed/runtime/zero/config.py), which
  workers/learner.py ``deepspeed_config`` does not override (it sets only the gradient accumulation dtype:
  float32 for bf16 at stages 2 and 3, mirrored here);
* CUDA context, NCCL, CUDA graphs, vLLM's own forward peak and kernel workspaces are estimates (stated
  in the rows), not measurements.

This module imports neither ray nor vllm (``soft_rl`` never does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from soft_rl.config import Config, ConfigError

GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------------------------------- constants
# Fixed per-process overheads (estimates, not measured here):
# a CUDA context with torch and CUDA 12 lazy module loading: driver state, cuBLAS/cuDNN handles and the kernels a
# training or inference process loads; 0.3-0.6 GiB on H100s in common reports, 0.5 taken.
CUDA_CONTEXT_BYTES = GiB // 2
# NCCL communicator buffers of the learners' data-parallel group: channels x buffers per peer; 0.7 GB was reported
# for 4 A100s and ~1.6 GB for 8 GPUs with NVLink SHARP (NVIDIA/nccl issues #964, #864); NCCL_NVLS_ENABLE=0 lowers it.
NCCL_GROUP_BYTES = 3 * GiB // 2
# vLLM engine with TP > 1: its NCCL communicator plus the custom all-reduce buffers.
ENGINE_TP_COMM_BYTES = GiB // 2
# One NCCL communicator's buffers for the weight broadcast (workers/driver.py's constant, mirrored below).
NCCL_BUFFERS_MB = 256
# The caching allocator's slack over the tensor bytes it hands out (blocks split for one size, not reusable for a
# larger one): assumed 5% of the learner's transient peak; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it.
ALLOCATOR_SLACK = 0.05

# DeepSpeed 0.19.8 ZeRO defaults (deepspeed/runtime/zero/config.py, deepspeed/runtime/engine.py), in elements.
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: the contiguous gradient ("ipg") bucket, stages 1-3
DS_ALLREDUCE_BUCKET = 500_000_000  # MEMORY_OPT_ALLREDUCE_SIZE: stage 0's flattened all-reduce buffer
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size
DS_PARAM_PERSISTENCE = 100_000  # stage3_param_persistence_threshold: smaller parameters are never partitioned
DS_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance: a parameter used again within this many
# gathered elements is kept gathered

# vLLM 0.32 (vllm/engine/arg_utils.py): the LLM class's max_num_batched_tokens on >= 70 GiB GPUs (H100/H200;
# an A100 80GB gets 8192, which the plan cannot tell apart by memory alone), else 8192.
VLLM_BATCHED_TOKENS_LARGE_GPU = 16384
VLLM_BATCHED_TOKENS_DEFAULT = 8192
VLLM_GRAPH_BYTES = GiB // 2  # CUDA graph pools (estimate: vLLM logs "Graph capturing finished ... took 0.3-0.6 GiB"
# for 1-8B models; the engine's own log line gives the real figure)
VLLM_WORKSPACE_BYTES = GiB // 4  # cuBLAS and attention-backend workspaces inside the budget (estimate)
VLLM_SAMPLER_BUFFERS = 7  # vLLM's dummy sampler run: [rows, V] float32 buffers alive at once (sort of the logits
# with int64 indices, probabilities, cumulative sums; estimate from vllm/v1/sample/ops/topk_topp_sampler.py)
ENGINE_MARKER_WIDTH = 8  # workers/vllm_soft/engine.py SoftEngine(marker_width=8)
ENGINE_MIN_SLOTS = 8  # workers/vllm_soft/runner.py: slots = max(8, max_num_seqs)

# The soft sampler's step (SoftStateStore.sample_step), per row, fitted to MemoryMeter measurements on the CPU
# (tests/test_memory_plan.py::test_sampler_step_formula_matches_the_meter): two float32 [V] buffers (the logits
# and their temperature-scaled copy), ~41 bytes per element of the top-(C + 16) window (stable_topk's values,
# int64 indices, argsorts and gathers; exact for wide windows, up to 10% over for C of 50-500), ~900 bytes per
# soft slot (the Gamma draws' 24 attempts). On CUDA
# logsumexp also holds an internal float32 [V] buffer the meter does not see while the logits and their copy are
# alive: 12 bytes per vocabulary entry at that moment.
SAMPLER_BYTES_PER_VOCAB = 8
SAMPLER_BYTES_PER_VOCAB_CUDA = 12
SAMPLER_BYTES_PER_CANDIDATE = 41
SAMPLER_TIE_WINDOW = 16  # soft_rl.sampling.TIE_WINDOW
SAMPLER_BYTES_PER_SLOT = 900

# The chunked LM head (soft_rl.lean_logprobs.token_scores), in float32 [chunk, V] buffers alive at once, counted
# with MemoryMeter (tests/test_memory_plan.py::test_head_terms_match_the_meter): the forward holds the scaled
# logits and their exponential; the backward turns the recomputed logits into the gradient in place, plus the
# softmax when the entropy is differentiated (learner.entropy_coef != 0), plus half a buffer for the gradient's
# bf16 copy in a bf16 model. Across chunks: grad_W in float32 [V, H], cast to the model dtype at the end.
HEAD_FWD_BUFFERS = 2
HEAD_BWD_BUFFERS = 1
HEAD_BWD_ENTROPY_BUFFERS = 1


# --------------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only HF model (Qwen2 / Llama family), from its config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False  # q/k/v biases (Qwen2 always has them)
    mlp_bias: bool = False
    model_type: str = ""

    @classmethod
    def from_config(cls, d: dict, source: str = "config.json") -> ModelShape:
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if k not in d]
        if missing:
            raise ConfigError(f"config key 'model.path': {source} lacks {missing} (not a decoder-only HF config)")
        heads = int(d["num_attention_heads"])
        model_type = str(d.get("model_type", ""))
        return cls(
            hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            vocab_size=int(d["vocab_size"]), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 0)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(d.get("mlp_bias", False)), model_type=model_type)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelShape:
        """The shape in ``path``/config.json (a model directory, or a shape directory with only that file)."""
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ConfigError(f"config key 'model.path': no config.json in {path} (a model directory or a shape "
                              "directory such as configs/shapes/r1-distill-qwen-7b)")
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'model.path': cannot read {f}: {e}") from e
        return cls.from_config(d, str(f))

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        H, F, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        attn = H * q + 2 * H * kv + q * H + ((q + 2 * kv) if self.attention_bias else 0)
        mlp = 3 * H * F + ((2 * F + H) if self.mlp_bias else 0)
        return attn + mlp + 2 * H  # + the two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * self.layer_params() + heads * self.embedding_params() + self.hidden_size

    def persistent_params(self, threshold: int = DS_PARAM_PERSISTENCE) -> int:
        """Elements in parameters smaller than ``threshold`` (ZeRO-3 never partitions them): norms, biases."""
        small = [self.hidden_size, self.hidden_size]
        if self.attention_bias:
            small += [self.q_width, self.kv_width, self.kv_width]
        if self.mlp_bias:
            small += [self.intermediate_size, self.intermediate_size, self.hidden_size]
        return self.num_layers * sum(n for n in small if n < threshold) + self.hidden_size


def dtype_bytes(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


# --------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Attention:
    """What an attention implementation saves for the backward, per layer.

    Every fused kernel saves its output (also o_proj's input) and q after RoPE; ``kv_repeated``: k and v are
    saved expanded to all heads (HF's repeat_kv, done whenever a mask is passed); ``lse``: a float32 logsumexp
    per head and token; ``mask_bytes``: the [T, T] mask each layer converts to the query dtype and saves (SDPA
    with a padding mask), its last dimension padded to ``mask_align``; ``probs_bytes``: bytes per element of
    [heads, T, T] saved (eager / math attention: the softmax, and its copy in the model dtype).
    """

    name: str
    kv_repeated: bool
    lse: bool
    mask_bytes: int = 0
    mask_align: int = 1
    probs_bytes: int = 0
    mask_input_bytes: int = 0  # bytes per [T, T] element of the mask HF builds (an input of every layer)


def attention_for(device: str, impl: str, dtype_bytes_: int, padded: bool, gqa: bool) -> Attention:
    """The attention HF runs for a training forward.

    ``impl``: "sdpa" (HF's default; the learner loads the model without choosing) or "eager". ``padded``: the
    micro-batch has rows of different lengths, so HF passes a 4D mask (an unpadded batch gets none: is_causal).

    On CUDA (reasoned from torch's SDPA dispatch, checked by tests/gpu/test_memory_plan_cuda.py): no mask in
    bf16 -> FlashAttention (GQA native); a mask -> the memory-efficient kernel with the boolean mask converted
    to a bias in the query dtype per call (padded to 16 columns) and saved per layer, k/v repeated by HF; fp32
    without a mask -> memory-efficient without GQA, the math kernel (a [heads, T, T] softmax) with GQA.
    On the CPU (measured): SDPA's flash kernel, the same rules without the 16-column padding.
    """
    b = dtype_bytes_
    if impl == "eager":
        # softmax(dtype=float32) output, and its copy in the model dtype (none in float32), both saved
        return Attention("eager", kv_repeated=gqa, lse=False, probs_bytes=4 + (b if b != 4 else 0), mask_input_bytes=b)
    if impl != "sdpa":
        raise ValueError(f"attention implementation must be sdpa or eager, got {impl!r}")
    cuda = device == "cuda"
    if padded:
        return Attention("sdpa-efficient+mask" if cuda else "sdpa-cpu-flash+mask", kv_repeated=gqa, lse=True,
                         mask_bytes=b, mask_align=16 if cuda else 1, mask_input_bytes=1)
    if cuda and b == 4 and gqa:
        return Attention("sdpa-math", kv_repeated=True, lse=False, probs_bytes=4)
    return Attention("sdpa-flash" if (not cuda or b == 2) else "sdpa-efficient", kv_repeated=False, lse=True)


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass
class LearnerActivations:
    """Bytes of one micro-batch's forward and backward on a learner (model + chunked head), by term.

    ``peak`` is the largest sum of live tensors: ``base`` (inputs, what the forward saves, the head's saved
    state) plus the largest transient phase: the head's forward, the head's backward, or a layer's backward
    (with checkpointing: that layer recomputed, plus its gradient buffers)."""

    terms: dict[str, int] = field(default_factory=dict)
    formulas: dict[str, str] = field(default_factory=dict)
    base_terms: tuple[str, ...] = ()
    phases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def phase_bytes(self, phase: str) -> int:
        return sum(self.terms[t] for t in self.phases[phase])

    @property
    def base(self) -> int:
        return sum(self.terms[t] for t in self.base_terms)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.base + self.phase_bytes(self.peak_phase)


def learner_activations(shape: ModelShape, *, rows: int, seq_len: int, scored: int, soft_scored: int = 0,
                        k: int = 5, dtype_bytes_: int = 2, attention: Attention, checkpointing: bool,
                        chunk_tokens: int, head_fp32: bool = True, entropy_grad: bool = False) -> LearnerActivations:
    """Activation and LM-head memory of one learner micro-batch (``PolicyWithSoftHead`` forward + backward):
    ``rows`` sequences right-padded to ``seq_len``, ``scored`` scored positions of which ``soft_scored`` are soft
    steps (K logits at stored ids) and the rest discrete (full-vocabulary logits through ``token_scores`` in
    chunks of ``chunk_tokens``).

    Saved for the backward, per token and layer (b = model dtype bytes, H hidden, F = I intermediate,
    q = heads x head_dim, kv likewise):
      RMSNorm x2:   4H (float32 copy of the input) + bH (normalised, for the weight's gradient) + bH (output,
                    for the next linear layers) + 4 (rsqrt)
      attention:    b q (q after RoPE) + 2 b kv (k, v; 2 b q when repeated) + b q (output = o_proj's input)
                    + 4 heads (logsumexp); per row: mask_bytes T x align(T) + probs_bytes heads T^2
      MLP:          4 b I (gate output, SiLU output, up output, their product)
    Outside the layers: the final norm (4H + bH + 4: its output is dropped once the head has copied its rows),
    RoPE's cos and sin (2 b head_dim), the inputs (b H). In float32 a norm's input copy is its input itself, which
    for the first layer (and every layer under checkpointing) is already counted: 4H less per such layer.
    Checkpointing keeps each layer's input (b H) instead, and the backward recomputes one layer at a time.
    LM head, saved: per discrete position its hidden state (b H), lse and mean (8) and the two outputs (8); per
    soft position the (K + 1) x H gathered rows and hidden state (float32 with head_fp32) and K logits.
    The transient phases (each on top of the saved state, the largest one is the peak):
      head forward:        the final hidden states (b H per token) + HEAD_FWD_BUFFERS [min(chunk, Nd), V] float32
      head backward:       HEAD_BWD_BUFFERS such buffers + grad_W float32 [V, H] (+ its cast) + grad_h (b H per
                           discrete position)
      soft head backward:  the gathered rows' float32 gradient (+ cast) K H per soft position, the [V, H] gradient
                           of the gather, and the final hidden states' gradient(s) (b H per token each)
      final norm backward: 16 H (its float32 gradients) + b H (the incoming gradient), the head's state released
      layer backward:      2 b I (the MLP's gradient buffers at SiLU x up) - 4H (the final norm's saved input,
                           released), the head's state released; under checkpointing plus one recomputed layer
    """
    s = shape
    b, H, F, L, V = dtype_bytes_, s.hidden_size, s.intermediate_size, s.num_layers, s.vocab_size
    q, kvw, heads = s.q_width, s.kv_width, s.num_heads
    n = rows * seq_len
    disc = max(scored - soft_scored, 0)
    a = attention
    norm_tok = 4 * H + 2 * b * H + 4
    attn_tok = b * q + 2 * b * (q if a.kv_repeated else kvw) + b * q + (4 * heads if a.lse else 0)
    mlp_tok = 4 * b * F
    layer_tok = 2 * norm_tok + attn_tok + mlp_tok
    t2_row = a.mask_bytes * seq_len * _ceil(seq_len, a.mask_align) + a.probs_bytes * heads * seq_len * seq_len
    layer = n * layer_tok + rows * t2_row
    input_copy = 4 * H * n if b == 4 else 0  # float32: a norm's input "copy" is the input itself
    hb = 4 if head_fp32 else b
    cast = b if b != 4 else 0  # a float32 gradient's cast to the model dtype (none in float32)
    c = min(chunk_tokens, disc)
    unit = c * V * 4
    bwd_units = HEAD_BWD_BUFFERS + (HEAD_BWD_ENTROPY_BUFFERS if entropy_grad else 0) + cast / 4
    r = LearnerActivations()
    t, f = r.terms, r.formulas

    def add(name: str, value: int, formula: str) -> None:
        t[name], f[name] = int(value), formula

    add("inputs", n * b * H, f"inputs_embeds: {rows} x {seq_len} x H x {b} B")
    if checkpointing:
        add("checkpoint inputs", (L - 1) * n * b * H + rows * a.mask_input_bytes * seq_len * seq_len,
            "each layer's input kept (the first is the inputs): (L-1) x tokens x bH, + HF's [T, T] mask")
    else:
        add("activations", L * layer - input_copy,
            f"L x (tokens x {layer_tok} B/token + rows x {t2_row} B of T^2 terms) [{a.name}]")
    add("final norm and RoPE", n * (4 * H + b * H + 4 + 2 * b * s.head_dim), "tokens x (4H + bH + 4 + 2b head_dim)")
    head_saved = disc * (b * H + 16) + soft_scored * ((k + 1) * H * hb + 4 * k)
    add("head saved state", head_saved, f"{disc} discrete x (bH + 16) + {soft_scored} soft x ((K+1) H x {hb} + 4K) B")
    add("final hidden states", n * b * H, "tokens x bH, alive while the head's forward runs")
    add("head forward temporaries", HEAD_FWD_BUFFERS * unit,
        f"{HEAD_FWD_BUFFERS} float32 [min(chunk, Nd)={c}, V] buffers")
    add("head backward temporaries", bwd_units * unit,
        f"{bwd_units:g} float32 [{c}, V] buffers (entropy gradient {'on' if entropy_grad else 'off'})")
    add("head weight gradient", (V * H * (4 + cast) + disc * b * H) if disc else 0,
        "grad_W float32 [V, H] + its cast to the model dtype, + grad_h [Nd, H]")
    add("soft head backward", soft_scored * k * H * (4 + cast) + 3 * V * H * b + (1 + (soft_scored > 0)) * n * b * H,
        "the gathered rows' gradient (4 + b) K H per soft position, the gather's [V, H] gradient (zeros + "
        "index_put) and the discrete part's, held until they are summed, the hidden states' gradient(s)")
    add("final norm backward", n * (16 * H + b * H), "tokens x (16H float32 gradients + bH incoming)")
    add("head state released", -head_saved, "the head's saved state, freed after its backward")
    if checkpointing:
        add("one layer recomputed", layer - input_copy,
            f"one layer's saved tensors, rebuilt in the backward: tokens x {layer_tok} B + rows x {t2_row} B")
    add("layer backward temporaries", n * max(2 * b * F - 4 * H, 0),
        "tokens x (2bI - 4H): the MLP's gradients at SiLU x up, less the final norm's released input")
    r.base_terms = tuple(x for x in ("inputs", "checkpoint inputs", "activations", "final norm and RoPE",
                                     "head saved state") if x in t)
    r.phases = {"head forward": ("final hidden states", "head forward temporaries"),
                "head backward": ("head backward temporaries", "head weight gradient"),
                "soft head backward": ("soft head backward", "head state released"),
                "final norm backward": ("final norm backward", "head state released"),
                "layer backward": (("one layer recomputed",) if checkpointing else ())
                + ("layer backward temporaries", "head state released")}
    return r


def longest_micro_batches(max_len: int, scored_max: int, budget: int,
                          max_seqs: int | None) -> list[tuple[int, int, int]]:
    """Candidate worst micro-batches (rows, padded length, scored positions per row) of
    ``soft_rl.learner_batch.split_by_token_budget``: for each row count B, rows as long as B rows may be
    (budget // B, at most the longest trajectory; one trajectory longer than the budget is alone)."""
    cap = max_seqs if max_seqs is not None else max(budget, 1)
    out = [(1, max_len, min(scored_max, max_len))]
    for B in range(2, min(cap, budget) + 1):
        T = min(max_len, budget // B)
        if T < 1:
            break
        out.append((B, T, min(scored_max, T)))
    return out


# --------------------------------------------------------------------------------------------------- engine terms
def grads_accumulate_in_fp32(zero_stage: int, dtype: str) -> bool:
    """Whether the learners accumulate gradients over micro-batches in float32 (``workers/learner.py``
    ``deepspeed_config`` sets DeepSpeed's ``grad_accum_dtype`` from this): bf16 at ZeRO 2 and 3. DeepSpeed
    0.19.8 rejects the setting at stage 0, and at stage 1 it switches to its bf16 optimizer, whose gradient norm
    differs; there, and in float32 runs, gradients accumulate in the model dtype."""
    return dtype == "bfloat16" and zero_stage in (2, 3)


def sync_reserve_mb(lc) -> int:
    """GPU memory an engine keeps out of its KV cache for weight syncs, which allocate after start-up:
    a received bucket and the loader's copy of it, plus NCCL's buffers for the broadcast transport.
    (workers/driver.py passes this to the engines.)"""
    return 2 * lc.sync_bucket_mb + (NCCL_BUFFERS_MB if lc.sync_transport == "broadcast" else 0)


def sampler_step_bytes(rows: int, vocab: int, candidates: int, width: int, device: str = "cuda") -> int:
    """Peak bytes of one ``SoftStateStore.sample_step`` (its logits included) over ``rows`` rows with top-
    ``candidates`` candidates and ``width`` soft slots (the constants' comment says where they come from)."""
    window = min(candidates + SAMPLER_TIE_WINDOW, vocab)
    later = SAMPLER_BYTES_PER_VOCAB * vocab + SAMPLER_BYTES_PER_CANDIDATE * window + SAMPLER_BYTES_PER_SLOT * width
    per_row = max(SAMPLER_BYTES_PER_VOCAB_CUDA * vocab, later) if device == "cuda" else later
    return rows * per_row


def store_bytes(slots: int, gen_len: int, width: int, vocab: int) -> tuple[int, int, int]:
    """(total bytes, bytes per generated position, bytes per slot) of a ``SoftStateStore`` of ``slots`` slots:
    the per-position history fields and the per-slot state come from a one-slot store built here on the CPU
    (its own spec), and the rows it allocates per slot (the scratch row included) from the same store."""
    from soft_rl.engine_state import SoftStateStore

    proto = SoftStateStore(1, 1, width, ENGINE_MARKER_WIDTH, "cpu", vocab)
    per_pos = sum(h.element_size() * h[0, 0].numel() for h in proto.h.values())
    per_slot = sum(x.element_size() * x[0].numel() for x in proto.t.values())
    extra_rows = next(iter(proto.h.values())).shape[0] - 1  # rows beyond the slots (the scratch slot)
    return (slots + extra_rows) * (gen_len * per_pos + per_slot), per_pos, per_slot


def candidate_width(cfg: Config, vocab: int) -> int:
    """The widest top-C a step of this run can need: ``soft_rl.engine_state.candidates_needed`` over the training
    and the evaluation sampling settings (what the engine profiles and is capped at)."""
    from soft_rl.engine_state import candidates_needed

    params = [cfg.rollout.sampling_params(0, embedding_rms=1.0), cfg.rollout.eval_sampling_params(0, embedding_rms=1.0)]
    return max(candidates_needed(p, cfg.rollout.k, vocab) for p in params)


# --------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanRow:
    role: str  # "learner rank", "engine GPU", "colocated GPU"
    item: str
    bytes: int
    formula: str
    phase: str = ""  # which sum it enters ("resident", "peak", "budget", ...): render() groups by it


@dataclass(frozen=True)
class Check:
    role: str
    what: str
    need: int
    capacity: int
    keys: tuple[str, ...]

    @property
    def over(self) -> int:
        return self.need - self.capacity


@dataclass
class MemoryPlan:
    """Per-GPU memory rows, the capacity checks, and warnings (e.g. vLLM would preempt)."""

    gpu_bytes: int
    rows: list[PlanRow] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    def add(self, role: str, item: str, nbytes: float, formula: str, phase: str = "") -> int:
        self.rows.append(PlanRow(role, item, int(nbytes), formula, phase))
        return int(nbytes)

    def overflows(self) -> list[Check]:
        return [c for c in self.checks if c.over > 0]

    def overflow_message(self) -> str | None:
        bad = self.overflows()
        if not bad:
            return None
        lines = [f"the memory plan does not fit {_gib(self.gpu_bytes)} GPUs:"]
        for c in bad:
            lines.append(f"  {c.role}: {c.what} needs {_gib(c.need)} of {_gib(c.capacity)} (over by {_gib(c.over)}); "
                         f"change: {', '.join(c.keys)}")
        lines.append("  (soft-rl plan --config ... prints the whole plan; its figures are estimates, see each row)")
        return "\n".join(lines)

    def render(self) -> str:
        width = max((len(r.item) for r in self.rows), default=10)
        out = [f"memory plan per GPU ({_gib(self.gpu_bytes)} each); GiB; phase = the sum a row enters"]
        role = None
        for r in self.rows:
            if r.role != role:
                role = r.role
                out.append(f"\n[{role}]")
            out.append(f"  {r.item:<{width}}  {r.bytes / GiB:8.2f}  {r.phase:<10}  {r.formula}")
        out.append("\nchecks:")
        for c in self.checks:
            verdict = "ok" if c.over <= 0 else f"OVER by {_gib(c.over)}"
            out.append(f"  {c.role}: {c.what}: {_gib(c.need)} of {_gib(c.capacity)}: {verdict}")
        for w in self.warnings:
            out.append(f"warning: {w}")
        for n in self.notes:
            out.append(f"note: {n}")
        return "\n".join(out)


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def plan_for_config(cfg: Config, gpu_bytes: int, model_shape: ModelShape | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` on GPUs of ``gpu_bytes`` each (see the module docstring)."""
    shape = model_shape or ModelShape.from_dir(cfg.model.path)
    plan = MemoryPlan(gpu_bytes=int(gpu_bytes))
    learner = _learner(plan, cfg, shape)
    engine = _engine(plan, cfg, shape)
    G = plan.gpu_bytes
    t = cfg.trainer
    learner_keys = _learner_keys(cfg, learner)
    if t.colocate:
        role = "colocated GPU"
        residue = engine["residue"]
        plan.add(role, "learner peak", learner["peak"], "the learner rank's peak (above)", "training")
        plan.add(role, "sleeping engine residue", residue,
                 "CUDA context + soft state store + CUDA graphs + persistent buffers + workspaces (sleep level 2 "
                 "frees weights and KV cache only)", "training")
        plan.checks.append(Check(role, "learner peak + sleeping engine", learner["peak"] + residue, G,
                                 learner_keys + ("rollout.max_num_seqs",)))
        awake = learner["resident"] + learner["sync"] + engine["outside"] + engine["budget"]
        plan.add(role, "learner resident (engine awake)", learner["resident"] + learner["sync"],
                 "learner state left on the GPU after release_memory, + its ZeRO-3 sync gather", "awake")
        plan.add(role, "engine: context + gpu_memory_utilization x GPU", engine["outside"] + engine["budget"],
                 "vLLM re-maps weights and KV cache at wake-up; its start-up check (a restart) wants this free",
                 "awake")
        plan.checks.append(Check(role, "learner resident + awake engine", awake, G,
                                 ("rollout.gpu_memory_utilization", "learner.offload_optimizer",
                                  "learner.offload_params", "learner.zero_stage")))
    else:
        plan.checks.append(Check("learner rank", "training peak", learner["peak"], G, learner_keys))
        plan.checks.append(Check("engine GPU", "CUDA context + gpu_memory_utilization x GPU",
                                 engine["outside"] + engine["budget"], G, ("rollout.gpu_memory_utilization",)))
    plan.checks.append(Check("engine GPU", "its budget: weights, buffers, store, profiling peak, graphs + the KV cache "
                                           f"of one model.max_model_len={cfg.model.max_model_len} sequence (vLLM's "
                                           "start-up minimum)",
                             engine["non_kv"] + engine["kv_per_token"] * cfg.model.max_model_len, engine["budget"],
                             ("rollout.gpu_memory_utilization", "model.max_model_len", "rollout.max_num_seqs")))
    for c in plan.checks:
        if 0 < c.need <= c.capacity and c.capacity - c.need < 0.1 * G:
            plan.warnings.append(f"{c.role}: {c.what} leaves {_gib(c.capacity - c.need)}, under 10% of the GPU: the "
                                 "estimated items (CUDA context, NCCL, fragmentation) may close that gap; change: "
                                 + ", ".join(c.keys))
    plan.totals.update({"learner_peak": learner["peak"], "learner_resident": learner["resident"],
                        "engine_kv_bytes": engine["kv"], "engine_kv_sequences": engine["kv_sequences"]})
    if cfg.trainer.device == "cpu":
        plan.notes.append("trainer.device=cpu: this plan describes the same run on GPUs")
    return plan


def check_plan(cfg: Config, gpu_bytes: int) -> str | None:
    """The overflow message of ``cfg``'s plan on ``gpu_bytes`` GPUs, None when it fits (and for CPU runs)."""
    if cfg.trainer.device == "cpu":
        return None
    return plan_for_config(cfg, gpu_bytes).overflow_message()


def _learner_keys(cfg: Config, learner: dict) -> tuple[str, ...]:
    lc = cfg.learner
    keys = [] if lc.gradient_checkpointing else ["learner.gradient_checkpointing"]
    keys += ["learner.micro_batch_tokens", "learner.micro_batch_seqs", "learner.logit_chunk_tokens"]
    if lc.zero_stage < 3 or not (lc.offload_optimizer and lc.offload_params):
        keys += ["learner.zero_stage", "learner.offload_optimizer", "learner.offload_params"]
    keys += ["rollout.max_new_tokens"]
    return tuple(keys)


def _learner(plan: MemoryPlan, cfg: Config, s: ModelShape) -> dict:
    role = "learner rank"
    lc, r, d = cfg.learner, cfg.rollout, cfg.data
    b = dtype_bytes(cfg.model.dtype)
    N, z = lc.world_size, lc.zero_stage
    P = s.num_params()
    Pn = P / N
    bf16 = b == 2
    add = plan.add
    # fixed
    fixed = add(role, "CUDA context", CUDA_CONTEXT_BYTES, "per process (estimate)", "resident")
    if N > 1:
        fixed += add(role, "NCCL (DeepSpeed group)", NCCL_GROUP_BYTES, "communicator buffers, 8 GPUs (estimate)",
                     "resident")
    if lc.sync_transport == "broadcast" and not cfg.trainer.colocate:
        fixed += add(role, "NCCL (weight broadcast, rank 0)", NCCL_BUFFERS_MB * MiB, "one more communicator",
                     "resident")
    # ZeRO state on the GPU
    res = 0
    if z == 3:
        on_gpu = 0 if lc.offload_params else b * Pn
        res += add(role, "weights (ZeRO-3 partition)", on_gpu + b * s.persistent_params(),
                   f"{'0 (offload_params: host)' if lc.offload_params else 'b x params / world'}"
                   f" + unpartitioned params < {DS_PARAM_PERSISTENCE:.0e} elements", "resident")
    else:
        res += add(role, "weights", b * P, f"b x {P / 1e9:.2f}B params", "resident")
    acc = 4 if grads_accumulate_in_fp32(z, cfg.model.dtype) else b
    if z in (0, 1):
        grads, gf = b * P, "full gradients (param.grad) in the model dtype"
    elif lc.offload_optimizer:
        grads, gf = 0, "partition on the host (offload_optimizer)"
    else:
        grads, gf = acc * Pn, f"{acc} B x params / world (gradient partition, grad_accum_dtype)"
    res += add(role, "gradients", grads, gf, "resident")
    if z > 0:
        res += add(role, "reduce bucket", b * DS_REDUCE_BUCKET, f"reduce_bucket_size {DS_REDUCE_BUCKET:.0e} x b "
                   "(DeepSpeed default)", "resident")
    opt_host = lc.offload_optimizer and z > 0
    if z == 0:
        master = 4 * P if bf16 else 0
        moments = 8 * P
    else:
        master = 0 if opt_host else 4 * Pn
        moments = 0 if opt_host else 8 * Pn
    res += add(role, "fp32 master weights", master, "host (offload_optimizer)" if opt_host else
               ("4 x params / world" if z else "4 x params (bf16 runs)"), "resident")
    res += add(role, "Adam moments", moments, "host (offload_optimizer)" if opt_host else
               ("8 x params / world" if z else "8 x params"), "resident")
    if z == 3 and not opt_host:
        res += add(role, "fp32 gradient buffer", 4 * Pn, "ZeRO-3 keeps it allocated: 4 x params / world", "resident")
    if lc.kl_coef:
        if z == 3:
            ref = (0 if lc.offload_params else b * Pn) + b * s.persistent_params()
            rf = "ZeRO-3 partition, on the host with offload_params"
        else:
            ref, rf = b * P, "whole model in the compute dtype on the learner's GPU"
        res += add(role, "KL reference model", ref, rf, "resident")
    if r.noises_input:  # learner._snapshot_embedding: a gathered copy while the step trains
        res += add(role, "rollout-time input embedding", b * s.vocab_size * s.hidden_size,
                   "b x vocabulary x hidden (the inputs a noise-on-input kind is scored at)", "resident")
    resident = fixed + res
    # the micro-batch
    seq_max = min(d.max_prompt_tokens + r.max_new_tokens, cfg.model.max_model_len)
    L_max = seq_max - 1  # split_by_token_budget: prompt + response - 1 input positions
    best = None
    for B, T, R in longest_micro_batches(L_max, r.max_new_tokens, lc.micro_batch_tokens, lc.micro_batch_seqs):
        att = attention_for("cuda", "sdpa", b, padded=B > 1, gqa=s.num_kv_heads < s.num_heads)
        for soft in ((0, B * R - min(B * R, lc.logit_chunk_tokens)) if r.soft else (0,)):
            est = learner_activations(s, rows=B, seq_len=T, scored=B * R, soft_scored=soft, k=r.k, dtype_bytes_=b,
                                      attention=att, checkpointing=lc.gradient_checkpointing,
                                      chunk_tokens=lc.logit_chunk_tokens, head_fp32=cfg.model.head_dtype == "float32",
                                      entropy_grad=bool(lc.entropy_coef))
            if best is None or est.peak > best[0].peak:
                best = (est, B, T, soft, att)
    est, B, T, soft, att = best
    scen = "soft steps" if soft else "discrete steps"
    plan.notes.append(f"learner micro-batch: {B} row(s) x {T} padded positions ({scen}), attention {att.name}; "
                      f"gradient checkpointing {'on' if lc.gradient_checkpointing else 'off'}")
    for name in est.base_terms:
        add(role, name, est.terms[name], est.formulas[name], "peak")
    for name in est.phases[est.peak_phase]:
        add(role, name, est.terms[name], est.formulas[name] + f" [{est.peak_phase} phase]", "peak")
    density = 0
    if r.noises_input:  # the density's K embedding rows (float32 copy, saved for the backward) and observed input
        density = add(role, "input-noise density", 4 * B * r.max_new_tokens * (2 * r.k + 2) * s.hidden_size,
                      "4 B x soft positions x (2K + 2) x hidden: the rows, their float32 copy, h and mu", "peak")
        if z == 3:  # the density's rows read the input embedding through its module: gathered whole meanwhile
            density += add(role, "ZeRO-3 gathered input embedding", b * s.vocab_size * s.hidden_size,
                           "b x vocabulary x hidden (for a tied model, the LM head already counted)", "peak")
    live = 0
    if z == 3:  # gathered parameters while the forward and backward run
        layer = s.layer_params()
        uses = 3 if lc.gradient_checkpointing else 2  # later layers' forward, (recompute,) backward
        kept = sum(1 for j in range(s.num_layers) if j * uses * layer < DS_MAX_REUSE_DISTANCE)
        live = b * (s.embedding_params() + (kept + 1) * layer + DS_PREFETCH_BUCKET)
        live = add(role, "ZeRO-3 gathered parameters", live,
                   f"LM head (external, gathered throughout) + {kept} trailing layers kept by max_reuse_distance "
                   f"+ the layer in use + prefetch bucket, x b", "peak")
        # reduce_scatter_coalesced flattens a full bucket (or one parameter larger than it, the LM head) before
        # scattering it: b x max(bucket, largest parameter) while the backward runs
        live += add(role, "ZeRO-3 gradient reduce-scatter", b * min(max(DS_REDUCE_BUCKET, s.embedding_params()), P),
                    "flattened copy of a reduce bucket (or the LM head's gradient), x b", "peak")
    step = 0
    if not opt_host:  # the optimizer step on the GPU, after the backward's activations are gone
        local = P if z == 0 else Pn
        fp32_grad = 0 if z == 3 or (z == 0 and not bf16) else 4 * local  # fp32 stage 0: param.grad itself
        # the optimizer's float32 gradient (stages 0-2 build it at the step; ZeRO-3 keeps one allocated) and torch
        # AdamW's foreach sqrt(exp_avg_sq) buffer (the non-finite guard sums each gradient: no [numel] mask)
        step = fp32_grad + 4 * local + (b * min(P, DS_ALLREDUCE_BUCKET) if z == 0 else 0)
    peak_transient = max(est.peak + live + density, step)
    if step > est.peak + live:
        add(role, "optimizer step temporaries", step, "fp32 gradient + AdamW's sqrt buffer "
            "(+ stage 0's flat all-reduce buffer); larger than the backward", "peak")
    slack = add(role, "allocator fragmentation", ALLOCATOR_SLACK * peak_transient,
                f"{ALLOCATOR_SLACK:.0%} of the transient peak (assumption)", "peak")
    peak = resident + peak_transient + slack
    add(role, "= peak", peak, "resident + the largest of the backward's and the optimizer step's transients", "total")
    sync = 0
    if z == 3:  # weight sync: each bucket's parameters gathered whole on every rank
        sync = max(lc.sync_bucket_mb * MiB, b * s.embedding_params())
        add(role, "weight-sync gather (engine awake)", sync, "max(sync_bucket_mb, the largest parameter) x b",
            "sync")
    add(role, "= resident", resident, "what stays while the engines are awake (after release_memory)", "total")
    return {"peak": peak, "resident": resident, "sync": sync, "activations": est}


def _engine(plan: MemoryPlan, cfg: Config, s: ModelShape) -> dict:
    role = "engine GPU"
    r, lc, d = cfg.rollout, cfg.learner, cfg.data
    b = dtype_bytes(cfg.model.dtype)
    tp = r.tensor_parallel_size
    G = plan.gpu_bytes
    add = plan.add
    seqs = r.engine_max_num_seqs(d.prompts_per_step)
    outside = add(role, "CUDA context (outside the budget)", CUDA_CONTEXT_BYTES
                  + (ENGINE_TP_COMM_BYTES if tp > 1 else 0),
                  "per process, taken before vLLM's snapshot" + (" + TP communicators" if tp > 1 else ""), "outside")
    budget = add(role, "gpu_memory_utilization x GPU", r.gpu_memory_utilization * G,
                 f"{r.gpu_memory_utilization} x {_gib(G)}", "budget")
    weights = add(role, "weights", b * s.num_params() / tp, f"b x params / tp={tp}", "in budget")
    batched = VLLM_BATCHED_TOKENS_LARGE_GPU if G >= 70 * GiB else VLLM_BATCHED_TOKENS_DEFAULT
    buffers = add(role, "persistent buffers", batched * (s.hidden_size * b + 64),
                  f"max_num_batched_tokens={batched} x (inputs_embeds bH + ids, positions, ...)", "in budget")
    workspace = add(role, "kernel workspaces", VLLM_WORKSPACE_BYTES, "cuBLAS, attention backend (estimate)",
                    "in budget")
    slots = max(ENGINE_MIN_SLOTS, seqs)
    store, per_pos, per_slot = store_bytes(slots, r.max_new_tokens, r.k, s.vocab_size)
    store = add(role, "soft state store", store,
                f"(max(8, max_num_seqs={seqs}) slots + scratch) x (max_new_tokens x {per_pos} B + {per_slot} B)",
                "in budget")
    H, F = s.hidden_size, s.intermediate_size
    logit_rows = min(seqs, batched)
    fwd = batched * b * max(2 * H + 3 * F // tp, 2 * H + 2 * (s.q_width + s.kv_width) // tp) \
        + logit_rows * s.vocab_size * 4
    cands = candidate_width(cfg, s.vocab_size)
    transients = {
        "profile forward": (fwd, f"{batched} tokens x b x max(2H + 3I/tp, ...) + [{logit_rows}, V] float32 logits "
                                 "(estimate)"),
        "vLLM dummy sampler": (VLLM_SAMPLER_BUFFERS * logit_rows * s.vocab_size * 4,
                               f"{VLLM_SAMPLER_BUFFERS} float32 [{logit_rows}, V] buffers (estimate)"),
        "soft sampler worst case": (sampler_step_bytes(seqs, s.vocab_size, cands, r.k),
                                    f"profile_step: {seqs} rows x V, candidates {cands} (measured fit)"),
        "weight-sync reserve": (sync_reserve_mb(lc) * MiB, "sync_reserve_mb: 2 x sync_bucket_mb (+ NCCL buffers)"),
    }
    for name, (v, f) in transients.items():
        add(role, name, v, f + " [profiling: the largest counts]", "max of")
    peak = max(v for v, _ in transients.values())
    peak = add(role, "profiling peak", peak, "the largest of the four above (vLLM measures the peak, not the sum)",
               "in budget")
    graphs = add(role, "CUDA graphs", VLLM_GRAPH_BYTES, "capture sizes up to min(2 x max_num_seqs, 512) "
                 "(estimate)", "in budget")
    non_kv = weights + buffers + workspace + store + peak + graphs
    kv = budget - non_kv
    kv_heads = max(1, s.num_kv_heads // tp)
    kv_tok = 2 * s.num_layers * kv_heads * s.head_dim * b
    add(role, "KV cache", kv, f"the rest of the budget; {kv_tok / 1024:.0f} KiB/token "
        f"(2 x L x {kv_heads} KV heads x head_dim x b)", "in budget")
    seq_len = min(d.max_prompt_tokens + r.max_new_tokens, cfg.model.max_model_len)
    per_seq = r.max_new_tokens + (d.max_prompt_tokens / r.n if r.prefix_caching == "prompt" else d.max_prompt_tokens)
    per_seq = min(per_seq, seq_len)
    tokens = max(kv, 0) // kv_tok
    fits = int(tokens // per_seq)
    add(role, "KV capacity", 0, f"{tokens} tokens = {fits} full-length sequences ({per_seq:.0f} tokens each: "
        f"prompt shared by the group of n={r.n} when prefix_caching=prompt) for max_num_seqs={seqs}", "info")
    if fits < seqs:
        plan.warnings.append(f"engine GPU: the KV cache holds {fits} full-length sequences but max_num_seqs={seqs}: "
                             "long rollouts will be preempted and recomputed (raise rollout.gpu_memory_utilization, "
                             "or lower rollout.max_num_seqs / rollout.max_new_tokens); a preempted request keeps its "
                             "soft-state slot, so the store can double")
    residue = CUDA_CONTEXT_BYTES + store + graphs + buffers + workspace
    return {"outside": outside, "budget": budget, "non_kv": non_kv, "kv": kv, "kv_per_token": kv_tok,
            "kv_sequences": fits, "residue": residue}
