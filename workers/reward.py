"""Reward scoring that untrusted model output cannot stall: Ray actors, each with a killable child.

Why a child process? math-verify hands the box content to sympy, and some strings make sympy run for
minutes or exhaust memory (``\\boxed{9^{9^{9^{9^{9}}}}}`` evaluates an exponent tower; thousands of
nested braces send the LaTeX parser into deep recursion). Python cannot interrupt a thread stuck in
a C-level big-integer operation, and ``signal.alarm`` only works in the main thread, so the only
reliable limit is to run the reward in another process and SIGKILL it. Each scorer keeps one child
alive across samples (start-up takes under a second; a sample milliseconds) and replaces it
only after a timeout or a crash.

Policy for one sample (``TimeoutScorer.score_one``):
- finished within ``timeout_s``      -> the reward's value;
- took longer                        -> 0.0, ``timeouts += 1``, child killed and restarted;
- the reward raised (or returned a non-finite / non-number value) -> 0.0, ``exceptions += 1``;
- the child died (segfault, ``sys.exit``, OOM kill) -> 0.0, ``crashes += 1``, child restarted.
Model output is only ever pickled to the child and handed to the reward function as a string.

``TimeoutScorer`` is plain Python (unit-testable without Ray); ``RewardPool`` spreads a batch over
``num_actors`` Ray actors that each wrap one. Ray is imported only when a pool is built, so the
scoring child never pays for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection

from soft_rl.rewards import get_reward, known_rewards

logger = logging.getLogger(__name__)

# A sample that outlives this many seconds scores 0.0; generous against an honest answer (milliseconds).
DEFAULT_TIMEOUT_S = 10.0
# Address-space cap of the child: turns a memory bomb into a MemoryError instead of an OOM kill.
# The child maps well under 100 MB after importing math-verify and sympy.
DEFAULT_MEMORY_LIMIT_MB = 4096
# Importing math-verify and sympy in a fresh interpreter; not part of any sample's time budget.
STARTUP_TIMEOUT_S = 120.0
_MAX_ERROR_CHARS = 500


# --------------------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------------------

# The child is a fresh interpreter started with subprocess, not multiprocessing: 'spawn' re-runs the
# parent's __main__ script in the child (it crashes scripts without a __main__ guard and drags
# Ray's worker module into every child), and 'fork' is unsafe in a multi-threaded Ray worker. The
# parent's end of a socketpair is wrapped in a multiprocessing Connection (framing + poll timeout).
_CHILD_BOOTSTRAP = "from workers.reward import _child_entry; _child_entry()"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a hung child must not outlive it).

    Without this, killing a Ray actor would orphan a child stuck in sympy forever. The kernel
    delivers the signal when the *thread* that started us exits, so scorers must be driven from a
    long-lived thread (a Ray actor's main thread, the test's main thread).
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_entry() -> None:
    """``python -c`` entry point: argv = [fd, reward, memory_limit_mb (0 = none), parent_pid]."""
    fd, reward, memory_limit_mb, parent_pid = sys.argv[1:5]
    _die_with_parent(int(parent_pid))
    if int(memory_limit_mb) > 0:
        import resource

        limit = int(memory_limit_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _child_loop(Connection(int(fd)), reward)


def _child_loop(conn: Connection, reward: str) -> None:
    """Receive ``(response, gold)``, reply ``("ok", value)`` or ``("error", message)``.

    The first message sent is ``("ready", None)`` once the reward is resolved and warmed up, or
    ``("init_error", message)``. A ``None`` message or a closed socket ends the loop.
    """
    try:
        fn = get_reward(reward)
        if reward in known_rewards():  # built-ins are pure: warm up lazy imports (sympy, the parser)
            fn("\\boxed{0}", "0")
    except Exception as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        response, gold = msg
        try:
            value = float(fn(response, gold))
            if not math.isfinite(value):
                raise ValueError(f"reward returned {value}")
        except Exception as e:  # any failure of the reward is contained and reported
            conn.send(("error", f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]))
        else:
            conn.send(("ok", value))


def _child_env() -> dict[str, str]:
    """The parent's environment, with its sys.path so the child imports the same code."""
    paths = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


# --------------------------------------------------------------------------------------------------
# TimeoutScorer: one child, a per-sample time limit
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScoreStats:
    """Counters since the scorer was built; ``failures = timeouts + exceptions + crashes``."""

    total: int = 0
    timeouts: int = 0
    exceptions: int = 0
    crashes: int = 0
    restarts: int = 0

    @property
    def failures(self) -> int:
        return self.timeouts + self.exceptions + self.crashes

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "failures": self.failures}


class TimeoutScorer:
    """Scores samples one at a time in a reusable child process, with a per-sample time limit.

    The time limit covers sending the sample, scoring it and receiving the result; the child's
    start-up (``STARTUP_TIMEOUT_S``) does not count against it. Not thread-safe.
    """

    def __init__(
        self,
        reward: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    ):
        get_reward(reward)  # an unknown name fails here, in the caller, not once per sample
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.reward = reward
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._started_once = False
        self._stats = ScoreStats()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child now (otherwise the first sample does); waits until it is ready."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard_child()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            args = [str(theirs.fileno()), self.reward, str(self.memory_limit_mb or 0), str(os.getpid())]
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOTSTRAP, *args],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_child_env(),
            )
            conn = Connection(os.dup(ours.fileno()))
        self._proc, self._conn = proc, conn
        try:
            if conn.poll(STARTUP_TIMEOUT_S):
                kind, detail = conn.recv()
            else:
                kind, detail = "init_error", f"no answer within {STARTUP_TIMEOUT_S:.0f}s"
        except (EOFError, OSError):
            kind, detail = "init_error", f"died during start-up (exit code {proc.wait(timeout=5.0)})"
        if kind != "ready":
            self._discard_child()
            raise RuntimeError(f"reward child for {self.reward!r} failed to start: {detail}")
        if self._started_once:
            self._stats.restarts += 1
        self._started_once = True

    @property
    def child_pid(self) -> int | None:
        """Process id of the current child, None if there is none (not started, or just killed)."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stop the child (politely, then by force). The scorer restarts it if used again."""
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        self._discard_child()

    def _discard_child(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> TimeoutScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -----------------------------------------------------------------------------------

    def score_one(self, response: str, gold: str) -> float:
        """The reward of one sample, or 0.0 (counted) if it timed out, raised or crashed the child."""
        self.start()
        self._stats.total += 1
        try:
            self._conn.send((response, gold))
            if not self._conn.poll(self.timeout_s):
                self._stats.timeouts += 1
                self._warn(f"timed out after {self.timeout_s:.1f}s", response)
                self._discard_child()
                return 0.0
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._stats.crashes += 1
            self._discard_child()
            self._warn("killed the scoring child", response)
            return 0.0
        if kind == "ok":
            return value
        self._stats.exceptions += 1
        self._warn(f"raised {value}", response)
        return 0.0

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        """``[score_one(r, g) for r, g in zip(responses, golds)]``; the lengths must match."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        return [self.score_one(r, g) for r, g in zip(responses, golds, strict=True)]

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def failures(self) -> int:
        return self._stats.failures

    def _warn(self, what: str, response: str) -> None:
        # Never log the response itself: it may be megabytes of adversarial text.
        logger.warning("reward %r: a sample of %d chars %s", self.reward, len(response), what)


# --------------------------------------------------------------------------------------------------
# RewardPool: a batch spread over Ray actors
# --------------------------------------------------------------------------------------------------


class _RewardActor:
    """Ray actor body: one ``TimeoutScorer`` whose child starts with the actor."""

    def __init__(self, reward: str, timeout_s: float, memory_limit_mb: int | None):
        self._scorer = TimeoutScorer(reward, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)
        self._scorer.start()

    def score(self, responses: list[str], golds: list[str]) -> tuple[list[float], dict[str, int]]:
        """The scores and this call's counters (the pool sums them: a replaced actor's counts are not lost)."""
        before = self._scorer.stats()
        scores = self._scorer.score(responses, golds)
        return scores, {k: v - before.get(k, 0) for k, v in self._scorer.stats().items()}

    def stats(self) -> dict[str, int]:
        return self._scorer.stats()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self._scorer.close()


def _chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


class RewardPool:
    """``num_actors`` Ray actors scoring batches in parallel; results come back in request order.

    A batch is cut into chunks of ``chunk_size`` (default ``ceil(n / (4 * num_actors))``). Each actor
    holds one chunk at a time and gets the next one when it returns, so an actor stuck on a
    timing-out sample does not hold up the others' share. Actors reserve ``num_cpus`` (0 by default:
    they mostly wait on their child) so the pool fits next to the trainer on a small machine.
    """

    def __init__(
        self,
        num_actors: int = 2,
        reward: str = "math",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
        num_cpus: float = 0.0,
        chunk_size: int | None = None,
        hang_s: float = 60.0,
    ):
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        get_reward(reward)  # fail fast in the driver on an unknown reward
        self.reward = reward
        self.timeout_s = timeout_s
        self.hang_s = hang_s
        self._chunk_size = chunk_size
        actor_cls = ray.remote(num_cpus=num_cpus)(_RewardActor)
        self._start = lambda: actor_cls.remote(reward, timeout_s, memory_limit_mb)
        self._actors = [self._start() for _ in range(num_actors)]
        # Surface start-up errors (e.g. the reward cannot be imported on the workers) now; the pool's counters
        # (summed per scored chunk) start at zero.
        self._totals: dict[str, int] = dict.fromkeys(ray.get([a.stats.remote() for a in self._actors])[0], 0)

    @property
    def actors(self) -> list:
        return self._actors

    def restart(self, i: int) -> None:
        """Replace actor ``i`` (dead or hung) by a fresh one."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self._actors[i])
        self._actors[i] = self._start()
        ray.get(self._actors[i].stats.remote())

    def chunk_budget_s(self, n: int) -> float:
        """How long an actor may take for a chunk of ``n`` samples before it counts as hung: every sample's
        timeout (plus a second each for a child restart) and ``hang_s``."""
        return n * (self.timeout_s + 1.0) + self.hang_s

    def score(self, responses: Sequence[str], golds: Sequence[str], on_lost=None, poll=None) -> list[float]:
        """Blocking: one reward per response, in the order given. ``on_lost(actor, error)`` (the run's
        recovery) is called when an actor dies or hangs (no answer within ``chunk_budget_s``) and must
        make it usable again (``restart``); the chunk is then scored again. Without it the error is raised.
        ``poll`` runs while waiting."""
        import time

        import ray

        from workers.calls import POLL_S

        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        n = len(responses)
        chunk_size = self._chunk_size or max(1, math.ceil(n / (4 * len(self._actors))))
        todo = list(_chunk_bounds(n, chunk_size))
        results: list[float] = [0.0] * n
        in_flight = {}  # ObjectRef -> (actor index, start, stop, deadline)

        def submit(i: int) -> None:
            if todo:
                start, stop = todo.pop(0)
                ref = self._actors[i].score.remote(list(responses[start:stop]), list(golds[start:stop]))
                in_flight[ref] = (i, start, stop, time.monotonic() + self.chunk_budget_s(stop - start))

        def lost(i: int, start: int, stop: int, error: BaseException) -> None:
            if on_lost is None:
                raise error
            on_lost(i, error)
            todo.insert(0, (start, stop))
            submit(i)

        for i in range(len(self._actors)):
            submit(i)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                i, start, stop, _ = in_flight.pop(ref)
                try:
                    scores, counts = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a dead actor (or a broken one: on_lost re-raises)
                    lost(i, start, stop, e)
                    continue
                results[start:stop] = scores
                for k, v in counts.items():
                    self._totals[k] = self._totals.get(k, 0) + v
                submit(i)
            if not ready:
                if poll is not None:
                    poll()
                now = time.monotonic()
                for ref, (i, start, stop, deadline) in list(in_flight.items()):
                    if now > deadline:
                        del in_flight[ref]
                        lost(i, start, stop, TimeoutError(
                            f"reward actor {i} did not answer within {self.chunk_budget_s(stop - start):.0f}s "
                            f"for {stop - start} samples (hung)"))
        return results

    def stats(self) -> dict[str, int]:
        """Counters (see ``ScoreStats``) summed over every chunk this pool scored, whichever actor scored it."""
        return dict(self._totals)

    def failures(self) -> int:
        return self.stats()["failures"]

    def shutdown(self) -> None:
        """Stop the children, then the actors. The pool is unusable afterwards."""
        import ray

        if not self._actors:
            return
        with contextlib.suppress(Exception):
            ray.get([a.shutdown.remote() for a in self._actors], timeout=30)
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
