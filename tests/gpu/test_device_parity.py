"""soft_rl on the GPU equals soft_rl on the CPU: sampler, densities, lean log-probs, the HF reference's
soft generation and teacher-forced scoring, and a single-process SofT-GRPO update in fp32 (and bf16,
within its rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from soft_rl.densities import DENSITY_MODES, RowNoise, soft_logprob
from soft_rl.lean_logprobs import head_logprobs, token_scores
from soft_rl.rng import NoiseCounters
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample
from tests.gpu.gpu_report import report

PARAMS = [SoftSamplingParams(seed=i, soft=i % 4 != 3, noise=["gumbel", "gaussian", "dirichlet", "gumbel"][i % 4],
                             noise_clamp=None if i % 4 in (1, 2) else (-3.0, 3.0), top_k=5 if i % 4 != 3 else 20)
          for i in range(64)]


def _sample(device, V=1000, density="official"):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(len(PARAMS), V, generator=g) * 4).to(device)
    batch = SamplingBatch.from_params(PARAMS, device=device, width=5)
    steps = torch.arange(len(PARAMS), device=device)
    return soft_sample(logits, batch, NoiseCounters(batch.seed, steps), density=density, candidates=20,
                       kinds=("gumbel", "gaussian", "dirichlet"))


@pytest.mark.parametrize("density", DENSITY_MODES)
def test_sampler_on_the_device_equals_the_cpu(device, density):
    gpu, cpu = _sample(device, density=density), _sample("cpu", density=density)
    for f in ("ids", "token", "is_soft", "kept"):
        assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), f
    for f in ("noisy", "weights", "logprob", "token_logprob"):
        torch.testing.assert_close(getattr(gpu, f).cpu(), getattr(cpu, f), rtol=1e-5, atol=1e-5, msg=f)


def test_densities_and_lean_logprobs_on_the_device_equal_the_cpu(device):
    g = torch.Generator().manual_seed(1)
    N, K, H, V = 256, 5, 32, 300
    hidden = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    noisy = torch.randn(N, K, generator=g) - 1.5
    slots = torch.ones(N, K, dtype=torch.bool)
    is_soft = torch.arange(N) % 3 != 0
    tokens = torch.randint(0, V, (N,), generator=g)
    temperature = torch.full((N,), 0.9)
    noise = RowNoise.from_settings([("gumbel", 1.0, (-3.0, 3.0), 1.0)], [N], [int(is_soft.sum())])

    def run(dev):
        h, w = hidden.to(dev).requires_grad_(), W.to(dev).requires_grad_()
        d = ~is_soft.to(dev)
        disc = token_scores(h[d], w, None, tokens.to(dev)[d], temperature.to(dev)[d], chunk_tokens=64)
        soft = torch.einsum("nh,nkh->nk", h[is_soft.to(dev)], w[ids.to(dev)[is_soft.to(dev)]])
        lp, ent = head_logprobs(disc, soft, is_soft=is_soft.to(dev), noisy=noisy.to(dev),
                                temperature=temperature.to(dev), slots=slots.to(dev), density="official",
                                noise=noise.to(dev), with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        direct = soft_logprob(soft.detach(), noisy[is_soft].to(dev), "official", 1.0)
        return [x.detach().cpu() for x in (lp, ent, h.grad, w.grad, direct)]

    for a, b, name in zip(run(device), run("cpu"), ["logprobs", "entropy", "d hidden", "d W", "density"],
                          strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def _tiny(tmp_path_factory):
    from soft_rl.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("gpu_tiny")
    tok = build_tokenizer(root / "tok")
    model = build_model(root / "qwen2", tok, arch="qwen2", seed=3, hidden=64, layers=2)
    return tok, model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory)


def _rollout(model, tok, device):
    from soft_rl.reference import generate

    prompts = [tok.encode(f"what is {i} + {i + 1}?") for i in range(8)]
    params = [SoftSamplingParams(seed=10 + i, thinking_budget=6, think_end="</think>") for i in range(8)]
    return generate(model.to(device), prompts, params, max_new_tokens=12, eos_token_ids=[], tokenizer=tok)


def test_reference_generation_and_scoring_on_the_device_equal_the_cpu(device, tiny):
    from soft_rl.reference import teacher_forced_logprobs

    tok, model = tiny
    cpu_model, dev_model = copy.deepcopy(model), copy.deepcopy(model)
    cpu, dev = _rollout(cpu_model, tok, "cpu"), _rollout(dev_model, tok, device)
    soft_steps = 0
    for a, b in zip(dev, cpu, strict=True):
        assert torch.equal(a.tokens.cpu(), b.tokens) and torch.equal(a.is_soft.cpu(), b.is_soft)
        torch.testing.assert_close(a.noisy.cpu(), b.noisy, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.logprobs.cpu(), b.logprobs, rtol=1e-4, atol=1e-4)
        soft_steps += int(b.is_soft.sum())
    assert soft_steps > 0
    with torch.no_grad():
        lp_dev = teacher_forced_logprobs(dev_model, cpu)
        lp_cpu = teacher_forced_logprobs(cpu_model, cpu)
    for a, b in zip(lp_dev, lp_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_update_on_the_device_tracks_the_cpu(device, tiny, dtype):
    from soft_rl.single_process import UpdateConfig, grpo_update

    tok, model = tiny
    trajs = _rollout(copy.deepcopy(model), tok, "cpu")
    rewards = torch.tensor([1.0, 0.0] * 4)
    group = torch.arange(4).repeat_interleave(2)
    moved = {}
    for which, dev, dt in (("ref", "cpu", torch.float32), ("got", device, dtype)):
        m = copy.deepcopy(model).to(device=dev, dtype=dt)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4)
        grpo_update(m, opt, trajs, rewards, group, UpdateConfig(mini_batches=2))
        moved[which] = {n: p.detach().float().cpu() for n, p in m.named_parameters()}
    ref, got = moved["ref"], moved["got"]
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    step = max((ref[n] - start[n]).abs().max().item() for n in ref)
    worst = max((got[n] - ref[n]).abs().max().item() for n in ref)
    report(f"single-process update {dtype}: max |device - cpu| = {worst:.2e} (update size {step:.2e})")
    if dtype == torch.float32:
        assert worst <= 1e-5 + 1e-3 * step
    else:  # bf16 weights: the update must still be the CPU's, within bf16 rounding of the weights
        assert worst <= 0.5 * step + 2 ** -7 * max(p.abs().max().item() for p in start.values())


def test_learner_rebuilds_the_engines_mixture_weights_bit_for_bit_on_the_device(device):
    """The weights the engine mixed with (computed on its device) equal, bit for bit, the weights the learner
    rebuilds from the stored values on the same kind of device (``rebuild_weights(traj, device)``, audit 13)."""
    from soft_rl.densities import soft_weights

    out = _sample(device)
    soft = out.is_soft
    for i in soft.nonzero().flatten().tolist():
        p = PARAMS[i]
        valid = torch.arange(5, device=device) < p.k  # Trajectory.slot_valid
        w = soft_weights(out.noisy[i], p.noise, p.tau, valid)
        assert torch.equal(w, out.weights[i]), i


def _bf16_head_problem(device):
    """bf16 hidden states and head at a Qwen2-7B-like shape on CUDA (H 3584, V 152,064, 4,000 positions: two
    chunks of 2,048, the second ragged), a small one for the CPU dry run; logits of standard deviation ~3."""
    N, H, V, chunk = (4000, 3584, 152064, 2048) if device.type == "cuda" else (300, 64, 5003, 128)
    g = torch.Generator(device=device).manual_seed(7)
    h = torch.randn(N, H, generator=g, device=device).bfloat16()
    W = (torch.randn(V, H, generator=g, device=device) * (3 / H ** 0.5)).bfloat16()
    x = torch.randint(0, V, (N,), generator=g, device=device)
    T = 0.6 + 0.4 * torch.rand(N, generator=g, device=device)
    up = torch.randn(2, N, generator=g, device=device, dtype=torch.float64) / N
    return h, W, x, T, up, chunk


def _float64_reference_and_bounds(h, W, x, T, up, rows=512, lam=6.0):
    """Float64 log-probs, entropies and gradients of sum(up[0] lp + up[1] H) from the same bf16 values, with
    error bounds for bf16 inputs and float32 accumulation (u = 2^-24, b = 2^-9 the bf16 half-ulp; rounding
    errors modelled as independent, so a sum of L terms errs by at most lam sqrt(L) u times the sum of the
    terms' magnitudes, Higham & Mary 2019, lam = 6):

    * logits u = h . w / T (H products of exact bf16 values, float32 accumulation): e_u = lam sqrt(H) u |h||w| / T;
    * log-prob and entropy: twice the logits' error plus the V-term sums' (lam sqrt(V) u (1 + max|y|));
    * d L / d z is computed in float32 from those (relative error e_p on its p-terms) and rounded to bf16 (b
      relative, independent per element) before the two GEMMs, whose float32 sums add lam sqrt(L) u; the
      gradients are returned in bf16 (b relative). So for d W = G^T h (and likewise d h = G W):
      |err| <= b |ref| (1 + 2^-8) + lam b sqrt((G^2)^T h^2) + lam sqrt(N) u |G|^T |h| + (e_p P)^T |h|."""
    u32, b16 = 2.0 ** -24, 2.0 ** -9
    N, H = h.shape
    V = W.shape[0]
    h64, W64, T64 = h.double(), W.double(), T.double()
    W_abs, W_sq = W64.abs(), W64 ** 2
    lp, ent = torch.empty(N, dtype=torch.float64, device=h.device), torch.empty(N, dtype=torch.float64, device=h.device)
    e_lp, e_ent = torch.empty_like(lp), torch.empty_like(lp)
    dh, dh_sq, dh_abs, dh_p = (torch.zeros(N, H, dtype=torch.float64, device=h.device) for _ in range(4))
    dW, dW_sq, dW_abs, dW_p = (torch.zeros(V, H, dtype=torch.float64, device=h.device) for _ in range(4))
    for s in range(0, N, rows):
        e = min(s + rows, N)
        t = T64[s:e, None]
        u = h64[s:e] @ W64.T / t
        e_u = lam * H ** 0.5 * u32 * ((h64[s:e].abs() @ W_abs.T) / t).amax(-1)
        logp = torch.log_softmax(u, -1)
        p = logp.exp()
        lp[s:e] = logp.gather(1, x[s:e, None]).squeeze(1)
        ent[s:e] = -(p * logp).sum(-1)
        y_mag = 1 + (u - u.amax(-1, keepdim=True)).abs().amax(-1)
        e_lp[s:e] = 2 * e_u + lam * V ** 0.5 * u32 * y_mag
        e_ent[s:e] = e_lp[s:e] * y_mag
        a, c = up[0, s:e, None] / t, up[1, s:e, None] / t
        mean_u = (p * u).sum(-1, keepdim=True)
        G = -p * (a + c * (u - mean_u))
        G.scatter_add_(1, x[s:e, None], a)
        P = (a.abs() * p + c.abs() * p * (u - mean_u).abs()) * (2 * e_u + lam * V ** 0.5 * u32 * y_mag)[:, None]
        for acc, g_term, h_term in ((dW, G, h64[s:e]), (dW_sq, G * G, h64[s:e] ** 2),
                                    (dW_abs, G.abs(), h64[s:e].abs()), (dW_p, P, h64[s:e].abs())):
            acc.addmm_(g_term.T, h_term)
        for acc, g_term, w_term in ((dh[s:e], G, W64), (dh_sq[s:e], G * G, W_sq),
                                    (dh_abs[s:e], G.abs(), W_abs), (dh_p[s:e], P, W_abs)):
            acc.copy_(g_term @ w_term)
        del u, logp, p, G, P
    del W64, W_abs, W_sq

    def tolerance(ref, sq, ab, prop, n):  # in place, into sq: [V, H] float64 buffers are 4.4 GB at 7B
        sq.sqrt_().mul_(lam * b16).add_(ab.mul_(lam * n ** 0.5 * u32)).add_(prop)
        return sq.add_(ref.abs().mul_(b16 * (1 + 2 ** -8)))

    tol_dW = tolerance(dW, dW_sq, dW_abs, dW_p, N)
    tol_dh = tolerance(dh, dh_sq, dh_abs, dh_p, V)
    return {"logprob": (lp, e_lp), "entropy": (ent, e_ent), "d h": (dh, tol_dh), "d W": (dW, tol_dW)}


def test_bf16_token_scores_at_a_qwen_like_shape_match_float64_within_fp32_accumulation(device):
    """The learner's bf16 head (``token_scores`` with model.head_dtype float32: on CUDA ``torch.mm(bf16, bf16,
    out_dtype=float32)``, never run before this test) forward and backward against a float64 reference of the
    same bf16 values, within ``_float64_reference_and_bounds``; also its peak memory, with the entropy's
    gradient (entropy_coef > 0) and without (the presets), against the design's bound (soft_rl.lean_logprobs:
    forward 2 chunk x V float32 buffers; backward 2 with the entropy's gradient, 1.5 without (the float32
    gradient and its bf16 copy), plus the float32 weight gradient [V, H], its bf16 copy, and d h [N, H])."""
    from soft_rl.lean_logprobs import _cuda_addmm_into_fp32

    h, W, x, T, up, chunk = _bf16_head_problem(device)
    N, H = h.shape
    V = W.shape[0]
    cuda = device.type == "cuda"
    peaks = {}
    for entropy_grad in (False, True):  # warm-up: one-time allocations (cuBLAS workspaces) stay out of the peaks
        hh, ww = h[:64].clone().requires_grad_(), W.clone().requires_grad_()
        lp, ent = token_scores(hh, ww, None, x[:64], T[:64], chunk_tokens=chunk, entropy_grad=entropy_grad)
        (lp.sum() + (ent.sum() if entropy_grad else 0.0)).backward()
    del hh, ww, lp, ent
    for entropy_grad in (False, True):  # the second run's outputs are checked
        hh, ww = h.clone().requires_grad_(), W.clone().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        lp, ent = token_scores(hh, ww, None, x, T, chunk_tokens=chunk, upcast=True, entropy_grad=entropy_grad)
        loss = (up[0].float() * lp).sum() + ((up[1].float() * ent).sum() if entropy_grad else 0.0)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peaks[entropy_grad] = torch.cuda.max_memory_allocated() - base
        assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.bfloat16
    got = {"logprob": lp.detach(), "entropy": ent.detach(), "d h": hh.grad, "d W": ww.grad}
    del hh, ww
    want = _float64_reference_and_bounds(h, W, x, T, up)
    worst = {}
    for name, (ref, tol) in want.items():
        worst[name] = (got[name].double().sub_(ref).abs_().div_(tol)).max().item()
        assert torch.isfinite(got[name]).all() and worst[name] <= 1.0, (name, worst[name])
    report(f"bf16 token_scores N={N} H={H} V={V} chunk={chunk} on {device}: max error / bound "
           + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
    if cuda:
        buf = chunk * V * 4
        grads = V * H * (4 + 2) + N * H * 2 + (0 if _cuda_addmm_into_fp32(device) else V * H * 4)
        for entropy_grad, peak in peaks.items():
            bound = max(2 * buf, (2 if entropy_grad else 1.5) * buf + grads + N * 4 * 8)
            report(f"bf16 token_scores peak memory ({'entropy gradient' if entropy_grad else 'entropy metric'}): "
                   f"{peak / 2**30:.3f} GiB, bound {bound / 2**30:.3f} GiB (chunk x V x 4 = {buf / 2**30:.3f} GiB; "
                   f"fp32 addmm into fp32: {_cuda_addmm_into_fp32(device)})")
            assert peak <= 1.02 * bound + 64 * 2**20, (entropy_grad, peak, bound)
