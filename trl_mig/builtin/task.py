"""The built-in task: multi-step integer arithmetic with one operation per reasoning step.

A problem is a chain of operations applied to a start value, written as a fully parenthesised expression, e.g.
`((12+7)*3)-5`. Its worked solution has one `### Step i` per operation inside the think block, and the answer::

    <think>### Step 1
    12+7=19
    ### Step 2
    19*3=57
    ### Step 3
    57-5=52
    </think>
    <answer>19 57 52</answer>

With `answer="running"` the answer lists the result of every step in order (above); with `answer="final"` it is the
last result only (`<answer>52</answer>`). The running answer is the benchmark's default for two measured reasons
(docs/benchmark.md): a tiny model gets a third of its final answers right by luck, which outcome-only RL learns to
exploit by guessing, and a running answer cannot be guessed; and the likelihood of a running answer rises with every
correct step, so MIG's step gains can see steps, where a final answer's likelihood only moves at the last step.

Splits: `train`, `validation` and `test` draw `min_ops`-`max_ops` operations and never share a problem; `ood` draws
longer chains, to measure length generalisation. Every split is a pure function of the configuration.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

TASK_VERSION = 2  # bump when the generated problems change, so cached warm starts are rebuilt
OPERATORS = ("+", "-", "*")
PROMPT_TEMPLATES = {  # how a problem is asked: with the format spelled out, or the expression alone
    "instructions": "Compute {expression}. Format: <think>### Step 1 ...</think><answer>...</answer>\n",
    "expression": "Compute {expression}.\n",
}
# The text between the end of the last step and the answer in a worked solution: use it as `mig_scaffold`, so the
# MIG likelihoods l_k are scored in exactly the layout the model is taught.
SCAFFOLD = "</think>\n<answer>"
SPLITS = ("train", "validation", "test", "ood")
ANSWER_FORMATS = ("running", "final")


def asdict_without_defaults(settings, names: tuple[str, ...]) -> dict:
    """`asdict(settings)` without the fields `names` where they hold their default: settings added after models were
    cached keep those models' cache keys."""
    defaults = type(settings)()
    return {k: v for k, v in asdict(settings).items() if k not in names or v != getattr(defaults, k)}


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Sizes and difficulty of the built-in arithmetic task (all splits are a pure function of these)."""

    seed: int = 0
    train_size: int = 4000
    validation_size: int = 200
    test_size: int = 200
    ood_size: int = 200
    min_ops: int = 2
    max_ops: int = 4
    ood_min_ops: int = 5
    ood_max_ops: int = 6
    max_start: int = 9  # start value in [1, max_start]
    max_operand: int = 5  # operand of + and - in [1, max_operand]
    max_factor: int = 2  # operand of * in [2, max_factor]
    max_value: int = 10  # every intermediate result stays in [0, max_value]
    answer: str = "running"  # "running": every step's result in order; "final": the last result
    prompt: str = "instructions"  # a key of PROMPT_TEMPLATES ("expression": shorter; the warm start teaches the format)

    def __post_init__(self):
        check_split_sizes(self)
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
        if self.answer not in ANSWER_FORMATS:
            raise ValueError(f"task answer={self.answer!r} is not one of {list(ANSWER_FORMATS)}.")
        if self.prompt not in PROMPT_TEMPLATES:
            raise ValueError(f"task prompt={self.prompt!r} is not one of {list(PROMPT_TEMPLATES)}.")

    def to_dict(self) -> dict:
        return {"version": TASK_VERSION, **asdict_without_defaults(self, ("prompt",))}


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

    def steps(self, slips: tuple[bool, ...] = ()) -> list[tuple[int, str, int, int]]:
        """
        (left, op, operand, result) for each operation, in order. A subtraction marked in `slips` is carried out as an
        addition (`8-3=11`) and the chain goes on from that result: a demonstrator's slip (`WarmStartConfig.slip_rate`).
        """
        out, value = [], self.start
        for index, (op, operand) in enumerate(self.ops):
            slipped = op == "-" and index < len(slips) and slips[index]
            result = apply(value, "+" if slipped else op, operand)
            out.append((value, op, operand, result))
            value = result
        return out

    def answer(self, answer_format: str = "running", slips: tuple[bool, ...] = ()) -> str:
        """
        The ground truth: every step's result in order (`"running"`), or the last one (`"final"`); with `slips`, those
        of the slipped chain (a sloppy demonstration's answer).
        """
        results = [str(c) for *_, c in self.steps(slips)]
        return " ".join(results) if answer_format == "running" else results[-1]

    def prompt(self, style: str = "instructions") -> str:
        return PROMPT_TEMPLATES[style].format(expression=self.expression)

    def worked_solution(self, answer_format: str = "running", shortcuts: tuple[bool, ...] = (),
                        slips: tuple[bool, ...] = ()) -> str:
        """
        The solution text. A step marked in `shortcuts` is written without its calculation (`=57` instead of
        `19*3=57`): a demonstrator that skips writing the work down (see `WarmStartConfig.shortcut_rate`). A
        subtraction marked in `slips` is added instead, and the answer follows the slipped chain (see `steps`).
        """
        lines = [
            f"### Step {i}\n" + (f"={c}\n" if i <= len(shortcuts) and shortcuts[i - 1] else f"{a}{op}{b}={c}\n")
            for i, (a, op, b, c) in enumerate(self.steps(slips), start=1)
        ]
        return "<think>" + "".join(lines) + f"{SCAFFOLD}{self.answer(answer_format, slips)}</answer>"

    def row(self, answer_format: str = "running", prompt_style: str = "instructions") -> dict:
        return {
            "prompt": self.prompt(prompt_style),
            "solution": self.answer(answer_format),
            "gold_completion": self.worked_solution(answer_format),
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


def draw_distinct(rng: random.Random, count: int, sample, exclude: set[str], what: str, advice: str) -> list:
    """`count` problems `sample(rng)` with distinct `expression`s, none in `exclude`; a ValueError naming `what`
    (e.g. "problems with 2-4 operations") and `advice` when too few distinct ones come up."""
    problems, seen, attempts = [], set(exclude), 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"Could not draw {count} distinct {what}; {advice}.")
        problem = sample(rng)
        if problem.expression in seen:
            continue
        seen.add(problem.expression)
        problems.append(problem)
    return problems


def check_split_names(splits, task: str) -> None:
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown} of the built-in {task} task; expected some of {list(SPLITS)}.")


def check_split_sizes(config) -> None:
    for name in ("train_size", "validation_size", "test_size", "ood_size"):
        if getattr(config, name) < 0:
            raise ValueError(f"task {name} must be >= 0, got {getattr(config, name)}.")


def disjoint_splits(splits, draw) -> dict[str, list]:
    """
    The problems of each requested split, from `draw(name, exclude)` (the split's own problems, none of whose
    expressions is in `exclude`): `train`; `test` excluding train's; `validation` excluding both; `ood` (longer
    problems) excluding nothing. So train, validation and test never share a problem.
    """
    train = draw("train", set())
    seen = {p.expression for p in train}
    test = draw("test", seen) if {"test", "validation"} & set(splits) else []
    drawn = {"train": train, "test": test}
    if "validation" in splits:
        drawn["validation"] = draw("validation", seen | {p.expression for p in test})
    if "ood" in splits:
        drawn["ood"] = draw("ood", set())
    return {name: drawn[name] for name in splits}


def generate_splits(config: ArithmeticTaskConfig | None = None, splits=SPLITS) -> dict[str, list[dict]]:
    """
    Rows of each requested split (`disjoint_splits`); `ood` has longer chains. Each split has its own random stream
    derived from the seed and the split name, so a split does not change with the sizes of the others (except through
    the exclusions).
    """
    config = config or ArithmeticTaskConfig()
    check_split_names(splits, "arithmetic")

    def draw(name: str, exclude: set[str]) -> list[Problem]:
        low, high = (config.ood_min_ops, config.ood_max_ops) if name == "ood" else (config.min_ops, config.max_ops)
        return draw_distinct(
            random.Random(f"trl-mig/{config.seed}/{name}"), getattr(config, f"{name}_size"),
            lambda rng: sample_problem(rng, rng.randint(low, high), config), exclude,
            f"problems with {low}-{high} operations", "lower the split size or widen the number ranges",
        )

    return {name: [p.row(config.answer, config.prompt) for p in problems]
            for name, problems in disjoint_splits(splits, draw).items()}


def held_out_expressions(config: ArithmeticTaskConfig) -> set[str]:
    """The problems of the validation, test and ood splits: a warm start must never train on them."""
    rows = generate_splits(config, ("validation", "test", "ood"))
    return {row["expression"] for split in rows.values() for row in split}


def warmstart_problems(config: ArithmeticTaskConfig, rng: random.Random, min_ops: int | None = None,
                       max_ops: int | None = None):
    """
    An endless stream of problems of `min_ops` to `max_ops` operations (default: the task's) drawn with `rng`, none of
    them in a held-out split (validation, test, ood). Problems may repeat: SFT wants volume, not uniqueness.
    """
    low, high = min_ops or config.min_ops, max_ops or config.max_ops
    if not 1 <= low <= high:
        raise ValueError(f"warm-start chain lengths must satisfy 1 <= min_ops <= max_ops, got {low} and {high}.")
    held_out = held_out_expressions(config)

    def stream():  # a nested generator, so that the checks above run at the call
        while True:
            problem = sample_problem(rng, rng.randint(low, high), config)
            if problem.expression not in held_out:
                yield problem

    return stream()


def sft_rows(config: ArithmeticTaskConfig, count: int, seed: int, min_ops: int | None = None,
             max_ops: int | None = None, shortcut_rate: float = 0.0, slip_rate: float = 0.0) -> list[dict]:
    """
    `count` prompt/completion rows for the warm-start SFT (`warmstart_problems`, with their own stream). Each step is
    written without its calculation with probability `shortcut_rate`; each subtraction is added instead with
    probability `slip_rate`.
    """
    for name, rate in (("warmstart_shortcut_rate", shortcut_rate), ("warmstart_slip_rate", slip_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}.")
    rng = random.Random(f"trl-mig/{config.seed}/sft/{seed}")
    rows = []
    for problem in warmstart_problems(config, rng, min_ops, max_ops):
        if len(rows) == count:
            break
        shortcuts = tuple(rng.random() < shortcut_rate for _ in problem.ops) if shortcut_rate > 0 else ()
        slips = tuple(rng.random() < slip_rate for _ in problem.ops) if slip_rate > 0 else ()
        completion = problem.worked_solution(config.answer, shortcuts, slips)
        rows.append({"prompt": problem.prompt(config.prompt), "completion": completion})
    return rows


def load_arithmetic_dataset(config: ArithmeticTaskConfig | None = None, splits=SPLITS):
    """The task as a `datasets.DatasetDict` (splits train, validation, test, ood) with columns prompt, solution,
    gold_completion, expression, num_ops."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in generate_splits(config, splits).items()})
