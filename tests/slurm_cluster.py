"""A throwaway multi-node Slurm cluster on this one host, for tests (docs/design/slurm-and-metrics.md §1).

One munged with a private key and socket, one slurmctld and N ``slurmd -N nX`` instances, all on
127.0.0.1 with free ports, every file (config, state, spool, logs, sockets) under one directory.
Daemons are started with Popen and stopped by their own PIDs (``scontrol shutdown`` first), never by
name, so other Slurm or Ray instances on the machine are left alone. Needs root and Debian's
slurm-wlm + munge (``bash launch/install_test_deps.sh``).

    with SlurmCluster(Path("/tmp/x"), nodes=2) as c:
        jobid = c.sbatch(["--nodes=2", "job.sh"])
        c.wait_job(jobid, timeout=60)

As a command (for trying things by hand): ``python tests/slurm_cluster.py [--nodes N] -- CMD ...``
starts a cluster, runs CMD with SLURM_CONF set, and stops the cluster again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "run `bash launch/install_test_deps.sh` (as root) to install slurm-wlm and munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    pass


def check_prerequisites() -> None:
    """Raise SlurmUnavailable (naming the install script) unless the daemons and clients are installed."""
    missing = [c for c in DAEMONS + CLIENTS if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailable(f"Slurm/munge commands not found: {' '.join(missing)}; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm test cluster runs slurmd, which needs root")


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_port_block(size: int, low: int = 20000, high: int = 32000, tries: int = 200) -> int:
    """First port of `size` consecutive free TCP ports, below Linux's ephemeral range (32768+)."""
    rng = secrets.SystemRandom()
    for _ in range(tries):
        base = rng.randrange(low, high - size)
        if _ports_free(list(range(base, base + size))):
            return base
    raise RuntimeError(f"no block of {size} free ports in [{low}, {high})")


class SlurmCluster:
    """N emulated Slurm nodes n1..nN (each `cpus` CPUs) on 127.0.0.1; all state under `root`."""

    def __init__(self, root: Path | None = None, nodes: int = 2, cpus: int = 1, name: str = "softrltest"):
        self._own_root = root is None
        # Short path: munge and slurmd put unix sockets under it.
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="softrl-slurm-", dir="/tmp"))
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.name = name
        self.port = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # -- paths and environment -------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (the clients need it: there is no /etc/slurm/slurm.conf)."""
        return self.env_from(os.environ)

    def env_from(self, base) -> dict[str, str]:
        """`base` without any outer Slurm settings, plus this cluster's SLURM_CONF."""
        env = dict(base)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[k]  # never leak an outer allocation's settings into the test cluster's jobs
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _write_config(self) -> None:
        r = self.root
        lines = [
            f"ClusterName={self.name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={r}/munge/sock",
            "CryptoType=crypto/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "ReturnToService=2",
            # scancel: SIGTERM to every step, SIGKILL this many seconds later
            "KillWait=10",
            "MessageTimeout=10",
            f"SlurmctldPort={self.port}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
        ]
        for i, n in enumerate(self.nodes, start=1):
            lines.append(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.port + i} "
                         f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # -- lifecycle ---------------------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{key}.out", "ab")
        self._logs.append(out)
        self._procs[key] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        check_prerequisites()
        r = self.root
        for d in ("etc", "state", "log", "run", "munge", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)
        (r / "munge").chmod(0o755)  # munged: the socket's directory must be o+x
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.port = free_port_block(len(self.nodes) + 1)
        self._write_config()
        try:
            self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={r}/munge/sock",
                                   f"--pid-file={r}/run/munged.pid", f"--seed-file={r}/munge/seed",
                                   f"--log-file={r}/log/munged.log"])
            self._wait(lambda: (r / "munge" / "sock").is_socket(), 10, "munged socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd.{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, f"{len(self.nodes)} idle nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        for key, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{key} exited with {p.returncode}; logs:\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False, timeout=10).stdout
        return sorted(set(out.split())) == sorted(self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs:\n{self.logs()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel all jobs, shut the daemons down (by PID, escalating to SIGKILL), remove our own files."""
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--quiet", "--partition=debug"], check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                q = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.3)
            self.run(["scontrol", "shutdown"], check=False, timeout=10)
        # slurm daemons first (they need munged to say goodbye), munged last
        for key in sorted(self._procs, key=lambda k: k == "munged"):
            p = self._procs[key]
            if key == "munged" and p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=timeout / 2)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
        # slurmstepd processes that outlived their slurmd (e.g. a step stuck in teardown)
        for pid in self.stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def stray_pids(self) -> list[int]:
        """PIDs of processes whose command line or environment mentions this cluster's config directory."""
        me = os.getpid()
        needle = str(self.root).encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                if needle in (d / "cmdline").read_bytes() or needle in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
        return found

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 30.0, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run a client command; `env` (default os.environ) is the complete environment, e.g. for sbatch's
        --export=ALL."""
        e = self.env_from(env if env is not None else os.environ)  # `env` is the whole environment
        res = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit without waiting; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, jobid: int) -> tuple[str, str]:
        """(JobState, ExitCode) from scontrol, e.g. ("COMPLETED", "0:0")."""
        out = self.run(["scontrol", "-o", "show", "job", str(jobid)], check=False).stdout
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")

    def wait_job(self, jobid: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")):
        """Poll until the job reaches one of `states` and has left every node; returns (state, exit code)."""
        deadline = time.monotonic() + timeout
        while True:
            state, code = self.job_state(jobid)
            if state in states:
                nodes = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
                if not any(s.startswith("completing") or s.endswith("+") for s in nodes):
                    return state, code
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} still {state} after {timeout:.0f}s; logs:\n{self.logs()}")
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run a command against a throwaway local multi-node Slurm cluster.")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    with SlurmCluster(nodes=a.nodes, cpus=a.cpus) as c:
        print(f"slurm cluster up: SLURM_CONF={c.conf} nodes={','.join(c.nodes)}", flush=True)
        return subprocess.run(cmd or ["sinfo"], env=c.env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
