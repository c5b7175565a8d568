"""Reward functions: answer-tag accuracy with math-verify, step-structure format, ground-truth parsing."""

import pickle

import pytest

from trl_mig import AnswerAccuracyReward, FormatSpec, answer_accuracy_reward, step_format_reward
from trl_mig.rewards import answer_variants, completion_text, default_reward_funcs

GOOD = "<think>### Step 1\n2+3=5\n</think>\n<answer>5</answer>"


def test_accuracy_on_answer_tags():
    completions = [GOOD, GOOD.replace(">5<", ">5.0<"), GOOD.replace(">5<", ">6<"), "<think>### Step 1</think>no answer"]
    assert answer_accuracy_reward(completions, solution=["5"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_accuracy_with_variants_missing_gold_and_conversational_completions():
    chat = [[{"role": "assistant", "content": GOOD}]] * 4
    rewards = answer_accuracy_reward(chat, solution=[["4", "5"], "", None, 5])
    assert rewards == [1.0, None, None, 1.0]


def test_accuracy_ignores_answers_inside_the_thought():
    text = "<think>### Step 1\n<answer>5</answer>\n</think>\n<answer>6</answer>"
    assert answer_accuracy_reward([text], solution=["5"]) == [0.0]


def test_text_answers_fall_back_to_exact_match():
    text = GOOD.replace(">5<", ">north  pole<")
    assert answer_accuracy_reward([text, GOOD], solution=["north pole", "south pole"]) == [1.0, 0.0]


def test_accuracy_reward_needs_its_column():
    with pytest.raises(KeyError, match="'solution'"):
        answer_accuracy_reward([GOOD], answer=["5"])
    custom = AnswerAccuracyReward(column="answer")
    assert custom([GOOD], answer=["5"]) == [1.0]


def test_format_reward():
    completions = [
        GOOD,
        "<think>no header</think><answer>5</answer>",
        "<think>### Step 1\nunfinished",
        "### Step 1\n2+3=5\n</think><answer>5</answer>",  # <think> in the prompt
    ]
    assert step_format_reward(completions) == [1.0, 0.0, 0.0, 1.0]


def test_tool_conversations_count_their_turns_as_steps():
    call = {"role": "assistant", "content": "<think>I need 2+3.", "tool_calls": [{"function": {"name": "calculator"}}]}
    result = {"role": "tool", "name": "calculator", "content": "5"}
    answers = [
        [call, result, {"role": "assistant", "content": "</think>\n<answer>5</answer>"}],
        [call, result, {"role": "assistant", "content": "<answer>5</answer>"}],  # a last turn that only answers
        [call, result, {"role": "assistant", "content": "<think>so 5 then</think><answer>5</answer>"}],
    ]
    assert step_format_reward(answers) == [1.0, 1.0, 1.0]
    assert answer_accuracy_reward(answers, solution=["5"] * 3) == [1.0, 1.0, 1.0]
    unfinished = [
        [call, result, {"role": "assistant", "content": "<think>so 5 then"}],  # thought left open, no answer
        [call, result],  # the last turn was cut off: the tool's "5" is not the model's answer
        [{"role": "assistant", "content": "<think>no header</think><answer>5</answer>"}],  # one turn: text rules
    ]
    assert step_format_reward(unfinished) == [0.0, 0.0, 0.0]
    assert answer_accuracy_reward(unfinished[:2], solution=["5"] * 2) == [0.0, 0.0]
    assert completion_text([call, result]) == ""


def test_rewards_are_picklable_and_named():
    for reward in (answer_accuracy_reward, step_format_reward, AnswerAccuracyReward(FormatSpec(step_fallback="line"))):
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == reward.__name__ and clone([GOOD], solution=["5"]) == reward([GOOD], solution=["5"])


def test_answer_variants():
    assert answer_variants(" 7 ") == ["7"]
    assert answer_variants(3) == ["3"] and answer_variants(2.5) == ["2.5"]
    assert answer_variants(["7", "7", " ", "seven"]) == ["7", "seven"]
    assert answer_variants(None) == [] and answer_variants("   ") == []
    with pytest.raises(TypeError, match="'gold'.*dict"):
        answer_variants({"a": 1}, column="gold")
    with pytest.raises(TypeError, match="bool"):
        answer_variants(True)


def test_completion_text_rejects_other_types():
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    with pytest.raises(TypeError, match="int"):
        completion_text(3)


def test_answer_match_modes():
    exact = AnswerAccuracyReward(FormatSpec(answer_match="exact"))
    completions = ["<think>x</think><answer>3  7 9</answer>", "<think>x</think><answer>1 7 9</answer>"]
    assert exact(completions, solution=["3 7 9", "3 7 9"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer_match='fuzzy' is not one of"):
        FormatSpec(answer_match="fuzzy")


def test_default_rewards_read_the_default_format_and_built_ones_read_theirs():
    spec = FormatSpec(think_open_tag="<reason>", think_close_tag="</reason>", answer_pattern=r"ANSWER: (\S+)")
    text = "<reason>### Step 1\n2+3=5</reason>ANSWER: 5"
    accuracy, fmt = default_reward_funcs(spec, "answer")
    assert accuracy([text], answer=["5"]) == [1.0] and fmt([text]) == [1.0]
    # the module-level conveniences keep the default format (tags, <answer>) and the 'solution' column
    assert answer_accuracy_reward([text], solution=["5"]) == [0.0] and step_format_reward([text]) == [0.0]
    assert answer_accuracy_reward.spec == FormatSpec() and answer_accuracy_reward.column == "solution"


def test_answer_matching_in_a_thread_leaves_the_math_verify_logger_alone():
    import logging
    import threading

    from trl_mig.rewards import answers_match

    logger = logging.getLogger("math_verify")
    level = logger.level
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("1/2", ["0.5"])))
    worker.start()
    worker.join()
    assert results == [True] and logger.level == level
