"""A deterministic, resumable prompt loader for RL steps.

Each epoch is a fresh permutation drawn from (seed, epoch); step i of an epoch takes global batch
perm[i*B : (i+1)*B] (an incomplete last batch is dropped, so every step sees exactly B prompts), and
data-parallel rank r gets the contiguous slice [r*B/W : (r+1)*B/W] of it. All ranks compute the same
permutation, so the slices are disjoint and cover the global batch without communication.

The state is (epoch, step within the epoch); `load_state_dict` restores it exactly.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .prompts import PromptExample


class PromptLoader:
    """Yields this rank's share of each global batch of prompts, forever (epoch after epoch)."""

    def __init__(self, dataset: Sequence[PromptExample], global_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_world_size: int = 1, shuffle: bool = True):
        if global_batch_size <= 0 or global_batch_size % dp_world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"dp_world_size={dp_world_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_world_size})")
        if len(dataset) < global_batch_size:
            raise ValueError(f"dataset has {len(dataset)} prompts, fewer than one global batch "
                             f"({global_batch_size})")
        self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
        self.dp_rank, self.dp_world_size, self.shuffle = dp_rank, dp_world_size, shuffle
        self.steps_per_epoch = len(dataset) // global_batch_size
        self.epoch, self.step_in_epoch = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self) -> list[int]:
        """Dataset indices of the next global batch (all ranks), without advancing."""
        start = self.step_in_epoch * self.global_batch_size
        return self._permutation(self.epoch)[start:start + self.global_batch_size].tolist()

    def rank_indices(self) -> list[int]:
        """Dataset indices of this rank's share of the next global batch, without advancing."""
        per_rank = self.global_batch_size // self.dp_world_size
        return self.global_indices()[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def next_batch(self) -> list[PromptExample]:
        """This rank's prompts for the next step; advances the position."""
        batch = [self.dataset[i] for i in self.rank_indices()]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def consumed_prompts(self) -> int:
        """Global prompts consumed so far (all ranks)."""
        return (self.epoch * self.steps_per_epoch + self.step_in_epoch) * self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch_size", "dataset_size"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                hint = (" (the dataset changed since the checkpoint, or which prompts are dropped as longer than "
                        "rollout.max_prompt_length did)" if key == "dataset_size" else "")
                raise ValueError(f"loader state mismatch: checkpoint {key}={state[key]}, current {mine}{hint}")
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch:
            raise ValueError(f"loader state step_in_epoch={state['step_in_epoch']} outside this dataset's "
                             f"{self.steps_per_epoch} steps per epoch")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
