"""Recovery: a lost actor is replaced and the run goes on as if nothing had happened, bit for bit.

The driver runs each phase of a step through this object; the algorithm's loop stays free of it:

    trajs   = recovery.generate(requests)            # an engine lost mid-generate: restarted in its
                                                      # placement, given the learners' weights, its
                                                      # requests generated again with their seeds
    rewards = recovery.score(texts, golds)            # a reward actor lost or hung: restarted, chunk rescored
    recovery.retry("update", learn, learners_at=s)    # a learner rank lost: the group rebuilt from the
                                                      # newest checkpoint, the steps since replayed from
                                                      # their stored batches (soft_rl/replay.py)
    recovery.retry("sync", sync, learners_at=s + 1)   # either side lost mid-sync: replaced, sync redone

Why the result is bit-identical: an engine's output is a pure function of its weights and its requests
(noise seeds = f(seed, step, index)), and a replacement gets the same weights and the same chunk of
requests; a reward is a pure function of its text; a learner step is a pure function of the learners'
state and the step's batch, and the state is rebuilt exactly (checkpoint + replay).

Which actor is lost is decided from Ray's record of the actor (dead) and, for engines, an answer to a
health call; an error with every actor alive is a bug, not a fault, and is raised as it is. Each loss
is recorded in the run's ``FaultLog`` (which enforces ``trainer.max_restarts``). Once SIGTERM has arrived
(``Preemption``), nothing is restarted: the cluster is going away, and the run stops with ``Preempted``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from soft_rl.checkpoints import checkpoint_step, usable_checkpoints
from soft_rl.faults import FaultLog, Preempted, Preemption, RestartLimitError
from workers.residency import EngineResidency

HEALTH_TIMEOUT_S = 10.0


def actor_dead(handle) -> bool:
    """Whether Ray's control store (GCS) has ``handle``'s actor as dead (no dashboard needed)."""
    from ray._private import state

    try:
        info = state.actors(actor_id=handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - an unreadable record: let the health call decide
        return False
    return bool(info) and info.get("State") == "DEAD"


def engine_lost(worker) -> bool:
    """Dead, or alive without a working engine (its vLLM engine core died), or not answering."""
    import ray

    if actor_dead(worker):
        return True
    try:
        return not ray.get(worker.health.remote(), timeout=HEALTH_TIMEOUT_S)["ok"]
    except Exception:  # noqa: BLE001 - dead or hung either way
        return True


class _Fatal(Exception):  # noqa: N818 - internal: carries an error no restart repairs out of ``retry``
    def __init__(self, error: BaseException):
        self.error = error


class _Workers:
    """A view of some of a pool's workers (``sync_weights`` reads ``.workers``)."""

    def __init__(self, workers: list):
        self.workers = workers


class Recovery:
    """Replaces lost actors of ``actors`` (``workers.driver.Actors``) during a run.

    ``make_learners()`` starts a new learner group where the old one was; ``replay(step)`` runs the
    learner work of RL step ``step`` (1-based) again from its stored batch; ``ckpt_root`` holds the
    run's checkpoints (the driver adds the ones it writes or resumes from to ``own_checkpoints``). ``step`` is
    the step in progress (1-based), for the fault records."""

    def __init__(self, actors, faults: FaultLog, preemption: Preemption, *, make_learners: Callable[[], object],
                 replay: Callable[[int], None], ckpt_root: Path, sync_one: Callable[[int], None],
                 sync_all: Callable[[], object] = lambda: None, residency: EngineResidency | None = None,
                 on_learners_replaced: Callable[[], None] = lambda: None, log=print):
        """``sync_all()``: a full weight sync of every engine (waking colocated ones); ``residency``: whether
        colocated engines are asleep (a rebuilt learner group replays with them asleep)."""
        self.actors, self.faults, self.preemption = actors, faults, preemption
        self.make_learners, self.replay, self.ckpt_root = make_learners, replay, Path(ckpt_root)
        self.sync_one, self.sync_all = sync_one, sync_all
        self.on_learners_replaced, self.log = on_learners_replaced, log
        self.residency = residency or EngineResidency(actors, enabled=False)
        self.step = 0
        # checkpoints this run wrote or resumed from (others in the directory may be another run's)
        self.own_checkpoints: set[str] = set()

    # ------------------------------------------------------------------ the phases

    def generate(self, requests) -> list:
        return self.actors.pool.generate(requests, on_lost=self._engine_lost, poll=self.preemption.check)

    def score(self, texts, golds) -> list[float]:
        return self.actors.rewards.score(texts, golds, on_lost=self._reward_lost, poll=self.preemption.check)

    def retry(self, phase: str, fn: Callable[[], object], *, learners_at: int, uses: tuple[str, ...]):
        """``fn()``, run again after replacing what was lost whenever it fails because an actor of a kind
        in ``uses`` is lost; a lost learner group is first brought back to ``learners_at`` updates."""
        error: BaseException | None = None
        while True:
            try:
                if error is not None:
                    self._recover(error, phase, learners_at, uses)
                    error = None
                return fn()
            except (Preempted, RestartLimitError):
                raise
            except _Fatal as f:
                raise f.error from None
            except Exception as e:  # noqa: BLE001 - classified by _recover
                if self.preemption.requested:
                    raise Preempted(f"SIGTERM received; {phase} failed meanwhile: {e}") from e
                error = e

    # ------------------------------------------------------------------ per kind

    def _engine_lost(self, i: int, error: BaseException) -> None:
        if self.preemption.requested:
            raise Preempted(f"SIGTERM received; rollout engine {i} failed meanwhile: {error}") from error
        if not engine_lost(self.actors.pool.workers[i]):
            raise error
        fault = self.faults.record("engine", i, "generate", error, self.step)
        self._restart_engine(i)
        self.faults.recovered(fault)

    def _reward_lost(self, i: int, error: BaseException) -> None:
        if self.preemption.requested:
            raise Preempted(f"SIGTERM received; reward actor {i} failed meanwhile: {error}") from error
        if not (isinstance(error, TimeoutError) or actor_dead(self.actors.rewards.actors[i])):
            raise error
        fault = self.faults.record("reward", i, "reward", error, self.step)
        self.actors.rewards.restart(i)
        self.faults.recovered(fault)

    def _restart_engine(self, i: int) -> None:
        self.actors.pool.restart(i)
        self.sync_one(i)
        self.residency.settle_restarted(i)  # asleep like the others where they are asleep

    def _lost_actors(self) -> list[tuple[str, int]]:
        a = self.actors
        lost = [("learner", i) for i, h in enumerate(a.learners.actors) if actor_dead(h)]
        lost += [("engine", i) for i, w in enumerate(a.pool.workers) if engine_lost(w)]
        lost += [("reward", i) for i, h in enumerate(a.rewards.actors) if actor_dead(h)]
        return lost

    def _recover(self, error: BaseException, phase: str, learners_at: int, uses: tuple[str, ...]) -> None:
        lost = self._lost_actors()
        if not any(kind in uses for kind, _ in lost):
            raise _Fatal(error)  # every actor this phase uses is alive: a bug, not a fault
        faults = [self.faults.record(kind, i, phase, error, self.step) for kind, i in lost]
        engines = tuple(i for kind, i in lost if kind == "engine")
        if any(kind == "learner" for kind, _ in lost):
            # colocated GPU engines sleep while the new group loads and replays (it needs their GPU memory);
            # lost engines start again once the learners are idle, and the engines that were awake are woken
            # and synced at the end
            with self.residency.learners_working(self.sync_all, skip=engines):
                self.rebuild_learners(learners_at)
                for i in engines:
                    self._restart_engine(i)
        else:
            for i in engines:
                self._restart_engine(i)
        for kind, i in lost:
            if kind == "reward":
                self.actors.rewards.restart(i)
        for fault in faults:
            self.faults.recovered(fault)

    def rebuild_learners(self, learners_at: int) -> None:
        """A new learner group holding exactly the state after ``learners_at`` updates: every rank replaced
        (ZeRO shards the optimizer state, so no survivor can be kept), the newest complete checkpoint at or
        before that step loaded (none: the initial weights, as the run started), the steps since replayed."""
        with contextlib.suppress(Exception):
            self.actors.learners.shutdown()
        self.actors.learners = self.make_learners()
        self.on_learners_replaced()
        base = 0
        for ckpt in usable_checkpoints(self.ckpt_root, self.log):
            if ckpt.name in self.own_checkpoints and checkpoint_step(ckpt) <= learners_at:
                self.actors.learners.load_checkpoint(str(ckpt))
                base = checkpoint_step(ckpt)
                break
        for s in range(base + 1, learners_at + 1):
            self.replay(s)
        self.log(f"[fault] learners rebuilt at step {learners_at}: checkpoint step {base}, "
                 f"{learners_at - base} step(s) replayed from their stored batches")


def sync_one_engine(learners, pool, i: int, bucket_mb: float, timeout_s: float) -> None:
    """The learners' weights into engine ``i`` alone, through the object store (whatever the run's transport:
    a broadcast would need every engine to join, and the others may be busy generating)."""
    from workers.weight_sync import sync_weights

    sync_weights(learners, _Workers([pool.workers[i]]), bucket_mb=bucket_mb, timeout_s=timeout_s)
