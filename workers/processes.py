"""Process trees and device memory on this machine (no Ray, no vLLM): what a restarted engine waits for.

A process is recorded as (pid, start time) within a "space" (the kernel boot and the pid namespace): a pid
means the same process only inside both, and a reused pid has another start time. A tree is a process and
all its descendants (for a rollout actor: vLLM's tensor-parallel worker processes, which outlive a killed
actor for a while, still holding their GPU memory).

    tree = process_tree()                        # {"space": ..., "procs": [[pid, start, name], ...]}
    stats = wait_for_exit(tree, timeout_s=120)   # returns once every process of the tree is gone
    free = device_memory()                       # [(free, total)] per visible CUDA device, or None
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time


def machine_space() -> str:
    """This process's kernel boot and pid namespace ("" where unknown): pids are comparable within one space."""
    boot = pidns = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return f"{boot}/{pidns}" if boot and pidns else ""


def process_identity(pid: int | None = None) -> dict:
    """{"space", "pid", "start"} of process ``pid`` (default: this one)."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return {"space": machine_space(), "pid": pid, "start": psutil.Process(pid).create_time()}


def process_gone(pid: int, start: float) -> bool:
    """Whether the process recorded as (pid, start time) has exited (a zombie, not yet reaped by its parent,
    has: its memory, GPU memory included, is released)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - start) > 1.0 or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # e.g. access denied: it exists
        return False


def process_tree(pid: int | None = None) -> dict:
    """Process ``pid`` (default: this one) and its descendants, as {"space", "procs": [[pid, start, name], ...]}."""
    import psutil

    root = psutil.Process(os.getpid() if pid is None else pid)
    procs = []
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child that exited meanwhile
            procs.append([p.pid, p.create_time(), p.name()])
    return {"space": machine_space(), "procs": procs}


def alive(tree: dict) -> list[int]:
    """The pids of ``tree`` still running (``tree`` must be from this machine's space)."""
    return [pid for pid, start, *_ in tree["procs"] if not process_gone(pid, start)]


def wait_for_exit(tree: dict, timeout_s: float, poll_s: float = 0.1) -> dict:
    """Block until every process of ``tree`` has exited, at most ``timeout_s`` (then ``TimeoutError`` naming the
    survivors). A tree from another machine or pid namespace cannot be watched from here: returned at once,
    with ``same_space`` False. Returns {"same_space", "pids", "alive_at_start" (pids), "waited_s"}."""
    t0 = time.monotonic()
    pids = [pid for pid, *_ in tree.get("procs", [])]
    if not tree.get("space") or tree["space"] != machine_space():
        return {"same_space": False, "pids": pids, "alive_at_start": [], "waited_s": 0.0}
    alive_at_start = alive(tree)
    while left := alive(tree):
        if time.monotonic() - t0 > timeout_s:
            names = {pid: name for pid, _, name in tree["procs"]}
            listed = ", ".join(f"{p} ({names.get(p, '?')})" for p in left)
            raise TimeoutError(f"processes of the replaced engine are still running {timeout_s:g}s after it was "
                               f"replaced: pids {listed}; their device memory is not free for the new engine (kill "
                               "them, or raise the restart wait)")
        time.sleep(poll_s)
    return {"same_space": True, "pids": pids, "alive_at_start": alive_at_start, "waited_s": time.monotonic() - t0}


_QUERY = ("import json, torch\n"
          "print(json.dumps([list(torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())]))")


def device_memory(timeout_s: float = 120.0) -> list[tuple[int, int]] | None:
    """(free, total) bytes of every CUDA device visible here, as ``torch.cuda.mem_get_info`` reports them (what
    vLLM's start-up check reads), or None without CUDA. Asked in a short-lived child process, so this process
    creates no CUDA context of its own (a TP>1 engine's actor never needs one; a context costs device memory)."""
    out = subprocess.run([sys.executable, "-c", _QUERY], capture_output=True, text=True, timeout=timeout_s,
                         env=os.environ.copy(), check=False)
    if out.returncode != 0:
        return None
    devices = json.loads(out.stdout.strip().splitlines()[-1])
    return [(int(f), int(t)) for f, t in devices] or None


def wait_for_device_memory(fraction: float, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Block until every visible CUDA device has ``fraction`` of its memory free (vLLM's start-up check:
    free >= gpu_memory_utilization x total), at most ``timeout_s`` (then ``TimeoutError`` with the figures).
    Returns {"waited_s", "free_gib", "needed_gib"} (empty figures without CUDA)."""
    t0 = time.monotonic()
    while True:
        devices = device_memory()
        if devices is None:
            return {"waited_s": time.monotonic() - t0, "free_gib": [], "needed_gib": []}
        need = [fraction * total for _, total in devices]
        free = [f for f, _ in devices]
        stats = {"waited_s": time.monotonic() - t0, "free_gib": [round(f / 2**30, 2) for f in free],
                 "needed_gib": [round(n / 2**30, 2) for n in need]}
        if all(f >= n for f, n in zip(free, need, strict=True)):
            return stats
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"device memory free {stats['free_gib']} GiB < needed {stats['needed_gib']} GiB "
                               f"(gpu_memory_utilization {fraction:g}) after waiting {timeout_s:g}s for the replaced "
                               "engine's memory (another process holds it)")
        time.sleep(poll_s)
