"""A local Prometheus scraping Ray's metrics export, and how to reach the dashboard and the metrics.

    prom = start_prometheus()          # Debian's `prometheus` on 127.0.0.1:9090, or None when not installed
    print(dashboard_hint(prometheus=prom))
    ...
    prom.stop()

Why: the Ray dashboard's metrics view (and ``/api/prometheus_health``) reads from a Prometheus at
``RAY_PROMETHEUS_HOST`` (default ``http://localhost:9090``); Ray itself only serves the current values
on each node's metrics export port. When the dashboard runs, Ray writes a scrape config into its session
directory, ``<session>/metrics/prometheus/prometheus.yml``, which discovers every node's export port
through ``<session>/prom_metrics_service_discovery.json``. :func:`start_prometheus` runs Prometheus
with that config (storage in a temporary directory that :meth:`PrometheusHandle.stop` removes); without
the dashboard (no config file) it scrapes the export ports that ``ray.nodes()`` reports instead.

Our metrics appear there as ``ray_soft_rl_<key>`` (see :mod:`workers.telemetry`), e.g.
``http://127.0.0.1:9090/graph?g0.expr=ray_soft_rl_reward_mean``. Grafana, which the dashboard embeds for
its charts, is not packaged in Debian, so those panels stay empty; Prometheus's own UI plots any metric.

Security: Ray's metrics export port answers **without authentication on all interfaces** (0.0.0.0),
even when the cluster uses token authentication; the Prometheus started here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "Prometheus is not installed, so the Ray dashboard's metrics view stays empty. On Debian/Ubuntu: "
    "`sudo apt-get install --no-install-recommends prometheus` (then rerun; soft-rl starts it on "
    "127.0.0.1:9090 itself, no service needed). Metrics are still written to metrics.jsonl and TensorBoard."
)
RAY_CONFIG = Path("metrics") / "prometheus" / "prometheus.yml"  # relative to a Ray session directory


@dataclass
class PrometheusHandle:
    """A running Prometheus started by :func:`start_prometheus`."""

    url: str
    process: subprocess.Popen
    workdir: Path  # config copy, TSDB storage and log; removed by stop()
    config: Path
    source: str  # what it scrapes: Ray's config file, or "ray.nodes()"
    _stopped: bool = field(default=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def query(self, expr: str, timeout: float = 5.0) -> list[dict]:
        """Instant query through the HTTP API (``/api/v1/query``); returns ``data.result``."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=timeout) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate Prometheus (SIGTERM, then SIGKILL after ``timeout``) and delete its working directory."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` executable (Debian: /usr/bin/prometheus), or None."""
    return shutil.which("prometheus")


def ray_session_dir() -> Path | None:
    """This process's Ray session directory when Ray is initialized, else the newest default session."""
    try:
        import ray

        if ray.is_initialized():
            node = ray._private.worker._global_node  # the session of *this* cluster, not the newest one
            if node is not None:
                return Path(node.get_session_dir_path())
    except Exception:  # pragma: no cover - best effort
        pass
    latest = Path(tempfile.gettempdir()) / "ray" / "session_latest"
    return latest.resolve() if latest.exists() else None


def _node_targets() -> list[str]:
    """``host:metrics_export_port`` of every live node, when Ray is initialized in this process."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
                if n.get("Alive") and n.get("MetricsExportPort")]
    except Exception:  # pragma: no cover - best effort
        return []


def _write_config(path: Path, ray_config: Path | None, targets: list[str], scrape_interval: str | None) -> None:
    import yaml

    if ray_config is not None:
        cfg = yaml.safe_load(ray_config.read_text()) or {}
    else:
        cfg = {"global": {"scrape_interval": "10s", "evaluation_interval": "10s"},
               "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}
    if scrape_interval:
        cfg.setdefault("global", {})["scrape_interval"] = scrape_interval
        cfg["global"]["evaluation_interval"] = scrape_interval
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_prometheus(session_dir: str | Path | None = None, port: int = 9090, *, scrape_interval: str | None = None,
                     ready_timeout: float = 30.0, log=_stderr) -> PrometheusHandle | None:
    """Start Debian's ``prometheus`` on ``127.0.0.1:port`` scraping a Ray cluster; None when not installed.

    ``session_dir``: a Ray session directory (default: this process's cluster when Ray is initialized, else
    ``/tmp/ray/session_latest``); its ``metrics/prometheus/prometheus.yml`` (written by the dashboard) is used.
    Without that file, the export ports from ``ray.nodes()`` are scraped (needs Ray initialized here).
    ``scrape_interval`` (e.g. ``"1s"``) overrides Ray's 10 s. Keep ``port=9090`` for the dashboard to find it,
    or start Ray with ``RAY_PROMETHEUS_HOST=http://127.0.0.1:<port>``. The process is stopped at interpreter
    exit if :meth:`PrometheusHandle.stop` was not called. Every reason for not running (not installed, no
    Ray cluster, port taken, Prometheus failing to start) is reported through ``log`` (default: stderr) and
    returns None: metrics must never stop a training run.
    """
    exe = prometheus_binary()
    if exe is None:
        log(INSTALL_HINT)
        return None
    session = Path(session_dir) if session_dir is not None else ray_session_dir()
    ray_config = session / RAY_CONFIG if session is not None else None
    if ray_config is not None and ray_config.is_file():
        targets, source = [], str(ray_config)
    else:
        ray_config, targets, source = None, _node_targets(), "ray.nodes()"
        if not targets:
            log(f"prometheus: no Ray scrape config ({session / RAY_CONFIG if session else 'no Ray session'}) and "
                "no Ray cluster in this process to read export ports from; not starting Prometheus. Start Ray "
                "with the dashboard (it writes the config) or pass session_dir.")
            return None
    if not _port_free(port):
        log(f"prometheus: 127.0.0.1:{port} is already in use (another Prometheus?); not starting one. "
            "Pass another port, and start Ray with RAY_PROMETHEUS_HOST=http://127.0.0.1:<port> for the dashboard.")
        return None
    workdir = Path(tempfile.mkdtemp(prefix="soft-rl-prometheus-"))
    config = workdir / "prometheus.yml"
    _write_config(config, ray_config, targets, scrape_interval)
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "prometheus.log", "wb") as logf:
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2d"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    handle = PrometheusHandle(url=url, process=proc, workdir=workdir, config=config, source=source)
    atexit.register(handle.stop)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            tail = handle.log_path.read_text(errors="replace")[-2000:]
            handle.stop()
            log(f"prometheus: exited with code {proc.returncode} at start-up; not running:\n{tail}")
            return None
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            log(f"prometheus: {url} not ready after {ready_timeout:.0f} s; stopped it")
            return None
        time.sleep(0.2)
    log(f"prometheus: {url} scraping Ray metrics ({source}); try {url}/graph?g0.expr=ray_soft_rl_reward_mean")
    return handle


def http_url(url: str | None) -> str | None:
    """Ray's dashboard address ("host:port", sometimes with a scheme) as an http URL; None when empty."""
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _dashboard_url() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return http_url(ray._private.worker._global_node.webui_url)  # "" when the dashboard is off
    except Exception:  # pragma: no cover - best effort
        pass
    return None


def dashboard_hint(dashboard_url: str | None = None, metrics_ports: list[str] | None = None,
                   prometheus: PrometheusHandle | None = None) -> str:
    """Human-readable lines: where the dashboard is, how to authenticate, where metrics go, what is exposed.

    Defaults come from the Ray cluster of this process when it is initialized.
    """
    url = dashboard_url or _dashboard_url()
    ports = metrics_ports if metrics_ports is not None else _node_targets()
    token_on = os.environ.get("RAY_AUTH_MODE", "token").lower() != "disabled"
    lines = []
    if url:
        lines.append(f"Ray dashboard: {url}  ({_how_to_open(url, 8265)})")
        if token_on:
            lines.append("  token auth is on (Ray's default): API clients need `Authorization: Bearer <token>`; "
                         "the token is in ~/.ray/auth_token (or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH); "
                         "`ray job submit` from another shell needs RAY_AUTH_MODE=token and that token.")
    else:
        lines.append("Ray dashboard: not running (start Ray with include_dashboard=True / `ray start --head`).")
    if prometheus is not None:
        lines.append(f"Prometheus: {prometheus.url}  ({_how_to_open(prometheus.url, 9090)}; query e.g. "
                     "ray_soft_rl_reward_mean; the dashboard's charts also need Grafana, which Debian does not "
                     "package)")
    elif prometheus_binary() is None:
        lines.append(INSTALL_HINT)
    else:
        lines.append("Prometheus: installed but not started (soft-rl train --dashboard starts it).")
    where = ", ".join(f"http://{t}/metrics" for t in ports) if ports else "http://<node>:<metrics_export_port>/metrics"
    lines.append(f"Ray metrics export: {where} -- answers WITHOUT authentication on all interfaces (0.0.0.0), "
                 "even with token auth on; firewall these ports on shared networks.")
    return "\n".join(lines)


def _how_to_open(url: str, default_port: int) -> str:
    """A browser on this host opens ``url`` as it is; from another machine, tunnel to it with ssh."""
    u = urllib.parse.urlparse(url)
    port, host = u.port or default_port, u.hostname or "127.0.0.1"
    tunnel = f"then open http://localhost:{port}"
    if host in ("127.0.0.1", "localhost", "::1"):  # loopback only: a browser here, or an ssh tunnel to here
        return f"open it in a browser on this host; from another machine: ssh -L {port}:{host}:{port} <this host>, " \
            + tunnel
    return f"open it from a machine that reaches {host}, or: ssh -L {port}:{host}:{port} <a host that does>, " + tunnel
