"""soft_rl on the GPU equals soft_rl on the CPU: sampler, densities, lean log-probs, the HF reference's
soft generation and teacher-forced scoring, and a single-process SofT-GRPO update in fp32 (and bf16,
within its rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from soft_rl.densities import RowNoise, soft_logprob
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


@pytest.mark.parametrize("density", ["official", "exact"])
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
