"""The driver's side of a failed broadcast sync (``BroadcastChannel``): a Ray call of the sync that fails sets the
group's abort key at once, so the learner and the engines still blocked in the broadcast raise within about a
second instead of at the sync's deadline, and the channel reports the failed worker and closes the group."""

import time

import pytest
import ray

pytestmark = pytest.mark.slow


def test_failed_call_aborts_the_blocked_members(ray_cluster):
    from tests.broadcast_stubs import BroadcastLearner, BroadcastWorker
    from workers.weight_broadcast import ABORT_POLL_S
    from workers.weight_sync import BroadcastChannel, WeightSyncError

    class Learners:
        actors = [ray.remote(num_cpus=0)(BroadcastLearner).remote()]

    class Pool:
        workers = [ray.remote(num_cpus=0)(BroadcastWorker).remote(m) for m in ("ok", "fail")]

    timeout_s = 60.0
    try:
        channel = BroadcastChannel(Learners, Pool, bucket_mb=16, timeout_s=timeout_s)
        channel._open()
        assert channel.open and len(channel.layout) == 4
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="rollout worker 1 failed receiving the broadcast: .*failed before"):
            channel.send()
        elapsed = time.monotonic() - t0
        # an error model, not a timing: Ray's report of the failed call, one poll of the abort key by each blocked
        # member, their replies through Ray; the sync's deadline (60 s) is far beyond
        assert elapsed < 20 * ABORT_POLL_S + 10.0 < timeout_s, elapsed
        assert not channel.open
        learner, worker = ray.get([Learners.actors[0].last_outcome.remote(), Pool.workers[0].last_outcome.remote()])
        assert "aborted" in learner and "the driver: rollout worker 1 failed" in learner, learner
        assert "aborted" in worker and "the driver: rollout worker 1 failed" in worker, worker
    finally:
        for a in Learners.actors + Pool.workers:
            ray.kill(a)
