"""workers.processes: a process tree recorded and waited for (what a restarted engine does with its predecessor's),
with a real child process; device memory without CUDA."""

import subprocess
import sys
import threading
import time

import pytest

from workers.processes import alive, device_memory, process_gone, process_identity, process_tree, wait_for_exit


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_wait_for_exit_returns_once_the_tree_is_gone():
    child = _sleeper()
    try:
        tree = process_tree(child.pid)
        assert [p[0] for p in tree["procs"]] == [child.pid] and alive(tree) == [child.pid]
        threading.Timer(0.5, child.kill).start()  # killed, and left a zombie (not reaped) until the end
        stats = wait_for_exit(tree, timeout_s=60)
        assert stats["same_space"] and stats["alive_at_start"] == [child.pid] and alive(tree) == []
        assert process_gone(child.pid, tree["procs"][0][1])
    finally:
        child.kill()
        child.wait()


def test_wait_for_exit_names_the_survivors():
    child = _sleeper()
    try:
        with pytest.raises(TimeoutError, match=f"pids {child.pid} "):
            wait_for_exit(process_tree(child.pid), timeout_s=0.3)
    finally:
        child.kill()
        child.wait()


def test_identity_and_foreign_trees():
    me = process_identity()
    assert not process_gone(me["pid"], me["start"])
    assert process_gone(me["pid"], me["start"] - 100)  # the same pid with another start time: a reused pid
    t0 = time.monotonic()
    other = {"space": "another-machine", "procs": [[1, 0.0, "init"]]}
    assert wait_for_exit(other, timeout_s=60) == {"same_space": False, "pids": [1], "alive_at_start": [],
                                                  "waited_s": 0.0}
    assert time.monotonic() - t0 < 30


def test_device_memory_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert device_memory() is None
