"""The job that tests/test_job_submit.py submits:

    ray job submit --working-dir <repo> -- python tests/job_submit_check.py

It runs inside the uploaded copy of the repository, connects to the cluster (RAY_ADDRESS is set by the job
supervisor), runs two small Ray tasks that import soft_rl from the working directory, and prints one line per
check; the test reads them back from the job's logs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray


@ray.remote(num_cpus=0.5)
def pass_at_1(n: int, c: int) -> tuple[float, str]:
    from soft_rl.metrics import pass_at_k

    return pass_at_k(n, c, 1), os.getcwd()


def main() -> int:
    cwd = Path.cwd()
    print(f"job_submit_check: python={sys.executable} prefix={sys.prefix}")
    print(f"job_submit_check: cwd={cwd}")
    print(f"job_submit_check: uploaded venv={(cwd / '.venv').exists()} cache={(cwd / '.cache').exists()} "
          f"soft_rl={(cwd / 'soft_rl' / '__init__.py').is_file()}")
    ray.init()  # the address comes from RAY_ADDRESS, set by the job supervisor
    results = ray.get([pass_at_1.remote(4, 1), pass_at_1.remote(4, 2)])
    values = [v for v, _ in results]
    same_dir = all(Path(d) == cwd for _, d in results)
    print(f"job_submit_check: pass_at_1={values} tasks_in_working_dir={same_dir}")
    ok = values == [0.25, 0.5] and same_dir
    print(f"job_submit_check: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
