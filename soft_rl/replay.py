"""The learners' inputs of every step since the newest checkpoint, on disk, so a lost learner group can be
rebuilt bit-exactly without generating anything again.

A learner rank that dies takes the group's optimizer state with it (ZeRO shards it), so the group is
rebuilt from the newest checkpoint. The steps after that checkpoint are then *replayed*: each step's
learner work is a pure function of its batch (trajectories and rewards: what the engines produced) and
the step number, so running it again on the stored batch gives the same weights bit for bit. Rollouts
are the expensive part of a step and are not redone.

    store = StepBatchStore(out / "replay")
    store.save(step, batch)          # before the step's update starts
    store.prune(through=step)        # once a checkpoint of `step` exists
    store.load(step)                 # replay

Size: one file per step (the trajectories as the engines returned them: ids, log-probs, top-K values),
``trainer.save_every`` files at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from soft_rl.trajectory import Trajectory


@dataclass
class StepBatch:
    """What the learners need of one RL step: its trajectories (in request order), their rewards, and the
    number of prompts (samples of one prompt are consecutive, ``len(trajs) // prompts`` each)."""

    trajs: list[Trajectory]
    rewards: torch.Tensor
    prompts: int

    @property
    def group(self) -> torch.Tensor:
        """The prompt index of every trajectory (the GRPO groups)."""
        return torch.arange(self.prompts).repeat_interleave(len(self.trajs) // self.prompts)


class StepBatchStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.pt"

    def save(self, step: int, batch: StepBatch) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step:08d}.pt"
        torch.save({"trajs": batch.trajs, "rewards": batch.rewards, "prompts": batch.prompts}, tmp)
        tmp.replace(self._path(step))

    def load(self, step: int) -> StepBatch:
        p = self._path(step)
        if not p.is_file():
            raise FileNotFoundError(f"no stored batch of step {step} ({p}): the learners cannot be rebuilt past the "
                                    "newest checkpoint without it")
        d = torch.load(p, weights_only=False)
        return StepBatch(d["trajs"], d["rewards"], d["prompts"])

    def steps(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.root.glob("step-*.pt"))

    def prune(self, through: int) -> None:
        """Drop the batches of steps <= ``through`` (a checkpoint holds their effect)."""
        for s in self.steps():
            if s <= through:
                self._path(s).unlink(missing_ok=True)

    def drop_after(self, step: int) -> None:
        """Drop batches of steps > ``step`` (left by an earlier attempt of this run that went further)."""
        for s in self.steps():
            if s > step:
                self._path(s).unlink(missing_ok=True)
