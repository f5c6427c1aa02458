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

Failures (a peer dead or hung): no rank blocks past its deadline, and none is killed.

* Every collective is waited for by polling ``work.is_completed()`` against a deadline: one sync's
  ``timeout_s`` from its first bucket (joining: from the join), shorter than the group's own timeout
  (``group_timeout_s``), so the deadline always fires before gloo's or NCCL's own timeout. Neither
  backend notices a *hung* peer by itself before that timeout, and NCCL does not notice a *dead* one
  on the same node at all (gloo does: its TCP connection drops).
* The group's store holds an abort key (``request_abort``): a rank that fails (an error, its deadline)
  sets it with the reason, and so may the driver the moment Ray reports an actor of the sync dead.
  A watcher thread per rank polls it while a collective is pending (``ABORT_POLL_S``); a store that
  stops answering because its host (learner rank 0) died counts as an abort too, and so does a peer
  process on the same machine (same kernel boot and pid namespace, recorded at the join) that no
  longer exists: the watcher sets the key then. The ranks blocked on the failed peer raise within
  about a second instead of at the deadline. (Measured on CPU: gloo itself reports a dead peer only
  sometimes, depending on when the connection dropped; a hung peer is only caught by the deadline.)
* A failed rank raises ``WeightGroupError`` (the driver turns it into ``WeightSyncError``) and tears its
  group down explicitly (``abort()``, in the background; the object is kept until its in-flight work
  has ended, because destroying a gloo group joins worker threads that a hung peer blocks until the
  group's own timeout). A failed group is never used again: the driver opens a new one.
* NCCL: the group is built with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (clean up, do not tear down the
  process; ProcessGroupNCCL reads it in its constructor, so the learners' DeepSpeed group keeps its
  own setting and a lost learner rank still ends that actor) and ``TORCH_NCCL_DUMP_ON_TIMEOUT=0``.
  Caveat: an error that NCCL itself reports to the watchdog sets a process-wide "dump" flag, on which
  the *first* ProcessGroupNCCL of the process (DeepSpeed's, vLLM's) terminates the process after its
  heartbeat timeout unless that group was built with ``TORCH_NCCL_DUMP_ON_TIMEOUT=0`` too
  (``workers.rollout`` sets it for engine processes). Store operations never run on a thread that
  must return (a TCPStore read from a stopped host blocks past its timeout): the join runs in a helper
  thread, the abort key is read by the watcher and written from a short-lived thread. Residual: an
  NCCL communicator is created by the first collective (inside the join, after a store barrier); a
  peer that dies within that window can leave the helper thread blocked in ``ncclCommInitRank`` (the
  join still raises at its deadline).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.processes import process_gone, process_identity

_PREFIX = "soft_rl_weights"
ABORT_KEY = "abort"
ABORT_POLL_S = 0.2  # how often a rank with a pending collective reads the abort key
_JOINED_KEY = "joined"
_MEMBER_KEY = "member/"  # + rank: the rank's process identity (machine, pid, start time), for the liveness check


class WeightGroupError(RuntimeError):
    """A collective of the weight-sync group failed, timed out or was aborted; the group is torn down."""


def group_timeout_s(timeout_s: float) -> float:
    """The backend's own timeout for a sync timeout of ``timeout_s``: well past every deadline of ours, so
    that gloo's and NCCL's own timeouts (NCCL's watchdog) never fire first."""
    return 2.0 * float(timeout_s) + 30.0


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


# ---------------------------------------------------------------------------------------------- the abort key

def _client(host: str, port: int, timeout_s: float):
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(_PREFIX, store)


def request_abort(host: str, port: int, reason: str, wait_s: float = 5.0) -> bool:
    """Set the abort key of the group whose store is at host:port (the driver, or a failed rank): every rank
    with a pending collective raises within about ``ABORT_POLL_S``. Waits at most ``wait_s`` (the write runs on
    a daemon thread, since a stopped store host would block it); returns whether the key was written by then."""
    done = threading.Event()

    def write():
        with contextlib.suppress(Exception):  # store host gone: the ranks see that by themselves
            _client(host, port, 10.0).set(ABORT_KEY, reason[:2000])
            done.set()

    threading.Thread(target=write, name="soft-rl-weight-abort", daemon=True).start()
    return done.wait(wait_s) if wait_s > 0 else False


class _AbortWatch:
    """Reads the group's abort key every ``ABORT_POLL_S`` on a daemon thread, only while ``active`` (a
    collective is pending), and checks that the peers on this machine (``local_peers``: (rank, pid, start)) still
    exist; ``reason`` is set once the key exists, the store host is gone or a local peer is gone (then the
    watcher sets the key for the others)."""

    def __init__(self, host: str, port: int, rank: int):
        self.host, self.port, self.rank = host, port, rank
        self.reason: str | None = None
        self.local_peers: list[tuple[int, int, float]] = []
        self._active = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def activate(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="soft-rl-weight-abort-watch", daemon=True)
            self._thread.start()
        self._active.set()

    def deactivate(self) -> None:
        self._active.clear()

    def close(self) -> None:
        self._closed = True
        self._active.set()

    def _run(self) -> None:
        store = None
        while True:
            self._active.wait()
            if self._closed:
                return
            try:
                if store is None:
                    store = _client(self.host, self.port, 30.0)
                if store.check([ABORT_KEY]):
                    self.reason = store.get(ABORT_KEY).decode(errors="replace") or "abort requested"
                    return
                dead = [(r, pid) for r, pid, start in self.local_peers if process_gone(pid, start)]
                if dead:
                    reason = (f"rank {self.rank}: peer rank {dead[0][0]} (pid {dead[0][1]}, on this machine) has "
                              "exited")
                    store.set(ABORT_KEY, reason)
                    self.reason = reason
                    return
            except Exception as e:  # noqa: BLE001 - any failure to read the store: its host is gone
                self.reason = (f"the group's store at {self.host}:{self.port} (learner rank 0's process) stopped "
                               f"answering: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                return
            time.sleep(ABORT_POLL_S)


# ---------------------------------------------------------------------------------------------- the group

@dataclass(eq=False)
class SyncGroup:
    group: object  # ProcessGroupGloo | ProcessGroupNCCL
    store: object  # kept alive with the group: rank 0 serves the rendezvous
    device: torch.device
    rank: int
    world_size: int
    timeout_s: float = 600.0  # one sync's deadline (the group's own timeout is group_timeout_s of it)
    host: str = ""
    port: int = 0
    watch: _AbortWatch | None = None
    failed: str | None = None  # why the group was torn down (then it is never used again)
    closed: bool = False
    stats: dict = field(default_factory=lambda: {"collectives": 0, "aborts_seen": 0})


# Torn-down groups, kept referenced until their in-flight work has surely ended (the group's own timeout):
# destroying a gloo group joins its worker threads, which a hung peer blocks until that timeout.
_retired: list[tuple[float, SyncGroup]] = []
_retired_lock = threading.Lock()


def _retire(sync: SyncGroup) -> None:
    now = time.monotonic()
    with _retired_lock:
        _retired[:] = [(t, s) for t, s in _retired if t > now]  # the expired ones are released here
        _retired.append((now + group_timeout_s(sync.timeout_s) + 10.0, sync))


def _teardown(sync: SyncGroup) -> None:
    """Abort the backend (on a daemon thread: NCCL's abort waits up to the group timeout for ncclCommAbort) and
    keep the group referenced until its in-flight work has ended."""
    if sync.watch is not None:
        sync.watch.close()

    def abort():
        with contextlib.suppress(Exception):
            if sync.group is not None:
                sync.group.abort()

    threading.Thread(target=abort, name="soft-rl-weight-group-abort", daemon=True).start()
    _retire(sync)


def abort_group(sync: SyncGroup, reason: str, *, publish: bool = True) -> None:
    """Mark ``sync`` failed, tell every other rank (the abort key, unless ``publish=False``) and tear it down.
    Idempotent."""
    if sync.failed is not None or sync.closed:
        return
    sync.failed = reason
    if publish and sync.host:
        request_abort(sync.host, sync.port, f"rank {sync.rank}: {reason}", wait_s=0.0)  # fire and forget
    _teardown(sync)


def close_group(sync: SyncGroup | None) -> None:
    """Leave the group (a healthy or a failed one) by tearing it down explicitly: ``abort()`` never waits on
    peers, so it is also right after a failure; the group is never used again."""
    if sync is None or sync.closed:
        return
    if sync.failed is None:
        sync.failed = "the group was closed"
        _teardown(sync)
    sync.closed = True


def _make_backend(backend: str, store, rank: int, world_size: int, timeout: timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    # read by ProcessGroupNCCL's constructor: this group's watchdog cleans up without tearing the process down
    with _env(TORCH_NCCL_ASYNC_ERROR_HANDLING="2", TORCH_NCCL_DUMP_ON_TIMEOUT="0"):
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bounded(fn: Callable[[], None], deadline: float, watch: _AbortWatch, what: str, timeout_s: float) -> None:
    """``fn()`` on a daemon thread, waited for until ``deadline`` or an abort (the thread is abandoned then)."""
    done, errors = threading.Event(), []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="soft-rl-weight-join", daemon=True).start()
    while not done.wait(0.02):
        if watch.reason is not None:
            raise WeightGroupError(f"aborted while {what}: {watch.reason}")
        if time.monotonic() >= deadline:
            raise WeightGroupError(f"{what} did not finish within {timeout_s:g}s (a peer dead, hung or not started?)")
    if errors:
        raise WeightGroupError(f"{what} failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]


def open_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float,
               device: torch.device | str = "cpu") -> SyncGroup:
    """Join the standalone sync group (rank 0 hosts the store). Returns once every rank has joined and the
    backend is connected (NCCL: its communicator created), at most ``timeout_s``; raises ``WeightGroupError``
    (and sets the abort key) otherwise. ``timeout_s`` is also each later sync's deadline."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight broadcast backend must be gloo or nccl, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a weight group of {world_size}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    device = torch.device(device)
    timeout = timedelta(seconds=group_timeout_s(timeout_s))
    deadline = time.monotonic() + timeout_s
    watch = _AbortWatch(host, port, rank)
    sync = SyncGroup(None, None, device, rank, world_size, float(timeout_s), host, int(port), watch)
    built: dict = {}

    def join():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread starts on the process's first device
        sync.store = dist.TCPStore(host, port, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore(_PREFIX, sync.store)
        watch.activate()  # the store exists: the abort key can be read from now on
        me = process_identity()
        prefixed.set(f"{_MEMBER_KEY}{rank}", json.dumps(me))
        prefixed.add(_JOINED_KEY, 1)
        while prefixed.add(_JOINED_KEY, 0) < world_size:  # every rank reached the store: none is missing
            time.sleep(0.02)
        if me["space"]:
            peers = [(r, json.loads(prefixed.get(f"{_MEMBER_KEY}{r}"))) for r in range(world_size) if r != rank]
            watch.local_peers = [(r, p["pid"], p["start"]) for r, p in peers if p["space"] == me["space"]]
        group = _make_backend(backend, prefixed, rank, world_size, timeout)  # gloo connects here
        if sync.failed is not None:  # the join gave up meanwhile: this group is nobody's
            with contextlib.suppress(Exception):
                group.abort()
            return
        sync.group = group
        built["work"] = group.broadcast(torch.zeros(1, device=device), 0)  # NCCL creates its communicator

    try:
        _bounded(join, deadline, watch, f"joining the weight group as rank {rank} of {world_size}", timeout_s)
        _await(sync, built["work"], deadline, "the join's first broadcast")
    except WeightGroupError as e:
        if sync.failed is not None:  # raised by _await, which tore the group down already
            raise
        abort_group(sync, str(e), publish=watch.reason is None)
        raise WeightGroupError(f"weight group (rank {rank} of {world_size}): {e}") from e.__cause__
    finally:
        watch.deactivate()
    return sync


def _await(sync: SyncGroup, work, deadline: float, what: str) -> None:
    """Poll ``work`` until it completes, the deadline passes or the group is aborted; raise (and abort the group)
    on anything but success."""
    sync.watch.activate()
    try:
        pause = 5e-5
        while not work.is_completed():
            if sync.watch.reason is not None:
                sync.stats["aborts_seen"] += 1
                _fail(sync, f"aborted during {what}: {sync.watch.reason}", publish=False)
            if time.monotonic() >= deadline:
                _fail(sync, f"{what} did not complete within the sync's {sync.timeout_s:g}s deadline (a peer hung, "
                            "or died unnoticed)")
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        try:
            work.wait()  # gloo: raises the collective's error; NCCL: raises it too, else orders the current stream
        except Exception as e:  # noqa: BLE001 - re-raised as WeightGroupError
            _fail(sync, f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", cause=e)
        sync.stats["collectives"] += 1
    finally:
        sync.watch.deactivate()


def _fail(sync: SyncGroup, reason: str, *, publish: bool = True, cause: BaseException | None = None):
    abort_group(sync, reason, publish=publish)
    raise WeightGroupError(f"weight group (rank {sync.rank} of {sync.world_size}): {reason}") from cause


def _usable(sync: SyncGroup) -> None:
    if sync.closed or sync.failed is not None:
        raise WeightGroupError(f"weight group (rank {sync.rank} of {sync.world_size}) is no longer usable: "
                               f"{sync.failed}")


def sync_deadline(sync: SyncGroup) -> float:
    """The deadline of a sync starting now (``time.monotonic()`` based)."""
    return time.monotonic() + sync.timeout_s


def send(sync: SyncGroup, flat: torch.Tensor, deadline: float | None = None) -> None:
    """Broadcast one bucket from rank 0 (a receiver passes its empty buffer). Returns once the bucket has
    arrived (NCCL: the collective has finished on the GPU), at the latest at ``deadline`` (default: the
    sync's timeout from now), else raises ``WeightGroupError`` with the group torn down."""
    _usable(sync)
    if deadline is None:
        deadline = sync_deadline(sync)
    try:
        work = sync.group.broadcast(flat, 0)
    except Exception as e:  # noqa: BLE001 - e.g. gloo: a peer's connection already closed
        _fail(sync, f"a bucket broadcast could not start: {type(e).__name__}: {e}", cause=e)
    _await(sync, work, deadline, "a bucket broadcast")


def receive(sync: SyncGroup, layout: Sequence[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive every bucket of ``layout`` (lazily, bucket by bucket) as (name, tensor) pairs; the whole
    layout must arrive within the sync's timeout from its first bucket."""
    deadline = None
    for bucket in layout:
        if deadline is None:
            deadline = sync_deadline(sync)
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=sync.device)
        send(sync, flat, deadline)
        yield from unpack(bucket, flat)
