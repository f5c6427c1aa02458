"""Rollout actors: ``RolloutWorker`` (one soft-thinking vLLM engine per Ray actor) and ``RolloutPool``.

    pool = RolloutPool(num_workers=2, model_dir=path, engine_kwargs={"dtype": "bfloat16", "max_k": 8})
    trajs = pool.generate([RolloutRequest(prompt_ids, SoftSamplingParams(...), max_new_tokens=512), ...])
    pool.update_weights(policy.state_dict().items())   # through the Ray object store
    pool.shutdown()

Weight sync, two receiving paths (both reload in place with vLLM's ``reload_weights``; on CPU
``load_weights`` fails after start-up):

* object store: ``update_weights`` takes (name, tensor) pairs; ``pull_weight_buckets`` fetches a
  bucketed sync from learner rank 0 one bucket ahead, and ``load_weight_buckets`` takes the object refs
  of one (ZeRO-3, where the driver drives the collective gathers); both stream into one reload;
* broadcast group: ``join_weight_group`` makes every worker process of the engine (each TP rank) a
  rank of a torch.distributed group whose rank 0 is learner rank 0 (NCCL on GPU, gloo on CPU);
  ``receive_weights(layout)`` then streams the broadcast buckets straight into the model loader.

Each worker must be shut down explicitly (``shutdown``): vLLM engines killed with their actor leak
/dev/shm segments.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from soft_rl.sampling import SoftSamplingParams
from soft_rl.trajectory import Trajectory

_ROOT = str(Path(__file__).resolve().parents[1])

# Settings an engine process needs before vLLM is imported (the caller's values win, except the model
# runner: the soft-thinking hooks live in vLLM's V1 runner, which SoftEngine enforces anyway).
DEFAULT_ENV = {
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# vLLM on CPU only: a process holding a GPU does not get these (a loopback host IP would also break
# multi-node communication).
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
_FORWARDED = ("VLLM_", "OMP_", "TORCHINDUCTOR_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "LD_PRELOAD")


def engine_env_defaults() -> dict[str, str]:
    """``DEFAULT_ENV``, plus ``CPU_ENV`` when this process holds no GPU (Ray's assignment inside an actor,
    else whether CUDA is available)."""
    import ray

    holds_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else torch.cuda.is_available()
    return {**DEFAULT_ENV, **({} if holds_gpu else CPU_ENV)}


@dataclass
class RolloutRequest:
    prompt_ids: list[int]
    params: SoftSamplingParams
    max_new_tokens: int


def _tensors(buckets: Iterable[list]) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a stream of buckets, each dropped as soon as it is handed on."""
    for bucket in buckets:
        while bucket:
            yield bucket.pop(0)


class RolloutWorker:
    """Owns one ``SoftEngine`` (tensor-parallel size from ``engine_kwargs``); used as a Ray actor."""

    def __init__(self, model_dir: str, engine_kwargs: dict | None = None, env: dict[str, str] | None = None):
        for k, v in {**engine_env_defaults(), **(env or {})}.items():
            os.environ.setdefault(k, str(v))
        self.model_dir = str(model_dir)
        self.engine = self._start_engine(self.model_dir, dict(engine_kwargs or {}))
        self.generated = 0
        self.engine_error: str | None = None  # set when the vLLM engine died under this actor (``health``)

    def _start_engine(self, model_dir: str, engine_kwargs: dict):
        """The one place the actor builds its vLLM engine (a test stand-in replaces only this)."""
        from workers.vllm_soft import SoftEngine

        return SoftEngine(model_dir, **engine_kwargs)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Trajectory]:
        if not requests:
            return []
        try:
            trajs = self.engine.generate([r.prompt_ids for r in requests], [r.params for r in requests],
                                         [r.max_new_tokens for r in requests])
        except Exception as e:
            from workers.vllm_soft import engine_died

            if engine_died(e) or self.engine.failed():  # e.g. a tensor-parallel worker process was killed
                self.engine_error = f"{type(e).__name__}: {e}"
            raise
        self.generated += len(trajs)
        return trajs

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict) -> int:
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        return self.engine.update_weights(items)

    def load_weight_buckets(self, refs: list) -> int:
        """One object-store sync: the buckets' object refs (nested in a list, so Ray passes them unresolved)
        are fetched one at a time and streamed into a single in-place reload; each tensor is dropped
        once handed to the loader, so at most about one bucket is resident here (workers.weight_sync)."""
        import ray

        if not refs:
            raise RuntimeError("load_weight_buckets: no buckets")

        def fetched():
            for i in range(len(refs)):
                ref, refs[i] = refs[i], None  # the bucket leaves the object store once every engine has it
                yield ray.get(ref)

        return self.engine.update_weights(_tensors(fetched()))

    def pull_weight_buckets(self, source, bucket_names: list[list[str]]) -> int:
        """One object-store sync pulled from ``source`` (learner rank 0's actor: ``weight_bucket(names)``),
        one bucket ahead of the loader: at most two buckets of this sync exist in the object store at a
        time, whatever the model's size (the driver-submitted path holds all of them at once)."""
        import ray

        if not bucket_names:
            raise RuntimeError("pull_weight_buckets: no buckets")

        def pulled():
            ahead = source.weight_bucket.remote(bucket_names[0])
            for i in range(len(bucket_names)):
                ref = ahead
                if i + 1 < len(bucket_names):
                    ahead = source.weight_bucket.remote(bucket_names[i + 1])
                bucket = ray.get(ref)
                del ref
                yield bucket

        return self.engine.update_weights(_tensors(pulled()))

    # broadcast transport (see workers.weight_sync.BroadcastChannel)
    def num_ranks(self) -> int:
        return self.engine.num_ranks

    def join_weight_group(self, host: str, port: int, base_rank: int, world_size: int, backend: str,
                          timeout_s: float) -> list[int]:
        return self.engine.join_weight_group(host, port, base_rank, world_size, backend, timeout_s)

    def receive_weights(self, layout) -> int:
        return self.engine.receive_weights(layout)

    def leave_weight_group(self) -> None:
        self.engine.leave_weight_group()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def placement(self) -> dict:
        from workers.placement import placement_info

        return placement_info()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def health(self) -> dict:
        if self.engine_error is None and self.engine.failed():
            self.engine_error = "a process of the vLLM engine died"
        if self.engine_error is not None:  # the engine cannot answer (stats would wait on a dead process)
            return {"ok": False, "error": self.engine_error, "pid": os.getpid(), "model": self.model_dir}
        return {"ok": not self.engine._closed, "error": None, "pid": os.getpid(), "model": self.model_dir,
                "generated": self.generated, **self.engine.stats()}

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutPool:
    """N ``RolloutWorker`` actors; ``generate`` splits a batch into contiguous chunks and gathers in order."""

    def __init__(self, num_workers: int, model_dir: str, engine_kwargs: dict | None = None,
                 tensor_parallel_size: int = 1, num_cpus_per_worker: float = 1.0, env: dict | None = None,
                 actor_options: list[dict] | None = None):
        """``actor_options``: per-worker Ray options (e.g. a colocation bundle, see workers.placement)."""
        import ray

        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        kw = dict(engine_kwargs or {})
        kw["tensor_parallel_size"] = tensor_parallel_size
        env_vars = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)}
        env_vars.update({k: str(v) for k, v in (env or {}).items()})
        pp = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        env_vars["PYTHONPATH"] = _ROOT + (os.pathsep + pp if pp else "")
        if actor_options is not None and len(actor_options) != num_workers:
            raise ValueError(f"{len(actor_options)} actor_options for {num_workers} workers")
        actor = ray.remote(RolloutWorker)
        opts = [{"num_cpus": num_cpus_per_worker, **(actor_options[i] if actor_options else {})}
                for i in range(num_workers)]
        # everything needed to start worker i again in the same place (``restart``)
        runtime_env = {"env_vars": env_vars}
        self._start = [lambda o=o: actor.options(**o, runtime_env=runtime_env).remote(str(model_dir), kw, env)
                       for o in opts]
        self.workers = [start() for start in self._start]
        ray.get([w.health.remote() for w in self.workers])  # wait until every engine is up

    def restart(self, i: int) -> None:
        """Replace worker ``i`` (dead or hung) by a fresh engine with the same options and placement bundle;
        it holds the model directory's weights until the next sync."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.workers[i])
        self.workers[i] = self._start[i]()
        ray.get(self.workers[i].health.remote())

    def chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(worker, start, stop) of a batch of ``n`` requests: contiguous, in order, one chunk per worker."""
        k = len(self.workers)
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [(i, bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]

    def generate(self, requests: Sequence[RolloutRequest], on_lost=None, poll=None) -> list[Trajectory]:
        """Every request's trajectory, in order. ``on_lost(worker, error)`` (the run's recovery) is called
        when a worker's call fails and must make worker ``worker`` usable again (restart it, give it the
        current weights); its chunk is then generated again on it, with the same requests and seeds, so
        the result is the one the lost engine would have returned. Without ``on_lost`` the error is raised.
        ``poll`` runs while waiting (the driver's preemption check)."""
        import ray

        from workers.calls import POLL_S

        out: list[list[Trajectory] | None] = [None] * len(self.workers)
        pending: dict = {}

        def submit(i: int, a: int, b: int) -> None:
            pending[self.workers[i].generate.remote(list(requests[a:b]))] = (i, a, b)

        for chunk in self.chunks(len(requests)):
            submit(*chunk)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if not ready and poll is not None:
                poll()
            for ref in ready:
                i, a, b = pending.pop(ref)
                try:
                    out[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - handed to on_lost, which re-raises what it cannot repair
                    if on_lost is None:
                        raise
                    on_lost(i, e)
                    submit(i, a, b)
        return [t for chunk in out if chunk for t in chunk]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | dict) -> list[int]:
        import ray

        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        ref = ray.put([(name, t.detach().to("cpu").contiguous()) for name, t in items])
        return ray.get([w.update_weights.remote(ref) for w in self.workers])

    def sleep(self) -> None:
        """Free the engines' device memory (vLLM sleep mode level 1: weights offloaded, KV cache dropped)."""
        import ray

        ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        import ray

        ray.get([w.wake_up.remote() for w in self.workers])

    def placement(self) -> list[dict]:
        import ray

        return ray.get([w.placement.remote() for w in self.workers])

    def reset_prefix_cache(self) -> list[bool]:
        import ray

        return ray.get([w.reset_prefix_cache.remote() for w in self.workers])

    def health(self) -> list[dict]:
        import ray

        return ray.get([w.health.remote() for w in self.workers])

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the engines (``graceful``: let each close its vLLM engine first, after a call in progress)
        and kill the actors."""
        import ray

        try:
            if graceful:
                calls = [w.shutdown.remote() for w in self.workers]
                for call in calls:
                    with contextlib.suppress(ray.exceptions.RayActorError):  # a lost engine has nothing to close
                        ray.get(call, timeout=300)
        finally:
            for w in self.workers:
                ray.kill(w)
            self.workers = []
