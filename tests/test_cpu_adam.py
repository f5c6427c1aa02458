"""The offloaded optimizer of GPU runs (DeepSpeed's CPU Adam in AdamW mode behind the learner's collective
non-finite-step guard) performs torch's AdamW update, and skips a step with a non-finite gradient.

Its C++ op is JIT-built into TORCH_EXTENSIONS_DIR on first use (g++ + ninja; about 45 s on 2 cores, then a
few seconds to load from the cache): hence marked slow."""

import math

import pytest
import torch

from soft_rl.config import LearnerConfig

pytestmark = pytest.mark.slow
U32 = 2.0 ** -24  # float32 unit roundoff
SHAPES = [(37, 19), (1000,), (3, 5, 7), (1,)]  # sizes off the SIMD widths (8, 16) exercise the remainder loops
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)  # eps and decay large enough to matter


def _float64_adamw(params, grads, lrs):
    """AdamW (decoupled weight decay, bias-corrected moments) in float64, written out from its definition; also
    the per-step magnitudes (|p|, lr |m^ / (sqrt(v^) + eps)|) that the float32 error bound needs."""
    b1, b2 = HP["betas"]
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    mags = []
    for k, (gs, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        step_mags = []
        for i, g in enumerate(gs):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** k)) / ((v[i] / (1 - b2 ** k)).sqrt() + HP["eps"])
            p[i] = p[i] * (1 - lr * HP["weight_decay"]) - lr * r
            step_mags.append((p[i].abs(), lr * r.abs()))
        mags.append(step_mags)
    return p, mags


def _float32_bound(mags, i):
    """Worst-case float32 error of parameter i after the steps, first order: step k rounds the decayed and the
    updated parameter (2 u |p| each, with margin) and the update r = m^ / (sqrt(v^) + eps) carries the moments'
    relative error, which grows by about 3 u per step in m and v (1.5 u through the square root) plus a few
    roundings in r itself: lr |r| (4.5 k + 6) u, doubled for margin."""
    return sum(4 * U32 * p_mag + 2 * U32 * (4.5 * k + 6) * r_mag
               for k, step in enumerate(mags, start=1) for p_mag, r_mag in [step[i]])


def _problem(steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[1e-2 * torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    lrs = [HP["lr"] * (1 - 0.1 * k) for k in range(steps)]  # a schedule, as the driver sets per step
    return params, grads, lrs


def _run(opt_cls, params, grads, lrs):
    ps = [torch.nn.Parameter(x.clone()) for x in params]
    opt = opt_cls(ps, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    for gs, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def test_guarded_cpu_adam_performs_the_adamw_update_of_torch():
    """Six AdamW steps (decoupled decay, bias correction, a per-step learning rate) of the guarded CPU Adam and
    of torch.optim.AdamW both stay within the float32 error bound of a float64 AdamW written from its
    definition; the bound is tight enough to tell Adam's L2 decay (adamw_mode off) apart."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from workers.learner import GuardedAdamW, guarded_cpu_adam_class

    params, grads, lrs = _problem()
    want, mags = _float64_adamw(params, grads, lrs)
    cpu_adam, opt = _run(guarded_cpu_adam_class(), params, grads, lrs)
    assert isinstance(opt, DeepSpeedCPUAdam) and opt.skipped == 0
    torch_adamw, _ = _run(GuardedAdamW, params, grads, lrs)
    l2_adam, _ = _run(lambda ps, **kw: DeepSpeedCPUAdam(ps, adamw_mode=False, **kw), params, grads, lrs)
    for i, w in enumerate(want):
        bound = _float32_bound(mags, i)
        for name, got in (("cpu adam", cpu_adam[i]), ("torch adamw", torch_adamw[i])):
            excess = ((got.double() - w).abs() - bound).max().item()
            assert excess <= 0, (name, SHAPES[i], excess)
        assert ((l2_adam[i].double() - w).abs() - bound).max().item() > 0  # the control is caught
    assert max(_float32_bound(mags, i).max().item() for i in range(len(want))) < 1e-5


def test_guarded_cpu_adam_skips_a_step_with_a_non_finite_gradient():
    """A non-finite gradient anywhere (here one element of one tensor) skips the whole step: no parameter, no
    moment and no step count changes, the skip is counted, and the next finite step proceeds."""
    from workers.learner import guarded_cpu_adam_class

    params, grads, lrs = _problem(steps=2)
    ps = [torch.nn.Parameter(x.clone()) for x in params]
    opt = guarded_cpu_adam_class()(ps, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    for p, g in zip(ps, grads[0], strict=True):
        p.grad = g.clone()
    opt.step()
    before = [p.detach().clone() for p in ps]
    state_before = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                    for i, p in enumerate(ps)}
    for bad in (math.inf, math.nan):
        for p, g in zip(ps, grads[1], strict=True):
            p.grad = g.clone()
        ps[1].grad[123] = bad
        assert opt.step() is None
        assert all(p.grad is None for p in ps)
        for i, p in enumerate(ps):
            assert torch.equal(p.detach(), before[i])
            for k, v in state_before[i].items():
                assert (torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v), (i, k)
    assert opt.skipped == 2
    for p, g in zip(ps, grads[1], strict=True):
        p.grad = g.clone()
    opt.step()
    assert opt.skipped == 2 and all(not torch.equal(p.detach(), b) for p, b in zip(ps, before, strict=True))


@pytest.mark.parametrize("device,offload,stage,want", [
    ("gpu", True, 3, "GuardedCPUAdam"), ("gpu", True, 2, "GuardedCPUAdam"), ("gpu", False, 3, "GuardedAdamW"),
    ("gpu", True, 0, "GuardedAdamW"), ("cpu", True, 3, "GuardedAdamW")])
def test_the_learner_picks_cpu_adam_for_an_offloaded_optimizer_on_gpu_runs_only(device, offload, stage, want):
    """CPU-only runs keep torch's AdamW (the exactness tests reproduce its update); stage 0 offloads nothing."""
    from workers.learner import make_optimizer

    cfg = LearnerConfig(zero_stage=stage, offload_optimizer=offload, lr=1e-3)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, device)
    assert type(opt).__name__ == want
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["eps"] == cfg.adam_eps
