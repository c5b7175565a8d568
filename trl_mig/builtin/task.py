"""The built-in task: multi-step integer arithmetic with one operation per reasoning step.

A problem is a chain of operations applied to a start value, written as a fully parenthesised expression, e.g.
`((12+7)*3)-5`. Its worked solution has one `### Step i` per operation inside the think block and the result in the
answer tags::

    <think>### Step 1
    12+7=19
    ### Step 2
    19*3=57
    ### Step 3
    57-5=52
    </think>
    <answer>52</answer>

Splits: `train` and `test` draw 1-3 operations (by default) and never share a problem; `ood` draws longer chains
(4-5 operations by default), to measure length generalisation. Every split is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

TASK_VERSION = 1  # bump when the generated problems change, so cached warm starts are rebuilt
OPERATORS = ("+", "-", "*")
PROMPT_TEMPLATE = "Compute {expression}. Format: <think>### Step 1 ...</think><answer>...</answer>\n"
# The text between the end of the last step and the answer in a worked solution: use it as `mig_scaffold`, so the
# MIG likelihoods l_k are scored in exactly the layout the model is taught.
SCAFFOLD = "</think>\n<answer>"
SPLITS = ("train", "test", "ood")


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Sizes and difficulty of the built-in arithmetic task (all splits are a pure function of these)."""

    seed: int = 0
    train_size: int = 4000
    test_size: int = 200
    ood_size: int = 200
    min_ops: int = 1
    max_ops: int = 3
    ood_min_ops: int = 4
    ood_max_ops: int = 5
    max_start: int = 15  # start value in [1, max_start]
    max_operand: int = 9  # operand of + and - in [1, max_operand]
    max_factor: int = 4  # operand of * in [2, max_factor]
    max_value: int = 50  # every intermediate result stays in [0, max_value]

    def __post_init__(self):
        for name in ("train_size", "test_size", "ood_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"task {name} must be >= 0, got {getattr(self, name)}.")
        for low, high in (("min_ops", "max_ops"), ("ood_min_ops", "ood_max_ops")):
            if not 1 <= getattr(self, low) <= getattr(self, high):
                raise ValueError(
                    f"task {low}={getattr(self, low)} and {high}={getattr(self, high)} must satisfy 1 <= {low} <= {high}."
                )
        if self.ood_min_ops <= self.max_ops:
            raise ValueError(
                f"task ood_min_ops={self.ood_min_ops} must exceed max_ops={self.max_ops}: the ood split holds longer "
                "chains than train/test."
            )
        if self.max_start < 1 or self.max_operand < 1 or self.max_factor < 2:
            raise ValueError("task max_start and max_operand must be >= 1 and max_factor >= 2.")
        if self.max_value < max(self.max_start, 2 * self.max_operand):
            raise ValueError(f"task max_value={self.max_value} is too small for the start values and operands.")

    def to_dict(self) -> dict:
        return {"version": TASK_VERSION, **asdict(self)}


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def expression(self) -> str:
        text = str(self.start)
        for index, (op, operand) in enumerate(self.ops):
            if index > 0:
                text = f"({text})"
            text = f"{text}{op}{operand}"
        return text

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, operand, result) for each operation, in order."""
        out, value = [], self.start
        for op, operand in self.ops:
            result = apply(value, op, operand)
            out.append((value, op, operand, result))
            value = result
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(expression=self.expression)

    def worked_solution(self) -> str:
        lines = [f"### Step {i}\n{a}{op}{b}={c}\n" for i, (a, op, b, c) in enumerate(self.steps(), start=1)]
        return "<think>" + "".join(lines) + f"{SCAFFOLD}{self.answer}</answer>"

    def row(self) -> dict:
        return {
            "prompt": self.prompt(),
            "solution": str(self.answer),
            "gold_completion": self.worked_solution(),
            "expression": self.expression,
            "num_ops": len(self.ops),
        }


def apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"Unknown operator {op!r}.")


def sample_problem(rng: random.Random, num_ops: int, config: ArithmeticTaskConfig) -> Problem:
    start = value = rng.randint(1, config.max_start)
    ops = []
    for _ in range(num_ops):
        choices = []
        if value + 1 <= config.max_value:
            choices.append("+")
        if value >= 1:
            choices.append("-")
        if 2 <= value and value * 2 <= config.max_value:
            choices.append("*")
        op = rng.choice(choices)
        if op == "+":
            operand = rng.randint(1, min(config.max_operand, config.max_value - value))
        elif op == "-":
            operand = rng.randint(1, min(config.max_operand, value))
        else:
            operand = rng.randint(2, min(config.max_factor, config.max_value // value))
        ops.append((op, operand))
        value = apply(value, op, operand)
    return Problem(start, tuple(ops))


def _problems(rng: random.Random, count: int, min_ops: int, max_ops: int, config, exclude: set[str]) -> list[Problem]:
    problems, seen, attempts = [], set(exclude), 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"Could not draw {count} distinct problems with {min_ops}-{max_ops} operations; lower the split size "
                "or widen the number ranges."
            )
        problem = sample_problem(rng, rng.randint(min_ops, max_ops), config)
        if problem.expression in seen:
            continue
        seen.add(problem.expression)
        problems.append(problem)
    return problems


def generate_splits(config: ArithmeticTaskConfig | None = None, splits=SPLITS) -> dict[str, list[dict]]:
    """
    Rows of each requested split. `test` never shares a problem with `train`; `ood` has longer chains. Each split
    has its own random stream derived from the seed and the split name, so a split does not change with the sizes of
    the others (except that `test` excludes the problems of `train`).
    """
    config = config or ArithmeticTaskConfig()
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown} of the built-in arithmetic task; expected some of {list(SPLITS)}.")
    out: dict[str, list[dict]] = {}
    train = _problems(
        random.Random(f"trl-mig/{config.seed}/train"), config.train_size, config.min_ops, config.max_ops, config, set()
    )
    if "train" in splits:
        out["train"] = [p.row() for p in train]
    if "test" in splits:
        test = _problems(
            random.Random(f"trl-mig/{config.seed}/test"),
            config.test_size,
            config.min_ops,
            config.max_ops,
            config,
            {p.expression for p in train},
        )
        out["test"] = [p.row() for p in test]
    if "ood" in splits:
        ood = _problems(
            random.Random(f"trl-mig/{config.seed}/ood"), config.ood_size, config.ood_min_ops, config.ood_max_ops, config, set()
        )
        out["ood"] = [p.row() for p in ood]
    return out


def sft_rows(config: ArithmeticTaskConfig, count: int, seed: int) -> list[dict]:
    """`count` prompt/completion rows for the warm-start SFT, drawn from the train distribution with their own stream
    (problems may repeat: SFT wants volume, not uniqueness). Test problems are excluded."""
    test = {row["expression"] for row in generate_splits(config, ("test",))["test"]}
    rng = random.Random(f"trl-mig/{config.seed}/sft/{seed}")
    rows = []
    while len(rows) < count:
        problem = sample_problem(rng, rng.randint(config.min_ops, config.max_ops), config)
        if problem.expression in test:
            continue
        rows.append({"prompt": problem.prompt(), "completion": problem.worked_solution()})
    return rows


def load_arithmetic_dataset(config: ArithmeticTaskConfig | None = None, splits=SPLITS):
    """The task as a `datasets.DatasetDict` with columns prompt, solution, gold_completion, expression, num_ops."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in generate_splits(config, splits).items()})
