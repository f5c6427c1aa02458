"""Where actors run: the resolved device, and colocation of learner ranks with rollout engines.

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
class Colocation:
    """One bundle per (learner rank, engine) pair; ``options(i, role)`` are the Ray actor options."""

    pairs: int
    learner_cpus: float
    engine_cpus: float
    gpu: bool
    timeout_s: float = 600.0

    def __post_init__(self):
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.learner_cpus + self.engine_cpus}
        if self.gpu:
            bundle["GPU"] = 1
        self.group = placement_group([dict(bundle) for _ in range(self.pairs)], strategy="PACK",
                                     name=f"soft_rl_colocate_{id(self):x}")
        import ray

        ready, _ = ray.wait([self.group.ready()], timeout=self.timeout_s)
        if not ready:
            self.remove()
            raise RuntimeError(f"trainer.colocate: the cluster cannot reserve {self.pairs} bundles of {bundle} "
                               f"within {self.timeout_s:.0f}s (resources: {ray.available_resources()})")

    def options(self, index: int, role: str) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not 0 <= index < self.pairs:
            raise IndexError(f"bundle {index} of {self.pairs}")
        cpus = self.learner_cpus if role == "learner" else self.engine_cpus
        return {"num_cpus": cpus, "num_gpus": 0.5 if self.gpu else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)
