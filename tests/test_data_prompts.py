"""Prompt files (jsonl / parquet), their error messages, chat rendering, reasoning-gym datasets."""
import json
import pickle

import pytest

from megatron_simko.data import (PromptExample, ReasoningGymPrompts, load_prompt_file, render_chatml, render_prompt,
                                 rg_splits)
from megatron_simko.data.prompts import build_messages

ROWS = [
    {"prompt": "What is 1+1?", "answer": "2", "data_source": "math", "level": 3},
    {"problem": "Compute 2^10.", "answer": 1024},
    {"prompt": [{"role": "user", "content": "hi"}], "answer": "x", "data_source": "chat"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_fields_defaults_and_metadata(tmp_path):
    exs = load_prompt_file(write_jsonl(tmp_path / "gsm8k.jsonl", ROWS))
    assert exs[0] == PromptExample("What is 1+1?", "2", "math", {"level": 3})
    assert exs[1] == PromptExample("Compute 2^10.", "1024", "gsm8k", {})  # number -> str; source from file name
    assert exs[2].prompt == [{"role": "user", "content": "hi"}]
    assert load_prompt_file(str(tmp_path / "gsm8k.jsonl"), data_source="aime")[1].data_source == "aime"


def test_parquet_same_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": f"p{i}", "answer": str(i), "data_source": "math", "id": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    assert load_prompt_file(str(tmp_path / "d.parquet")) == load_prompt_file(write_jsonl(tmp_path / "d.jsonl", rows))


@pytest.mark.parametrize("bad_row, field", [
    ('{"prompt": "p", "answer": ', "<row>"),                    # bad JSON
    ('[1, 2]', "<row>"),                                        # not an object
    ({"answer": "1"}, "prompt"),                                # no prompt / problem
    ({"prompt": 5, "answer": "1"}, "prompt"),                   # wrong type
    ({"problem": "  ", "answer": "1"}, "problem"),              # empty text
    ({"prompt": "p"}, "answer"),                                # missing answer
    ({"prompt": "p", "answer": [1]}, "answer"),                 # wrong type
    ({"prompt": "p", "answer": "1", "data_source": 3}, "data_source"),
])
def test_malformed_row_names_file_row_field(tmp_path, bad_row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "", ROWS[1], bad_row, ROWS[0]])  # blank line: not a row
    with pytest.raises(ValueError) as e:
        load_prompt_file(path)
    assert f"{path}: row 3: field '{field}'" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        exs = load_prompt_file(path, skip_malformed=True)
    assert len(exs) == 3


def test_rendering_default_instruction():
    text = render_prompt(PromptExample("What is 1+1?", "2", "math"))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("Q", instruction=" Answer in <answer> tags.", system=None) == \
        "<|im_start|>user\nQ Answer in <answer> tags.<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "user", "content": "hi"}]  # a message list is rendered as given
    assert render_prompt(msgs) == render_chatml(msgs) and build_messages(msgs) == msgs


def test_reasoning_gym_prompts_deterministic_splits_picklable():
    train, val = rg_splits("chain_sum", train_size=20, val_size=10, seed=3)
    again, _ = rg_splits("chain_sum", train_size=20, val_size=10, seed=3)
    assert [e.prompt for e in train] == [e.prompt for e in again]
    assert [e.prompt for e in train[:10]] != [e.prompt for e in val]  # distinct seeds
    ex = train[0]
    assert ex.data_source == "reasoning_gym/chain_sum" and ex.answer == ex.metadata["rg_entry"]["answer"]
    assert ex.prompt == ex.metadata["rg_entry"]["question"]
    assert pickle.loads(pickle.dumps(ex)) == ex
    json.dumps(ex.metadata, default=str)
    ks = ReasoningGymPrompts("knights_knaves", 3, 0)
    assert len(ks) == 3 and ks[-1] is ks[2]
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        ReasoningGymPrompts("no_such_task", 3, 0)
    _, dedup = rg_splits("chain_sum", 50, 50, seed=0, dedup_val=True, min_terms=2, max_terms=2, min_digits=1,
                         max_digits=1)
    assert len(dedup) < 50  # 1-digit two-term sums repeat across seeds...
    assert not {e.prompt for e in dedup} & {e.prompt for e in ReasoningGymPrompts(
        "chain_sum", 50, 0, min_terms=2, max_terms=2, min_digits=1, max_digits=1)}  # ...and are dropped


def test_load_prompts_dispatch(tmp_path):
    from megatron_simko.data import load_prompts

    train = load_prompts("reasoning_gym/chain_sum", size=8, seed=1)
    val = load_prompts("reasoning_gym/chain_sum", split="validation", size=8, seed=1)
    assert len(train) == 8 and train[0].data_source == "reasoning_gym/chain_sum"
    assert [e.prompt for e in val] == [e.prompt for e in rg_splits("chain_sum", 8, 8, seed=1)[1]]
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(load_prompts(path, size=2)) == 2 and len(load_prompts([path, path])) == 6
    with pytest.raises(ValueError, match="only apply to reasoning_gym"):
        load_prompts(path, min_terms=2)


def test_heldout_prompts_exclude_training_problems_and_survive_a_jsonl_round_trip(tmp_path):
    """A small task space: validation and train splits overlap; held-out problems never do, and written to a
    prompt file they still score with the task's own checker (the study evaluates them from heldout.jsonl)."""
    from megatron_simko.data import load_prompts, write_prompt_jsonl
    from megatron_simko.data.procedural import heldout_prompts
    from megatron_simko.rewards.reasoning_gym_reward import reasoning_gym_reward

    cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 distinct problems
    train = load_prompts("reasoning_gym/chain_sum", "train", size=120, seed=0, **cfg)
    plain_val = load_prompts("reasoning_gym/chain_sum", "validation", size=40, seed=5, **cfg)
    trained = {ex.prompt for ex in train}
    assert any(ex.prompt in trained for ex in plain_val)  # the overlap this guards against
    held = heldout_prompts("chain_sum", 40, 5, [train], **cfg)
    assert len(held) == 40 and len({ex.prompt for ex in held}) == 40
    assert not any(ex.prompt in trained for ex in held)
    assert [ex.prompt for ex in held if ex.prompt not in trained][:5] == \
        [ex.prompt for ex in plain_val if ex.prompt not in trained][:5]  # split order, excluded ones skipped
    write_prompt_jsonl(str(tmp_path / "h.jsonl"), held)
    back = load_prompt_file(str(tmp_path / "h.jsonl"))
    assert [ex.prompt for ex in back] == [ex.prompt for ex in held]
    for ex, orig in zip(back[:5], held[:5]):
        assert ex.data_source == "reasoning_gym/chain_sum"
        assert reasoning_gym_reward(f"\\boxed{{{orig.answer}}}", ex) == 1.0
        assert reasoning_gym_reward(f"\\boxed{{{int(orig.answer) + 1}}}", ex) == 0.0
    with pytest.raises(ValueError, match="only .* held-out problems"):
        heldout_prompts("chain_sum", 150, 5, [train], **cfg)
