"""Learner -> rollout weight sync through the Ray object store, bucketed, with timeouts and a parity probe.

    sync_weights(learners, pool, bucket_mb=256, timeout_s=600, probe=requests)

1. The weights are cut into buckets of at most ``bucket_mb`` (one plan for both transports).
2. Learner rank 0 returns each bucket in the model dtype into the object store (under ZeRO-3 every
   rank gathers that bucket's parameters); every engine fetches the buckets one at a time and streams
   them into one in-place reload. The driver never holds the weights; the object store holds one
   copy of the model in its dtype, each engine about one bucket (``bench/weight_sync.py`` measures it).
3. Every call waits at most ``timeout_s``: a hung or dead engine raises ``WeightSyncError`` naming
   the worker, instead of blocking the run.
4. The parity probe generates fixed requests on every worker and rescores them with the learners:
   the engine's log-probs must equal the learner's (the rollout-vs-learner difference is also the
   metric the driver reports). A mismatch (a lost or corrupted bucket, a wrong name mapping) fails
   loudly.

Two transports (``learner.sync_transport``):

* ``object_store``: as above (works with colocated engines, where NCCL cannot join two ranks on one GPU).
* ``broadcast``: a ``BroadcastChannel`` (opened once, reopened after a failure) is a standalone
  torch.distributed group of learner rank 0 plus every engine worker process (NCCL on GPU, gloo on
  CPU; ``workers.weight_broadcast``). Buckets are gathered (ZeRO-3: one bucket's parameters at a
  time), broadcast, and streamed into each engine's loader: no object-store copy, no full state
  dict on the driver, at most one bucket resident per process. On GPU with NCCL the learner and an
  engine must not share a device (NCCL does not allow two ranks of a group on one GPU). A dead or hung
  member never blocks the others past the sync's deadline (``timeout_s``) and kills no process: every
  collective is polled against that deadline and an abort key in the group's store, which the driver
  sets as soon as a call of the sync fails (an actor died), so the survivors raise within about a
  second; the group is then torn down (aborted) on every member and reopened by the next sync.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import ray
import torch


class WeightSyncError(RuntimeError):
    pass


# object-store syncs of this driver, numbered: learner rank 0 keys its once-per-sync buckets by them
_SYNC_IDS = itertools.count(time.time_ns())


def make_buckets(state: dict[str, torch.Tensor], bucket_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) groups of at most bucket_mb each (a larger tensor gets its own), cut by
    the same plan as the broadcast transport (``workers.weight_broadcast.plan_buckets``)."""
    from workers.weight_broadcast import plan_buckets, tensor_spec

    plan = plan_buckets([tensor_spec(name, t) for name, t in state.items()], bucket_mb)
    return [[(name, state[name].detach().cpu().contiguous()) for name in b.names] for b in plan]


def _failure(error: Exception, what: str, worker: int, timeout_s: float) -> str | None:
    """What went wrong with rollout worker ``worker`` (a Ray timeout or a dead actor), else None."""
    if isinstance(error, ray.exceptions.GetTimeoutError):
        return f"rollout worker {worker} did not finish {what} within {timeout_s:.0f}s (engine hung?)"
    if isinstance(error, ray.exceptions.RayActorError):
        return f"rollout worker {worker} died during {what}: {error}"
    return None


def _get(refs, timeout_s: float, what: str, worker: int):
    try:
        return ray.get(refs, timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        raise WeightSyncError(f"weight sync: {_failure(e, what, worker, timeout_s)}") from e


def check_parity(learners, pool, probe: Sequence, tol: float, timeout_s: float) -> float:
    """Generate ``probe`` requests on every worker; max |engine log-prob - learner log-prob|."""
    futures = [w.generate.remote(list(probe)) for w in pool.workers]
    worst = 0.0
    for i, f in enumerate(futures):
        trajs = _get(f, timeout_s, "the parity probe", i)
        learner_lp = learners.logprobs(trajs) if len(trajs) >= len(learners.actors) else None
        if learner_lp is None:
            raise WeightSyncError(f"the parity probe needs at least {len(learners.actors)} requests")
        diff = max(float((a - t.logprobs).abs().max()) for a, t in zip(learner_lp, trajs, strict=True))
        if not diff <= tol:
            raise WeightSyncError(f"weight sync parity probe failed on rollout worker {i}: engine and learner "
                                  f"log-probs differ by {diff:.3g} (> {tol:g}); the engine does not hold the "
                                  "learner's weights")
        worst = max(worst, diff)
    return worst


def _first_line(error: BaseException, limit: int = 500) -> str:
    """A Ray task error's own message (its first lines are the remote traceback's header)."""
    cause = getattr(error, "cause", None)
    text = str(cause if cause is not None else error).strip()
    return text.splitlines()[-1][:limit] if text else type(error).__name__


class BroadcastChannel:
    """The broadcast sync group: learner rank 0 (rank 0, hosts the rendezvous) + every engine process."""

    def __init__(self, learners, pool, *, bucket_mb: float = 256, timeout_s: float = 600.0, device: str = "cpu"):
        from workers.weight_broadcast import plan_buckets

        self.learners, self.pool, self.timeout_s = learners, pool, timeout_s
        self.backend = "nccl" if device == "gpu" else "gloo"
        rank0 = learners.actors[0]
        self.layout = plan_buckets(ray.get(rank0.weight_specs.remote(), timeout=timeout_s), bucket_mb)
        self.open = False
        self._address: tuple[str, int] | None = None  # the open group's store (learner rank 0): its abort key

    def _open(self) -> None:
        rank0 = self.learners.actors[0]
        host, port = ray.get(rank0.address.remote(), timeout=self.timeout_s)
        self._address = (host, port)
        ranks = [_get(w.num_ranks.remote(), self.timeout_s, "reporting its ranks", i)
                 for i, w in enumerate(self.pool.workers)]
        world = 1 + sum(ranks)
        base = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        lead = rank0.join_weight_group.remote(host, port, world, self.timeout_s)
        joins = [w.join_weight_group.remote(host, port, b, world, self.backend, self.timeout_s)
                 for w, b in zip(self.pool.workers, base, strict=True)]
        self._wait([lead], joins, "joining the weight broadcast group")
        self.open = True

    def _abort(self, reason: str) -> None:
        """Set the group's abort key: every rank still blocked in a collective of it raises within about a second
        (``workers.weight_broadcast``) instead of at its deadline."""
        from workers.weight_broadcast import request_abort

        if self._address is not None:  # not waited for long: a dead store host (learner rank 0) would only delay
            request_abort(*self._address, f"the driver: {reason}", wait_s=0.5)

    def _wait(self, leads: list, receivers: list, what: str) -> None:
        """Wait for the learner side (one call per learner rank taking part) and every receiver.

        On the first failure (an actor died, a call raised) the group's abort key is set at once, so the ranks
        still blocked in a collective raise within about a second; at the deadline (the ranks' own deadline plus a
        margin) it is set too. The survivors then get a short grace to return, so that they are free again for
        recovery's health checks, and the dead or hung actors are named in the ``WeightSyncError``.
        """
        who = {ref: ("learner rank", j) for j, ref in enumerate(leads)}
        who.update({ref: ("rollout worker", i) for i, ref in enumerate(receivers)})
        grace = min(10.0, 0.5 * self.timeout_s + 2.0)
        end = time.monotonic() + self.timeout_s + min(30.0, 0.5 * self.timeout_s + 5.0)
        pending, errors, aborted = list(who), {}, False
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(max(end - time.monotonic(), 0.0), 1.0))
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified below
                    errors[who[ref]] = e
                    if not aborted:
                        aborted, end = True, min(end, time.monotonic() + grace)
                        kind, i = who[ref]
                        died = isinstance(e, ray.exceptions.RayActorError)
                        # a dead learner rank 0 took the group's store with it: the ranks notice that by themselves
                        if not (died and kind == "learner rank" and i == 0):
                            self._abort(f"{kind} {i} {'died' if died else 'failed'} during {what}")
            if not ready and time.monotonic() >= end:
                if aborted:
                    break
                aborted, end = True, time.monotonic() + grace
                self._abort(f"{what} did not finish within {self.timeout_s:.0f}s")
        if not errors and not pending:
            return
        self.close()
        problems = [f"{kind} {i} did not finish {what} within {self.timeout_s:.0f}s (hung?)"
                    for kind, i in (who[ref] for ref in pending)]
        problems += [f"{kind} {i} died during {what}: {e}" for (kind, i), e in errors.items()
                     if isinstance(e, ray.exceptions.RayActorError)]
        if not problems:  # every actor alive and answering: the errors themselves (the first one caused the others)
            problems = [f"{kind} {i} failed {what}: {_first_line(e)}" for (kind, i), e in errors.items()]
        raise WeightSyncError(f"weight sync (broadcast): {'; '.join(problems)}") from next(iter(errors.values()), None)

    def send(self) -> int:
        """One sync: every learner rank gathers, rank 0 broadcasts, every engine reloads in place."""
        if not self.open:
            self._open()
        receivers = [w.receive_weights.remote(self.layout) for w in self.pool.workers]
        senders = [a.broadcast_weights.remote(self.layout) for a in self.learners.actors]
        self._wait(senders, receivers, "receiving the broadcast")
        return len(self.layout)

    def close(self) -> None:
        """Tear the group down on every member (each aborts its side; it is reopened, on a new port, by the next
        send)."""
        self.open = False
        for a in self.learners.actors[:1]:
            a.leave_weight_group.remote()
        for w in self.pool.workers:
            w.leave_weight_group.remote()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.layout)


def sync_weights(learners, pool, *, bucket_mb: float = 256, timeout_s: float = 600.0, probe: Sequence = (),
                 tol: float = 1e-4, state: dict[str, torch.Tensor] | None = None,
                 channel: BroadcastChannel | None = None) -> dict[str, float]:
    """Send the learners' weights to every rollout worker: through ``channel`` (broadcast) when
    given, else through the object store (``state`` overrides the learners' weights there);
    returns timing metrics."""
    t0 = time.perf_counter()
    if channel is not None:
        if state is not None:
            raise ValueError("state= is only for the object-store transport")
        n = channel.send()
        metrics = {"sync/total_s": time.perf_counter() - t0, "sync/buckets": float(n),
                   "sync/mb": channel.nbytes / 2**20}
        if probe:
            metrics["sync/probe_max_abs_diff"] = check_parity(learners, pool, probe, tol, timeout_s)
        return metrics
    others: list = []
    if state is None and learners.cfg.zero_stage < 3:
        # rank 0 holds full weights: each engine pulls the buckets itself, one ahead of its loader; rank 0
        # packs each bucket once per sync and every engine reads that one object (model dtype, straight from
        # the learner; RolloutWorker.pull_weight_buckets, LearnerWorker.weight_bucket_ref)
        layout = learners.bucket_layout(bucket_mb)
        nbytes, n_buckets = sum(b.nbytes for b in layout), len(layout)
        sync_id, names = next(_SYNC_IDS), [b.names for b in layout]
        loads = [w.pull_weight_buckets.remote(learners.actors[0], names, sync_id, len(pool.workers))
                 for w in pool.workers]
    else:
        if state is None:  # ZeRO-3: every rank joins each bucket's gather, so the driver submits them all
            refs, others, layout = learners.weight_buckets(bucket_mb)
            nbytes = sum(b.nbytes for b in layout)
        else:  # an explicit state (tests): the same plan, put from here
            buckets = make_buckets(state, bucket_mb)
            refs = [ray.put(b) for b in buckets]
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
        n_buckets = len(refs)
        loads = [w.load_weight_buckets.remote(refs) for w in pool.workers]
        del refs  # the engines hold the only references: each bucket leaves the store once all loaded it
    for i, ref in enumerate(loads):
        _get(ref, timeout_s, "loading the weight buckets", i)
    ray.get(others, timeout=timeout_s)
    metrics = {"sync/total_s": time.perf_counter() - t0, "sync/buckets": float(n_buckets), "sync/mb": nbytes / 2**20}
    if probe:
        metrics["sync/probe_max_abs_diff"] = check_parity(learners, pool, probe, tol, timeout_s)
    return metrics
