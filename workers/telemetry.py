"""Per-step training metrics to four sinks: a JSONL file, TensorBoard, Ray's metrics export and a console bar.

    tel = Telemetry("runs/x", progress_total=cfg.trainer.steps)
    for step in ...:
        tel.log(step, {"reward/mean": 0.4, "time/rollout": 3.2, "learner/grad_norm": 1.7, ...})
    tel.close()

Sinks (each can be switched off):

* ``<out_dir>/metrics.jsonl``: one line per call, ``{"step": step, **metrics}``, appended (a resumed run
  continues the file). Non-finite floats are written as ``null`` (JSON has no NaN/Infinity).
* ``<out_dir>/tb``: TensorBoard scalars, one tag per metric key (``reward/mean`` groups under ``reward``),
  x-axis = ``step``. Non-finite values are written as they are (TensorBoard shows NaN/inf).
* ``ray.util.metrics`` Gauges, only while Ray is initialized in this process; one Gauge per key, made on
  first use, with the tag ``run`` (default: the name of ``out_dir``). Non-finite values are skipped (the
  Gauge keeps its last value). Ray's metrics agent drops a gauge series that was not set within two report
  intervals (measured on Ray 2.60: a value set once vanished from the export port about 2 s later with
  ``RAY_metrics_report_interval_ms=1000``), while RL steps can take minutes; so a daemon thread re-sets
  every Gauge to its last value every half report interval (0.5-5 s) until :meth:`Telemetry.close`,
  after which the series age out. The name mapping is :func:`prometheus_name`:

      "reward/mean"                               -> soft_rl_reward_mean
      "time/rollout"                              -> soft_rl_time_rollout
      "learner/grad_norm"                         -> soft_rl_learner_grad_norm
      "sync/total_s"                              -> soft_rl_sync_total_s
      "eval/pass@1"                               -> soft_rl_eval_pass_at_1
      "rollout_vs_learner/max_abs_logprob_diff"   -> soft_rl_rollout_vs_learner_max_abs_logprob_diff
      the step itself                             -> soft_rl_step

  Ray exports every user metric with a ``ray_`` prefix, so Prometheus (and the Ray dashboard's metrics
  view) shows ``ray_soft_rl_reward_mean{run="x", ...}``. Ray pushes values to its metrics agent every
  ``RAY_metrics_report_interval_ms`` (10 s by default); the agent serves them, without authentication,
  on every interface at ``http://<node>:<metrics_export_port>/metrics``.
* a tqdm bar on the driver's stderr: one tick per step, postfix with a few key metrics
  (:data:`POSTFIX`). Use :meth:`Telemetry.write` for log lines so they do not tear the bar.

Values may be Python/NumPy/torch scalars or bools; anything ``float()`` rejects (strings, lists) goes to
the JSONL file only (or as ``str`` when JSON cannot hold it). Unknown keys are fine: every key is a metric.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "soft_rl_"

# (metric key, short label) shown after the bar, in this order, when present in a step's metrics.
POSTFIX: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward"),
    ("eval/pass@1", "pass@1"),
    ("rollout/soft_frac", "soft"),
    ("learner/grad_norm", "gnorm"),
    ("time/step", "step_s"),
)


def prometheus_name(key: str, prefix: str = PREFIX) -> str:
    """A valid Prometheus metric name for a metric key: ``prefix`` + key lower-cased, ``@`` -> ``_at_``,
    every other character outside ``[a-z0-9_]`` -> ``_``, runs of ``_`` collapsed, no trailing ``_``.

    ``"reward/mean"`` -> ``soft_rl_reward_mean``; ``"eval/pass@1"`` -> ``soft_rl_eval_pass_at_1``.
    Distinct keys can collide (``"a/b"`` and ``"a_b"``): they then share one Gauge (last write wins).
    """
    body = re.sub(r"[^a-z0-9_]", "_", key.lower().replace("@", "_at_"))
    body = re.sub(r"_+", "_", body).strip("_") or "unnamed"
    return prefix + body


def _as_float(value: Any) -> float | None:
    """``float(value)`` for numbers, bools and 0-d / 1-element arrays and tensors; None otherwise."""
    if isinstance(value, str | bytes) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _json_value(value: Any) -> Any:
    """A JSON-safe value: finite numbers as numbers, non-finite as null, ints/bools/str/None as they are."""
    if value is None or isinstance(value, bool | int | str):
        return value
    f = _as_float(value)
    if f is not None:
        if not math.isfinite(f):
            return None
        return int(f) if "int" in str(getattr(value, "dtype", "")) else f  # NumPy / torch integer scalars
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


class Telemetry:
    """Logs one dict of metrics per RL step to JSONL, TensorBoard, Ray Gauges and a tqdm bar (see module doc)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, ray_metrics: bool = True,
                 jsonl: bool = True, progress_total: int | None = None, progress: bool = True,
                 run_name: str | None = None, gauge_refresh_s: float | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or self.out_dir.resolve().name
        self.jsonl_path = self.out_dir / "metrics.jsonl" if jsonl else None
        self.tb_dir = self.out_dir / "tb" if tensorboard else None
        self._jsonl = open(self.jsonl_path, "a") if self.jsonl_path else None  # closed in close()
        self._tb = None
        if self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.tb_dir), flush_secs=10)
        self._ray_metrics = ray_metrics
        self._gauges: dict[str, Any] = {}
        self._last: dict[str, float] = {}  # Prometheus name -> last finite value, re-set by the refresher
        self._lock = threading.Lock()
        self._refresh_s = gauge_refresh_s
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, desc="train", unit="step", dynamic_ncols=True)
        self._closed = False

    # -- sinks -------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for RL step ``step`` in every enabled sink. A ``"step"`` key in ``metrics``
        is ignored in favour of ``step``."""
        if self._closed:
            raise RuntimeError("Telemetry.log after close()")
        step = int(step)
        items = [(str(k), v) for k, v in metrics.items() if k != "step"]
        if self._jsonl is not None:
            rec = {"step": step, **{k: _json_value(v) for k, v in items}}
            self._jsonl.write(json.dumps(rec, allow_nan=False) + "\n")
            self._jsonl.flush()
        numeric = [(k, f) for k, f in ((k, _as_float(v)) for k, v in items) if f is not None]
        if self._tb is not None:
            for k, f in numeric:
                self._tb.add_scalar(k, f, global_step=step)
            self._tb.flush()
        if self._ray_metrics:
            self._export_ray(step, numeric)
        if self._bar is not None:
            self._advance_bar(step, dict(numeric))

    def _export_ray(self, step: int, numeric: list[tuple[str, float]]) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a hard dependency of the trainer
            return
        if not ray.is_initialized():
            return
        with self._lock:
            for k, f in [("step", float(step)), *numeric]:
                if not math.isfinite(f):
                    continue
                try:
                    self._gauge(k).set(f, tags={"run": self.run_name})
                    self._last[prometheus_name(k)] = f
                except Exception as e:  # metrics must never stop training
                    logger.warning("ray metric %s (%s) not exported: %s", prometheus_name(k), k, e)
        if self._refresher is None and self._gauges:
            self._refresher = threading.Thread(target=self._refresh_loop, name="soft-rl-gauges", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        """Re-set every Gauge to its last value so the series stays on the export port between steps."""
        period = self._refresh_s
        if period is None:
            try:
                import ray

                period = min(5.0, max(0.5, ray._config.metrics_report_interval_ms() / 2000))
            except Exception:  # pragma: no cover - private config accessor moved
                period = 2.0
        while not self._stop.wait(period):
            with self._lock:
                for name, value in self._last.items():
                    try:
                        self._gauges[name].set(value, tags={"run": self.run_name})
                    except Exception:  # pragma: no cover - e.g. Ray shut down under us
                        return

    def _gauge(self, key: str):
        name = prometheus_name(key)
        g = self._gauges.get(name)
        if g is None:
            from ray.util.metrics import Gauge

            g = Gauge(name, description=f"soft-rl metric '{key}' (per RL step)", tag_keys=("run",))
            self._gauges[name] = g
        return g

    def _advance_bar(self, step: int, numeric: dict[str, float]) -> None:
        bar = self._bar
        bar.set_postfix({label: f"{numeric[k]:.3g}" for k, label in POSTFIX if k in numeric}, refresh=False)
        if step > bar.n:
            bar.update(step - bar.n)  # a resumed run jumps straight to its step
        else:
            bar.refresh()

    # -- helpers -----------------------------------------------------------------------------------------
    @property
    def gauge_names(self) -> list[str]:
        """Prometheus names of the Gauges made so far (without Ray's ``ray_`` export prefix)."""
        return sorted(self._gauges)

    def write(self, msg: str) -> None:
        """Print a log line above the progress bar (plain ``print`` when there is no bar)."""
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        """Flush and close every sink (idempotent); stops refreshing the Gauges (their series then age out)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
