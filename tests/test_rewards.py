"""Rewards: answer extraction, math-verify and reasoning-gym scoring, the registry, and the isolated worker's
hard time limit."""
import time

import pytest

from megatron_simko.data import PromptExample, ReasoningGymPrompts
from megatron_simko.rewards import (RewardScorer, extract_answer, get_reward_fn, last_boxed, math_reward,
                                    reasoning_gym_reward, register_reward, score_response)


def hanging_reward(response, example):
    """A reward function stuck for good (as a verifier blocked inside C code would be)."""
    time.sleep(3600)


def crashing_reward(response, example):
    """A reward function that takes its process down (as a segfault in a native library would)."""
    import os

    os._exit(3)


def raising_reward(response, example):
    raise RuntimeError("broken verifier")


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(timeout_s=3.0) as s:
        s.warmup()
        yield s


def math(answer):
    return PromptExample("q", answer, "math")


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),              # the LAST box
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),         # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                                  # escaped braces don't count
    ("\\fbox{7}", "7"), ("\\boxed {7}", "7"), ("\\boxed 7$.", "7"),
    ("no box here", None), ("\\boxed{1} and \\boxed{\\frac{1}{2", None),    # unclosed last box
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_order():
    assert extract_answer("x <answer>B</answer>\n\\boxed{\\text{A is a hero}}") == "A is a hero"
    assert extract_answer("<answer> 1 </answer> <answer>2</answer>\nbye") == "2"
    assert extract_answer("thinking\n\n 5 + 3  \n\n") == "5 + 3"
    assert extract_answer("   ") is None


@pytest.mark.parametrize("response, gold, reward", [
    ("... so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{\\frac{\\sqrt{12}}{4}}", "\\frac{\\sqrt{3}}{2}", 1.0),         # nested, equal after simplifying
    ("\\boxed{3} oh wait \\boxed{4}", "3", 0.0),                             # the last box counts
    ("\\boxed{2}", "3", 0.0),
    ("The answer is 3.", "3", 0.0),                                          # no box
    ("\\boxed{}", "3", 0.0), ("\\boxed{3", "3", 0.0),                         # empty / unclosed
    ("\\boxed{\\frac{}{}}}}", "3", 0.0), ("\\boxed{@#!?}", "3", 0.0),          # unparseable
    ("\\boxed{3}", "\\boxed{3}", 1.0),                                       # gold given boxed
])
def test_math_reward(response, gold, reward):
    assert math_reward(response, math(gold)) == reward


def test_reasoning_gym_reward_is_binary():
    cd = ReasoningGymPrompts("countdown", 2, seed=0)[0]
    target = cd.metadata["rg_entry"]["metadata"]["target"]
    assert reasoning_gym_reward(f"\\boxed{{{cd.answer}}}", cd) == 1.0
    assert reasoning_gym_reward(f"I think\n{cd.answer}", cd) == 1.0                 # last line
    assert reasoning_gym_reward("\\boxed{1 + 2}", cd) == 0.0  # reasoning-gym gives 0.05 partial credit here
    assert reasoning_gym_reward(f"\\boxed{{{target}}}", cd) == 0.0
    kk = ReasoningGymPrompts("knights_knaves", 2, seed=0)[1]
    assert reasoning_gym_reward(f"<answer>{kk.answer}</answer>", kk) == 1.0
    assert reasoning_gym_reward("<answer>no idea</answer>", kk) == 0.0
    # A row from a file (no generated entry kept): rebuilt from the row's fields.
    row = PromptExample("Calculate 5 - 3.", "2", "reasoning_gym/basic_arithmetic", {})
    assert reasoning_gym_reward("\\boxed{2}", row) == 1.0 and reasoning_gym_reward("\\boxed{3}", row) == 0.0


def test_registry_by_longest_prefix():
    assert get_reward_fn("reasoning_gym/chain_sum") is reasoning_gym_reward
    assert get_reward_fn("math_500") is math_reward and get_reward_fn("gsm8k") is math_reward  # default: math
    with pytest.raises(KeyError, match="no reward registered"):
        get_reward_fn("gsm8k", strict=True)
    register_reward("reasoning_gym/chain_sum", math_reward)
    try:
        assert get_reward_fn("reasoning_gym/chain_sum") is math_reward
        assert get_reward_fn("reasoning_gym/countdown") is reasoning_gym_reward
    finally:
        register_reward("reasoning_gym/chain_sum", reasoning_gym_reward)
    assert score_response("\\boxed{2}", PromptExample("q", "2", "gsm8k")) == 1.0


def test_pathological_math_answer_is_time_limited(scorer):
    """Answers whose evaluation would take forever (9^9^9^9, (10^10^10)!) score 0 within the limit, and each
    time limit hit is counted (math-verify's own, here: it reports them only as a log line)."""
    patho = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10^{10^{10}})!}", "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}"]
    before = scorer.counters()
    t0 = time.perf_counter()
    assert scorer.score(patho + ["\\boxed{1}"], [math("1")] * 4) == [0.0, 0.0, 0.0, 1.0]
    assert time.perf_counter() - t0 < 4 * scorer.timeout_s
    after = scorer.counters()
    assert after["timeouts"] + after["verify_timeouts"] - before["timeouts"] - before["verify_timeouts"] == 3
    assert after["verify_timeouts"] > before["verify_timeouts"] and after["errors"] == before["errors"]
    assert scorer.score(["\\boxed{2}"], [math("2")]) == [1.0] and scorer.counters() == after  # no false alarms


def test_hung_crashed_or_raising_reward_scores_zero_and_the_batch_goes_on(scorer):
    for prefix, fn in [("test/hang", hanging_reward), ("test/crash", crashing_reward), ("test/raise", raising_reward)]:
        register_reward(prefix, fn)
    try:
        examples = [math("1")] + [PromptExample("q", "1", f"test/{p}") for p in ("hang", "raise", "crash")] + [math("2")]
        counts = scorer.counters()
        t0 = time.perf_counter()
        assert scorer.score(["\\boxed{1}"] * 4 + ["\\boxed{2}"], examples) == [1.0, 0.0, 0.0, 0.0, 1.0]
        assert scorer.counters() == dict(counts, timeouts=counts["timeouts"] + 1, errors=counts["errors"] + 2)
        assert time.perf_counter() - t0 < scorer.timeout_s + 60  # the limit + two worker restarts
    finally:
        for prefix in ("test/hang", "test/crash", "test/raise"):
            register_reward(prefix, math_reward)
    assert scorer.score(["\\boxed{3}"], [math("3")]) == [1.0]  # the restarted worker serves on
    with pytest.raises(TypeError, match="picklable"):
        register_reward("test/lambda", lambda r, e: 1.0)
        try:
            scorer.score(["x"], [PromptExample("q", "1", "test/lambda")])
        finally:
            register_reward("test/lambda", math_reward)


def test_batch_of_64_is_fast_after_warm_up(scorer):
    rg = ReasoningGymPrompts("chain_sum", 32, seed=0)
    examples = [math(str(i)) for i in range(32)] + list(rg)
    responses = ([f"Thinking... \\boxed{{{i if i % 2 else i + 1}}}" for i in range(32)]
                 + [f"\\boxed{{{ex.answer}}}" for ex in rg])
    expected = [float(i % 2) for i in range(32)] + [1.0] * 32
    assert scorer.score(responses, examples) == expected  # warm-up: builds the chain_sum scorer
    t0 = time.perf_counter()
    assert scorer.score(responses, examples) == expected
    elapsed = time.perf_counter() - t0
    print(f"64 rewards in {elapsed * 1e3:.0f} ms")
    assert elapsed < 1.0
