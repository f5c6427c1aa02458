"""The Ray-free parts of fault tolerance: the fault log and restart budget, SIGTERM as a request, checkpoint
manifests (an incomplete checkpoint is skipped, naming it), the stored step batches a learner rebuild replays."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from soft_rl.checkpoints import checkpoint_problem, latest_checkpoint, usable_checkpoints, write_manifest
from soft_rl.faults import FaultLog, Preempted, Preemption, RestartLimitError
from soft_rl.replay import StepBatch, StepBatchStore


def test_fault_log_counts_limits_and_reports_per_step():
    said = []
    log = FaultLog({"engine": 1, "learner": 0}, log=said.append)
    f = log.record("engine", 1, "generate", RuntimeError("ActorDiedError: the actor died\nmore"), step=2)
    assert f.actor == "engine 1" and f.cause == "RuntimeError: ActorDiedError: the actor died"
    log.recovered(f)
    assert f.recovery_s is not None and f.recovery_s >= 0
    m = log.step_metrics()
    assert m["faults/engine_restarts"] == 1 and m["faults/total"] == 1 and m["faults/learner_restarts"] == 0
    events = [(e["kind"], e["index"], e["phase"], e["step"]) for e in m["faults/events"]]
    assert events == [("engine", 1, "generate", 2)]
    assert "faults/events" not in log.step_metrics()  # reported once, in the step it happened
    with pytest.raises(RestartLimitError, match=r"engine 0 was lost during sync at step 3 \(boom\).*"
                                                r"trainer.max_restarts.engine=1"):
        log.record("engine", 0, "sync", "boom", step=3)
    with pytest.raises(RestartLimitError, match="learner 1 .*trainer.max_restarts.learner=0"):
        log.record("learner", 1, "update", "gone", step=3)
    assert any("engine 1 lost during generate" in s for s in said)
    with pytest.raises(ValueError, match="unknown actor kind"):
        FaultLog({"engines": 1})


def test_preemption_turns_sigterm_into_a_request():
    p = Preemption(grace_s=30.0).install()
    try:
        p.check()  # nothing yet
        assert p.time_left() == float("inf")
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only notes the time: the process lives on
        assert p.requested and 29.0 < p.time_left() <= 30.0
        with pytest.raises(Preempted):
            p.check()
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not p._on_signal


def _fake_checkpoint(root, step, files):
    d = root / f"step-{step:08d}"
    (d / "state").mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_incomplete_checkpoints_are_skipped_with_their_name(tmp_path):
    good = _fake_checkpoint(tmp_path, 2, {"state/latest": b"state", "state/mp_rank_00_model_states.pt": b"x" * 10})
    write_manifest(good, 2)
    assert checkpoint_problem(good) is None
    truncated = _fake_checkpoint(tmp_path, 4, {"state/latest": b"state", "state/model.pt": b"x" * 10})
    write_manifest(truncated, 4)
    (truncated / "state" / "model.pt").write_bytes(b"x" * 3)
    unfinished = _fake_checkpoint(tmp_path, 6, {"state/latest": b"state"})  # no manifest
    lost_file = _fake_checkpoint(tmp_path, 8, {"state/latest": b"state", "state/optim.pt": b"y"})
    write_manifest(lost_file, 8)
    (lost_file / "state" / "optim.pt").unlink()
    garbled = _fake_checkpoint(tmp_path, 9, {})
    (garbled / "manifest.json").write_text("{not json")
    said = []
    assert latest_checkpoint(tmp_path, log=said.append) == good
    assert usable_checkpoints(tmp_path, log=lambda s: None) == [good]
    named = [s.split("skipping checkpoint ", 1)[1].split(": ", 1)[0] for s in said]
    assert named == [str(p) for p in (garbled, lost_file, unfinished, truncated)]
    assert "state/model.pt has 3 bytes, the manifest says 10" in said[-1]
    assert "missing state/optim.pt" in said[1] and "no manifest.json" in said[2] and "unreadable" in said[0]
    assert latest_checkpoint(tmp_path / "nothing", log=said.append) is None
    assert json.loads((good / "manifest.json").read_text())["step"] == 2


def test_step_batches_round_trip_and_prune(tmp_path):
    store = StepBatchStore(tmp_path / "replay")
    trajs = [{"tokens": torch.arange(i + 1)} for i in range(4)]  # any picklable trajectories round-trip
    for step in (1, 2, 3):
        store.save(step, StepBatch(trajs, torch.tensor([0.0, 1.0, 0.5, 1.0]) * step, prompts=2))
    b = store.load(2)
    assert b.prompts == 2 and torch.equal(b.rewards, torch.tensor([0.0, 2.0, 1.0, 2.0]))
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(b.trajs, trajs, strict=True))
    assert torch.equal(b.group, torch.tensor([0, 0, 1, 1]))
    store.prune(through=1)
    store.drop_after(2)
    assert store.steps() == [2]
    with pytest.raises(FileNotFoundError, match="no stored batch of step 3"):
        store.load(3)


def test_a_dead_vllm_engine_marks_its_worker_lost():
    """vLLM raises EngineDeadError when one of its processes dies (a tensor-parallel worker killed): the actor is
    alive but useless, so its health says so and the run replaces it; any other error leaves it healthy."""
    from workers.rollout import RolloutRequest, RolloutWorker
    from workers.vllm_soft import engine_dead_error

    EngineDeadError = engine_dead_error()

    class Engine:
        _closed = False

        def __init__(self, error):
            self.error = error

        def generate(self, *args):
            raise self.error

        def stats(self):
            return {}

        def failed(self):
            return False

    for error, lost in ((EngineDeadError(), True), (ValueError("prompt too long"), False)):
        w = RolloutWorker.__new__(RolloutWorker)
        w.engine, w.model_dir, w.generated, w.engine_error = Engine(error), "m", 0, None
        with pytest.raises(type(error)):
            w.generate([RolloutRequest([1, 2], None, 4)])
        assert w.health()["ok"] is not lost and (w.health()["error"] is not None) is lost
