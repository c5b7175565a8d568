"""The built-in column-addition task (`builtin:addition`) and its warm-started tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trl_mig.builtin import AdditionTaskConfig, BuiltinArguments, load_builtin_dataset, resolve_builtin_model
from trl_mig.builtin.addition import Addition, addition_sft_rows, generate_addition_splits
from trl_mig.builtin.model import METADATA_FILE
from trl_mig.rewards import AnswerAccuracyReward, DigitCreditReward, StepFormatReward
from trl_mig.segmentation import FormatSpec, analyze_text

SMALL = AdditionTaskConfig(train_size=300, validation_size=50, test_size=60, ood_size=40)


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))


def test_worked_solution_adds_one_column_per_step_with_the_carry():
    text = Addition(4827, 3956).worked_solution()
    assert text == (
        "<think>### Step 1\n7+6=13\n### Step 2\n2+5+1=8\n### Step 3\n8+9=17\n### Step 4\n4+3+1=8\n</think>\n"
        "<answer>8783</answer>"
    )
    # a carry out of the last column makes the last step's result two digits: the sum's leading digits
    assert Addition(999, 1).worked_solution().endswith("### Step 3\n9+0+1=10\n</think>\n<answer>1000</answer>")


def test_splits_are_disjoint_correct_and_a_function_of_the_seed():
    splits = generate_addition_splits(SMALL)
    assert splits == generate_addition_splits(SMALL)
    assert splits != generate_addition_splits(AdditionTaskConfig(**{**SMALL.__dict__, "seed": 1}))
    seen = {name: {row["expression"] for row in rows} for name, rows in splits.items()}
    assert not seen["train"] & seen["test"] and not seen["validation"] & (seen["train"] | seen["test"])
    assert {len(rows) for rows in splits.values()} >= {300, 50, 60, 40} - {0}
    spec = FormatSpec()
    for name, rows in splits.items():
        low, high = (6, 7) if name == "ood" else (3, 5)
        for row in rows:
            left, right = map(int, row["expression"].split("+"))
            assert row["solution"] == str(left + right) and low <= row["num_digits"] <= high
            layout = analyze_text(row["gold_completion"], spec)
            assert layout.well_formed and layout.answer == row["solution"]
            assert len(re.findall(r"### Step", row["gold_completion"])) == row["num_digits"]


def test_sft_rows_are_correct_solutions_and_never_held_out_problems():
    rows = addition_sft_rows(SMALL, 400, seed=0)
    assert rows == addition_sft_rows(SMALL, 400, seed=0) and rows != addition_sft_rows(SMALL, 400, seed=1)
    held_out = {r["prompt"] for name in ("validation", "test", "ood") for r in generate_addition_splits(SMALL)[name]}
    assert not {row["prompt"] for row in rows} & held_out
    reward = AnswerAccuracyReward()
    for row in rows[:50]:
        left, right = map(int, re.search(r"(\d+)\+(\d+)", row["prompt"]).groups())
        assert reward([row["completion"]], solution=[str(left + right)]) == [1.0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="addition_min_digits=4 and addition_max_digits=3"):
        AdditionTaskConfig(min_digits=4, max_digits=3)
    with pytest.raises(ValueError, match="addition_ood_min_digits=5 must exceed addition_max_digits=5"):
        AdditionTaskConfig(ood_min_digits=5)
    with pytest.raises(ValueError, match="task validation_size must be >= 0"):
        AdditionTaskConfig(validation_size=-1)


def test_builtin_dataset_and_rewards_score_the_gold_completions():
    args = BuiltinArguments(task_train_size=20, task_validation_size=5, task_test_size=5, task_ood_size=5,
                            addition_min_digits=2, addition_max_digits=3, addition_ood_min_digits=4,
                            addition_ood_max_digits=4, task_prompt="expression")
    dataset = load_builtin_dataset("builtin:addition", args)
    assert set(dataset) == {"train", "validation", "test", "ood"} and dataset["ood"][0]["num_digits"] == 4
    assert dataset["train"][0]["prompt"] == f"Compute {dataset['train'][0]['expression']}.\n"
    rows = dataset["test"]
    gold = list(rows["gold_completion"])
    assert AnswerAccuracyReward()(gold, solution=rows["solution"]) == [1.0] * 5
    assert DigitCreditReward()(gold, solution=rows["solution"]) == [1.0] * 5
    assert StepFormatReward()(gold) == [1.0] * 5


def test_addition_model_is_warm_started_on_addition_and_cached_apart(tmp_path):
    small = dict(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1,
                 warmstart_max_steps=2, warmstart_batch_size=4, task_train_size=16, task_validation_size=4,
                 task_test_size=4, task_ood_size=4, builtin_cache_dir=str(tmp_path))
    args = BuiltinArguments(**small)
    path = resolve_builtin_model("builtin:tiny-qwen2-addition", args, use_cpu=True)
    info = json.loads((Path(path) / METADATA_FILE).read_text())
    assert info["task"]["kind"] == "addition" and info["warmstart"]["steps"] == 2
    assert Path(path).name.startswith("tiny-qwen2-addition")
    assert resolve_builtin_model("builtin:tiny-qwen2-addition", args, use_cpu=True) == path  # cached
    # another digit range is another warm start; the arithmetic warm-start habits are refused, naming the field
    other = resolve_builtin_model("builtin:tiny-qwen2-addition", BuiltinArguments(**small, addition_max_digits=4),
                                  use_cpu=True)
    assert other != path
    with pytest.raises(ValueError, match="warmstart_slip_rate shape"):
        resolve_builtin_model("builtin:tiny-qwen2-addition", BuiltinArguments(**small, warmstart_slip_rate=0.5),
                              use_cpu=True)
