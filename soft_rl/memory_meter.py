"""Peak tensor memory of a piece of code, on any device (the CPU included), by watching its allocations.

``torch.cuda.max_memory_allocated`` exists only on CUDA; the learner's and the engine's memory terms
(``soft_rl.memory_plan``) are checked on the CPU too. ``MemoryMeter`` is a ``TorchDispatchMode``: every
tensor an operator returns inside it whose storage is new is counted (its storage's bytes) until that
storage is freed, so ``peak`` is the largest number of bytes that code held at once, autograd's saved
tensors and the backward's temporaries included (the autograd engine runs the backward's operators
under the same mode). Storages that existed before the meter started (parameters, inputs) are not
counted, nor is anything an operator allocates and frees inside itself (a kernel's own workspace), nor
allocator rounding and caching: it measures what the program holds, as ``max_memory_allocated`` does
up to its 512-byte block rounding.

    with MemoryMeter() as m:
        loss = model(x).sum(); loss.backward()
    m.peak  # bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MemoryMeter(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active (``device``: count only
    storages on that device type, e.g. "cpu" or "cuda"; None: all)."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}  # storage data pointer -> weak reference (freed: callback)

    def _track(self, t: torch.Tensor) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        s = t.untyped_storage()
        key = s.data_ptr()
        if key == 0 or key in self._seen:  # empty, or a view of a storage already counted
            return
        nbytes = s.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            self.live -= nbytes
            self._seen.pop(key, None)

        self._seen[key] = weakref.ref(s, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an in-place op) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live
