"""Waiting on actor calls so that a dead actor is noticed at once.

``ray.get(refs)`` on a group's calls waits for every one of them: when one learner rank dies, the others
block in their collective until its timeout (minutes), and the driver with them. ``get_all`` raises the
first error any call returns (Ray reports a SIGKILLed actor's calls within about a second), so the run can
replace the group right away. ``POLL_S`` is also how often the pools' waits run the driver's preemption
check. Ray is imported when called (the learner module, which uses this, also runs without Ray).
"""

from __future__ import annotations

from collections.abc import Sequence

POLL_S = 0.5


def get_all(refs: Sequence) -> list:
    """The results of ``refs`` in order; the first failed call's error as soon as it is known."""
    import ray

    results: list = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)  # raises the call's error (RayActorError for a dead actor)
    return results


def is_actor_loss(error: BaseException) -> bool:
    """A dead or unreachable actor (the kind of failure a restart repairs), looking through wrapped causes."""
    import ray

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, ray.exceptions.RayActorError | ray.exceptions.GetTimeoutError):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False
