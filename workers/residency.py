"""Who holds a colocated GPU: the rollout engines or the learners.

In a colocated GPU run (``trainer.colocate=true``) learner rank i and engine i share one GPU. The engines
sleep (vLLM sleep mode level 2: weights and KV cache released) while the learners work, and wake for the
weight sync that follows every update, which also gives them back their weights. ``EngineResidency`` keeps
that state, so that the step loop and fault recovery agree on it:

    residency.sleep()                 # after the rollout: the learners get the GPU
    residency.wake()                  # before the sync: learners release their cached memory, engines wake
    with residency.learners_working(sync):   # recovery: a rebuilt learner group replays steps with the
        replay ...                            # engines asleep; engines that were awake are woken after it
                                              # and synced (level 2 discarded their weights)

Without colocation on a GPU every call is a no-op: the engines own their GPUs and never sleep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable


class EngineResidency:
    def __init__(self, actors, enabled: bool):
        """``actors``: the run's ``workers.driver.Actors`` (read at each call: recovery replaces its members)."""
        self.actors, self.enabled = actors, enabled
        self.awake = True  # engines start awake (vLLM allocates its KV cache at start-up)

    def sleep(self, skip: tuple[int, ...] = ()) -> None:
        """Engines asleep (``skip``: lost engines, which cannot answer; their replacements start awake and are put
        to sleep by ``settle_restarted``)."""
        if self.enabled:
            pool = self.actors.pool
            self.actors.pool.sleep(only=[i for i in range(len(pool.workers)) if i not in skip])
        self.awake = False

    def wake(self) -> None:
        """Learners hand their cached GPU memory back, then the engines wake (their weights need a sync)."""
        if self.enabled:
            self.actors.learners.release_memory()
            self.actors.pool.wake_up()
        self.awake = True

    def settle_restarted(self, i: int) -> None:
        """A restarted engine (awake, just given the learners' weights) goes to sleep if the others are asleep."""
        if self.enabled and not self.awake:
            self.actors.pool.sleep(only=[i])

    @contextlib.contextmanager
    def learners_working(self, sync_all: Callable[[], object], skip: tuple[int, ...] = ()):
        """The engines asleep for the duration (a learner group's rebuild and replay need the GPU), then as they
        were: engines that were awake are woken and given the learners' weights with ``sync_all``."""
        was_awake = self.awake
        if was_awake:
            self.sleep(skip)
        yield
        if was_awake and self.enabled:
            sync_all()  # wakes the engines (TrainingRun.sync_engines) and gives them the weights
        self.awake = was_awake
