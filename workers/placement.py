"""Where actors run: the resolved device, and the layout of engines and learner ranks (``plan_actors``).

Colocation (``trainer.colocate=true``) reserves one Ray placement-group bundle per learner rank and
puts learner rank i and rollout engine i in bundle i. On GPU each bundle is one GPU shared by the
two (0.5 GPU each in Ray's accounting); the engine then runs with vLLM's sleep mode, so its weights
and KV cache leave the GPU while the learner works (``RolloutPool.sleep`` / ``wake_up``), and the
learner's memory must fit beside the sleeping engine. NCCL cannot put two ranks of one group on the
same GPU, so colocated GPU runs sync weights through the object store (config validation says so).
On CPU the bundles pin the pairs to the same node and reserve their CPU share together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def resolve_device(device: str) -> str:
    """``auto`` -> gpu when the Ray cluster has GPUs, else cpu (Ray must be initialised)."""
    if device != "auto":
        return device
    import ray

    return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def placement_info() -> dict:
    """The calling actor's node, placement group and GPUs, as Ray assigned them."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "placement_group": ctx.get_placement_group_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}


@dataclass
class ActorLayout:
    """Where every engine and learner rank of a run goes: their Ray actor options, the engine arguments
    the layout implies, and the placement group that reserves it all (removed with ``remove``).

    * GPU, separate (the default): one bundle per engine with ``tensor_parallel_size`` GPUs, then one
      bundle per learner rank with one GPU, packed onto as few nodes as possible. An engine's actor
      holds all of its bundle's GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` to them), and for TP > 1 vLLM's
      multiprocessing executor starts one worker process per GPU inside that bundle, so a TP group never
      spans nodes. Engines and learners hold different GPUs, so the NCCL weight broadcast can join them.
    * GPU, colocated: learner rank i and engine i share bundle i, one GPU (0.5 each in Ray's accounting;
      TP = 1 only), and the engine sleeps while the learner works (see the module docstring).
    * CPU: no GPUs; colocated pairs share a CPU bundle, separate actors are placed by Ray freely.
    """

    engine_options: list[dict]
    learner_options: list[dict]
    engine_kwargs: dict
    group: object | None = None

    def remove(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def plan_actors(device: str, *, num_engines: int, tensor_parallel_size: int, world_size: int, colocate: bool,
                engine_cpus: float, learner_cpus: float, timeout_s: float = 600.0) -> ActorLayout:
    """Reserve the run's placement (blocking until the cluster grants it) and return the layout."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpu, tp = device == "gpu", tensor_parallel_size
    engine_kwargs = {"distributed_executor_backend": "mp"} if gpu and tp > 1 else {}
    if colocate:
        if num_engines != world_size or tp != 1:
            raise ValueError("colocation pairs engine i with learner rank i: needs num_engines == world_size and TP 1")
        bundle = {"CPU": learner_cpus + engine_cpus, **({"GPU": 1} if gpu else {})}
        bundles = [dict(bundle) for _ in range(world_size)]
        engine_at, learner_at = list(range(num_engines)), list(range(world_size))
        engine_gpus = learner_gpus = 0.5 if gpu else 0
    elif gpu:
        bundles = [{"CPU": engine_cpus, "GPU": tp} for _ in range(num_engines)] + \
                  [{"CPU": learner_cpus, "GPU": 1} for _ in range(world_size)]
        engine_at, learner_at = list(range(num_engines)), [num_engines + r for r in range(world_size)]
        engine_gpus, learner_gpus = tp, 1
    else:  # CPU, separate: nothing to reserve
        return ActorLayout([{"num_cpus": engine_cpus} for _ in range(num_engines)],
                           [{"num_cpus": learner_cpus, "num_gpus": 0} for _ in range(world_size)], engine_kwargs)
    group = placement_group(bundles, strategy="PACK", name=f"soft_rl_{'colocate' if colocate else 'actors'}_"
                                                          f"{os.getpid():x}_{id(bundles):x}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
        raise RuntimeError(f"the cluster cannot reserve the run's placement {bundles} within {timeout_s:.0f}s "
                           f"(available: {ray.available_resources()}); check rollout.num_engines, "
                           "rollout.tensor_parallel_size and learner.world_size against the cluster's GPUs")

    def opts(bundle: int, cpus: float, gpus: float) -> dict:
        return {"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=True)}

    return ActorLayout([opts(b, engine_cpus, engine_gpus) for b in engine_at],
                       [opts(b, learner_cpus, learner_gpus) for b in learner_at], engine_kwargs, group)
