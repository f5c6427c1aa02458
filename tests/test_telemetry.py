"""Telemetry sinks (JSONL, TensorBoard, Ray Gauges) and the Prometheus path of our metrics.

Fast: files written and read back (TensorBoard via EventAccumulator), Gauge naming and NaN handling, Gauges
on the session's live `ray_cluster`. Slow: a Ray head of our own (dashboard on, metrics pushed every second),
a driver process logging through Telemetry, our names in the Prometheus text of Ray's metrics export port, and,
when Debian's `prometheus` is installed, start_prometheus scraping them (queried over its HTTP API).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from workers import prometheus as prom
from workers.telemetry import Telemetry, prometheus_name

try:
    from test_job_submit import ROOT, LocalRayHead, free_port
except ImportError:  # pytest --import-mode=importlib
    from tests.test_job_submit import ROOT, LocalRayHead, free_port

# One driver-like step record per step (names as workers/driver.py produces them).
STEPS = {
    1: {"reward/mean": 0.25, "reward/std": 0.5, "time/rollout": 3.5, "learner/grad_norm": 1.5,
        "sync/total_s": 0.125, "learner/kl": 0.1, "eval/pass@1": 0.375,
        "rollout_vs_learner/max_abs_logprob_diff": 0.001},
    2: {"reward/mean": 0.75, "reward/std": 0.25, "time/rollout": 2.5, "learner/grad_norm": float("nan"),
        "sync/total_s": 0.0625, "learner/kl": float("inf"), "eval/pass@1": 0.625,
        "rollout_vs_learner/max_abs_logprob_diff": 0.002},
}
# Prometheus name -> value exported after both steps (non-finite step-2 values keep the step-1 value).
EXPECTED = {"soft_rl_step": 2.0, "soft_rl_reward_mean": 0.75, "soft_rl_reward_std": 0.25, "soft_rl_time_rollout": 2.5,
            "soft_rl_learner_grad_norm": 1.5, "soft_rl_sync_total_s": 0.0625, "soft_rl_learner_kl": 0.1,
            "soft_rl_eval_pass_at_1": 0.625, "soft_rl_rollout_vs_learner_max_abs_logprob_diff": 0.002}


def test_prometheus_names():
    assert prometheus_name("reward/mean") == "soft_rl_reward_mean"
    assert prometheus_name("time/rollout") == "soft_rl_time_rollout"
    assert prometheus_name("learner/grad_norm") == "soft_rl_learner_grad_norm"
    assert prometheus_name("sync/total_s") == "soft_rl_sync_total_s"
    assert prometheus_name("eval/pass@1") == "soft_rl_eval_pass_at_1"
    assert prometheus_name("Rollout-vs Learner//x.y") == "soft_rl_rollout_vs_learner_x_y"
    assert prometheus_name("1st") == "soft_rl_1st" and prometheus_name("///") == "soft_rl_unnamed"


def test_jsonl_and_tensorboard(tmp_path):
    import numpy as np
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Telemetry(tmp_path, ray_metrics=False, progress_total=3) as tel:
        tel.log(1, {"step": 1, **STEPS[1], "note": "warm-up", "n_tok": np.int64(12), "t": torch.tensor(0.5)})
        tel.log(2, STEPS[2])
        tel.write("a log line above the bar")
    tel.close()  # idempotent
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[0]["reward/mean"] == 0.25 and lines[0]["note"] == "warm-up" and lines[0]["n_tok"] == 12
    assert lines[0]["t"] == 0.5 and lines[1]["eval/pass@1"] == 0.625
    assert lines[1]["learner/grad_norm"] is None and lines[1]["learner/kl"] is None  # NaN/inf -> null

    # A resumed run appends to the same file.
    with Telemetry(tmp_path, ray_metrics=False, tensorboard=False, progress=False) as tel:
        tel.log(3, {"reward/mean": 1.0})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(STEPS[1]) | {"n_tok", "t"} <= tags and "note" not in tags and "step" not in tags
    for key in STEPS[1]:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [1, 2], key
        for (_, v), step in zip(got, (1, 2), strict=True):
            want = STEPS[step][key]
            assert (math.isnan(v) and math.isnan(want)) or v == pytest.approx(want), (key, step, v)


class _FakeGauge:
    made: dict[str, _FakeGauge] = {}

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tag_keys, []
        _FakeGauge.made[name] = self

    def set(self, value, tags=None):
        self.values.append((value, dict(tags or {})))


def test_gauges_lazy_named_and_skip_non_finite(tmp_path, monkeypatch):
    import ray
    import ray.util.metrics

    tel = Telemetry(tmp_path, tensorboard=False, jsonl=False, progress=False, run_name="r1", gauge_refresh_s=3600)
    # Ray not initialized (the session's cluster may be up when this runs inside the whole suite)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    tel.log(1, STEPS[1])  # nothing exported, nothing made
    assert tel.gauge_names == []
    _FakeGauge.made = {}
    monkeypatch.setattr(ray.util.metrics, "Gauge", _FakeGauge)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    tel.log(1, {**STEPS[1], "note": "not a number"})
    tel.log(2, STEPS[2])
    tel.close()
    assert tel.gauge_names == sorted(EXPECTED) == sorted(_FakeGauge.made)
    for name, gauge in _FakeGauge.made.items():
        assert gauge.tag_keys == ("run",) and all(t == {"run": "r1"} for _, t in gauge.values)
        assert gauge.values[-1][0] == pytest.approx(EXPECTED[name]), name
    assert len(_FakeGauge.made["soft_rl_learner_grad_norm"].values) == 1  # the NaN was skipped
    assert len(_FakeGauge.made["soft_rl_reward_mean"].values) == 2

    # Between steps a thread re-sets every Gauge to its last finite value (Ray drops series not set lately).
    _FakeGauge.made = {}
    tel = Telemetry(tmp_path, tensorboard=False, jsonl=False, progress=False, run_name="r2", gauge_refresh_s=0.05)
    tel.log(1, STEPS[1])
    tel.log(2, STEPS[2])
    time.sleep(0.5)
    tel.close()
    n = len(_FakeGauge.made["soft_rl_reward_mean"].values)
    assert n >= 4 and {v for v, _ in _FakeGauge.made["soft_rl_reward_mean"].values[2:]} == {0.75}
    assert {v for v, _ in _FakeGauge.made["soft_rl_learner_grad_norm"].values} == {1.5}
    time.sleep(0.2)
    assert len(_FakeGauge.made["soft_rl_reward_mean"].values) == n  # close() stopped the refresher


def test_gauges_on_live_cluster(tmp_path, ray_cluster):
    from ray.util.metrics import Gauge

    with Telemetry(tmp_path, tensorboard=False, progress=False) as tel:
        tel.log(1, STEPS[1])
        tel.log(2, STEPS[2])
        assert tel.gauge_names == sorted(EXPECTED)
        assert all(isinstance(g, Gauge) for g in tel._gauges.values())


def test_start_prometheus_not_installed(monkeypatch):
    monkeypatch.setattr(prom.shutil, "which", lambda name: None)
    said = []
    assert prom.start_prometheus(log=said.append) is None
    assert "apt-get install" in said[0] and "prometheus" in said[0]
    hint = prom.dashboard_hint(dashboard_url="http://127.0.0.1:8265", metrics_ports=["127.0.0.1:1234"])
    assert "http://127.0.0.1:8265" in hint and "http://127.0.0.1:1234/metrics" in hint
    assert "WITHOUT authentication on all interfaces" in hint and "apt-get install" in hint


@pytest.mark.skipif(prom.prometheus_binary() is None, reason="Debian's prometheus is not installed")
def test_start_prometheus_port_taken(tmp_path):
    import socket

    (tmp_path / prom.RAY_CONFIG).parent.mkdir(parents=True)
    (tmp_path / prom.RAY_CONFIG).write_text("global:\n  scrape_interval: 10s\nscrape_configs: []\n")
    said = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert prom.start_prometheus(session_dir=tmp_path, port=s.getsockname()[1], log=said.append) is None
    assert "already in use" in said[0]


# ---- slow: a real Ray head, a driver logging through Telemetry, Ray's metrics export, Prometheus ----------

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from workers.telemetry import Telemetry
    ray.init(address=sys.argv[1])
    tel = Telemetry(sys.argv[2], tensorboard=False, progress=False, run_name="srltest")
    for step, metrics in json.loads(sys.argv[3]).items():
        tel.log(int(step), metrics)
    print("LOGGED", flush=True)
    sys.stdin.readline()  # stay connected (Gauges live in this process) until the test is done
    tel.close()
""")


def _scrape(port: int) -> dict[str, float]:
    """``{metric name: value}`` of our series (run="srltest") on a Ray metrics export port."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("ray_soft_rl_") and s.labels.get("run") == "srltest"}


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory):
    """A Ray head (metrics reported every 1 s) and a driver process that logged STEPS through Telemetry."""
    t0 = time.monotonic()
    head = LocalRayHead(num_cpus=1, env={"RAY_metrics_report_interval_ms": "1000"})
    driver = None
    try:
        env = {**head.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{head.env.get('PYTHONPATH', '')}"}
        steps = json.dumps({str(k): v for k, v in STEPS.items()})  # NaN/Infinity: Python's json reads them back
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, head.gcs_address,
                                   str(tmp_path_factory.mktemp("run")), steps],
                                  env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in driver.stdout:  # Ray's log lines, then ours (blocks until the driver logged or died)
            seen.append(line)
            if line.startswith("LOGGED"):
                break
        else:
            raise AssertionError(f"driver exited with {driver.wait()} before logging:\n{''.join(seen)[-3000:]}")
        print(f"metrics cluster + driver ready in {time.monotonic() - t0:.1f}s")
        yield head
    finally:
        if driver is not None:
            try:
                driver.stdin.close()
                driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait(timeout=10)
            driver.stdout.close()
        head.stop()
        assert not head.tmp.exists()


def _wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout:.0f} s; last: {last}")


@pytest.mark.slow
def test_metric_names_on_ray_metrics_export_port(metrics_cluster):
    t0 = time.monotonic()
    want = {f"ray_{k}": v for k, v in EXPECTED.items()}

    def ours():
        got = _scrape(metrics_cluster.metrics_export_port)
        return got if set(want) <= set(got) else None

    got = _wait_for(ours, 30, f"all of {sorted(want)} on the metrics export port")
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name
    # Still there after 3 report intervals without a new step (Ray's agent drops gauges not set for 2).
    time.sleep(3.5)
    assert _scrape(metrics_cluster.metrics_export_port) == got
    print(f"metrics on the export port after {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_start_prometheus_scrapes_our_metrics(metrics_cluster):
    t0 = time.monotonic()
    session = metrics_cluster.tmp / "session_latest"
    _wait_for(lambda: (session / prom.RAY_CONFIG).is_file(), 30, "Ray's prometheus.yml")
    handle = prom.start_prometheus(session_dir=session, port=free_port(), scrape_interval="1s")
    assert handle is not None
    try:
        assert handle.url.startswith("http://127.0.0.1:") and handle.source.endswith("prometheus.yml")

        def value():
            res = handle.query('ray_soft_rl_reward_mean{run="srltest"}')
            return res[0]["value"][1] if res else None

        assert float(_wait_for(value, 40, "ray_soft_rl_reward_mean in Prometheus")) == pytest.approx(0.75)
        assert float(handle.query('ray_soft_rl_eval_pass_at_1{run="srltest"}')[0]["value"][1]) == 0.625
        hint = prom.dashboard_hint(dashboard_url=metrics_cluster.dashboard_url, prometheus=handle,
                                   metrics_ports=[f"127.0.0.1:{metrics_cluster.metrics_export_port}"])
        assert handle.url in hint and "WITHOUT authentication" in hint
    finally:
        handle.stop()
    assert handle.process.poll() is not None and not handle.workdir.exists()
    print(f"prometheus scraped our metric after {time.monotonic() - t0:.1f}s")
