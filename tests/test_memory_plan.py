"""The memory plan (soft_rl/memory_plan.py) and the meter it is checked with (soft_rl/memory_meter.py).

* The meter against closed forms (plain allocations, views, in-place ops, autograd's saved tensors).
* The plan's learner terms against MemoryMeter on the CPU: one ``PolicyWithSoftHead`` forward + backward
  (the learner's model and chunked head, no DeepSpeed) of a tiny random Qwen2 and of SmolLM2-135M
  (slow), at two sequence lengths, with and without gradient checkpointing, padded (SDPA with a mask) and
  not. The CPU runs HF's SDPA through torch's CPU flash kernel, so the prediction uses
  ``attention_for("cpu", ...)``; the GPU's kernels are checked by tests/gpu/test_memory_plan_cuda.py.
  Tolerances: what the forward saves is predicted tensor by tensor, so it must match within 1% (left out:
  [N]-sized index and bookkeeping vectors); the peak within 2% (left out besides: the head backward's [chunk,
  H] product before its copy into grad_h, per-chunk [chunk] vectors). Measured errors are below 0.6%. The
  test also checks its own power: every principal term is larger than the tolerance in some case, so
  dropping or doubling it fails.
* The soft sampler's fitted step formula against the meter, and the soft state store's size against a
  real store.
* The plan as a whole: closed forms for the ZeRO state, the KV cache and the colocated checks, the
  presets' overflow and its message, the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soft_rl.config import ConfigError, load_config
from soft_rl.memory_meter import MemoryMeter
from soft_rl.memory_plan import (
    DS_REDUCE_BUCKET,
    HEAD_BWD_BUFFERS,
    HEAD_BWD_ENTROPY_BUFFERS,
    HEAD_FWD_BUFFERS,
    GiB,
    ModelShape,
    attention_for,
    check_plan,
    learner_activations,
    plan_for_config,
    sampler_step_bytes,
    store_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes"
PRESETS = {"1.5b": ROOT / "configs" / "softgrpo_r1_distill_qwen_1p5b.yaml",
           "7b": ROOT / "configs" / "softgrpo_r1_distill_qwen_7b.yaml"}
BASE_TOL = 0.01  # what the forward saves (see the module docstring)
PEAK_TOL = 0.02  # the forward + backward peak


# ----------------------------------------------------------------------------------------------- the meter
def test_meter_counts_new_storages_not_views_or_in_place_ops():
    with MemoryMeter() as m:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B: live 8000
        view = a[:10]
        a.add_(1.0)  # in place: nothing new
        c = a * 2  # 4000 B: live 12000 (the peak)
        del b  # live 8000
        d = torch.empty(250)  # 1000 B: live 9000
    assert (m.peak, m.live) == (12000, 9000)
    assert view.shape == (10,) and c.numel() == 1000 and d.numel() == 250
    with MemoryMeter(device="cuda") as m:  # counts only CUDA storages
        torch.empty(1000)
    assert m.peak == 0


def test_meter_counts_autograd_saved_tensors_and_the_backward():
    n = 1000
    x = torch.randn(n, requires_grad=True)  # exists before: not counted, nor its .grad (stolen, see below)
    with MemoryMeter() as m:
        y = x.exp()  # 4n, saved by exp's backward (its output)
        s = (y * 3.0).sum()  # y * 3: 4n, freed after the sum (sum saves no input): peak 8n + 4
        forward_live = m.live  # y + s
        m.reset_peak()
        del y
        s.backward()
        # backward: the seed gradient ones_like(s) (4); MulBackward makes grad * 3 (4n); ExpBackward makes that
        # * exp(x) (4n) while the former and the saved y are alive: 4n + 4n + 4n + 4 + s (4). The last gradient
        # becomes x.grad (it lives on).
    assert forward_live == 4 * n + 4
    assert m.peak == 12 * n + 8
    assert m.live == 4 * n + 4  # x.grad (created inside) and s


# ----------------------------------------------------------------------------------------------- model shapes
@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1-distill-qwen-7b"])
def test_shape_files_count_parameters_like_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = ModelShape.from_dir(SHAPES / name)
    hf_cfg = AutoConfig.from_pretrained(SHAPES / name)
    with torch.device("meta"):  # no memory: the reference count of the real architecture
        model = AutoModelForCausalLM.from_config(hf_cfg)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    assert shape.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())
    small = sum(p.numel() for p in model.parameters() if p.numel() < 100_000)
    assert shape.persistent_params() == small


def test_a_model_path_without_config_json_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        ModelShape.from_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ConfigError, match="model.path.*lacks"):
        ModelShape.from_dir(tmp_path)


# ----------------------------------------------------------------------------------------------- learner terms
def run_micro_batch(hf, *, rows: int, seq_len: int, soft_frac: float, chunk: int, checkpointing: bool,
                    padded: bool, entropy_grad: bool, device, meter, k: int = 5, seed: int = 0):
    """One ``PolicyWithSoftHead`` forward + backward, the learner's loss shape (the log-probs' and, with
    ``entropy_grad``, the entropies' sum, plus the soft logits'), inputs made inside ``meter`` (a context whose
    ``live`` and ``peak`` count bytes since it started). Returns (forward live, peak, scored, soft)."""
    from workers.learner import PolicyWithSoftHead

    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()
    hf.train()
    policy = PolicyWithSoftHead(hf, head_fp32=True, logit_chunk_tokens=chunk, entropy_grad=entropy_grad)
    H, V = hf.config.hidden_size, hf.config.vocab_size
    dtype = next(hf.parameters()).dtype
    for p in hf.parameters():  # preallocated: gradients accumulate in place, as into DeepSpeed's buffers
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len] + [seq_len // 2 if padded else seq_len] * (rows - 1)
    attn = torch.zeros(rows, seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    flat = torch.cat([i * seq_len + torch.arange(n) for i, n in enumerate(lengths)])
    scored = flat.numel()
    soft = int(scored * soft_frac)
    perm = torch.randperm(scored, generator=g)
    soft_rows, disc_rows = flat[perm[:soft]].sort().values, flat[perm[soft:]].sort().values
    args = [attn, torch.arange(seq_len).expand(rows, seq_len), disc_rows, soft_rows,
            torch.randint(0, V, (soft, k), generator=g), torch.randint(0, V, (scored - soft,), generator=g),
            torch.full((scored - soft,), 0.9)]
    args = [a.to(device) for a in args]
    x_cpu = torch.randn(rows, seq_len, H, generator=g)
    with meter as m:
        x = x_cpu.to(device=device, dtype=dtype, copy=True)  # counted: a micro-batch builds its inputs
        disc, soft_logits = policy(x, *args)
        forward_live = m.live
        loss = disc[:, :-1].sum() + soft_logits.sum() + (disc[:, -1].sum() if entropy_grad else 0.0)
        loss.backward()
    for p in hf.parameters():
        p.grad = None
    return forward_live, m.peak, scored, soft


def predict(hf, *, rows, seq_len, scored, soft, chunk, checkpointing, padded, entropy_grad, device):
    shape = ModelShape.from_config(hf.config.to_dict())
    b = next(hf.parameters()).element_size()
    att = attention_for(device, "sdpa", b, padded=padded and rows > 1, gqa=shape.num_kv_heads < shape.num_heads)
    return learner_activations(shape, rows=rows, seq_len=seq_len, scored=scored, soft_scored=soft, k=5,
                               dtype_bytes_=b, attention=att, checkpointing=checkpointing, chunk_tokens=chunk,
                               head_fp32=True, entropy_grad=entropy_grad)


def compare(hf, cases, device="cpu", meter_factory=MemoryMeter, base_tol=BASE_TOL, peak_tol=PEAK_TOL, log=print):
    """Run ``cases`` (dicts of run_micro_batch's keywords), assert base and peak within tolerance, and return the
    terms each case could detect (dropping or doubling them would leave the tolerance)."""
    detected: set[str] = set()
    for case in cases:
        fwd, peak, scored, soft = run_micro_batch(hf, device=device, meter=meter_factory(), **case)
        est = predict(hf, scored=scored, soft=soft, device=device,
                      **{k: case[k] for k in ("rows", "seq_len", "chunk", "checkpointing", "padded", "entropy_grad")})
        log(f"{case}: forward live {fwd / 2**20:.3f} MiB (predicted {est.base / 2**20:.3f}), peak "
            f"{peak / 2**20:.3f} MiB (predicted {est.peak / 2**20:.3f}, {est.peak_phase})")
        assert abs(est.base - fwd) <= base_tol * fwd, (case, est.base, fwd, est.terms)
        assert abs(est.peak - peak) <= peak_tol * peak, (case, est.peak, peak, est.peak_phase, est.terms)
        for name in est.base_terms:
            if abs(est.terms[name]) > base_tol * fwd:
                detected.add(name)
        for name in est.phases[est.peak_phase]:
            if abs(est.terms[name]) > peak_tol * peak:
                detected.add(name)
    return detected


def tiny_qwen2(vocab=4000, hidden=64, intermediate=256, layers=4, heads=4, kv_heads=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return Qwen2ForCausalLM(cfg)


# Each case makes one phase the peak (a tiny model: H 64, V 4000): the head's forward (chunk > H), its backward
# with the entropy's gradient, the soft gather's backward (small chunks), a recomputed layer (checkpointing, long
# rows), and padded rows (SDPA's per-layer mask) with and without checkpointing.
TINY_CASES = [
    dict(rows=1, seq_len=256, soft_frac=0.0, chunk=256, checkpointing=False, padded=False, entropy_grad=False),
    dict(rows=1, seq_len=256, soft_frac=0.0, chunk=256, checkpointing=False, padded=False, entropy_grad=True),
    dict(rows=1, seq_len=256, soft_frac=0.5, chunk=32, checkpointing=False, padded=False, entropy_grad=False),
    dict(rows=1, seq_len=768, soft_frac=0.0, chunk=32, checkpointing=True, padded=False, entropy_grad=False),
    dict(rows=2, seq_len=384, soft_frac=0.5, chunk=64, checkpointing=False, padded=True, entropy_grad=False),
    dict(rows=2, seq_len=384, soft_frac=0.5, chunk=64, checkpointing=True, padded=True, entropy_grad=True),
]
PRINCIPAL_TERMS = {"inputs", "activations", "checkpoint inputs", "final norm and RoPE", "head saved state",
                   "head forward temporaries", "head backward temporaries", "head weight gradient",
                   "soft head backward", "one layer recomputed", "layer backward temporaries"}


def test_learner_terms_match_the_meter_on_a_tiny_qwen2():
    detected = compare(tiny_qwen2(), TINY_CASES)
    assert PRINCIPAL_TERMS <= detected, f"terms no case can detect: {PRINCIPAL_TERMS - detected}"


def test_attention_masks_are_per_layer_terms():
    """Padded rows: SDPA converts HF's boolean [T, T] mask to the query dtype in every layer and saves it (on
    CUDA padded to 16 columns), and HF repeats k and v to all heads; under checkpointing only HF's boolean mask
    (1 B per element) stays, as an input of every layer."""
    shape = ModelShape(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=2048)
    rows, T = 2, 250

    def acts(device, padded, ckpt=False):
        att = attention_for(device, "sdpa", 2, padded=padded, gqa=True)
        est = learner_activations(shape, rows=rows, seq_len=T, scored=rows * T, dtype_bytes_=2, attention=att,
                                  checkpointing=ckpt, chunk_tokens=64)
        return est.terms["checkpoint inputs" if ckpt else "activations"]

    repeat = 2 * 2 * (64 - 32) * rows * T  # k and v, bf16, kv 32 -> q 64 wide, per layer
    assert acts("cpu", True) - acts("cpu", False) == 3 * (rows * 2 * T * T + repeat)
    assert acts("cuda", True) - acts("cuda", False) == 3 * (rows * 2 * T * 256 + repeat)  # 250 -> 256 columns
    assert acts("cuda", True, ckpt=True) - acts("cuda", False, ckpt=True) == rows * T * T


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_head_terms_match_the_meter(entropy_grad):
    """token_scores alone: its forward holds HEAD_FWD_BUFFERS float32 [chunk, V] buffers over the [N] outputs
    and saved vectors, its backward HEAD_BWD_BUFFERS (+ HEAD_BWD_ENTROPY_BUFFERS) over grad_W [V, H] and
    grad_h [N, H] (float32 model: no casts), and one chunk's [chunk, H] product on its way into grad_h. Left out:
    [chunk]-sized vectors (0.03% of the backward here)."""
    from soft_rl.lean_logprobs import token_scores

    N, chunk, V, H = 512, 128, 2000, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    tokens, temp = torch.randint(0, V, (N,), generator=g), torch.full((N,), 0.8)
    unit = chunk * V * 4
    with MemoryMeter() as m:
        lp, ent = token_scores(h, w, None, tokens, temp, chunk_tokens=chunk, entropy_grad=entropy_grad)
        fwd_peak = m.peak
        before = m.live
        m.reset_peak()
        (lp.sum() + (ent.sum() if entropy_grad else 0.0)).backward()
        bwd_extra = m.peak - before
    fwd = HEAD_FWD_BUFFERS * unit + 16 * N  # + lp, ent, lse, mean
    bwd = ((HEAD_BWD_BUFFERS + (HEAD_BWD_ENTROPY_BUFFERS if entropy_grad else 0)) * unit + V * H * 4 + N * H * 4
           + chunk * H * 4)
    assert abs(fwd_peak - fwd) <= 0.02 * fwd, (fwd_peak, fwd)
    assert abs(bwd_extra - bwd) <= 0.02 * bwd, (bwd_extra, bwd)
    assert unit > 0.04 * bwd and V * H * 4 > 0.04 * bwd and N * H * 4 > 0.04 * bwd  # each term detectable


@pytest.mark.slow
def test_learner_terms_match_the_meter_on_smollm2():
    """SmolLM2-135M (Llama, tied embeddings, 30 layers, V 49152), two lengths, with and without checkpointing."""
    from transformers import AutoModelForCausalLM

    from soft_rl.real_model import real_init

    out = ROOT / ".cache" / "smollm2"
    real_init(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    hf.config.use_cache = False
    cases = [dict(rows=1, seq_len=T, soft_frac=0.5, chunk=64, checkpointing=ckpt, padded=False, entropy_grad=False)
             for T in (64, 160) for ckpt in (False, True)]
    detected = compare(hf, cases)
    # its tied 49152 x 576 head makes the soft gather's backward the peak at these lengths
    assert {"activations", "checkpoint inputs", "final norm and RoPE", "soft head backward"} <= detected


# ----------------------------------------------------------------------------------------------- engine terms
@pytest.mark.parametrize("rows,vocab,candidates,width", [(16, 4000, 5, 5), (32, 4000, 5, 5), (16, 8000, 5, 5),
                                                         (16, 4000, 8, 8), (16, 4000, 500, 5), (16, 4000, 4000, 5)])
def test_sampler_step_formula_matches_the_meter(rows, vocab, candidates, width):
    """``sampler_step_bytes`` (a fit) bounds the measured step from above within 15%: its per-candidate 41 B is
    stable_topk's cost for wide windows and overstates narrow-to-medium ones (measured up to 10% at C=200);
    dropping or doubling the vocabulary term (>= 50% of the total at small C) or the candidates term (most of it
    at C = V) leaves that band."""
    from soft_rl.engine_state import SoftStateStore

    store = SoftStateStore(rows, 4, width, 8, "cpu", vocab, max_candidates=candidates)
    with MemoryMeter() as m:  # what the engine runs inside vLLM's profiling: the step at the widest candidates
        assert store.profile_step(rows) == rows
    predicted = sampler_step_bytes(rows, vocab, candidates, width, device="cpu")
    assert m.peak <= predicted <= 1.15 * m.peak, (m.peak, predicted)
    # on CUDA logsumexp's internal [rows, V] buffer comes on top while the logits and their copy are alive
    assert sampler_step_bytes(rows, vocab, candidates, width, device="cuda") >= 12 * rows * vocab


def test_store_bytes_equal_a_real_store():
    from soft_rl.engine_state import SoftStateStore

    total, per_pos, per_slot = store_bytes(12, 40, 5, 300)
    store = SoftStateStore(12, 40, 5, 8, "cpu", 300)
    real = sum(t.numel() * t.element_size() for t in list(store.h.values()) + list(store.t.values()))
    assert total == real
    # per position, K = 5: ids int64, noisy and weights float32, kept bool; token int64, is_soft bool, logprob and
    # token_logprob float32, forced bool
    assert per_pos == 5 * 8 + 2 * 5 * 4 + 5 + 8 + 1 + 2 * 4 + 1 == 103


# ----------------------------------------------------------------------------------------------- the plan
def _cfg(preset: str, *overrides: str):
    name = "r1-distill-qwen-1.5b" if preset == "1.5b" else "r1-distill-qwen-7b"
    return load_config(PRESETS[preset], [f"model.path={SHAPES / name}", *overrides])


def test_activation_rows_in_closed_form_for_the_7b_preset():
    """7B, one 9,215-position row (1024 + 8192 - 1), FlashAttention (no mask), bf16, per token and layer:
    norms 2 x (4H + 4H + 4) + attention (2 x 2 x 3584 + 2 x 2 x 512 + 4 x 28) + MLP 8 x 18944 = 225,400 B."""
    cfg = _cfg("7b", "learner.gradient_checkpointing=false")
    plan = plan_for_config(cfg, 80 * GiB)
    rows = {r.item: r.bytes for r in plan.rows if r.role == "learner rank"}
    per_token = 2 * (4 * 3584 + 4 * 3584 + 4) + (2 * 2 * 3584 + 2 * 2 * 512 + 4 * 28) + 8 * 18944
    assert per_token == 225_400
    assert rows["activations"] == 28 * 9215 * per_token
    ckpt = {r.item: r.bytes for r in plan_for_config(_cfg("7b", "learner.gradient_checkpointing=true"),
                                                     80 * GiB).rows if r.role == "learner rank"}
    assert ckpt["checkpoint inputs"] == 27 * 9215 * 2 * 3584  # each layer's input but the first (the inputs)


def test_kv_cache_and_engine_budget_in_closed_form():
    cfg = _cfg("7b")
    plan = plan_for_config(cfg, 80 * GiB)
    eng = {r.item: r.bytes for r in plan.rows if r.role == "engine GPU"}
    assert eng["gpu_memory_utilization x GPU"] == int(0.6 * 80 * GiB)
    non_kv = sum(eng[k] for k in ("weights", "persistent buffers", "kernel workspaces", "soft state store",
                                  "profiling peak", "CUDA graphs"))
    assert eng["KV cache"] == eng["gpu_memory_utilization x GPU"] - non_kv
    assert eng["profiling peak"] == max(eng[k] for k in ("profile forward", "vLLM dummy sampler",
                                                         "soft sampler worst case", "weight-sync reserve"))
    kv_token = 2 * 28 * 4 * 128 * 2  # K and V, layers, KV heads, head_dim, bf16
    per_seq = 8192 + 1024 / 8  # the group's 8 samples share the prompt's blocks (prefix_caching=prompt)
    assert plan.totals["engine_kv_sequences"] == int((eng["KV cache"] // kv_token) // per_seq)
    assert eng["weights"] == 2 * ModelShape.from_dir(SHAPES / "r1-distill-qwen-7b").num_params()
    # store: max(8, 64 prompts x 8 samples / 8 engines) slots + the scratch slot, x (8192 positions x 103 B of
    # history + the slot's state)
    _, per_pos, per_slot = store_bytes(1, 1, 5, 152064)
    assert per_pos == 103 and eng["soft state store"] == (64 + 1) * (8192 * per_pos + per_slot)


def test_zero_state_by_stage_in_closed_form():
    """Non-colocated 1.5B on 8 learner ranks, bf16: weights b P (stages 0-2) or b P / 8 (stage 3); gradients
    full (0, 1) or a float32 partition (2, 3: grad_accum_dtype fp32); master + Adam 16 P (stage 0) or 12 P / 8;
    the reduce bucket b x 5e8 (stages 1-3)."""
    P = ModelShape.from_dir(SHAPES / "r1-distill-qwen-1.5b").num_params()
    small = ModelShape.from_dir(SHAPES / "r1-distill-qwen-1.5b").persistent_params()
    want = {0: 2 * P + 2 * P + 12 * P, 1: 2 * P + 2 * P + 12 * P / 8 + 2 * DS_REDUCE_BUCKET,
            2: 2 * P + 4 * P / 8 + 12 * P / 8 + 2 * DS_REDUCE_BUCKET,
            3: 2 * P / 8 + 2 * small + 4 * P / 8 + 12 * P / 8 + 4 * P / 8 + 2 * DS_REDUCE_BUCKET}
    for stage, expected in want.items():
        cfg = _cfg("1.5b", "trainer.colocate=false", "learner.sync_transport=broadcast", f"learner.zero_stage={stage}",
                   "learner.offload_optimizer=false", "learner.offload_params=false", "learner.kl_coef=0")
        rows = {r.item: r.bytes for r in plan_for_config(cfg, 80 * GiB).rows
                if r.role == "learner rank" and r.phase == "resident"}
        fixed = sum(rows.pop(k) for k in ("CUDA context", "NCCL (DeepSpeed group)", "NCCL (weight broadcast, rank 0)"))
        assert fixed == int(0.5 * GiB + 1.5 * GiB + 256 * 2**20)
        assert abs(sum(rows.values()) - expected) <= 8, (stage, rows)


def test_overflow_message_names_the_gpu_the_excess_and_the_keys():
    no_ckpt = ("learner.gradient_checkpointing=false", "learner.logit_chunk_tokens=2048")
    message = check_plan(_cfg("1.5b", *no_ckpt), 64 * GiB)
    assert message is not None and "over by" in message
    assert "colocated GPU: learner peak + sleeping engine" in message
    assert "learner.gradient_checkpointing" in message and "learner.micro_batch_tokens" in message
    assert check_plan(_cfg("1.5b", "learner.gradient_checkpointing=true"), 64 * GiB) is None
    # the engine's budget cannot hold the weights and one max_model_len sequence of KV cache
    message = check_plan(_cfg("7b", "rollout.gpu_memory_utilization=0.2"), 80 * GiB)
    assert "engine GPU: its budget" in message and "KV cache of one model.max_model_len" in message
    assert "rollout.gpu_memory_utilization" in message
    # everything on the GPU (ZeRO-0): the learner's resident state does not leave room for the awake engine
    message = check_plan(_cfg("7b", "learner.zero_stage=0", "learner.offload_optimizer=false",
                              "learner.offload_params=false"), 80 * GiB)
    assert "colocated GPU: learner resident + awake engine" in message and "learner.offload_optimizer" in message


def test_checkpointing_takes_the_layers_activations_out_of_the_peak():
    for preset in ("1.5b", "7b"):
        off = plan_for_config(_cfg(preset, "learner.gradient_checkpointing=false"), 80 * GiB)
        on = plan_for_config(_cfg(preset, "learner.gradient_checkpointing=true"), 80 * GiB)
        rows = {r.item: r.bytes for r in off.rows if r.role == "learner rank"}
        assert off.totals["learner_peak"] - on.totals["learner_peak"] > 0.8 * rows["activations"]
        plan = on
        awake = [c for c in plan.checks if c.what == "learner resident + awake engine"][0]
        rows = {(r.role, r.item): r.bytes for r in plan.rows}
        assert awake.need == rows[("colocated GPU", "learner resident (engine awake)")] + \
            rows[("colocated GPU", "engine: context + gpu_memory_utilization x GPU")]
    assert check_plan(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["model.path=/nonexistent"]), GiB) is None


def test_cli_plan_prints_the_plan_and_exits_1_on_overflow(capsys):
    from soft_rl.cli import main

    base = ["plan", "--config", str(PRESETS["1.5b"]), "--gpu-memory-gib", "64",
            f"model.path={SHAPES / 'r1-distill-qwen-1.5b'}"]
    assert main(base + ["learner.gradient_checkpointing=false"]) == 1
    out, err = capsys.readouterr()
    assert "[learner rank]" in out and "[engine GPU]" in out and "KV cache" in out and "64.0 GiB" in out
    assert "over by" in err
    assert main(base + ["learner.gradient_checkpointing=true"]) == 0
    assert main(["plan", "--config", str(PRESETS["1.5b"]), "model.path=/nonexistent"]) == 2
    assert "model.path" in capsys.readouterr().err
