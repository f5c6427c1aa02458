"""Learner -> rollout weight sync through the Ray object store, bucketed, with timeouts and a parity probe.

    sync_weights(learners, pool, bucket_mb=256, timeout_s=600, probe=requests)

1. The learners gather full weights (under ZeRO-3 parameter by parameter) and rank 0 returns them.
2. They are cut into buckets of at most ``bucket_mb``; each bucket is put in the object store once
   and staged by every rollout worker; a final commit reloads them in place in each engine.
3. Every call waits at most ``timeout_s``: a hung or dead engine raises ``WeightSyncError`` naming
   the worker, instead of blocking the run.
4. The parity probe generates fixed requests on every worker and rescores them with the learners:
   the engine's log-probs must equal the learner's (the rollout-vs-learner difference is also the
   metric the driver reports). A mismatch (a lost or corrupted bucket, a wrong name mapping) fails
   loudly.

A torch.distributed broadcast transport (NCCL on GPU) is the follow-up for large models.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
import torch


class WeightSyncError(RuntimeError):
    pass


def make_buckets(state: dict[str, torch.Tensor], bucket_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) groups of at most bucket_mb each (a larger tensor gets its own)."""
    limit = bucket_mb * 2**20
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > limit:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t.detach().cpu().contiguous()))
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _get(refs, timeout_s: float, what: str, worker: int):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise WeightSyncError(f"weight sync: rollout worker {worker} did not finish {what} within {timeout_s:.0f}s "
                              "(engine hung?)") from e
    except ray.exceptions.RayActorError as e:
        raise WeightSyncError(f"weight sync: rollout worker {worker} died during {what}: {e}") from e


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


def sync_weights(learners, pool, *, bucket_mb: float = 256, timeout_s: float = 600.0, probe: Sequence = (),
                 tol: float = 1e-4, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Send the learners' weights (or ``state``) to every rollout worker; returns timing metrics."""
    t0 = time.perf_counter()
    state = learners.full_state_dict() if state is None else state
    t_gather = time.perf_counter() - t0
    buckets = make_buckets(state, bucket_mb)
    refs = [ray.put(b) for b in buckets]
    for i, w in enumerate(pool.workers):
        _get([w.stage_weights.remote(r) for r in refs], timeout_s, "receiving buckets", i)
    for i, w in enumerate(pool.workers):
        _get(w.commit_weights.remote(), timeout_s, "reloading weights", i)
    t_sync = time.perf_counter() - t0
    metrics = {"sync/gather_s": t_gather, "sync/total_s": t_sync, "sync/buckets": float(len(buckets)),
               "sync/mb": sum(t.numel() * t.element_size() for t in state.values()) / 2**20}
    if probe:
        metrics["sync/probe_max_abs_diff"] = check_parity(learners, pool, probe, tol, timeout_s)
    return metrics
