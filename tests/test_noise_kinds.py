"""The noise-kind registry (``soft_rl.noise_kinds``): every registered kind keeps the contract the sampler, the
densities and the config rely on, so a new kind is checked here without a test of its own for these points."""

from __future__ import annotations

import pytest
import torch

from soft_rl import rng
from soft_rl.config import ConfigError, load_config
from soft_rl.densities import DENSITIES, soft_logprob, soft_weights, trainable_noises
from soft_rl.noise_kinds import EPS_LOG, NOISE_KINDS, NOISES, DrawContext
from soft_rl.noise_kinds.embedding_gaussian import EmbeddingObservation
from soft_rl.sampling import SamplingBatch, SoftSamplingParams, soft_sample


def _context(B: int = 6, K: int = 5, seed: int = 0) -> DrawContext:
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(B, K, generator=g) * 2, -1)
    q[0, 3:] = 0  # a row whose truncation emptied two slots
    q = q / q.sum(-1, keepdim=True)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, 4] = False  # a request with k = 4
    col = torch.ones(B, 1)
    return DrawContext(q=q * valid, ell=torch.log(q * valid + EPS_LOG), valid=valid, scale=col, clamp_lo=-1.5 * col,
                       clamp_hi=3.0 * col, alpha=col, seed=torch.arange(B) + 11, step=torch.full((B,), 3))


@pytest.mark.parametrize("name", NOISE_KINDS)
def test_every_kind_draws_finite_values_and_weights_that_sum_to_one_over_the_valid_slots(name):
    kind, ctx = NOISES[name], _context()
    y = kind.draw(ctx)
    assert y.shape == ctx.q.shape and torch.isfinite(y).all()
    assert torch.equal(y, kind.draw(ctx))  # a pure function of the rows' counters
    w = kind.weights(torch.where(ctx.valid, y, torch.zeros_like(y)), torch.full((6,), 0.1), ctx.valid)
    assert (w[~ctx.valid] == 0).all()  # (not >= 0: the Gaussian ablation's x = q + s eps can be negative)
    torch.testing.assert_close(w.sum(-1), torch.ones(6), atol=1e-6, rtol=0)
    assert torch.equal(w, soft_weights(torch.where(ctx.valid, y, torch.zeros_like(y)), name, torch.full((6,), 0.1),
                                       ctx.valid))


@pytest.mark.parametrize("name", NOISE_KINDS)
def test_every_score_a_kind_registers_is_a_density_mode_with_a_finite_value_and_gradient(name):
    kind, ctx = NOISES[name], _context()
    assert set(kind.scores) <= set(DENSITIES)
    assert kind.trainable == (name in trainable_noises())
    y = torch.where(ctx.valid, kind.draw(ctx), torch.zeros_like(ctx.q))
    kept = ctx.valid & (ctx.q > 0)
    g = torch.Generator().manual_seed(1)
    # a kind that noises the input is scored at an observed input: embedding rows at the ids, h near their mixture
    obs = EmbeddingObservation(obs=torch.randn(6, 8, generator=g), rows=torch.randn(6, 5, 8, generator=g),
                               sigma=torch.full((6,), 0.3), tau=torch.full((6,), 0.5)) if kind.noises_input else None
    for mode in kind.scores:
        z = torch.log(ctx.q.clamp_min(1e-4)).requires_grad_(True)  # logits whose p-hat is q on the kept slots
        lp = soft_logprob(z, y, mode, 1.0, noise=name, valid=kept, log_norm=torch.logsumexp(z, -1).detach(),
                          embedding=obs)
        assert lp.shape == (6,) and torch.isfinite(lp).all(), mode
        lp.sum().backward()
        assert torch.isfinite(z.grad).all() and (z.grad[~kept] == 0).all(), mode
    if not kind.trainable:
        with pytest.raises(ValueError, match="has no density"):
            soft_logprob(torch.zeros(6, 5), y, "exact", noise=name)


def test_a_rows_step_does_not_depend_on_the_kinds_of_its_batch_mates():
    """Each kind's branch runs on the whole batch and is selected per row: a row's ids, values, weights, token and
    log-prob are the same in a batch of every kind as alone (bit for bit)."""
    V = 50
    params = [SoftSamplingParams(noise=name, seed=7 + i, top_k=8, k=5, embedding_sigma=0.05)
              for i, name in enumerate(NOISE_KINDS)]
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(4)) * 2
    counters = rng.NoiseCounters(torch.tensor([p.seed for p in params]), torch.full((len(params),), 2))
    together = soft_sample(logits, SamplingBatch.from_params(params), counters, density="exact", hidden_size=16)
    for i, p in enumerate(params):
        alone = soft_sample(logits[i:i + 1], SamplingBatch.from_params([p]),
                            rng.NoiseCounters(counters.seed[i:i + 1], counters.step[i:i + 1]), density="exact",
                            hidden_size=16)
        for field in ("ids", "noisy", "weights", "token", "logprob", "kept"):
            assert torch.equal(getattr(together, field)[i:i + 1], getattr(alone, field)), (p.noise, field)


@pytest.mark.parametrize("name", NOISE_KINDS)
def test_the_config_takes_every_kind_and_refuses_to_train_one_without_a_density(name):
    """Every registered kind runs from the config (a variant through its method's own key) and the sampler gets
    that kind; one without a density is refused for training."""
    key = {"multiplex_uniform": ["rollout.noise=multiplex", "rollout.multiplex_weights=uniform"]}
    overrides = ["model.path=x", *key.get(name, [f"rollout.noise={name}"]), "learner.density=exact"]
    if NOISES[name].trainable:
        assert load_config(None, overrides).rollout.sampling_params(0, embedding_rms=1.0).noise == name
        assert load_config(None, [*overrides, "rollout.soft=false"]).rollout.noise_kind == name
    else:
        with pytest.raises(ConfigError, match="rollout.noise"):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match="rollout.noise"):
        load_config(None, ["model.path=x", "rollout.noise=uniform"])
