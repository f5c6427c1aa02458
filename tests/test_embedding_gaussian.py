"""Gaussian soft tokens (``rollout.noise=embedding_gaussian``, soft_rl/noise_kinds/embedding_gaussian.py): the input
noise, the mixture weights, the density against torch.distributions, and rollout = learner on a tiny model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from soft_rl import rng
from soft_rl.config import ConfigError, load_config
from soft_rl.densities import soft_logprob
from soft_rl.evaluation import EvalSettings, checkpoint_embedding_rms
from soft_rl.noise_kinds.embedding_gaussian import (
    EMBEDDING_NOISE,
    EmbeddingObservation,
    embedding_rms,
    embedding_sigma,
    input_noise,
)
from soft_rl.reference import generate, observed_inputs, teacher_forced_logprobs
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, input_offsets, mix_rows_f32, soft_sample
from soft_rl.single_process import UpdateConfig, grpo_update

U32 = 2.0**-24  # float32 unit roundoff
KIND = "embedding_gaussian"


def _reference_logpdf(z, valid, rows, obs, sigma, tau):
    """log N(obs; sum_k softmax(log p-hat / tau)_k rows_k, sigma^2 I) with torch.distributions, all float64."""
    logp_hat = torch.log_softmax(z.double().masked_fill(~valid, float("-inf")), -1)
    pi = torch.softmax((logp_hat / tau.double()[:, None]).masked_fill(~valid, float("-inf")), -1)
    mu = torch.einsum("nk,nkh->nh", pi, rows.double())
    normal = torch.distributions.Normal(mu, sigma.double()[:, None])
    return torch.distributions.Independent(normal, 1).log_prob(obs.double()), mu


def test_the_density_is_the_gaussian_of_torch_distributions_value_and_gradient():
    """Value and gradients (logits, embedding rows) against the float64 torch.distributions density. soft-rl forms
    the [N, H] mixture in float32: |mu_32 - mu| <= K u max|E| per coordinate, so the log-density moves by at most
    sum_j |h_j - mu_j| K u max|E| / sigma^2 (and the gradient d/dE_k = pi_k (h - mu) / sigma^2 by pi_k times that
    coordinate bound / sigma^2); the asserted bounds are 4x these."""
    g = torch.Generator().manual_seed(3)
    N, K, H = 12, 5, 48
    rows = torch.randn(N, K, H, generator=g, dtype=torch.float64).float()
    z = (torch.randn(N, K, generator=g) * 2).requires_grad_(True)
    valid = torch.ones(N, K, dtype=torch.bool)
    valid[0, 3:] = False  # truncated slots
    valid[1, 4] = False
    sigma = torch.rand(N, generator=g) * 0.5 + 0.1
    tau = torch.tensor([0.5, 1.0, 0.1, 2.0] * 3)
    with torch.no_grad():
        _, mu0 = _reference_logpdf(z, valid, rows, torch.zeros(N, H), sigma, tau)
    obs = (mu0 + sigma.double()[:, None] * torch.randn(N, H, generator=g, dtype=torch.float64) * 1.5).float()
    rows_ours = rows.clone().requires_grad_(True)
    ours = soft_logprob(z, torch.zeros(N, K), "exact", noise=KIND, valid=valid, clamp=None,
                        embedding=EmbeddingObservation(obs=obs, rows=rows_ours, sigma=sigma, tau=tau))
    z_ref, rows_ref = z.detach().clone().requires_grad_(True), rows.double().clone().requires_grad_(True)
    want, mu = _reference_logpdf(z_ref, valid, rows_ref, obs, sigma, tau)
    # also the full-covariance form: N(mu, sigma^2 I)
    mvn = torch.distributions.MultivariateNormal(mu.detach(), covariance_matrix=torch.eye(H, dtype=torch.float64)
                                                 * sigma.double()[:, None, None] ** 2)
    torch.testing.assert_close(mvn.log_prob(obs.double()), want.detach(), atol=1e-9, rtol=1e-12)
    coord = K * U32 * rows.abs().amax((1, 2)).double()  # [N] the float32 mixture's error per coordinate
    s2 = sigma.double() ** 2
    bound = (obs.double() - mu.detach()).abs().sum(-1) * coord / s2 + 1e-12 * want.detach().abs()
    err = (ours.double() - want.detach()).abs()
    assert (err <= 4 * bound).all(), (err / bound).max()
    assert ours.dtype == torch.float32
    (ours.sum()).backward()
    want.sum().backward()
    pi = torch.softmax((torch.log_softmax(z.detach().double().masked_fill(~valid, float("-inf")), -1)
                        / tau.double()[:, None]).masked_fill(~valid, float("-inf")), -1)
    g_bound = 4 * pi[..., None] * (coord / s2)[:, None, None] + 1e-6 * rows_ref.grad.abs()
    assert ((rows_ours.grad.double() - rows_ref.grad).abs() <= g_bound + 1e-12).all()
    # d/dz = sum_k (d logp / d pi_k)(d pi_k / dz), d logp / d pi_k = E_k . (h - mu) / sigma^2: each term's error is
    # at most sum_j |E_kj| x the coordinate bound / sigma^2, and the softmax Jacobian's rows sum to at most 2 / tau
    z_bound = 4 * (2 / tau.double()) * rows.double().abs().sum(-1).amax(-1) * coord / s2
    z_err = (z.grad.double() - z_ref.grad.double()).abs()
    assert (z_err <= z_bound[:, None] + 1e-6 * z_ref.grad.double().abs()).all(), (z_err / z_bound[:, None]).max()
    assert (z.grad[~valid] == 0).all() and float(z.grad.abs().max()) > 0  # the logits are trained through mu


def _batch(B, H, V=64, k=5, tau=0.5, top_k=8, top_p=1.0, sigma=0.2, seed=0):
    params = [SoftSamplingParams(noise=KIND, k=k, tau=tau, top_k=top_k, top_p=top_p, embedding_sigma=sigma,
                                 seed=1000 + 7 * i + seed) for i in range(B)]
    return params, SamplingBatch.from_params(params)


def test_the_weights_are_the_tau_softmax_of_the_kept_slots_and_the_most_likely_slot_is_emitted():
    """w = softmax(log q / tau) over the K kept slots (q: temperature, top-k, top-p, renormalised): deterministic
    given the logits, the noise is on the input only; the emitted token is the most likely slot (slot 0)."""
    B, V, H = 16, 64, 8
    z = torch.randn(B, V, generator=torch.Generator().manual_seed(5)) * 2
    params, batch = _batch(B, H, V, top_p=0.8, tau=0.5)
    counters = rng.NoiseCounters(batch.seed, torch.full((B,), 4))
    out = soft_sample(z, batch, counters, density="exact", hidden_size=H)
    p = torch.softmax(z.double(), -1)
    top, idx = p.topk(8, -1)
    keep = torch.cumsum(top / top.sum(-1, keepdim=True), -1) - top / top.sum(-1, keepdim=True) < 0.8
    q = (top * keep)[:, :5]
    q = q / q.sum(-1, keepdim=True)
    w = torch.softmax(torch.log(q) / 0.5, -1)
    assert torch.equal(out.ids, idx[:, :5]) and torch.equal(out.token, idx[:, 0]) and bool(out.is_soft.all())
    torch.testing.assert_close(out.weights.double(), w, atol=4 * 5 * U32 / 0.5, rtol=0)  # float32 softmax of log q
    again = soft_sample(z, batch, rng.NoiseCounters(batch.seed, torch.full((B,), 9)), density="exact", hidden_size=H)
    assert torch.equal(again.weights, out.weights)  # another step's noise: the same weights


def test_the_input_noise_is_sigma_times_a_standard_normal_regenerated_from_the_counters():
    """eps over H coordinates and many (seed, step): mean and variance within 6 standard errors of N(0, 1), a
    negligible correlation between consecutive steps, and the same numbers when regenerated (nothing is stored)."""
    n_rows, H = 400, 256
    seed, step = torch.arange(n_rows) * 31 + 5, torch.arange(n_rows) % 17
    eps = input_noise(seed, step, H).double()
    n = eps.numel()
    assert abs(float(eps.mean())) < 6 / math.sqrt(n)
    assert abs(float(eps.var()) - 1) < 6 * math.sqrt(2 / n)
    nxt = input_noise(seed, step + 1, H).double()
    assert abs(float((eps * nxt).mean())) < 6 / math.sqrt(n)
    assert torch.equal(input_noise(seed, step, H), eps.float())
    # the offsets: sigma eps on the soft rows of the kind, exactly 0 elsewhere (discrete rows, other kinds)
    from soft_rl.noise_kinds import NOISE_CODES

    codes = torch.tensor([NOISE_CODES[KIND], NOISE_CODES[KIND], NOISE_CODES["gumbel"]])
    off = input_offsets(codes, torch.tensor([True, False, True]), seed[:3], step[:3], torch.full((3,), 0.25), H,
                        (KIND, "gumbel"))
    assert torch.equal(off[0], 0.25 * eps[0].float()) and not off[1:].any()
    assert input_offsets(codes, torch.ones(3, dtype=torch.bool), seed[:3], step[:3], torch.ones(3), H,
                         ("gumbel",)) is None


def test_the_rollout_log_prob_is_the_density_of_the_input_it_feeds():
    """soft_sample's log-prob of a Gaussian step equals the learner's density of the input rebuilt from the stored
    values, the embedding and the counters: h - mu = sigma eps at the rollout's own logits. Bound: the float32
    mixture's error (see the density test) plus a few float32 ulps of the value."""
    B, V, H = 10, 64, 32
    g = torch.Generator().manual_seed(9)
    E = torch.randn(V, H, generator=g) * 0.05
    z = torch.randn(B, V, generator=g) * 2
    sigma = embedding_sigma(E)
    params, batch = _batch(B, H, V, sigma=sigma)
    step = torch.arange(B) + 3
    out = soft_sample(z, batch, rng.NoiseCounters(batch.seed, step), density="exact", hidden_size=H)
    off = input_offsets(batch.noise, out.is_soft, batch.seed, step, batch.embedding_sigma, H, (KIND,))
    obs = mix_rows_f32(E[out.ids], out.weights, off)
    lp = soft_logprob(z.gather(1, out.ids), out.noisy, "exact", noise=KIND, valid=out.kept, clamp=None,
                      embedding=EmbeddingObservation(obs=obs, rows=E[out.ids], sigma=batch.embedding_sigma,
                                                     tau=batch.tau))
    coord = 5 * U32 * float(E.abs().max()) * 4
    bound = (H * sigma * 4) * coord / sigma**2 + 8 * U32 * out.logprob.abs()
    assert ((lp - out.logprob).abs() <= bound).all(), ((lp - out.logprob).abs() / bound).max()
    eps = input_noise(batch.seed, step, H).double()
    want = -0.5 * eps.square().sum(-1) - H * math.log(sigma) - 0.5 * H * math.log(2 * math.pi)
    torch.testing.assert_close(out.logprob.double(), want, atol=0, rtol=4 * U32)


def test_sigma_is_the_configured_fraction_of_the_embedding_rms(tiny_dir):
    """sigma = embedding_noise x sqrt(mean E^2) (per coordinate); the evaluation reads the RMS from the checkpoint's
    safetensors alone, equal to the loaded model's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2")
    E = model.get_input_embeddings().weight.detach()
    rms = math.sqrt(float((E.double() ** 2).sum()) / E.numel())
    assert embedding_rms(E) == pytest.approx(rms, rel=1e-12)
    assert embedding_sigma(E) == pytest.approx(EMBEDDING_NOISE * rms, rel=1e-7)
    assert checkpoint_embedding_rms(tiny_dir / "qwen2") == embedding_rms(E)
    s = EvalSettings(noise=KIND, embedding_noise=0.5, embedding_rms=rms)
    assert s.params(3).embedding_sigma == pytest.approx(0.5 * rms, rel=1e-7)
    with pytest.raises(ValueError, match="embedding RMS"):
        EvalSettings(noise=KIND).params(0)
    with pytest.raises(ValueError, match="embedding_sigma"):
        SoftSamplingParams(noise=KIND)
    assert SoftSamplingParams(noise=KIND, soft=False).embedding_sigma == 0.0  # discrete: no input noise


def test_config_keys():
    """rollout.embedding_noise sets sigma from the RMS the driver passes; the kind is scored by the exact density
    only; a bad value names its key."""
    base = ["model.path=/m", f"rollout.noise={KIND}", "learner.density=exact", "rollout.tau=0.5"]
    cfg = load_config(None, [*base, "rollout.embedding_noise=0.2"])
    p = cfg.rollout.sampling_params(0, embedding_rms=0.05)
    assert (p.noise, p.tau) == (KIND, 0.5) and p.embedding_sigma == pytest.approx(0.01, rel=1e-7)
    with pytest.raises(ValueError, match="embedding RMS"):
        cfg.rollout.sampling_params(0)
    with pytest.raises(ConfigError, match="learner.density"):
        load_config(None, [*base[:2], "learner.density=official"])
    with pytest.raises(ConfigError, match=r"rollout\.embedding_noise"):
        load_config(None, [*base, "rollout.embedding_noise=0"])


def test_hf_rollout_and_learner_agree_and_the_update_scores_the_rollout_inputs(tiny_hf, tiny_tokenizer):
    """On a tiny model: the learner's teacher-forced log-probs equal the rollout's at every position before an
    update (the inputs it rebuilds carry the same sigma eps: without it the later positions' logits would differ);
    after an update the step is still scored at the rollout's inputs (the embedding taken before the update), not
    at inputs rebuilt from the updated embedding."""
    _, model0 = tiny_hf
    import copy

    model = copy.deepcopy(model0)
    tok = tiny_tokenizer
    sigma = embedding_sigma(model.get_input_embeddings().weight)
    prompts = [list(tok.encode(f"q{i}: {i} plus {2 * i} is")) for i in range(4) for _ in range(2)]
    params = [SoftSamplingParams(seed=50 + i, noise=KIND, k=4, tau=0.5, top_k=8, embedding_sigma=sigma,
                                 thinking_budget=4 + i % 3, answer_temperature=0.8) for i in range(len(prompts))]
    trajs = generate(model, prompts, params, max_new_tokens=10, eos_token_ids=[], tokenizer=tok, density="exact")
    assert sum(t.num_soft for t in trajs) >= 2 * len(trajs), [t.num_soft for t in trajs]
    lps = teacher_forced_logprobs(model, trajs, "exact")
    for t, lp in zip(trajs, lps, strict=True):
        # float32 forwards of a KV-cached and a full-sequence pass: ~1e-6 relative on the logits; the Gaussian
        # steps' values are ~H / 2 + H |log sigma| in size and carry ~1e-6 relative
        torch.testing.assert_close(lp, t.logprobs, atol=2e-5, rtol=2e-6)
    # the noise matters: the same steps without it score differently (inputs and observations change)
    quiet = [dataclasses.replace(t, sampling=dataclasses.replace(t.sampling, embedding_sigma=sigma * 0.5))
             for t in trajs]
    moved = max(float((a - b).abs().max()) for a, b in zip(teacher_forced_logprobs(model, quiet, "exact"), lps,
                                                          strict=True))
    assert moved > 1.0
    # one update, then the snapshot: inputs rebuilt from the rollout-time embedding are the rollout's bit for bit
    E0 = model.get_input_embeddings().weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rewards = torch.tensor([1.0, 0.0] * 4)
    grpo_update(model, opt, trajs, rewards, torch.arange(4).repeat_interleave(2),
                UpdateConfig(mini_batches=1, density="exact"))
    E1 = model.get_input_embeddings().weight.detach()
    assert float((E1 - E0).abs().max()) > 1e-4  # the embedding moved
    t = trajs[0]
    assert not torch.equal(observed_inputs(E1, t), observed_inputs(E0, t))
    after = teacher_forced_logprobs(model, trajs, "exact", observed_embedding=E0)
    drifted = teacher_forced_logprobs(model, trajs, "exact")
    assert max(float((a - b).abs().max()) for a, b in zip(after, drifted, strict=True)) > 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(after, lps, strict=True)) > 1e-3  # the policy moved
