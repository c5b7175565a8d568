"""Reward functions: answer-tag accuracy with math-verify, partial credit, step-structure format, ground-truth parsing."""

import pickle

import pytest

from trl_mig import (
    AnswerAccuracyReward,
    DigitCreditReward,
    FormatSpec,
    PartialCreditReward,
    answer_accuracy_reward,
    step_format_reward,
)
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
    for reward in (answer_accuracy_reward, step_format_reward, AnswerAccuracyReward(FormatSpec(step_fallback="line")),
                   PartialCreditReward()):
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


def test_last_match_compares_the_final_values():
    last = AnswerAccuracyReward(FormatSpec(answer_match="last"))
    completions = [f"<think>x</think><answer>{a}</answer>" for a in ("3 8 9", "3 7 8", "9", "", "3 7 9")]
    # a running answer and a final-only ground truth, or the reverse, are scored on their final values
    assert last(completions, solution=["3 7 9"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert last(completions, solution=["9"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]


def _answers(*answers):
    return [f"<think>### Step 1\n3+4=7\n</think>\n<answer>{answer}</answer>" for answer in answers]


def test_partial_credit_counts_the_leading_right_values():
    reward = PartialCreditReward(FormatSpec(answer_match="exact"))
    assert reward.__name__ == "partial_credit_reward"
    # all right, a wrong last value, a wrong middle value (the right one after it earns nothing), a wrong first value
    got = reward(_answers("3 7 9", "3 7 10", "3 8 9", "4 7 9", " 3  7 9 "), solution=["3 7 9"] * 5)
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 1.0])
    # missing and extra values are wrong: only the exact answer earns 1
    assert reward(_answers("3 7", "3 7 9 12", "3"), solution=["3 7 9"] * 3) == pytest.approx([2 / 3, 3 / 4, 1 / 3])
    # malformed: no answer tag, an empty answer, words instead of numbers, no thought closed before the answer tag
    malformed = ["<think>### Step 1\n3 7 9</think>", *_answers("", "three seven nine"), "<think>3 7 9"]
    assert reward(malformed, solution=["3 7 9"] * 4) == [0.0, 0.0, 0.0, 0.0]
    # variants: the best; no ground truth: None (left out, as the accuracy reward does); chat completions
    assert reward(_answers("3 7 1", "3 7 1"), solution=[["3 8 1", "3 7 2"], None]) == pytest.approx([2 / 3, None])
    assert reward([[{"role": "assistant", "content": _answers("3 7 1")[0]}]], solution=["3 7 9"]) == pytest.approx([2 / 3])
    with pytest.raises(KeyError, match="partial_credit_reward needs the dataset column 'answer'"):
        PartialCreditReward(column="answer")(_answers("3"), solution=["3"])


def test_partial_credit_on_a_final_answer_is_answer_accuracy():
    completions = _answers("9", "8", "9.0", "", "nine")
    for match, expected in (("exact", [1.0, 0.0, 0.0, 0.0, 0.0]), ("math", [1.0, 0.0, 1.0, 0.0, 0.0])):
        spec = FormatSpec(answer_match=match)
        partial = PartialCreditReward(spec)(completions, solution=["9"] * len(completions))
        assert partial == AnswerAccuracyReward(spec)(completions, solution=["9"] * len(completions)) == expected
    # answers of several values against a final value: the first must be it, and the extra ones are wrong
    exact = PartialCreditReward(FormatSpec(answer_match="exact"))
    assert exact(_answers("3 7 9", "9 9"), solution=["9", "9"]) == [0.0, 0.5]
    # values compared as answer_match compares answers: math-verify reads 9.0 as 9
    assert PartialCreditReward(FormatSpec(answer_match="math"))(_answers("3 9.0"), solution=["3 9"]) == [1.0]
    assert exact(_answers("3 9.0"), solution=["3 9"]) == [0.5]


def test_partial_credit_never_gates_sft_by_accident():
    """Gated SFT's default correctness reward is the first named *accuracy*: partial credit is never picked."""
    from types import SimpleNamespace

    from trl_mig import MIGMixin

    def gate(*names, wanted=None):
        trainer = SimpleNamespace(reward_func_names=list(names), args=SimpleNamespace(sft_correctness_reward=wanted))
        return MIGMixin._resolve_correctness_reward(trainer)

    partial, accuracy, fmt = (reward.__name__ for reward in (PartialCreditReward(), answer_accuracy_reward,
                                                             step_format_reward))
    assert gate(partial, fmt) is None  # SFT off, with its warning
    assert gate(partial, accuracy, fmt) == 1
    assert gate(partial, wanted=partial) == 0  # only when named


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


def test_digit_credit_counts_the_right_digits_from_the_units():
    reward = DigitCreditReward()
    assert reward.__name__ == "digit_credit_reward"
    # all right; units right then tens wrong; only the leading digit wrong; units wrong (nothing else counts)
    got = reward(_answers("8783", "8773", "9783", "8784", " 8783 "), solution=["8783"] * 5)
    assert got == pytest.approx([1.0, 1 / 4, 3 / 4, 0.0, 1.0])
    # a missing or an extra digit is wrong: only the exact sum earns 1
    assert reward(_answers("783", "18783", "-8783"), solution=["8783"] * 3) == pytest.approx([3 / 4, 4 / 5, 4 / 5])
    # malformed: no answer, an empty one, words, a number with other text
    assert reward(_answers("", "eight", "8783 apples"), solution=["8783"] * 3) == [0.0, 0.0, 0.0]
    assert reward(["<think>### Step 1\n8783</think>"], solution=["8783"]) == [0.0]
    # variants: the best; no ground truth: None; a ground truth that is not an integer names the column
    assert reward(_answers("8783", "1"), solution=[["1783", "8780"], None]) == pytest.approx([3 / 4, None])
    with pytest.raises(ValueError, match="column 'solution' holds '3 7 9'"):
        reward(_answers("3"), solution=["3 7 9"])
