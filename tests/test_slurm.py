"""launch/slurm/soft_rl.sbatch on a real two-node Slurm cluster started on this host (slow, ~2 min).

The cluster (tests/slurm_cluster.py): munged + slurmctld + ``slurmd -N n1`` + ``slurmd -N n2`` on
127.0.0.1, private key, sockets and ports, stopped again at the end of the module. Each job brings a
Ray cluster up across n1 and n2 (head + worker, as on a real cluster), runs a driver and tears
everything down. Ray still advertises the host's own address (it maps 127.0.0.1 to it), so its
traffic stays on this host without being strictly loopback.

* test_two_node_soft_rl_train: the script's default driver, a real ``soft-rl train --config
  configs/tiny_cpu.yaml ...`` (reduced, tests/train_run.py: 2 steps, 1 engine, 2 learners, 1 reward
  actor, 1.5 CPUs of actors on two 1-CPU nodes); exit code 0, the run's outputs, the driver's
  actor placement on both Slurm nodes, nothing left afterwards.
* test_cancel_tears_down_with_default_token_auth: a small check driver (``--`` form) that puts one
  task on each node, then scancel under the default token auth.

Slurm and munge are Debian packages: without them these tests FAIL (not skip) and name
``launch/install_test_deps.sh``, which CI runs first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests import train_run
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, check_prerequisites, free_port_block

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test (CI runs in a fresh clone)
SBATCH = ROOT / "launch" / "slurm" / "soft_rl.sbatch"

# A check driver: connects to the cluster the job built, runs one task pinned to each node, reports where
# they ran. With an argument it then announces READY and waits (to be cancelled).
CHECK = r"""
import json, os, socket, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    return {"node_id": ray.get_runtime_context().get_node_id(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "host": socket.gethostname(), "pid": os.getpid()}

refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes]
tasks = ray.get(refs, timeout=120)
print("CHECK " + json.dumps({"nodes": len(nodes), "node_ids": [n["NodeID"] for n in nodes],
                             "labels": [n["Labels"].get("slurm-node") for n in nodes], "tasks": tasks,
                             "auth": os.environ.get("RAY_AUTH_MODE"),
                             "slurm_nodes": os.environ.get("SOFT_RL_SLURM_NODES")}), flush=True)
if len(sys.argv) > 1:
    print("READY", flush=True)
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def slurm():
    missing = None
    try:
        check_prerequisites()
    except SlurmUnavailable as e:
        missing = str(e)
    if missing:  # fail, not skip: CI must have run launch/install_test_deps.sh
        pytest.fail(missing, pytrace=False)
    cluster = SlurmCluster(nodes=2, cpus=1)
    cluster.start(timeout=30)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.root.exists()
        assert not cluster.stray_pids(), "Slurm daemons or steps outlived the test cluster"


@pytest.fixture
def job_env(slurm, tmp_path):
    """Environment for a submission; ray temp dir and info dir are removed afterwards whatever happens."""
    ray_tmp = Path(f"/tmp/softrl-slurm-ray-{secrets.token_hex(4)}")  # short: Ray puts unix sockets under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this venv's ray/python
        "SOFT_RL_PYTHON": sys.executable,
        "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster; see test_cancel for token auth
        "RAY_USAGE_STATS_ENABLED": "0",
        "SOFT_RL_RAY_HEAD_IP": "127.0.0.1",
        "SOFT_RL_RAY_PORT_BASE": str(free_port_block(100)),
        "SOFT_RL_RAY_DASHBOARD": "0",
        "SOFT_RL_RAY_OBJECT_STORE_MEMORY": str(200 * 1024**2),
        "SOFT_RL_RAY_TMPDIR": str(ray_tmp),
        "SOFT_RL_SLURM_INFO_DIR": str(tmp_path / "info"),
        "SOFT_RL_JOIN_TIMEOUT": "120",
        "SOFT_RL_STOP_TIMEOUT": "30",
    })
    (tmp_path / "check.py").write_text(CHECK)
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(slurm, env, tmp_path, *driver_args) -> tuple[int, Path]:
    """sbatch the script with the check driver (``-- python check.py ...``)."""
    return _sbatch(slurm, env, tmp_path, "--", sys.executable, str(tmp_path / "check.py"), *driver_args)


def _sbatch(slurm, env, tmp_path, *script_args) -> tuple[int, Path]:
    out = tmp_path / "job.out"
    jobid = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}", f"--chdir={tmp_path}", str(SBATCH),
                          *script_args], env=env, cwd=tmp_path)
    return jobid, out


def _check_record(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("CHECK ")]
    assert lines, f"the driver printed no CHECK line; job output:\n{text}"
    return json.loads(lines[-1][len("CHECK "):])


def _job_processes(jobid: int, ray_tmp: str, conf: Path, pids=()) -> list[str]:
    """Live processes of this job: its Ray (marker in the environment, temp dir on the command line),
    anything else started under its SLURM_JOB_ID in this cluster (driver, steps), and the task workers."""
    marks = {f"SOFT_RL_RAY_OF_JOB={jobid}".encode()}
    job_env = {f"SLURM_JOB_ID={jobid}".encode(), f"SLURM_CONF={conf}".encode()}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its (late-reaping) parent
            cmdline = (d / "cmdline").read_bytes()
            environ = set((d / "environ").read_bytes().split(b"\0"))
        except (OSError, IndexError):
            continue
        if (ray_tmp.encode() in cmdline or marks & environ or job_env <= environ or int(d.name) in pids):
            found.append(d.name + ": " + cmdline.replace(b"\0", b" ")[:160].decode(errors="replace"))
    return found


def _assert_nothing_left(slurm, jobid: int, env: dict, pids=(), timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := _job_processes(jobid, env["SOFT_RL_RAY_TMPDIR"], slurm.conf, pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes of the job outlived it:\n" + "\n".join(left)


def test_two_node_soft_rl_train(slurm, job_env, tmp_path):
    """`sbatch --nodes=2 soft_rl.sbatch --config configs/tiny_cpu.yaml ...`: the script runs `soft-rl train`."""
    t0 = time.monotonic()
    toy, run = train_run.make_toy(tmp_path / "toy"), tmp_path / "run"
    jobid, out = _sbatch(slurm, job_env, tmp_path, *train_run.train_args(toy, run))
    state, code = slurm.wait_job(jobid, timeout=420)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert (state, code) == ("COMPLETED", "0:0"), f"job {jobid}: {state} {code}\n{text}\n{slurm.logs()}"
    assert "all 2 Ray nodes joined" in text and "teardown done (exit code 0)" in text, text
    assert "driver: soft-rl train --config" in text, text  # the script's default driver
    records = train_run.check_run(run)
    assert f"[train] step {train_run.STEPS}/{train_run.STEPS} reward=" in text, text

    # the run's actors ran on both Ray nodes, each node being a Slurm step on n1 / n2 (its label)
    placement = train_run.actor_placement(text)
    assert sorted(n["labels"].get("slurm-node") for n in placement.values()) == ["n1", "n2"], placement
    assert not train_run.missing_actors(placement), placement

    pids = {a["pid"] for n in placement.values() for a in n["actors"]}
    _assert_nothing_left(slurm, jobid, job_env, pids=pids)
    assert not Path(job_env["SOFT_RL_RAY_TMPDIR"]).exists(), "the job's Ray temp dir was not removed"
    assert not Path(job_env["SOFT_RL_SLURM_INFO_DIR"]).exists(), "the job's info dir was not removed"
    print(f"two-node soft-rl train job: {time.monotonic() - t0:.1f}s ({len(records)} steps, "
          f"{sum(r['time/step'] for r in records):.1f}s in steps)")


def test_cancel_tears_down_with_default_token_auth(slurm, job_env, tmp_path):
    """scancel mid-run -> the job's Ray is gone; runs with the script's default (token auth, fresh token)."""
    env = dict(job_env)
    del env["RAY_AUTH_MODE"]
    home_token = Path.home() / ".ray" / "auth_token"
    home_token_before = home_token.read_bytes() if home_token.exists() else None

    jobid, out = _submit(slurm, env, tmp_path, "hold")
    deadline = time.monotonic() + 150
    text = ""
    while "READY" not in text:
        state, _ = slurm.job_state(jobid)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {jobid} ended early: {state}\n{text}"
        assert time.monotonic() < deadline, f"driver never got READY:\n{text}\n{slurm.logs()}"
        time.sleep(0.5)
        text = out.read_text(errors="replace") if out.exists() else ""
    rec = _check_record(text)
    assert rec["nodes"] == 2 and sorted(t["slurm_node"] for t in rec["tasks"]) == ["n1", "n2"], rec
    assert rec["auth"] == "token", rec  # the driver connected with the job's generated token
    token_file = Path(env["SOFT_RL_SLURM_INFO_DIR"]) / "auth_token"
    assert token_file.stat().st_mode & 0o077 == 0 and len(token_file.read_text()) == 64

    slurm.run(["scancel", str(jobid)])
    state, _ = slurm.wait_job(jobid, timeout=60)
    assert state == "CANCELLED", state
    _assert_nothing_left(slurm, jobid, env, pids={t["pid"] for t in rec["tasks"]}, timeout=30)
    # the token never went to ~/.ray, and the job's copy is gone
    assert (home_token.read_bytes() if home_token.exists() else None) == home_token_before
    assert not token_file.exists()


# A driver that stands in for a preempted `soft-rl train`: on its first run it saves "state" on SIGTERM and exits
# with the driver's preemption code; requeued (SLURM_RESTART_COUNT=1) it finishes.
PREEMPTIBLE = r"""
import os, signal, sys, time
run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print(f"RUN {run}", flush=True)
if run == 0:
    def on_term(*_):
        print("SAVED", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    print("READY", flush=True)
    time.sleep(300)
"""


def test_preempted_driver_is_requeued(slurm, job_env, tmp_path):
    """`sbatch --requeue`: SIGTERM to the batch script (as `--signal=B:TERM@120` sends before the time limit)
    reaches the driver, which exits with 75; the script tears Ray down and requeues the job, whose second run
    (SLURM_RESTART_COUNT=1; `soft-rl train` would get `--resume auto`) completes."""
    from soft_rl.faults import EXIT_PREEMPTED

    (tmp_path / "preemptible.py").write_text(PREEMPTIBLE)
    out = tmp_path / "job.out"
    jobid = slurm.sbatch(["--requeue", "--open-mode=append", "--nodes=2", "--ntasks-per-node=1", f"--output={out}",
                          f"--chdir={tmp_path}", str(SBATCH), "--", sys.executable, str(tmp_path / "preemptible.py")],
                         env=job_env, cwd=tmp_path)
    deadline, text = time.monotonic() + 150, ""
    while "READY" not in text:
        assert time.monotonic() < deadline, f"driver never got READY:\n{text}\n{slurm.logs()}"
        time.sleep(0.5)
        text = out.read_text(errors="replace") if out.exists() else ""
    t0 = time.monotonic()
    slurm.run(["scancel", "--batch", "--signal=TERM", str(jobid)])
    deadline, hurried = time.monotonic() + 300, False
    while "RUN 1" not in text:
        assert time.monotonic() < deadline, f"the job did not run again:\n{text}\n{slurm.logs()}"
        time.sleep(1)
        text = out.read_text(errors="replace") if out.exists() else ""
        if not hurried and slurm.job_state(jobid)[0] == "PENDING":
            # Slurm holds a requeued job back (its BeginTime a couple of minutes ahead); no need to wait that long,
            # but a few seconds: slurmd revokes the killed run's job credential with one-second resolution, and an
            # allocation within that second is refused ("Job credential revoked") and the job ends failed
            hurried = slurm.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now+3"],
                                check=False).returncode == 0
    print(f"requeued job ran again {time.monotonic() - t0:.1f}s after SIGTERM")
    state, code = slurm.wait_job(jobid, timeout=200)
    text = out.read_text(errors="replace")
    assert (state, code) == ("COMPLETED", "0:0"), f"job {jobid}: {state} {code}\n{text}\n{slurm.logs()}"
    assert "SAVED" in text and f"teardown done (exit code {EXIT_PREEMPTED})" in text, text
    assert f"requeueing job {jobid}" in text and "teardown done (exit code 0)" in text, text
