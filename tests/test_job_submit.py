"""`ray job submit --working-dir <repo>` against a live local Ray cluster that the test starts on 127.0.0.1.

Two jobs on one head: tests/job_submit_check.py (what the upload holds, where the job runs) and a real, reduced
`soft-rl train --dashboard` (tests/train_run.py: 2 steps, 1 engine, 1 learner, 1 reward actor; its outputs are
checked, and its job status must be SUCCEEDED).

Authentication: Ray 2.60 turns token authentication on by default, and that is what users should keep.
`ray start --head` then creates ~/.ray/auth_token, and another shell submits with

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)" \\
        ray job submit --address http://127.0.0.1:8265 --working-dir . -- soft-rl train ...

(or RAY_AUTH_TOKEN_PATH=<file>). This test is a throw-away loopback cluster, so it starts it with
RAY_AUTH_MODE=disabled, which needs no token.

The cluster is `ray start --head --block` in a subprocess, with every port chosen free (so it cannot collide with
other clusters on the host) and its own --temp-dir. It is stopped by SIGTERM to that process, which makes Ray
kill exactly the processes it started. `ray stop` is deliberately not used: it kills every Ray process on the
machine, including other clusters (e.g. the session's `ray_cluster` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

try:
    import train_run
except ImportError:  # pytest --import-mode=importlib
    from tests import train_run

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
PORT_FLAGS = ("port", "dashboard-port", "metrics-export-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")
# What `--working-dir` must not upload (the 3 GB venv, caches, git objects, earlier runs).
EXCLUDES = [".venv", ".cache", ".git", "runs", ".pytest_cache", ".ruff_cache", "__pycache__"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead:
    """A one-node Ray cluster on 127.0.0.1 (dashboard on), started as `ray start --head --block`.

    Everything it writes lives in a fresh temp dir (removed by stop()); stop() asserts no process is left.
    Extra environment (e.g. RAY_metrics_report_interval_ms) goes to every Ray process and job.
    """

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None, start_timeout: float = 60.0):
        # Short path on purpose: Ray's unix sockets live under it (108-byte limit on socket paths).
        self.tmp = Path(tempfile.mkdtemp(prefix="srl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.dashboard_url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.metrics_export_port = self.ports["metrics-export-port"]
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # TMPDIR: Python's own temp files in Ray's processes (e.g. multiprocessing's pymp-* dirs, which the
        # dashboard leaves behind when it is terminated) land in our temp dir and go away with it.
        self.env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(self.tmp),
                         "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})})
        cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--temp-dir={self.tmp}", "--disable-usage-stats",
               *[f"--{flag}={p}" for flag, p in self.ports.items()]]
        self._log = open(self.tmp / "ray-start.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs: dict[int, psutil.Process] = {}
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop(check=False)
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200 and (self.tmp / "ray_current_cluster").is_file():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head not up after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        self.gcs_address = (self.tmp / "ray_current_cluster").read_text().strip()
        self._remember_processes()

    def _remember_processes(self) -> None:
        """Record our process tree (gcs_server, raylet, dashboard, agents, workers) for the leak check."""
        try:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                self._procs.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def _ours(self) -> list[psutil.Process]:
        """Live processes of this cluster: the recorded tree plus anything naming our temp dir."""
        alive = {pid: p for pid, p in self._procs.items() if _alive(p)}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid not in alive and str(self.tmp) in " ".join(p.info["cmdline"] or ()) and _alive(p):
                    alive[p.pid] = p
            except psutil.Error:
                pass
        alive.pop(os.getpid(), None)
        return list(alive.values())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.tmp / "ray-start.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, check: bool = True) -> list[str]:
        """SIGTERM the `ray start --block` process (Ray tears its processes down), SIGKILL leftovers after
        ``timeout``, delete the temp dir. Returns the names of processes that had to be killed."""
        self._remember_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (left := self._ours()) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = []
        for p in left:
            try:
                killed.append(f"{p.name()}({p.pid})")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if check:
            assert not killed, f"Ray processes survived SIGTERM of `ray start --block`: {killed}"
        return killed


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def head():
    """One Ray head for this module's jobs; stop() asserts that no process of it is left."""
    t0 = time.monotonic()
    h = LocalRayHead(num_cpus=2)
    print(f"ray head up {time.monotonic() - t0:.1f}s")
    try:
        yield h
    finally:
        t1 = time.monotonic()
        h.stop()
        assert not h.tmp.exists()
        print(f"ray head stopped in {time.monotonic() - t1:.1f}s")


def _submit(head: LocalRayHead, sid: str, entrypoint: list[str], timeout: float) -> str:
    """`ray job submit --working-dir <repo>` (the README's command); returns its output, asserts success."""
    cmd = [str(RAY), "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entrypoint]
    r = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"ray job submit failed ({r.returncode}):\n{out[-6000:]}\n{head.log_tail()}"
    assert f"Job '{sid}' succeeded" in out, out[-4000:]
    return out


@pytest.mark.slow
def test_ray_job_submit_working_dir(head):
    """What --working-dir uploads and where the job runs (a small check script, ~5 s)."""
    t0 = time.monotonic()
    sid = f"soft-rl-check-{uuid.uuid4().hex[:8]}"
    _submit(head, sid, ["python", "tests/job_submit_check.py"], timeout=180)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(sid)
    assert "job_submit_check: ok" in logs, logs
    assert f"prefix={sys.prefix}" in logs, logs  # the job ran with this venv's python
    assert "uploaded venv=False cache=False soft_rl=True" in logs, logs
    cwd = next(line for line in logs.splitlines() if line.startswith("job_submit_check: cwd=")).split("=", 1)[1]
    assert Path(cwd) != ROOT and str(head.tmp) in cwd, cwd  # ran in the uploaded copy, not the repo
    print(f"check job {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_ray_job_submit_soft_rl_train(head, tmp_path):
    """The README's `ray job submit ... -- soft-rl train --config configs/tiny_cpu.yaml ...`, reduced (2 steps,
    1 engine, 1 learner, 1 reward actor), with --dashboard: the driver joins the job's cluster, says whose
    dashboard it is, starts a Prometheus next to the head for the run and stops it at the end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    t0 = time.monotonic()
    toy, out = train_run.make_toy(tmp_path / "toy"), tmp_path / "run"
    prom_port = free_port()
    sid = f"soft-rl-train-{uuid.uuid4().hex[:8]}"
    _submit(head, sid, ["soft-rl", "train", "--dashboard", "--prometheus-port", str(prom_port),
                        *train_run.train_args(toy, out, learners=1)], timeout=420)
    client = JobSubmissionClient(head.dashboard_url)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(sid)
    records = train_run.check_run(out, learners=1)
    assert f"[train] step {train_run.STEPS}/{train_run.STEPS} reward=" in logs, logs[-4000:]
    # all of the run's actors ran, here on the one node of this cluster
    placement = train_run.actor_placement(logs)
    assert len(placement) == 1 and not train_run.missing_actors(placement, learners=1), placement
    # --dashboard on a joined cluster: the dashboard is the cluster's; Prometheus ran for the run only
    assert "belongs to that cluster" in logs and f"Ray dashboard: {head.dashboard_url}" in logs, logs[-4000:]
    assert f"Prometheus: http://127.0.0.1:{prom_port}" in logs, logs[-4000:]
    assert "WITHOUT authentication on all interfaces" in logs, logs[-4000:]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", prom_port)) != 0, "the run's Prometheus outlived the run"
    print(f"soft-rl train job {time.monotonic() - t0:.1f}s ({len(records)} steps, "
          f"{sum(r['time/step'] for r in records):.1f}s in steps)")


@pytest.mark.slow
def test_ray_job_stop_checkpoints_the_run(head, tmp_path):
    """`ray job stop` sends the driver SIGTERM: it writes a checkpoint of its last finished step and exits within
    Ray's stop wait, which a job raises from its 3 s default through its runtime env (RAY_JOB_STOP_WAIT_TIME_S=30)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from soft_rl.checkpoints import latest_checkpoint

    toy, out = train_run.make_toy(tmp_path / "toy"), tmp_path / "run"
    sid = f"soft-rl-stop-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}
    args = [a for a in train_run.train_args(toy, out, learners=1) if not a.startswith(("trainer.steps=",
                                                                                        "trainer.save_every="))]
    cmd = [str(RAY), "job", "submit", "--no-wait", "--address", head.dashboard_url, "--submission-id", sid,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "soft-rl", "train", *args, "trainer.steps=50", "trainer.save_every=100"]
    r = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    client = JobSubmissionClient(head.dashboard_url)
    deadline = time.monotonic() + 300
    while "[train] step 1/50" not in (logs := client.get_job_logs(sid)):
        assert client.get_job_status(sid) in (JobStatus.PENDING, JobStatus.RUNNING), logs[-4000:]
        assert time.monotonic() < deadline, logs[-4000:]
        time.sleep(0.5)
    t0 = time.monotonic()
    stop = subprocess.run([str(RAY), "job", "stop", "--address", head.dashboard_url, sid], env=head.env,
                          capture_output=True, text=True, timeout=120)
    while client.get_job_status(sid) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.monotonic() < t0 + 60, client.get_job_logs(sid)[-4000:]
        time.sleep(0.2)
    took = time.monotonic() - t0
    logs = client.get_job_logs(sid)
    print(f"ray job stop: the job ended {took:.1f}s later ({client.get_job_status(sid)})")
    assert client.get_job_status(sid) == JobStatus.STOPPED, stop.stdout + stop.stderr + logs[-4000:]
    assert "[train] preempted: checkpoint of step" in logs, logs[-4000:]
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 1, logs[-4000:]
