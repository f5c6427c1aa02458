"""`soft-rl train --dashboard`: the CLI flags, and workers.cluster.init_ray against a fresh local Ray for real.

The slow test runs init_ray(dashboard=True) in a child process (this pytest process may already have the
session's `ray_cluster`), with Ray 2.60's default token auth (HOME is a temp dir, so the generated token does
not touch ~/.ray), its own RAY_TMPDIR and free ports. It checks, over HTTP, that the dashboard answers, that
the dashboard reaches the Prometheus that was started (RAY_PROMETHEUS_HOST), that Prometheus scrapes Ray's
metrics export port (target "up", ray_* series), then makes the "run" fail and checks that Prometheus, its
files and every process of the cluster are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from soft_rl import cli
from workers import prometheus as prom

try:
    from test_job_submit import ROOT, free_port
    from test_telemetry import _wait_for
except ImportError:  # pytest --import-mode=importlib
    from tests.test_job_submit import ROOT, free_port
    from tests.test_telemetry import _wait_for


def test_train_cli_dashboard_flags(monkeypatch):
    import workers.driver

    calls = []
    monkeypatch.setattr(workers.driver, "main", lambda *a, **kw: calls.append((a, kw)) or 0)
    assert cli.main(["train", "--config", "c.yaml", "--dashboard", "--dashboard-port", "18265",
                     "--prometheus-port", "19090", "trainer.steps=2", "rollout.n=4"]) == 0
    assert cli.main(["train", "--config", "c.yaml", "--resume", "trainer.steps=3"]) == 0
    assert cli.main(["train", "--resume", "auto", "trainer.steps=4"]) == 0
    assert calls == [
        (("c.yaml", ["trainer.steps=2", "rollout.n=4"]),
         {"resume": False, "dashboard": True, "dashboard_port": 18265, "prometheus_port": 19090}),
        (("c.yaml", ["trainer.steps=3"]),
         {"resume": True, "dashboard": False, "dashboard_port": None, "prometheus_port": 9090}),
        ((None, ["trainer.steps=4"]),
         {"resume": "auto", "dashboard": False, "dashboard_port": None, "prometheus_port": 9090}),
    ]
    with pytest.raises(SystemExit):
        cli.main(["train", "--dashboard-port", "not-a-port"])


def test_init_ray_uses_an_initialized_ray_as_it_is(ray_cluster):
    from workers.cluster import init_ray

    said = []
    with init_ray(dashboard=True, log=said.append) as session:
        assert session.mode == "existing" and session.prometheus is None and not session.owns_ray
    assert ray_cluster.is_initialized()  # not shut down: it is not the run's
    assert "already initialized" in said[0]


CHILD = r"""
import json, sys
from workers.cluster import init_ray

session = init_ray(dashboard=True, dashboard_port=int(sys.argv[1]), prometheus_port=int(sys.argv[2]),
                   scrape_interval="1s", log=lambda s: print(s, flush=True))
import ray
p = session.prometheus
print("STARTED " + json.dumps({
    "mode": session.mode, "owns_ray": session.owns_ray, "dashboard_url": session.dashboard_url,
    "prometheus_url": p and p.url, "prometheus_pid": p and p.process.pid, "prometheus_dir": p and str(p.workdir),
    "prometheus_source": p and p.source, "export_ports": [n["MetricsExportPort"] for n in ray.nodes()]}), flush=True)
with session:  # what the driver does around a run: stop() also when the run fails
    if sys.stdin.readline().strip() == "fail":
        raise RuntimeError("boom: the run failed")
"""


def _get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _answers(url: str) -> bool:
    try:
        _get(url, timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(prom.prometheus_binary() is None, reason="Debian's prometheus is not installed "
                    "(launch/install_test_deps.sh)")
def test_init_ray_dashboard_and_prometheus_for_real():
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="srl-dash-", dir="/tmp"))  # short: Ray's unix sockets live under it
    dash_port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_PROMETHEUS_HOST")}
    env.update({"HOME": str(tmp / "home"), "RAY_TMPDIR": str(tmp / "ray"), "TMPDIR": str(tmp),
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(dash_port), str(prom_port)], env=env, cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    info = None
    try:
        for line in child.stdout:
            out.append(line)
            if line.startswith("STARTED "):
                info = json.loads(line[len("STARTED "):])
                break
        assert info is not None, f"init_ray exited with {child.wait()}:\n{''.join(out)[-4000:]}"
        t_up = time.monotonic() - t0
        text = "".join(out)
        assert info["mode"] == "local" and info["owns_ray"], info
        dash, prom_url = info["dashboard_url"], info["prometheus_url"]
        assert dash == f"http://127.0.0.1:{dash_port}" and prom_url == f"http://127.0.0.1:{prom_port}", info
        assert info["prometheus_source"].endswith("prometheus.yml"), info  # Ray's own scrape config
        # what is printed: both URLs, how to open them, the unauthenticated export port
        assert f"Ray dashboard: {dash}" in text and f"Prometheus: {prom_url}" in text, text
        assert f"ssh -L {dash_port}:127.0.0.1:{dash_port}" in text and "token auth is on" in text, text
        assert "WITHOUT authentication on all interfaces" in text, text

        # the dashboard answers (token auth on: the API wants the generated token)
        token = (tmp / "home" / ".ray" / "auth_token").read_text().strip()
        status, _ = _get(dash)
        assert status == 200, status
        status, body = _get(f"{dash}/api/version", token)
        assert status == 200 and b"ray_version" in body, (status, body[:300])
        # ... and reaches the Prometheus started for it (RAY_PROMETHEUS_HOST)
        status, body = _get(f"{dash}/api/prometheus_health", token)
        assert status == 200, (status, body[:500])

        # Prometheus is up and scrapes Ray's metrics export port
        def ray_target_up():
            _, b = _get(f"{prom_url}/api/v1/targets")
            return [t for t in json.loads(b)["data"]["activeTargets"] if t["health"] == "up"
                    and any(t["scrapeUrl"].endswith(f":{p}/metrics") for p in info["export_ports"])]

        _wait_for(ray_target_up, 30, "Ray's metrics export target 'up' in Prometheus")

        def ray_series():
            _, b = _get(f"{prom_url}/api/v1/query?query=count(%7B__name__%3D~%22ray_.%2B%22%7D)")
            res = json.loads(b)["data"]["result"]
            return float(res[0]["value"][1]) if res else 0

        assert _wait_for(ray_series, 30, "ray_* series in Prometheus") > 0
        t_checks = time.monotonic() - t0 - t_up

        # the run fails: Prometheus and the run's cluster are stopped all the same
        child.stdin.write("fail\n")
        child.stdin.flush()
        rest = child.stdout.read()
        assert child.wait(timeout=60) != 0 and "boom: the run failed" in rest, rest[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        child.stdout.close()
        child.stdin.close()
        t1 = time.monotonic()
        deadline = time.monotonic() + 20
        while (left := _leftovers(tmp, info)) and time.monotonic() < deadline:
            time.sleep(0.5)
        names = [f"{p.name()}({p.pid})" for p in left]
        for p in left:  # only when the check below fails: do not leak into the rest of the suite
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not names, f"processes outlived the run: {names}"
    assert not Path(info["prometheus_dir"]).exists(), "Prometheus's working dir was not removed"
    assert not _answers(info["prometheus_url"]) and not _answers(info["dashboard_url"])
    print(f"dashboard + prometheus up {t_up:.1f}s, checks {t_checks:.1f}s, stopped in {time.monotonic() - t1:.1f}s")


def _leftovers(tmp: Path, info: dict | None) -> list[psutil.Process]:
    """Live processes of the child's cluster (its RAY_TMPDIR on the command line) and its Prometheus."""
    found = []
    for p in psutil.process_iter(["cmdline", "pid"]):
        try:
            mine = str(tmp) in " ".join(p.info["cmdline"] or ()) or (info and p.pid == info["prometheus_pid"])
            if mine and p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found
