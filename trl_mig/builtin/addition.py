"""The built-in column-addition task: add two numbers digit by digit, one column per reasoning step.

A problem is a sum of two numbers of the same length, e.g. `4827+3956`. Its worked solution adds one column per
`### Step i`, from the units, the carry of the previous column written as `+1`; the answer is the sum::

    <think>### Step 1
    7+6=13
    ### Step 2
    2+5+1=8
    ### Step 3
    8+9=17
    ### Step 4
    4+3+1=8
    </think>
    <answer>8783</answer>

The answer is only the final value (the paper's setting), and every step fixes one more of its digits (the last digit
of the step's result; the last step's result gives the leading digits). So the likelihood of the ground truth after
step k can rise step by step, where the arithmetic task's final value only moves at its last step. The warm start
(`addition_sft_rows`) is plain SFT on correct solutions: the model's errors are its own (a column added wrong, a carry lost),
not a demonstrator's habit. `DigitCreditReward` (`trl_mig.rewards`) gives GRPO the same information as a reward:
the share of the answer's digits right from the units up.

Splits: `train`, `validation` and `test` draw numbers of `min_digits`-`max_digits` digits and never share a problem;
`ood` draws longer numbers. Every split is a pure function of the configuration.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from .task import (
    PROMPT_TEMPLATES,
    SCAFFOLD,
    SPLITS,
    check_split_names,
    check_split_sizes,
    disjoint_splits,
    draw_distinct,
)

ADDITION_TASK_VERSION = 1  # bump when the generated problems change, so cached warm starts are rebuilt


@dataclass(frozen=True)
class AdditionTaskConfig:
    """Sizes and difficulty of the built-in column-addition task (all splits are a pure function of these)."""

    seed: int = 0
    train_size: int = 4000
    validation_size: int = 200
    test_size: int = 200
    ood_size: int = 200
    min_digits: int = 3
    max_digits: int = 5
    ood_min_digits: int = 6
    ood_max_digits: int = 7
    prompt: str = "instructions"  # a key of PROMPT_TEMPLATES ("expression": the warm start teaches the format)

    def __post_init__(self):
        check_split_sizes(self)
        for low, high in (("min_digits", "max_digits"), ("ood_min_digits", "ood_max_digits")):
            if not 1 <= getattr(self, low) <= getattr(self, high):
                raise ValueError(
                    f"addition_{low}={getattr(self, low)} and addition_{high}={getattr(self, high)} must satisfy "
                    f"1 <= addition_{low} <= addition_{high}."
                )
        if self.ood_min_digits <= self.max_digits:
            raise ValueError(
                f"addition_ood_min_digits={self.ood_min_digits} must exceed addition_max_digits={self.max_digits}: "
                "the ood split holds longer numbers than train/test."
            )
        if self.prompt not in PROMPT_TEMPLATES:
            raise ValueError(f"task prompt={self.prompt!r} is not one of {list(PROMPT_TEMPLATES)}.")

    def to_dict(self) -> dict:
        return {"kind": "addition", "version": ADDITION_TASK_VERSION, **asdict(self)}


@dataclass(frozen=True)
class Addition:
    left: int
    right: int

    @property
    def expression(self) -> str:
        return f"{self.left}+{self.right}"

    def columns(self) -> list[tuple[int, int, int, int]]:
        """(left digit, right digit, carry in, column sum) per column, units first."""
        left, right = str(self.left), str(self.right)
        width = max(len(left), len(right))
        left, right = left.zfill(width), right.zfill(width)
        out, carry = [], 0
        for a, b in zip(reversed(left), reversed(right)):
            total = int(a) + int(b) + carry
            out.append((int(a), int(b), carry, total))
            carry = total // 10
        return out

    def answer(self) -> str:
        return str(self.left + self.right)

    def prompt(self, style: str = "instructions") -> str:
        return PROMPT_TEMPLATES[style].format(expression=self.expression)

    def worked_solution(self) -> str:
        lines = [
            f"### Step {i}\n{a}+{b}{'+1' if carry else ''}={total}\n"
            for i, (a, b, carry, total) in enumerate(self.columns(), start=1)
        ]
        return "<think>" + "".join(lines) + f"{SCAFFOLD}{self.answer()}</answer>"

    def row(self, prompt_style: str = "instructions") -> dict:
        return {
            "prompt": self.prompt(prompt_style),
            "solution": self.answer(),
            "gold_completion": self.worked_solution(),
            "expression": self.expression,
            "num_digits": len(str(self.left)),
        }


def sample_addition(rng: random.Random, digits: int) -> Addition:
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    return Addition(rng.randint(low, high), rng.randint(low, high))


def generate_addition_splits(config: AdditionTaskConfig | None = None, splits=SPLITS) -> dict[str, list[dict]]:
    """
    Rows of each requested split (columns prompt, solution, gold_completion, expression, num_digits), disjoint as the
    arithmetic task's are (`trl_mig.builtin.task.disjoint_splits`); `ood` has longer numbers. Each split draws from its
    own random stream (seed and split name).
    """
    config = config or AdditionTaskConfig()
    check_split_names(splits, "addition")

    def draw(name: str, exclude: set[str]) -> list[Addition]:
        low, high = (config.ood_min_digits, config.ood_max_digits) if name == "ood" else (config.min_digits,
                                                                                           config.max_digits)
        return draw_distinct(
            random.Random(f"trl-mig/addition/{config.seed}/{name}"), getattr(config, f"{name}_size"),
            lambda rng: sample_addition(rng, rng.randint(low, high)), exclude, f"additions of {low}-{high} digits",
            "lower the split size or allow more digits",
        )

    return {name: [p.row(config.prompt) for p in problems] for name, problems in disjoint_splits(splits, draw).items()}


def addition_sft_rows(config: AdditionTaskConfig, count: int, seed: int) -> list[dict]:
    """
    `count` prompt/completion rows of correct worked solutions for the warm-start SFT, numbers of the task's train
    lengths, none of them a validation, test or ood problem (problems may repeat: SFT wants volume).
    """
    held_out = {
        row["expression"]
        for rows in generate_addition_splits(config, ("validation", "test", "ood")).values()
        for row in rows
    }
    rng = random.Random(f"trl-mig/addition/{config.seed}/sft/{seed}")
    rows = []
    while len(rows) < count:
        problem = sample_addition(rng, rng.randint(config.min_digits, config.max_digits))
        if problem.expression not in held_out:
            rows.append({"prompt": problem.prompt(config.prompt), "completion": problem.worked_solution()})
    return rows


def load_addition_dataset(config: AdditionTaskConfig | None = None, splits=SPLITS):
    """The task as a `datasets.DatasetDict` (splits train, validation, test, ood)."""
    from datasets import Dataset, DatasetDict

    splits = generate_addition_splits(config, splits)
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
