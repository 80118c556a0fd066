"""The resumable prompt loader: exact resume, disjoint data-parallel shares, per-epoch shuffles."""
import pytest

from megatron_simko.data import PromptExample, PromptLoader

DATA = [PromptExample(f"p{i}", str(i), "math") for i in range(23)]


def ids(batch):
    return [int(ex.answer) for ex in batch]


def test_resume_is_exact():
    ref = PromptLoader(DATA, global_batch_size=4, seed=7)
    ref_batches = [ids(ref.next_batch()) for _ in range(17)]  # 5 steps per epoch: crosses 3 epochs
    first = PromptLoader(DATA, global_batch_size=4, seed=7)
    for _ in range(8):
        first.next_batch()
    state = first.state_dict()
    resumed = PromptLoader(DATA, global_batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_batch()) for _ in range(9)] == ref_batches[8:]
    assert resumed.consumed_prompts == 17 * 4


def test_epochs_are_permutations_with_distinct_orders():
    loader = PromptLoader(DATA, global_batch_size=5, seed=0)
    epochs = [sum((ids(loader.next_batch()) for _ in range(4)), []) for _ in range(2)]
    assert all(len(set(e)) == 20 for e in epochs)  # 23 // 5 = 4 full steps; the remainder is dropped
    assert epochs[0] != epochs[1]
    assert ids(PromptLoader(DATA, 5, seed=1).next_batch()) != epochs[0][:5]  # the seed matters


def test_data_parallel_shares_are_disjoint_and_cover_the_global_batch():
    world = 4
    loaders = [PromptLoader(DATA, global_batch_size=8, seed=3, dp_rank=r, dp_world_size=world) for r in range(world)]
    single = PromptLoader(DATA, global_batch_size=8, seed=3)
    for _ in range(5):
        shares = [ids(ld.next_batch()) for ld in loaders]
        assert all(len(s) == 2 for s in shares)
        assert sum(shares, []) == ids(single.next_batch())  # rank order = global order, so disjoint


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of dp_world_size"):
        PromptLoader(DATA, global_batch_size=6, dp_world_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptLoader(DATA[:3], global_batch_size=4)
    state = PromptLoader(DATA, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptLoader(DATA, 4, seed=2).load_state_dict(state)
