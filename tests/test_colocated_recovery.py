"""Fault recovery in a colocated GPU run keeps the engines asleep while a rebuilt learner group loads its
checkpoint and replays (workers/recovery.py, workers/residency.py), checked with recording stand-ins: a CPU
cannot run vLLM's sleep mode, but it can show the order of the calls a GPU run would make.

On a GPU an awake colocated engine holds rollout.gpu_memory_utilization of the GPU; a replay beside it runs out
of memory. Sleep level 2 discards the engines' weights, so every wake must be followed by a full sync."""

from __future__ import annotations

import pytest

from soft_rl.faults import FaultLog, Preemption
from workers.recovery import Recovery
from workers.residency import EngineResidency


class _Worker:
    def __init__(self, calls, i):
        self.calls, self.i = calls, i


class _Pool:
    def __init__(self, calls, n=2):
        self.calls = calls
        self.workers = [_Worker(calls, i) for i in range(n)]

    def sleep(self, only=None):
        self.calls.append(("sleep", tuple(range(len(self.workers)) if only is None else only)))

    def wake_up(self, only=None):
        self.calls.append(("wake", tuple(range(len(self.workers)) if only is None else only)))

    def restart(self, i):
        self.calls.append(("restart_engine", i))
        self.workers[i] = _Worker(self.calls, i)


class _Learners:
    def __init__(self, calls, generation):
        self.calls, self.generation, self.actors = calls, generation, [object()]

    def release_memory(self):
        self.calls.append(("release_memory", self.generation))

    def shutdown(self):
        self.calls.append(("shutdown_learners", self.generation))

    def load_checkpoint(self, path):
        self.calls.append(("load_checkpoint", self.generation))


class _Actors:
    def __init__(self, calls):
        self.pool, self.learners, self.rewards = _Pool(calls), _Learners(calls, 0), None


def _recovery(tmp_path, calls, lost, colocated=True):
    actors = _Actors(calls)
    residency = EngineResidency(actors, enabled=colocated)
    generations = iter(range(1, 10))

    def make_learners():
        calls.append(("make_learners",))
        return _Learners(calls, next(generations))

    def sync_all():  # the driver's sync_engines: wake (colocated), then a full sync
        residency.wake()
        calls.append(("sync_all",))

    rec = Recovery(actors, FaultLog({"engine": 4, "reward": 4, "learner": 4}, log=lambda s: None),
                   Preemption(30.0), make_learners=make_learners, replay=lambda s: calls.append(("replay", s)),
                   ckpt_root=tmp_path, sync_one=lambda i: calls.append(("sync_one", i)), sync_all=sync_all,
                   residency=residency, log=lambda s: None)
    rec._lost_actors = lambda: list(lost)
    return rec, residency


def _fail_once(calls, phase):
    state = {"failed": False}

    def fn():
        if not state["failed"]:
            state["failed"] = True
            raise RuntimeError(f"learner rank 1 died during {phase}")
        calls.append((phase + "_done",))
        return phase

    return fn


def test_learner_lost_after_the_sync_replays_with_engines_asleep_then_wakes_and_syncs(tmp_path):
    """Lost during the checkpoint (engines awake, as after every sync): engines sleep, the group is rebuilt and
    replays 3 steps, the learners release their cache, the engines wake and get the weights, the phase runs."""
    calls: list = []
    rec, residency = _recovery(tmp_path, calls, lost=[("learner", 1)])
    assert rec.retry("checkpoint", _fail_once(calls, "checkpoint"), learners_at=3, uses=("learner",)) == "checkpoint"
    assert calls == [("sleep", (0, 1)), ("shutdown_learners", 0), ("make_learners",), ("replay", 1), ("replay", 2),
                     ("replay", 3), ("release_memory", 1), ("wake", (0, 1)), ("sync_all",), ("checkpoint_done",)]
    assert residency.awake


def test_learner_lost_during_the_update_keeps_engines_asleep_and_a_restarted_engine_sleeps_too(tmp_path):
    """Lost in the update (engines already asleep) together with engine 1 (a node failure): nothing wakes; the
    replacement engine starts after the replay, gets the learners' weights, and is put to sleep like the others."""
    calls: list = []
    rec, residency = _recovery(tmp_path, calls, lost=[("learner", 0), ("engine", 1)])
    residency.sleep()
    calls.clear()
    assert rec.retry("update", _fail_once(calls, "update"), learners_at=2, uses=("learner",)) == "update"
    assert calls == [("shutdown_learners", 0), ("make_learners",), ("replay", 1), ("replay", 2),
                     ("restart_engine", 1), ("sync_one", 1), ("sleep", (1,)), ("update_done",)]
    assert not residency.awake
    assert not any(c[0] in ("wake", "sync_all") for c in calls)


def test_a_lost_engine_is_skipped_when_the_others_go_to_sleep(tmp_path):
    calls: list = []
    rec, residency = _recovery(tmp_path, calls, lost=[("learner", 0), ("engine", 0)])
    rec.retry("eval", _fail_once(calls, "eval"), learners_at=1, uses=("learner", "engine"))
    assert calls[0] == ("sleep", (1,))  # engine 0 is dead: it cannot be asked to sleep
    i_restart = calls.index(("restart_engine", 0))
    assert calls[i_restart + 1: i_restart + 3] == [("sync_one", 0), ("sleep", (0,))]  # asleep like engine 1
    assert calls[-3:] == [("wake", (0, 1)), ("sync_all",), ("eval_done",)] and residency.awake


@pytest.mark.parametrize("phase", ["checkpoint", "update"])
def test_without_colocation_nothing_sleeps_and_the_engines_keep_their_weights(tmp_path, phase):
    calls: list = []
    rec, _ = _recovery(tmp_path, calls, lost=[("learner", 0)], colocated=False)
    rec.retry(phase, _fail_once(calls, phase), learners_at=1, uses=("learner",))
    assert calls == [("shutdown_learners", 0), ("make_learners",), ("replay", 1), (phase + "_done",)]
