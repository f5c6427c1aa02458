"""Restarting a TP=2 engine (the CPU proxy of the GPU race): vLLM's tensor-parallel worker processes outlive their
killed actor for a while (on GPU still holding the memory that Ray has already handed to the replacement). The
restarted actor must wait until the old process tree is gone before it builds its engine.

Ray 2.60 kills a dead worker's process group (``process_group_cleanup_enabled``), which on the CPU ends the orphans
within ~0.2 s (measured); on GPU a killed process still frees its memory later, and deployments may turn that
cleanup off. This test turns it off (its own Ray cluster) so that the race is certain: the old worker processes are
frozen (SIGSTOP) before the actor is SIGKILLed, and released (SIGCONT; they then exit on their own, having lost
their parent) only once the replacement actor is running its constructor. Its recorded handover must show that it
met them alive, waited for them, and that none was alive when it built its engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def _release_when_replacement_starts(frozen: list[int], old_actor: int, released: dict) -> None:
    """SIGCONT the frozen processes 2 s after a new RolloutWorker actor process has entered its constructor (Ray
    titles it ``ray::RolloutWorker.__init__``), or after 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(p.info["name"] == "ray::RolloutWorker.__init__" and p.info["pid"] != old_actor
               for p in psutil.process_iter(["pid", "name"])):
            time.sleep(2.0)
            break
        time.sleep(0.05)
    released["at"] = time.monotonic()
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def ray_keeping_orphans():
    """A Ray cluster that leaves a dead worker's child processes alone (the session's ``ray_cluster`` is restored
    afterwards when it was running)."""
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"process_group_cleanup_enabled": False})
    yield ray
    ray.shutdown()
    if was_running:  # as tests/conftest.py's ray_cluster started it
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


def test_tp2_restart_waits_for_the_old_worker_processes(ray_keeping_orphans, tmp_path):
    from soft_rl.sampling import SoftSamplingParams
    from soft_rl.tiny import build_model, build_tokenizer
    from workers.processes import process_gone
    from workers.rollout import RolloutPool, RolloutRequest

    tok = build_tokenizer(tmp_path / "tok")
    build_model(tmp_path / "m", tok, arch="qwen2", seed=13, hidden=128, heads=2, kv_heads=2, layers=2)
    kw = dict(dtype="float32", enforce_eager=True, max_model_len=128, max_k=4, max_new_tokens=8, seed=0,
              distributed_executor_backend="mp")
    pool = RolloutPool(1, str(tmp_path / "m"), kw, tensor_parallel_size=2, num_cpus_per_worker=0.5,
                       env={"OMP_NUM_THREADS": "1"}, restart_wait_s=180)
    frozen: list[int] = []
    try:
        before = pool.health()[0]
        tree = before["process_tree"]
        tp_workers = [pid for pid, _, name in tree["procs"] if name.startswith("VLLM::Worker")]
        assert len(tp_workers) == 2, tree
        for pid in tp_workers:  # the old workers cannot exit until released
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        os.kill(before["pid"], signal.SIGKILL)
        released: dict = {}
        releaser = threading.Thread(target=_release_when_replacement_starts,
                                    args=(tp_workers, before["pid"], released), daemon=True)
        releaser.start()
        pool.restart(0)
        releaser.join(5)
        after = pool.health()[0]
        handover = after["handover"]
        print(f"handover of the restarted engine: {handover}")  # -s shows what it waited for
        assert after["ok"] and after["pid"] != before["pid"], after
        assert handover["same_space"], handover
        assert set(tp_workers) | {before["pid"]} <= set(handover["predecessor_pids"]), handover
        # it met the old workers alive, and waited until they were gone before building its engine
        assert set(tp_workers) <= set(handover["alive_at_start"]), handover
        assert handover["alive_at_engine_start"] == [] and handover["engine_start_attempts"] == 1, handover
        assert all(process_gone(pid, start) for pid, start, _ in tree["procs"])
        new_workers = [pid for pid, _, name in after["process_tree"]["procs"] if name.startswith("VLLM::Worker")]
        assert len(new_workers) == 2 and not set(new_workers) & set(tp_workers), after["process_tree"]
        # the replacement works
        prompt = list(tok.encode("3 + 4 = ?"))
        (traj,) = pool.generate([RolloutRequest(prompt, SoftSamplingParams(seed=1, top_k=4, k=4), 8)])
        assert traj.prompt_ids.tolist() == prompt and len(traj.tokens) > 0
    finally:
        for pid in frozen:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
        pool.shutdown()
