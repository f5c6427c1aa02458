"""The driver's actor layout for ``trainer.device=gpu`` on a CPU machine: a Ray cluster with 4 logical
GPUs, the real driver code up to the actor classes, and stand-ins for the two classes that would touch
a GPU (``RolloutWorker._start_engine``, ``LearnerWorker.init``), which record what they were given.

    python tests/gpu_layout_check.py '<json list of scenarios>'   -> one JSON line per scenario

A scenario is a list of config overrides, or ``["eval", <num_engines>, <tensor_parallel_size>]``: the engines of
``soft-rl eval --backend vllm`` (``workers.eval``) instead of a training run's. Run by tests/test_gpu_proxies.py in
its own process (its own Ray cluster, separate from the test session's CPU-only one).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.learner import LearnerWorker  # noqa: E402
from workers.rollout import RolloutWorker  # noqa: E402


def _seen() -> dict:
    """What an actor process was given: its GPUs (Ray's and CUDA's view), placement and environment."""
    import ray

    ctx = ray.get_runtime_context()
    return {"gpu_ids": sorted(str(g) for g in ray.get_gpu_ids()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "placement_group": ctx.get_placement_group_id(), "node": ctx.get_node_id(), "pid": os.getpid(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}


class RecordingEngine:
    """Stands in for ``SoftEngine``: keeps its arguments and the process's view, generates nothing."""

    _closed = False

    def __init__(self, model_dir: str, engine_kwargs: dict):
        import dataclasses

        kw = dict(engine_kwargs)
        kw["prepare_params"] = [dataclasses.asdict(p) for p in kw.get("prepare_params", [])]
        self.record = {"model_dir": model_dir, "engine_kwargs": kw, **_seen()}

    def stats(self) -> dict:
        return {"standin": self.record}

    def failed(self) -> bool:
        return False

    def shutdown(self) -> None:
        self._closed = True


class EngineStandIn(RolloutWorker):
    """The real rollout actor (environment set-up included) with the engine replaced by a recording."""

    def _start_engine(self, model_dir: str, engine_kwargs: dict):
        return RecordingEngine(model_dir, engine_kwargs)


class LearnerStandIn(LearnerWorker):
    """The real learner actor, except ``init`` (DeepSpeed and the model) only records."""

    def init(self, addr: str, port: int) -> int:
        self.record = {"rank": self.rank, "world_size": self.world_size, "device": self.device,
                       "backend": self.backend, "master": [addr, port], **_seen()}
        return self.rank

    def recorded(self) -> dict:
        return self.record

    def shutdown(self) -> None:
        pass


def _eval_scenario(model: Path, num_engines: int, tp: int) -> dict:
    """The engines ``soft-rl eval --backend vllm`` starts (``workers.eval._VLLMGenerator``), as recorded."""
    import ray

    from soft_rl.evaluation import EvalSettings
    from workers.eval import EvalRun, _VLLMGenerator

    run = EvalRun(model=str(model), data=[], settings=EvalSettings(n=1, max_new_tokens=8), num_engines=num_engines,
                  tensor_parallel_size=tp)
    gen = _VLLMGenerator(run, tokenizer=None, max_new_tokens=8, max_model_len=None)
    try:
        engines = [h["standin"] for h in gen.pool.health()]
        bundles = gen.layout.group.bundle_specs if gen.layout.group is not None else None
        free = ray.available_resources().get("GPU", 0.0)
    finally:
        gen.close()
    import time

    deadline = time.monotonic() + 30  # Ray returns the released GPUs asynchronously
    while ray.available_resources().get("GPU", 0.0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"overrides": ["eval", num_engines, tp], "engines": engines, "bundles": bundles,
            "gpus_free_while_running": free, "gpus_free_after": ray.available_resources().get("GPU", 0.0)}


def main(scenarios: list[list[str]]) -> None:
    import ray

    import workers.learner
    import workers.rollout
    from soft_rl.config import load_config
    from workers.driver import start_actors

    workers.rollout.RolloutWorker = EngineStandIn
    workers.learner.LearnerWorker = LearnerStandIn
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = Path(tempfile.mkdtemp(prefix="gpu_layout_")) / "model"  # only its config.json is read (vocabulary)
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    ray.init(num_cpus=16, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for overrides in scenarios:
            if overrides[0] == "eval":
                print(json.dumps(_eval_scenario(model, *overrides[1:])), flush=True)
                continue
            cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"model.path={model}", "trainer.device=gpu",
                                                                    *overrides])
            actors = start_actors(cfg, "gpu")
            try:
                engines = [h["standin"] for h in actors.pool.health()]
                learners = ray.get([a.recorded.remote() for a in actors.learners.actors])
                bundles = actors.layout.group.bundle_specs if actors.layout.group is not None else None
            finally:
                actors.shutdown()
            print(json.dumps({"overrides": overrides, "engines": engines, "learners": learners,
                              "bundles": bundles}), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
