"""Fault bookkeeping and preemption, free of Ray: what died, when, how long recovery took, and the limits.

A run survives the loss of any rollout engine, reward actor or learner rank (``workers/recovery.py``
restarts them); this module keeps the record that the log, ``metrics.jsonl``, the Ray dashboard
(``faults/*`` gauges) and each step's record are written from, and enforces ``trainer.max_restarts``
per actor kind. ``Preemption`` turns SIGTERM into a request the driver honours at its next safe point.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field

ACTOR_KINDS = ("engine", "reward", "learner")
# `soft-rl train` exits with this code after a preemption (SIGTERM) was handled: a checkpoint holds the run's
# state and `--resume auto` continues it. 75 is EX_TEMPFAIL ("try again later"); the Slurm script requeues on it.
EXIT_PREEMPTED = 75


class RestartLimitError(RuntimeError):
    """An actor kind needed more restarts than ``trainer.max_restarts`` allows."""


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised at a safe point once SIGTERM was received (see ``Preemption``)."""


@dataclass
class Fault:
    """One lost actor: ``kind`` (engine | reward | learner), its index, the phase it was lost in, the cause
    (the error's first line), when it was detected and how long the run took to go on again."""

    kind: str
    index: int
    phase: str
    cause: str
    step: int
    detected_at: float = field(default_factory=time.time)
    recovery_s: float | None = None

    @property
    def actor(self) -> str:
        return f"{self.kind} {self.index}"


class FaultLog:
    """Every fault of the run, restart counts per kind, and the restart budget.

    ``record`` is called when a dead actor is found (it raises ``RestartLimitError`` once a kind exceeds
    ``max_restarts``), ``recovered`` when its replacement is ready; ``step_metrics`` returns the counters
    (cumulative, for the dashboard) and the faults since the previous call (for the step's record)."""

    def __init__(self, max_restarts: dict[str, int], log=print):
        unknown = sorted(set(max_restarts) - set(ACTOR_KINDS))
        if unknown:
            raise ValueError(f"trainer.max_restarts: unknown actor kind(s) {unknown}; known: {list(ACTOR_KINDS)}")
        self.max_restarts = {k: int(max_restarts.get(k, 0)) for k in ACTOR_KINDS}
        self.faults: list[Fault] = []
        self.restarts = dict.fromkeys(ACTOR_KINDS, 0)
        self._reported = 0
        self.log = log

    def record(self, kind: str, index: int, phase: str, cause: BaseException | str, step: int) -> Fault:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        fault = Fault(kind, index, phase, f"{type(cause).__name__}: {text}" if isinstance(cause, BaseException)
                      else text, step)
        self.faults.append(fault)
        self.log(f"[fault] step {step}: {fault.actor} lost during {phase}: {fault.cause}")
        if self.restarts[kind] >= self.max_restarts[kind]:
            raise RestartLimitError(
                f"{fault.actor} was lost during {phase} at step {step} ({fault.cause}) and the run already restarted "
                f"{self.restarts[kind]} {kind} actor(s), trainer.max_restarts.{kind}={self.max_restarts[kind]}")
        self.restarts[kind] += 1
        return fault

    def recovered(self, fault: Fault) -> None:
        fault.recovery_s = time.time() - fault.detected_at
        self.log(f"[fault] step {fault.step}: {fault.actor} restarted; the run went on {fault.recovery_s:.1f}s "
                 "after the loss was detected")

    def step_metrics(self) -> dict:
        new = self.faults[self._reported:]
        self._reported = len(self.faults)
        out: dict = {f"faults/{k}_restarts": v for k, v in self.restarts.items()}
        out["faults/total"] = len(self.faults)
        if new:
            out["faults/events"] = [asdict(f) for f in new]
            out["faults/recovery_s"] = max(f.recovery_s or 0.0 for f in new)
        return out


class Preemption:
    """SIGTERM (Slurm preemption or time limit, ``scancel --signal=TERM``, ``ray job stop``) as a request.

    ``install`` replaces the SIGTERM handler until ``uninstall``; the handler only notes the time, and the
    driver checks ``requested`` at safe points (``check`` raises ``Preempted``). ``grace_s`` is how long
    the driver may take from the signal to its exit (``trainer.preempt_grace_s``; Slurm's KillWait is 30 s)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received_at: float | None = None
        self._previous = None

    def install(self) -> Preemption:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()

    def request(self) -> None:
        """As if SIGTERM had arrived now (tests, or a driver that wants to stop at the next safe point)."""
        self._on_signal(signal.SIGTERM, None)

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def time_left(self) -> float:
        return float("inf") if self.received_at is None else self.grace_s - (time.monotonic() - self.received_at)

    def check(self) -> None:
        if self.requested:
            raise Preempted("SIGTERM received")
