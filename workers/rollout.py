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
import time
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

    def __init__(self, model_dir: str, engine_kwargs: dict | None = None, env: dict[str, str] | None = None,
                 predecessor: dict | None = None, handover_timeout_s: float = 300.0):
        """``predecessor``: the process tree of the engine this one replaces (``RolloutPool.restart``). A TP>1
        engine's vLLM worker processes outlive its killed actor for a while, holding their GPU memory, while Ray
        has already handed the GPUs over; so before building its engine this actor waits (at most
        ``handover_timeout_s``, then a clear error naming the pids) until those processes are gone and, on CUDA,
        until every device has the free memory vLLM's start-up check asks for. ``handover`` records what it
        waited for. On CUDA, an engine start that fails on that check is retried once after waiting again."""
        from workers.processes import process_tree

        for k, v in {**engine_env_defaults(), **(env or {})}.items():
            os.environ.setdefault(k, str(v))
        self.model_dir = str(model_dir)
        kw = dict(engine_kwargs or {})
        self.handover: dict | None = None
        if predecessor is not None:
            self.handover = self._wait_for_predecessor(predecessor, kw, handover_timeout_s)
        self.engine = self._start_engine_checked(kw, predecessor, handover_timeout_s)
        self.generated = 0
        self.engine_error: str | None = None  # set when the vLLM engine died under this actor (``health``)
        self.process_tree = process_tree()  # this actor and its engine's worker processes, as started

    @staticmethod
    def _on_cuda() -> bool:
        import ray

        return bool(ray.get_gpu_ids()) if ray.is_initialized() else torch.cuda.is_available()

    def _wait_for_predecessor(self, tree: dict, engine_kwargs: dict, timeout_s: float) -> dict:
        from workers.processes import wait_for_device_memory, wait_for_exit

        t0 = time.monotonic()
        stats = wait_for_exit(tree, timeout_s)
        stats["predecessor_pids"] = stats.pop("pids")
        if self._on_cuda():
            left = max(timeout_s - (time.monotonic() - t0), 1.0)
            stats["memory"] = wait_for_device_memory(float(engine_kwargs.get("gpu_memory_utilization", 0.9)), left)
        return stats

    def _start_engine_checked(self, engine_kwargs: dict, predecessor: dict | None, timeout_s: float):
        """``_start_engine``, recording which of the predecessor's processes were alive right before it (none,
        after the wait), and retried once on CUDA when vLLM's free-memory check failed (a TP>1 worker's failure
        reaches the actor only as "WorkerProc initialization failed")."""
        from workers.processes import alive, machine_space

        attempts = 0
        while True:
            attempts += 1
            if self.handover is not None and predecessor is not None and predecessor.get("space") == machine_space():
                self.handover["alive_at_engine_start"] = alive(predecessor)
            try:
                engine = self._start_engine(self.model_dir, engine_kwargs)
                break
            except Exception as e:
                text = str(e)
                if attempts > 1 or not self._on_cuda() or not any(
                        m in text for m in ("Free memory on device", "WorkerProc initialization failed")):
                    raise
                if self.handover is None:
                    self.handover = {}
                self.handover["retried_after"] = f"{type(e).__name__}: {text[:300]}"
                from workers.processes import wait_for_device_memory

                self.handover["memory_retry"] = wait_for_device_memory(
                    float(engine_kwargs.get("gpu_memory_utilization", 0.9)), timeout_s)
        if self.handover is not None:
            self.handover["engine_start_attempts"] = attempts
        return engine

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

    def pull_weight_buckets(self, source, bucket_names: list[list[str]], sync_id: int, readers: int) -> int:
        """One object-store sync pulled from ``source`` (learner rank 0's actor), one bucket ahead of the
        loader. ``source.weight_bucket_ref(sync_id, i, names, readers)`` packs bucket i once per sync, for
        all ``readers`` engines of the sync, and hands each the same object ref: rank 0 copies the model to
        the host once per sync, not once per engine. Each engine asks for one bucket ahead of the one it
        loads, so the object store holds the buckets between the slowest engine's and the fastest
        engine's next (two when the engines keep pace), each once."""
        import ray

        if not bucket_names:
            raise RuntimeError("pull_weight_buckets: no buckets")

        def pulled():
            def request(i: int):
                return source.weight_bucket_ref.remote(sync_id, i, bucket_names[i], readers)

            ahead = request(0)
            for i in range(len(bucket_names)):
                ref = ahead
                if i + 1 < len(bucket_names):
                    ahead = request(i + 1)
                (bucket_ref,) = ray.get(ref)  # nested in a list: the shared object's ref, unresolved
                del ref
                bucket = ray.get(bucket_ref)
                del bucket_ref  # the object leaves the store once every engine has dropped its ref
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

    def sleep(self) -> bool:
        """Sleep (vLLM sleep mode level 2) unless asleep already; returns whether the engine slept now."""
        if getattr(self, "asleep", False):
            return False
        self.engine.sleep()
        self.asleep = True
        return True

    def wake_up(self) -> bool:
        """Wake up unless awake (a fresh engine is awake); returns whether it woke now. Its weights are then
        undefined (level 2 discarded them) until the next weight sync."""
        if not getattr(self, "asleep", False):
            return False
        self.engine.wake_up()
        self.asleep = False
        return True

    def placement(self) -> dict:
        from workers.placement import placement_info

        return placement_info()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def health(self) -> dict:
        """State and counters, with this actor's process tree now (``process_tree``: what a replacement waits
        for) and, for a replacement, what it waited for before its engine started (``handover``)."""
        from workers.processes import process_tree

        about = {"pid": os.getpid(), "model": self.model_dir, "process_tree": process_tree(),
                 "handover": getattr(self, "handover", None)}
        if self.engine_error is None and self.engine.failed():
            self.engine_error = "a process of the vLLM engine died"
        if self.engine_error is not None:  # the engine cannot answer (stats would wait on a dead process)
            return {"ok": False, "error": self.engine_error, **about}
        return {"ok": not self.engine._closed, "error": None, **about, "generated": self.generated,
                **self.engine.stats()}

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutPool:
    """N ``RolloutWorker`` actors; ``generate`` splits a batch into contiguous chunks and gathers in order."""

    def __init__(self, num_workers: int, model_dir: str, engine_kwargs: dict | None = None,
                 tensor_parallel_size: int = 1, num_cpus_per_worker: float = 1.0, env: dict | None = None,
                 actor_options: list[dict] | None = None, restart_wait_s: float = 300.0):
        """``actor_options``: per-worker Ray options (e.g. a colocation bundle, see workers.placement).
        ``restart_wait_s``: how long a restarted engine waits for its predecessor's processes and device memory."""
        import ray

        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if not restart_wait_s > 0:
            raise ValueError(f"restart_wait_s must be > 0, got {restart_wait_s}")
        kw = dict(engine_kwargs or {})
        kw["tensor_parallel_size"] = tensor_parallel_size
        env_vars = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)}
        # a failed weight-broadcast group must not make the process's first NCCL group (vLLM's) kill the engine
        # process after its heartbeat timeout (workers.weight_broadcast); read when that group is built
        env_vars.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
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
        self._start = [lambda predecessor=None, o=o: actor.options(**o, runtime_env=runtime_env).remote(
            str(model_dir), kw, env, predecessor, restart_wait_s) for o in opts]
        self.workers = [start() for start in self._start]
        # wait until every engine is up; keep each actor's process tree (its vLLM worker processes are fixed from
        # its start on) for a replacement to wait for (``restart``)
        self._trees = [h.get("process_tree") for h in ray.get([w.health.remote() for w in self.workers])]

    def restart(self, i: int) -> None:
        """Replace worker ``i`` (dead or hung) by a fresh engine with the same options and placement bundle;
        it holds the model directory's weights until the next sync. The new actor first waits for the old one's
        process tree to be gone (TP>1: vLLM's worker processes exit after their actor, still holding the GPUs Ray
        has already handed over; ``RolloutWorker``); ``health()["handover"]`` says what it waited for."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.workers[i])
        self.workers[i] = self._start[i](predecessor=self._trees[i])
        self._trees[i] = ray.get(self.workers[i].health.remote()).get("process_tree")

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

    def sleep(self, only: Sequence[int] | None = None) -> None:
        """Free the engines' device memory (vLLM sleep mode level 2: weights and KV cache discarded; every wake
        is followed by a full weight sync). ``only``: these workers (default all); asleep ones are left as
        they are."""
        import ray

        ray.get([self.workers[i].sleep.remote() for i in (range(len(self.workers)) if only is None else only)])

    def wake_up(self, only: Sequence[int] | None = None) -> None:
        """Wake the sleeping engines (``only``: these workers); their weights must be synced before they generate."""
        import ray

        ray.get([self.workers[i].wake_up.remote() for i in (range(len(self.workers)) if only is None else only)])

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
