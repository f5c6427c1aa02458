"""The error model of compiled (or CUDA-graph) engine steps against eager ones (tests/test_engine_step.py,
tests/gpu/test_engine_step_cuda_graph.py).

A compiled step computes the same float32 function as the eager one with other roundings: inductor reorders
reductions and fuses operations (and on a GPU, Triton's math differs from eager CUDA's). The bound is M times
the eager step's own sensitivity S to a float32-sized rounding error in every arithmetic operation, measured by
running it PERTURB_RUNS times under ``perturbed_ops`` (as tests/test_vllm_soft.py bounds engine-vs-HF
differences with perturbed matmuls): a property of the step and the data, the same on every machine, not of one
processor's rounding. Ids and flags must be equal; ``assert_within_model`` first checks that the data has no
near-tie (no perturbed run changes an id), where an exact comparison would be meaningless.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# -----------------------------------------------------------------------------------------------
U32 = 2.0**-24  # float32 unit roundoff
PERTURB_C = 2.0  # every floating-point op's output is multiplied by 1 + C * U32 * N(0, 1)
PERTURB_RUNS = 4
M_BOUND = 10.0  # as tests/test_vllm_soft.py: compiled may deviate from eager up to M * max(S, s_min)


# operators whose results are rounded (arithmetic); selections and copies (where, masked_fill, gather, topk, cat,
# clamp, max, ...) are exact in every implementation and must keep their exact ties (e.g. masked -1 weights)
ROUNDING_OPS = {"add", "sub", "rsub", "mul", "div", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "reciprocal",
                "pow", "sum", "mean", "logsumexp", "_softmax", "_log_softmax", "cumsum", "sin", "cos", "tanh",
                "sigmoid", "lerp", "addcmul", "addcdiv"}


class perturbed_ops(TorchDispatchMode):
    """Multiply the result of every rounding floating-point operator (``ROUNDING_OPS``, in place too) by
    1 + C * U32 * z, z ~ N(0, 1) from a seeded generator: a float32-sized rounding error in every arithmetic
    operation, and so in every reduction whatever its order (what inductor's reordering and fusion change)."""

    def __init__(self, seed: int):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def _factor(self, t: torch.Tensor) -> torch.Tensor:
        z = torch.randn(t.shape, generator=self.gen, dtype=torch.float64)  # on the CPU: the same on every device
        return 1 + PERTURB_C * U32 * z.to(t.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name.rstrip("_") not in ROUNDING_OPS:
            return out
        if func._schema.is_mutable:  # x.op_(...): perturb x in place
            target = args[0]
            if isinstance(target, torch.Tensor) and target.is_floating_point():
                target.copy_(target.double() * self._factor(target))
            return out
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return (out.double() * self._factor(out)).to(out.dtype)
        return out


EXACT = ("ids", "token", "is_soft", "kept")
VALUES = ("noisy", "weights", "logprob", "token_logprob")


def assert_within_model(eager, compiled, perturbed, label):
    """compiled's ids exactly eager's, its values within M * max(S, s_min) per row and field, where S is the largest
    deviation of a perturbed eager run; returns the largest |compiled - eager| / max(S, s_min) seen."""
    worst = 0.0
    for f in EXACT:
        for p in perturbed:  # no near-tie in the data: a float32-sized error anywhere changes no id
            assert torch.equal(getattr(p, f), getattr(eager, f)), f"{label}: near-tie in {f}; change the seeds"
        assert torch.equal(getattr(compiled, f), getattr(eager, f)), f"{label}: {f}"
    for f in VALUES:
        e = getattr(eager, f).double()
        rows = e.reshape(e.shape[0], -1)
        sens = torch.stack([(getattr(p, f).double() - e).reshape(e.shape[0], -1).abs().amax(1) for p in perturbed])
        scale = torch.maximum(sens.amax(0), U32 * rows.abs().amax(1).clamp_min(1.0))
        dev = (getattr(compiled, f).double() - e).reshape(e.shape[0], -1).abs().amax(1)
        bad = dev > M_BOUND * scale
        assert not bad.any(), f"{label}: {f}: {dev[bad]} > {M_BOUND} * {scale[bad]} (rows {bad.nonzero().flatten()})"
        worst = max(worst, float((dev / scale).max()))
    return worst
