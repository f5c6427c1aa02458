"""Connect a run's driver to Ray, optionally with the Ray dashboard and a local Prometheus.

    session = init_ray(dashboard=True, log=print)   # what `soft-rl train --dashboard` and the quickstart do
    try:
        ...                                          # the run
    finally:
        session.stop()                               # Prometheus stopped, and the local cluster if we started it

Three cases, decided by the process's state:

* **Ray already initialized in this process** (a test fixture, a notebook): used as it is; nothing is started
  or stopped here.
* **``RAY_ADDRESS`` is set** (``ray job submit``, the Slurm script, a shell pointed at a cluster): ``ray.init()``
  joins that cluster. Its dashboard belongs to that cluster: whoever started it chose its address, port,
  authentication and lifetime, and ``--dashboard`` neither starts another one nor changes it; its URL is
  printed. Prometheus is started only when this driver runs on the **head node's host**: the dashboard reads
  its charts from ``RAY_PROMETHEUS_HOST`` (by default ``http://localhost:9090`` *on the head node*), so a
  Prometheus elsewhere would feed nothing. On the head's host it is the run's Prometheus (Slurm jobs and
  one-off job clusters have no other one), it lives as long as the run and it is skipped, with a message,
  when the port is taken, e.g. by the cluster's own Prometheus.
* **Otherwise** a local cluster is started. With ``dashboard=True``: the dashboard on 127.0.0.1 (port
  ``dashboard_port``, Ray's 8265 by default) and, when Debian's ``prometheus`` is installed, a Prometheus on
  ``127.0.0.1:prometheus_port`` scraping Ray's metrics export (:func:`workers.prometheus.start_prometheus`);
  the dashboard is pointed at it (``RAY_PROMETHEUS_HOST``). The cluster belongs to the run:
  :meth:`RaySession.stop` shuts it down. Token authentication follows ``RAY_AUTH_MODE`` (Ray 2.60's default:
  on; the quickstart turns it off for its loopback-only cluster).

Whenever the dashboard is asked for, the URLs and how to open them are printed (:func:`dashboard_hint`),
including that Ray's metrics export port answers **without authentication on all interfaces** (0.0.0.0).

Stopping: the driver calls :meth:`RaySession.stop` in a ``finally``, so Prometheus goes when the run ends or
raises; SIGTERM (``kill``, ``scancel``) also gets there, since ``ray.init`` installs a handler that turns it
into ``SystemExit`` in the main thread. Prometheus's own atexit hook is the last resort.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.prometheus import RAY_CONFIG, PrometheusHandle, dashboard_hint, http_url, ray_session_dir, start_prometheus

DEFAULT_PROMETHEUS_PORT = 9090  # where the Ray dashboard looks unless RAY_PROMETHEUS_HOST says otherwise


@dataclass
class RaySession:
    """What :func:`init_ray` did: ``mode`` is "existing", "joined" or "local"."""

    mode: str
    dashboard_url: str | None = None
    prometheus: PrometheusHandle | None = None
    owns_ray: bool = False  # the local cluster was started here; stop() shuts it down
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop Prometheus (if started), then the Ray cluster if it was started here. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.prometheus is not None:
                self.prometheus.stop()
        finally:
            if self.owns_ray:
                import ray

                ray.shutdown()

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def init_ray(dashboard: bool = False, *, dashboard_port: int | None = None,
             prometheus_port: int = DEFAULT_PROMETHEUS_PORT, scrape_interval: str | None = None,
             log: Callable[[str], None] = print, config_wait_s: float = 10.0) -> RaySession:
    """Initialize Ray for a run (see the module docstring for the three cases); returns a :class:`RaySession`
    to ``stop()`` at the end of the run, also on error. ``scrape_interval`` overrides Ray's 10 s (e.g. "1s")."""
    import ray

    if ray.is_initialized():
        if dashboard:
            log("[train] Ray is already initialized in this process: using that cluster as it is "
                "(--dashboard starts nothing).")
        return RaySession("existing")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init()  # joins RAY_ADDRESS without local options
        session = RaySession("joined", dashboard_url=http_url(ctx.dashboard_url))
        if dashboard:
            _start_joined_monitoring(session, address, prometheus_port, scrape_interval, log)
        return session
    if not dashboard:
        ray.init(include_dashboard=False, log_to_driver=False)
        return RaySession("local", owns_ray=True)
    prom_host = f"http://127.0.0.1:{prometheus_port}"
    saved = os.environ.get("RAY_PROMETHEUS_HOST")
    if saved is None:  # the dashboard process reads it at start-up
        os.environ["RAY_PROMETHEUS_HOST"] = prom_host
    try:
        kw = {} if dashboard_port is None else {"dashboard_port": dashboard_port}
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, **kw)
    finally:
        if saved is None:
            os.environ.pop("RAY_PROMETHEUS_HOST", None)
    session = RaySession("local", dashboard_url=http_url(ctx.dashboard_url), owns_ray=True)
    try:
        if saved is not None and saved.rstrip("/") != prom_host:
            log(f"[train] note: RAY_PROMETHEUS_HOST={saved}: the dashboard reads its charts from there, "
                f"not from the Prometheus started here ({prom_host})")
        _wait_for_ray_scrape_config(config_wait_s)
        session.prometheus = start_prometheus(port=prometheus_port, scrape_interval=scrape_interval, log=log)
        _print_hint(session, log)
    except BaseException:
        session.stop()
        raise
    return session


def _start_joined_monitoring(session: RaySession, address: str, prometheus_port: int, scrape_interval: str | None,
                             log: Callable[[str], None]) -> None:
    where = session.dashboard_url or "not running (the head was started without it)"
    log(f"[train] joined the Ray cluster at {address}; its dashboard ({where}) belongs to that cluster: whoever "
        "started the cluster chose its address, authentication and lifetime, and --dashboard does not change it.")
    head = _head_ip()
    import ray

    here = ray.util.get_node_ip_address()
    if head is not None and head != here:
        log(f"[train] not starting Prometheus: this driver runs on {here}, the head node on {head}; the dashboard "
            "reads Prometheus on the head node (RAY_PROMETHEUS_HOST, default http://localhost:9090), so start it "
            "there (`soft-rl train --dashboard` run on the head does).")
    else:
        session.prometheus = start_prometheus(port=prometheus_port, scrape_interval=scrape_interval, log=log)
        if session.prometheus is not None and prometheus_port != DEFAULT_PROMETHEUS_PORT:
            log(f"[train] note: the cluster's dashboard shows this Prometheus only if its head was started with "
                f"RAY_PROMETHEUS_HOST={session.prometheus.url}")
    _print_hint(session, log)


def _print_hint(session: RaySession, log: Callable[[str], None]) -> None:
    for line in dashboard_hint(dashboard_url=session.dashboard_url, prometheus=session.prometheus).splitlines():
        log(f"[train] {line}")


def _wait_for_ray_scrape_config(timeout: float) -> None:
    """The dashboard writes Ray's Prometheus config into the session shortly after start-up; wait for it (else
    start_prometheus falls back to the export ports of ray.nodes())."""
    session = ray_session_dir()
    deadline = time.monotonic() + timeout
    while session is not None and not (session / RAY_CONFIG).is_file() and time.monotonic() < deadline:
        time.sleep(0.2)


def _head_ip() -> str | None:
    import ray

    for n in ray.nodes():
        if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
            return n.get("NodeManagerAddress")
    return None
