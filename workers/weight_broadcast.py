"""The torch.distributed side of the broadcast weight sync (no Ray, no vLLM: used by both ends).

Group: learner rank 0 is rank 0 and hosts the rendezvous store; every rollout engine process (each
tensor-parallel rank of each engine) is one more rank. The group is standalone (its own TCPStore and
``ProcessGroupGloo`` / ``ProcessGroupNCCL`` object, not ``init_process_group``), so it coexists with
the learners' DeepSpeed group and with vLLM's own group in the same processes.

Wire format: the layout (from ``plan_buckets``) is agreed before any byte moves; each bucket is one
flat tensor of a single dtype, the concatenation of its parameters in layout order. The sender packs
and broadcasts bucket by bucket; a receiver turns each flat tensor back into (name, tensor) views,
lazily, so a model loader can consume them while the next bucket is in flight and at most one
bucket is resident.

Every collective has the group's timeout: a hung peer makes the broadcast fail after ``timeout_s``
(gloo: "Timed out waiting ... for send"), a dead one fails as soon as its connection drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

_PREFIX = "soft_rl_weights"


@dataclass
class Bucket:
    dtype: str  # torch dtype name, e.g. "float32"
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def tensor_spec(name: str, t: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    """The (name, shape, dtype name) spec of a tensor, as ``plan_buckets`` takes it."""
    return name, tuple(t.shape), str(t.dtype).removeprefix("torch.")


def plan_buckets(specs: Sequence[tuple[str, Sequence[int], str]], bucket_mb: float) -> list[Bucket]:
    """Consecutive (name, shape, dtype) specs grouped into single-dtype buckets of at most bucket_mb
    (a larger tensor gets a bucket of its own)."""
    limit = bucket_mb * 2**20
    out: list[Bucket] = []
    cur: Bucket | None = None
    size = 0
    for name, shape, dtype in specs:
        nbytes = _numel(shape) * _itemsize(dtype)
        if cur is None or cur.dtype != dtype or (cur.names and size + nbytes > limit):
            cur, size = Bucket(dtype), 0
            out.append(cur)
        cur.names.append(name)
        cur.shapes.append(tuple(int(d) for d in shape))
        size += nbytes
    return out


def pack(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The bucket's flat wire tensor from its parameters (in layout order)."""
    if len(tensors) != len(bucket.names):
        raise ValueError(f"bucket has {len(bucket.names)} tensors, got {len(tensors)}")
    dtype = getattr(torch, bucket.dtype)
    for name, shape, t in zip(bucket.names, bucket.shapes, tensors, strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"weight {name}: shape {tuple(t.shape)} differs from the agreed layout {shape}")
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def unpack(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs of a received flat tensor."""
    offset = 0
    for name, shape in zip(bucket.names, bucket.shapes, strict=True):
        n = _numel(shape)
        yield name, flat[offset:offset + n].view(shape)
        offset += n


@dataclass
class SyncGroup:
    group: object  # ProcessGroupGloo | ProcessGroupNCCL
    store: object  # kept alive with the group: rank 0 serves the rendezvous
    device: torch.device
    rank: int
    world_size: int


def open_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float,
               device: torch.device | str = "cpu"):
    """Join the standalone sync group (rank 0 hosts the store). Blocks until all ranks have joined,
    at most ``timeout_s``."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(_PREFIX, store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"weight broadcast backend must be gloo or nccl, got {backend!r}")
    sync = SyncGroup(group, store, torch.device(device), rank, world_size)
    send(sync, torch.zeros(1, device=device))  # every rank has connected before the first bucket
    return sync


def send(sync: SyncGroup, flat: torch.Tensor) -> None:
    """Broadcast one bucket from rank 0 (a receiver passes its empty buffer). Returns once the bucket has
    arrived: NCCL's ``wait()`` only orders the current CUDA stream, so the host also waits for it (a hung
    peer then shows up as this call not returning, within the sync timeout, instead of a later failure)."""
    sync.group.broadcast(flat, 0).wait()
    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()


def receive(sync: SyncGroup, layout: Sequence[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive every bucket of ``layout`` (lazily, bucket by bucket) as (name, tensor) pairs."""
    for bucket in layout:
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=sync.device)
        send(sync, flat)
        yield from unpack(bucket, flat)
