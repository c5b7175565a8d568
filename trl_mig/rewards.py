"""Reward functions in TRL's signature (`completions`, dataset columns as keyword lists, `**kwargs`).

TRL's own rewards are reused where they fit: `trl.rewards.accuracy_reward` for `\\boxed{}` answers and
`trl.rewards.think_format_reward` for the think block. What TRL lacks is added here: the accuracy of an answer inside
answer tags (TRL's extractor needs LaTeX anchors, so `<answer>7</answer>` scores 0 there), partial credit for an
answer that lists values (its leading right values), and a step-structure format check. All read the completion with
the same `FormatSpec` the trainer uses for the structural gate.
"""

from __future__ import annotations

import threading

from .segmentation import FormatSpec, analyze_text


def completion_text(completion) -> str:
    """
    Text of a completion, whether plain (`str`) or conversational (`[{"role": ..., "content": ...}]`): the last
    message's. A multi-turn tool conversation that ends on a tool message (its last turn was cut off) has no final
    text: "".
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        if completion[-1].get("role") == "tool":
            return ""
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    raise TypeError(f"Expected a completion string or a list of chat messages, got {type(completion).__name__}.")


def has_tool_turns(completion) -> bool:
    """Whether a conversational completion holds a tool call answered by a tool (TRL's multi-turn `tools` loop)."""
    return isinstance(completion, list) and any(
        isinstance(message, dict) and message.get("role") == "tool" for message in completion
    )


def answer_variants(value, column: str = "solution") -> list[str]:
    """
    Accepted answers of one row: a string, a number, or a list of them. Empty or missing values give `[]`
    (the row cannot be scored); any other type raises a `TypeError` naming the column.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        variants = []
        for item in value:
            variants += answer_variants(item, column)
        return list(dict.fromkeys(variants))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(
            f"Column {column!r} must hold a string, a number or a list of them, got {type(value).__name__}: {value!r}."
        )
    text = str(value).strip()
    return [text] if text else []


def answers_match(answer: str, gold: list[str], match: str = "math") -> bool:
    """
    True when `answer` equals one of the `gold` variants. `match="math"`: math-verify when both parse, else exact text;
    `match="exact"`: text equal up to whitespace; `match="last"`: the last whitespace-separated values equal (a list
    of values "3 7 9" is scored on its final value 9, and so is the list's ground truth).
    """
    if match == "exact":
        return any(answer.split() == variant.split() for variant in gold)
    if match == "last":
        return any(answer.split()[-1:] == variant.split()[-1:] for variant in gold)
    if match != "math":
        raise ValueError(f"Unknown answer match {match!r}; expected 'math', 'exact' or 'last'.")
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere it runs without one (and
    # says so once; its logger is the user's to configure)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed_answer = parse(answer, parsing_timeout=timeout)
    for variant in gold:
        parsed_gold = parse(variant, parsing_timeout=timeout)
        if parsed_gold and parsed_answer:
            if verify(parsed_gold, parsed_answer, timeout_seconds=timeout):
                return True
        elif " ".join(answer.split()) == " ".join(variant.split()):
            return True
    return False


class _AnswerReward:
    """A reward of the answer after the thought against the ground truth in `column`: `score_answer` per completion,
    None for rows without a ground truth (TRL then leaves them out of the statistics)."""

    name = ""

    def __init__(self, spec: FormatSpec | None = None, column: str = "solution"):
        self.spec = spec or FormatSpec()
        self.column = column
        self.__name__ = self.name

    def __call__(self, completions, **kwargs) -> list[float | None]:
        if self.column not in kwargs:
            raise KeyError(f"{self.name} needs the dataset column {self.column!r}; got {sorted(kwargs)}.")
        rewards = []
        for completion, gold in zip(completions, kwargs[self.column], strict=True):
            variants = answer_variants(gold, self.column)
            answer = analyze_text(completion_text(completion), self.spec).answer if variants else None
            rewards.append(self.score_answer(answer, variants) if variants else None)
        return rewards

    def score_answer(self, answer: str | None, variants: list[str]) -> float:
        raise NotImplementedError


class AnswerAccuracyReward(_AnswerReward):
    """
    1.0 when the answer found by `spec.answer_pattern` after the thought matches the ground truth in `column`
    (a string or a list of variants) as `spec.answer_match` compares them, 0.0 when it does not or when there is no
    answer, and None for rows without a ground truth (TRL then leaves them out of the statistics). A picklable
    callable, named like a function.
    """

    name = "answer_accuracy_reward"

    def score_answer(self, answer: str | None, variants: list[str]) -> float:
        return float(answer is not None and answers_match(answer.strip(), variants, self.spec.answer_match))


class PartialCreditReward(_AnswerReward):
    """
    The share of an answer's values that are right, counted from the first value up to the first wrong one: for answers
    that list values separated by whitespace (e.g. every step's result, `task_answer: running`). The answer is found by
    `spec.answer_pattern` after the thought, as `AnswerAccuracyReward` finds it, and each value is compared with the
    ground truth's value at the same position as `spec.answer_match` compares answers. For the ground truth "3 7 9":

        "3 7 9" -> 1, "3 7 10" -> 2/3, "3 8 9" -> 1/3 (nothing after the first wrong value counts), "4 7 9" -> 0,
        "3 7" -> 2/3 and "3 7 9 12" -> 3/4 (missing and extra values are wrong: the count is divided by the longer of
        the two lists, so only the exact answer earns 1), no answer or an empty one -> 0.

    With a one-value ground truth (a final answer) it scores one-value answers as `AnswerAccuracyReward` does, and an
    answer of n values 1/n at most. With several variants, the best score; None for rows without a ground truth (as
    `AnswerAccuracyReward`). Its name, `partial_credit_reward`, has no "accuracy"
    on purpose: gated SFT's default correctness check is the first reward whose name contains "accuracy", and a
    half-right completion must not pass it.
    """

    name = "partial_credit_reward"

    def score_answer(self, answer: str | None, variants: list[str]) -> float:
        values = answer.split() if answer is not None else []
        return max(self.score(values, variant.split()) for variant in variants)

    def score(self, values: list[str], gold_values: list[str]) -> float:
        """Leading right values of `values` (compared with `gold_values` position by position), over the longer list."""
        leading = 0
        for value, gold_value in zip(values, gold_values):
            if not answers_match(value, [gold_value], self.spec.answer_match):
                break
            leading += 1
        return leading / max(len(values), len(gold_values))


class DigitCreditReward(_AnswerReward):
    """
    The share of an integer answer's digits that are right, counted from the units digit up to the first wrong one:
    partial credit for a sum worked out column by column from the units (`builtin:addition`, one digit per step),
    where `PartialCreditReward` would see one value. The answer is found as `AnswerAccuracyReward` finds it; answer
    and ground truth are read as integers (surrounding spaces and a leading `+` stripped) and aligned at the units
    digit. For the ground truth "8783":

        "8783" -> 1, "8773" -> 1/4 (the units right, the tens wrong), "9783" -> 3/4, "8784" -> 0, "18783" -> 4/5 (an
        extra digit is wrong: the count is divided by the longer of the two, so only the exact answer earns 1),
        "783" -> 3/4, no answer or one that is not an integer -> 0.

    A ground truth that is not an integer raises a ValueError naming the column. With several variants, the best
    score; None for rows without a ground truth. No "accuracy" in its name (`digit_credit_reward`), so that gated
    SFT's default correctness check never takes a half-right sum for a right one.
    """

    name = "digit_credit_reward"

    def score_answer(self, answer: str | None, variants: list[str]) -> float:
        digits = _integer_digits(answer) if answer is not None else None
        best = 0.0
        for variant in variants:
            gold = _integer_digits(variant)
            if gold is None:
                raise ValueError(
                    f"digit_credit needs integer ground truths; column {self.column!r} holds {variant!r}."
                )
            if digits is not None:
                best = max(best, self.score(digits, gold))
        return best

    @staticmethod
    def score(digits: str, gold: str) -> float:
        """Right digits of `digits` from the units up to the first wrong one, over the longer of the two strings."""
        right = 0
        for digit, gold_digit in zip(reversed(digits), reversed(gold)):
            if digit != gold_digit:
                break
            right += 1
        return right / max(len(digits), len(gold))


def _integer_digits(text: str) -> str | None:
    """The digits of an integer written in `text` ('-' kept as a sign character), or None when it is not one."""
    text = text.strip().lstrip("+")
    body = text[1:] if text.startswith("-") else text
    return text if body.isdigit() else None


class StepFormatReward:
    """
    1.0 when a completion has at least one step header, a closed thought and an answer after it (the structural gate
    of gated SFT), else 0.0. A multi-turn tool conversation has its steps already (each answered tool turn is one, as
    the trainer segments it): its last turn needs an answer, and to close any thought it opens.
    """

    def __init__(self, spec: FormatSpec | None = None):
        self.spec = spec or FormatSpec()
        self.__name__ = "step_format_reward"

    def __call__(self, completions, **kwargs) -> list[float]:
        return [float(self._well_formed(completion)) for completion in completions]

    def _well_formed(self, completion) -> bool:
        text = completion_text(completion)
        layout = analyze_text(text, self.spec)
        if not has_tool_turns(completion):
            return layout.well_formed
        # a last turn that only answers opens no thought, so it leaves none unclosed
        closed = layout.think_closed or (layout.answer is not None and not text[: layout.cot_end].strip())
        return closed and layout.answer is not None


def default_reward_funcs(spec: FormatSpec, column: str = "solution") -> list:
    """The rewards `MIGGRPOTrainer` uses when given none: answer accuracy and step format, read with `spec`."""
    return [AnswerAccuracyReward(spec, column), StepFormatReward(spec)]


# Conveniences for code that uses the default format, kept importable (`from trl_mig import answer_accuracy_reward`).
# They read completions with `FormatSpec()` and the 'solution' column whatever a config says: nothing in trl_mig uses
# them; wherever a config or a FormatSpec is known, build the rewards from it (`default_reward_funcs(spec, column)`).
answer_accuracy_reward = AnswerAccuracyReward()
"""`AnswerAccuracyReward()`: answer accuracy read with the *default* format (`FormatSpec()`: `<think>` tags, `<answer>`
tags, math-verify) from the 'solution' column, whatever a config says. With another format or column use
`AnswerAccuracyReward(FormatSpec.from_config(args), args.solution_column)`; `trl-mig train` builds it from the recipe
(`reward_funcs: [answer_accuracy]`)."""
step_format_reward = StepFormatReward()
"""`StepFormatReward()`: the step format read with the *default* format (`FormatSpec()`), whatever a config says. With
another format use `StepFormatReward(FormatSpec.from_config(args))`; `trl-mig train` builds it from the recipe
(`reward_funcs: [step_format]`)."""
