"""``report``: measured figures of the GPU suite, printed and appended to $SOFT_RL_GPU_REPORT."""

from __future__ import annotations

import os


def report(line: str) -> None:
    print(f"[gpu] {line}", flush=True)
    path = os.environ.get("SOFT_RL_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
