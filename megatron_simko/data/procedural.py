"""Built-in procedural prompt datasets from reasoning-gym (logic and arithmetic tasks, generated, no download).

`ReasoningGymPrompts("chain_sum", size=1000, seed=1)` is a Sequence[PromptExample] with
data_source "reasoning_gym/chain_sum"; the generated entry is kept in `metadata["rg_entry"]` because the
task's scorer needs it (many tasks accept several answers, e.g. countdown). Entries are generated lazily and
deterministically from (name, seed, index, config), so a loader checkpoint only needs its position.

Train and validation splits use distinct seeds (`rg_splits`). Small task spaces (e.g. 1-digit sums) can still
produce the same question in both splits; pass `dedup_val=True` to drop validation questions seen in train.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable, Sequence

from .prompts import PromptExample

SOURCE_PREFIX = "reasoning_gym/"
VAL_SEED_OFFSET = 1_000_003  # validation seed = train seed + this (any fixed, distinct offset)


def rg_task_names() -> list[str]:
    """All task names reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymPrompts(Sequence[PromptExample]):
    """A reasoning-gym task as prompts. `config` is passed to the task's config (e.g. min_terms=2)."""

    def __init__(self, name: str, size: int, seed: int, **config: Any):
        import reasoning_gym as rg

        if name not in rg_task_names():
            raise ValueError(f"unknown reasoning-gym task {name!r}; known: {', '.join(rg_task_names())}")
        self.name, self.size, self.seed, self.config = name, int(size), int(seed), dict(config)
        self._ds = rg.create_dataset(name, size=self.size, seed=self.seed, **config)
        self._cache: dict[int, PromptExample] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.size))]
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        if i not in self._cache:
            entry = self._ds[i]
            answer = entry.get("answer")
            self._cache[i] = PromptExample(
                prompt=entry["question"],
                answer="" if answer is None else str(answer),  # "" : the task checks answers itself
                data_source=SOURCE_PREFIX + self.name,
                metadata={"rg_entry": entry, "rg_config": self.config, "rg_index": i, "rg_seed": self.seed},
            )
        return self._cache[i]


def rg_splits(name: str, train_size: int, val_size: int, seed: int = 0, dedup_val: bool = False,
              **config: Any) -> tuple[Sequence[PromptExample], Sequence[PromptExample]]:
    """(train, validation) for a task, with seeds `seed` and `seed + VAL_SEED_OFFSET`."""
    train = ReasoningGymPrompts(name, train_size, seed, **config)
    val: Sequence[PromptExample] = ReasoningGymPrompts(name, val_size, seed + VAL_SEED_OFFSET, **config)
    if dedup_val:
        seen = {ex.prompt for ex in train}
        val = [ex for ex in val if ex.prompt not in seen]
    return train, val



def heldout_prompts(name: str, size: int, seed: int, exclude: Iterable[Sequence[PromptExample]] = (),
                    **config: Any) -> list[PromptExample]:
    """`size` problems of the task's validation split (seed `seed + VAL_SEED_OFFSET`, as `rg_splits`) whose
    question text appears in none of `exclude` (e.g. the RL training prompts and the SFT data): problems no
    model was trained on, even where the task space is small enough for the splits to overlap. Problems are
    taken in split order, skipping excluded ones; ValueError if 50 × size candidates do not yield enough."""
    seen = {ex.prompt for dataset in exclude for ex in dataset}
    candidates = ReasoningGymPrompts(name, 50 * size, seed + VAL_SEED_OFFSET, **config)
    out = []
    for ex in candidates:
        if ex.prompt not in seen:
            seen.add(ex.prompt)  # no duplicates within the held-out set either
            out.append(ex)
            if len(out) == size:
                return out
    raise ValueError(f"reasoning_gym/{name}: only {len(out)} held-out problems among {len(candidates)} candidates "
                     f"(the task space is too small for {size}); lower the size or widen the task config")

@lru_cache(maxsize=None)
def _scorer(name: str, config_items: tuple) -> Any:
    import reasoning_gym as rg

    if not config_items:
        return rg.get_score_answer_fn(name)
    return rg.create_dataset(name, size=1, seed=0, **dict(config_items)).score_answer


def rg_score_fn(name: str, config: dict | None = None):
    """The task's `score_answer(answer, entry) -> float` (cached per task and config)."""
    items = tuple(sorted((config or {}).items(), key=lambda kv: kv[0]))
    try:
        hash(items)
    except TypeError:  # unhashable config values: build uncached
        import reasoning_gym as rg

        return rg.create_dataset(name, size=1, seed=0, **(config or {})).score_answer
    return _scorer(name, items)
