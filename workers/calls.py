"""Waiting on actor calls so that a dead actor is noticed at once.

``ray.get(refs)`` on a group's calls waits for every one of them: when one learner rank dies, the others
block in their collective until its timeout (minutes), and the driver with them. ``get_all`` raises the
first error any call returns (Ray reports a SIGKILLed actor's calls within about a second), so the run can
replace the group right away; ``poll`` runs between waits (the driver's preemption check). Ray is imported
when called (the learner module, which uses this, also runs without Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

POLL_S = 0.5


def get_all(refs: Sequence, timeout_s: float | None = None, poll: Callable[[], None] | None = None,
            what: str = "actor calls") -> list:
    """The results of ``refs`` in order; the first failed call's error as soon as it is known."""
    import ray

    refs = list(refs)
    results: list = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        wait_s = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)  # raises the call's error (RayActorError for a dead actor)
        if pending:
            if poll is not None:
                poll()
            if deadline is not None and time.monotonic() >= deadline:
                raise ray.exceptions.GetTimeoutError(f"{what}: {len(pending)} of {len(refs)} did not finish "
                                                     f"within {timeout_s:.0f}s")
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
