"""Reward scoring under a time limit: TimeoutScorer (plain processes) and RewardPool (Ray actors).

Timeouts are kept small so the file runs in seconds; every hostile sample below runs for more than
15 s in-process on a 2-core machine (measured), far beyond the 2 s limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workers.reward import RewardPool, TimeoutScorer

HELPER = "tests.reward_helpers:misbehave"

ROOT = Path(__file__).resolve().parents[1]

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"  # verify() tries to evaluate the exponent tower
NESTED = "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}"  # the LaTeX parser crawls
MEGABYTE = "\\boxed{" + "1+" * 500_000 + "1}"  # a megabyte answer


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _pid_gone(pid):
            return True
        time.sleep(0.05)
    return _pid_gone(pid)


# --------------------------------------------------------------------------------------------------
# TimeoutScorer (no Ray)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer():
    with TimeoutScorer(HELPER, timeout_s=1.0) as s:
        yield s


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_scorer_returns_rewards_in_order(scorer):
    before = scorer.stats()
    assert scorer.score(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == [1.0, 0.0, 1.0, 0.0]
    assert _delta(before, scorer.stats()) == {"total": 4}


def test_scorer_contains_a_raising_reward_without_restart(scorer):
    scorer.start()
    pid, before = scorer.child_pid, scorer.stats()
    assert scorer.score(["raise", "nan", "text", "ok"], ["x", "x", "x", "ok"]) == [0.0, 0.0, 0.0, 1.0]
    assert _delta(before, scorer.stats()) == {"total": 4, "exceptions": 3, "failures": 3}
    assert scorer.child_pid == pid  # an exception does not cost a restart


def test_scorer_kills_a_hanging_reward_and_recovers(scorer):
    scorer.start()
    pid, before = scorer.child_pid, scorer.stats()
    t0 = time.monotonic()
    assert scorer.score_one("hang", "x") == 0.0
    elapsed = time.monotonic() - t0
    assert scorer.timeout_s <= elapsed < scorer.timeout_s + 5.0
    assert _wait_gone(pid, within_s=5.0), "the hung child must be killed"
    assert scorer.score_one("ok", "ok") == 1.0  # a fresh child takes over
    assert _delta(before, scorer.stats()) == {"total": 2, "timeouts": 1, "restarts": 1, "failures": 1}


def test_scorer_survives_a_dying_child(scorer):
    scorer.start()
    before = scorer.stats()
    assert scorer.score(["exit", "ok"], ["x", "ok"]) == [0.0, 1.0]
    assert _delta(before, scorer.stats()) == {"total": 2, "crashes": 1, "restarts": 1, "failures": 1}


def test_scorer_restarts_a_child_killed_between_samples(scorer):
    scorer.start()
    os.kill(scorer.child_pid, signal.SIGKILL)
    assert _wait_gone(scorer.child_pid, within_s=5.0)
    before = scorer.stats()
    assert scorer.score_one("ok", "ok") == 1.0  # not counted against the sample
    assert _delta(before, scorer.stats()) == {"total": 1, "restarts": 1}


def test_scorer_memory_limit_turns_a_memory_bomb_into_an_exception():
    with TimeoutScorer(HELPER, timeout_s=5.0, memory_limit_mb=512) as s:
        assert s.score(["alloc", "ok"], ["x", "ok"]) == [0.0, 1.0]
        expected = {"total": 2, "timeouts": 0, "exceptions": 1, "crashes": 0, "restarts": 0, "failures": 1}
        assert s.stats() == expected


def test_scorer_close_stops_the_child():
    s = TimeoutScorer(HELPER, timeout_s=1.0)
    s.start()
    pid = s.child_pid
    s.close()
    assert s.child_pid is None
    assert _wait_gone(pid, within_s=5.0)


@pytest.mark.parametrize("reward", ["no_such_reward", "tests.reward_helpers:no_such_fn"])
def test_scorer_rejects_a_bad_reward_up_front(reward):
    with pytest.raises(ValueError, match="reward"):
        TimeoutScorer(reward)


def test_scorer_rejects_mismatched_lengths(scorer):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        scorer.score(["a", "b"], ["a"])


def test_child_dies_with_its_parent(tmp_path):
    """SIGKILL the process that owns a scorer while its child hangs: the child must not linger."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from workers.reward import TimeoutScorer
        s = TimeoutScorer({HELPER!r}, timeout_s=600)
        s.start()
        print(s.child_pid, flush=True)
        s.score_one("hang", "x")
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child_pid = int(proc.stdout.readline())
        time.sleep(0.3)  # let the child pick up the hanging sample
        assert not _pid_gone(child_pid)
    finally:
        proc.kill()
        proc.wait()
    assert _wait_gone(child_pid, within_s=10.0), "orphaned reward child still running"


# --------------------------------------------------------------------------------------------------
# RewardPool (Ray)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_pool(ray_cluster):
    pool = RewardPool(num_actors=2, reward="math", timeout_s=2.0)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def helper_pool(ray_cluster):
    pool = RewardPool(num_actors=2, reward=HELPER, timeout_s=1.0)
    yield pool
    pool.shutdown()


def test_pool_returns_results_in_request_order(math_pool):
    n = 53  # several chunks per actor, the last one short
    golds = [str(i) for i in range(n)]
    responses = [f"\\boxed{{{i if i % 3 else i + 1}}}" for i in range(n)]
    before = math_pool.stats()
    assert math_pool.score(responses, golds) == [1.0 if i % 3 else 0.0 for i in range(n)]
    assert _delta(before, math_pool.stats()) == {"total": n}


def test_pool_contains_hostile_answers(math_pool, tmp_path):
    marker = tmp_path / "pwned"
    code = f"\\boxed{{__import__('os').system('touch {marker}')}}"
    responses = [TOWER, "\\boxed{7}", NESTED, MEGABYTE, code, "x" * 2**20, "\\boxed{8}"]
    golds = ["7", "7", "1", "1", "0", "1", "8"]
    before = math_pool.stats()
    t0 = time.monotonic()
    assert math_pool.score(responses, golds) == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # Three timeouts of 2 s on two actors, plus child restarts: far less than one hostile sample in-process.
    assert time.monotonic() - t0 < 3 * (2.0 + 3.0)
    delta = _delta(before, math_pool.stats())  # restarts are lazy, so their count depends on timing
    assert {k: delta.get(k, 0) for k in ("total", "timeouts", "exceptions", "crashes", "failures")} == {
        "total": 7, "timeouts": 3, "exceptions": 0, "crashes": 0, "failures": 3,
    }
    assert not marker.exists()
    assert math_pool.score(["\\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]  # the pool still works


def test_pool_contains_a_raising_hanging_or_crashing_user_reward(helper_pool):
    responses = ["a", "raise", "hang", "b", "exit", "c"]
    golds = ["a", "x", "x", "b", "x", "z"]
    before = helper_pool.stats()
    t0 = time.monotonic()
    assert helper_pool.score(responses, golds) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 10.0
    delta = _delta(before, helper_pool.stats())
    assert {k: delta.get(k, 0) for k in ("total", "exceptions", "timeouts", "crashes", "failures")} == {
        "total": 6, "exceptions": 1, "timeouts": 1, "crashes": 1, "failures": 3,
    }
    assert helper_pool.failures() == helper_pool.stats()["failures"]


def test_pool_empty_batch_and_length_check(helper_pool):
    assert helper_pool.score([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        helper_pool.score(["a", "b"], ["a"])


def test_pool_rejects_unknown_reward_before_starting_actors(ray_cluster):
    with pytest.raises(ValueError, match="unknown reward"):
        RewardPool(num_actors=1, reward="no_such_reward")
