"""The built-in arithmetic task and the built-in tiny model (local, warm-started, cached)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trl_mig.builtin import (
    SCAFFOLD,
    ArithmeticTaskConfig,
    BuiltinArguments,
    generate_splits,
    load_builtin_dataset,
    resolve_builtin_model,
)
from trl_mig.builtin.model import METADATA_FILE
from trl_mig.builtin.task import sft_rows
from trl_mig.rewards import AnswerAccuracyReward, StepFormatReward, answers_match
from trl_mig.segmentation import FormatSpec, analyze_text

SMALL = ArithmeticTaskConfig(train_size=300, validation_size=50, test_size=60, ood_size=40)
# The tiny model settings shared by the tests that build one (one warm start per session and cache folder).
TINY = dict(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1, warmstart_max_steps=3,
            warmstart_batch_size=4, task_train_size=64, task_validation_size=4, task_test_size=8, task_ood_size=4)


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))


def test_splits_are_a_function_of_the_seed():
    assert generate_splits(SMALL) == generate_splits(SMALL)
    other = generate_splits(ArithmeticTaskConfig(seed=1, train_size=300, validation_size=50, test_size=60, ood_size=40))
    assert other["train"] != generate_splits(SMALL)["train"]
    # a split does not depend on the size of the splits drawn after it
    bigger_ood = generate_splits(ArithmeticTaskConfig(train_size=300, validation_size=50, test_size=60, ood_size=80))
    assert bigger_ood["train"] == generate_splits(SMALL)["train"]
    assert bigger_ood["ood"][:40] == generate_splits(SMALL)["ood"]
    # nor does test on the size of validation
    fewer_validation = generate_splits(ArithmeticTaskConfig(train_size=300, validation_size=5, test_size=60, ood_size=40))
    assert fewer_validation["test"] == generate_splits(SMALL)["test"]


def test_train_validation_test_are_disjoint_and_ood_is_longer():
    splits = generate_splits(SMALL)
    assert [len(splits[s]) for s in ("train", "validation", "test", "ood")] == [300, 50, 60, 40]
    expressions = {name: {row["expression"] for row in rows} for name, rows in splits.items()}
    assert not expressions["train"] & expressions["test"]
    assert not expressions["validation"] & (expressions["train"] | expressions["test"])
    assert len(expressions["train"]) == 300  # no duplicates
    max_train_ops = max(row["num_ops"] for name in ("train", "validation", "test") for row in splits[name])
    assert max_train_ops <= SMALL.max_ops
    assert min(row["num_ops"] for row in splits["ood"]) > max_train_ops
    mean = lambda rows: sum(len(r["gold_completion"]) for r in rows) / len(rows)  # noqa: E731
    assert mean(splits["ood"]) > mean(splits["train"])


@pytest.mark.parametrize("answer", ["running", "final"])
def test_gold_solutions_are_correct_and_well_formed(answer):
    task = ArithmeticTaskConfig(train_size=300, validation_size=50, test_size=60, ood_size=40, answer=answer)
    spec = FormatSpec(answer_match="exact" if answer == "running" else "math")
    rows = [row for split in generate_splits(task).values() for row in split]
    golds = [row["gold_completion"] for row in rows]
    solutions = [row["solution"] for row in rows]
    assert AnswerAccuracyReward(spec)(golds, solution=solutions) == [1.0] * len(rows)
    assert StepFormatReward(spec)(golds) == [1.0] * len(rows)
    for row in rows:
        # one step per operation; each step's result is the running value of the expression
        results = [int(v) for v in re.findall(r"=(\d+)\n", row["gold_completion"])]
        assert len(results) == row["num_ops"] == analyze_text(row["gold_completion"], spec).num_steps
        assert results[-1] == eval(row["expression"])  # noqa: S307 - digits and + - * ( )
        expected = " ".join(map(str, results)) if answer == "running" else str(results[-1])
        assert row["solution"] == expected
        assert all(0 <= value <= task.max_value for value in results)
        assert re.findall(r"### Step (\d+)", row["gold_completion"]) == [str(i + 1) for i in range(row["num_ops"])]
        assert row["expression"] in row["prompt"] and "<think>" in row["prompt"] and "<answer>" in row["prompt"]
        # the scaffold is the text between the last step and the answer: MIG scores in the taught layout
        assert row["gold_completion"].endswith(f"\n{SCAFFOLD}{row['solution']}</answer>")
    # one wrong value anywhere in a running answer is a wrong answer
    wrong = [s.rsplit(" ", 1)[0] + " " + str(int(s.split()[-1]) + 1) if " " in s else str(int(s) + 1) for s in solutions[:20]]
    assert AnswerAccuracyReward(spec)(golds[:20], solution=wrong) == [0.0] * 20


def test_running_answers_need_exact_matching():
    """math-verify reads '3 7 9' as the number 9: a running answer is compared as text."""
    assert answers_match("1 2 9", ["3 7 9"], "math")  # the reason `answer_match: exact` exists
    assert not answers_match("1 2 9", ["3 7 9"], "exact")
    assert answers_match(" 3  7 9", ["3 7 9"], "exact")


def test_final_answers_change_the_solutions_and_the_taught_answers_not_the_prompts():
    """task_answer: final (the mig_final_answer arm) asks the same problems and teaches the same thoughts; only the
    answer is the last result, so its warm start is another cached model."""
    from dataclasses import replace

    from trl_mig.builtin import check_answer_match
    from trl_mig.builtin.model import TinyModelSpec, WarmStartConfig, cache_key

    final = replace(SMALL, answer="final")
    running_splits, final_splits = generate_splits(SMALL), generate_splits(final)
    for name, rows in running_splits.items():
        assert len(rows) == len(final_splits[name]) > 0
        for running_row, final_row in zip(rows, final_splits[name], strict=True):
            assert final_row["prompt"] == running_row["prompt"] and final_row["expression"] == running_row["expression"]
            assert final_row["solution"] == running_row["solution"].split()[-1]  # the last result only
            # the same thought, then an answer holding the final value
            thought = running_row["gold_completion"].rsplit("<answer>", 1)[0]
            assert final_row["gold_completion"] == f"{thought}<answer>{final_row['solution']}</answer>"
    # the warm start's demonstrations: same problems, slips and thoughts, in the same order; the answers differ
    for running_row, final_row in zip(sft_rows(SMALL, 200, 0, slip_rate=0.8), sft_rows(final, 200, 0, slip_rate=0.8),
                                      strict=True):
        assert final_row["prompt"] == running_row["prompt"]
        running_thought, running_answer = running_row["completion"].rsplit("<answer>", 1)
        final_thought, final_answer = final_row["completion"].rsplit("<answer>", 1)
        assert final_thought == running_thought
        assert final_answer.removesuffix("</answer>") == running_answer.removesuffix("</answer>").split()[-1]
    assert cache_key(TinyModelSpec(), WarmStartConfig(), final) != cache_key(TinyModelSpec(), WarmStartConfig(), SMALL)
    # a running answer may be scored on its final value ('last'), never by math-verify
    args = BuiltinArguments(task_answer="running")
    assert check_answer_match("builtin:arithmetic", args, "last", "accuracy_eval_answer_match") == "last"
    with pytest.raises(ValueError, match="accuracy_eval_answer_match='math' cannot compare the running answers"):
        check_answer_match("builtin:arithmetic", args, "math", "accuracy_eval_answer_match")


def test_sft_rows_exclude_held_out_problems_and_are_deterministic():
    rows = sft_rows(SMALL, 500, seed=0)
    assert rows == sft_rows(SMALL, 500, seed=0) and rows != sft_rows(SMALL, 500, seed=1)
    held_out = {row["prompt"] for name in ("validation", "test", "ood") for row in generate_splits(SMALL, (name,))[name]}
    assert not held_out & {row["prompt"] for row in rows}
    assert all(set(row) == {"prompt", "completion"} for row in rows)
    short = sft_rows(SMALL, 200, seed=0, min_ops=1, max_ops=2)
    assert {row["completion"].count("### Step") for row in short} == {1, 2}
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        sft_rows(SMALL, 10, seed=0, min_ops=3, max_ops=2)


def test_warmstart_shortcut_rate_reaches_the_demonstrations():
    warm = BuiltinArguments(warmstart_shortcut_rate=0.5).warmstart_config()
    assert warm.shortcut_rate == 0.5
    rows = sft_rows(SMALL, 200, seed=0, shortcut_rate=warm.shortcut_rate)
    steps = [line for row in rows for line in row["completion"].splitlines() if "=" in line and "<" not in line]
    skipped = sum(line.startswith("=") for line in steps)
    assert 0.35 < skipped / len(steps) < 0.65
    assert not any(line.startswith("=") for row in sft_rows(SMALL, 50, seed=0) for line in row["completion"].splitlines())
    with pytest.raises(ValueError, match="warmstart_shortcut_rate"):
        sft_rows(SMALL, 10, seed=0, shortcut_rate=1.5)


def test_warmstart_slip_rate_adds_demonstrated_subtractions_and_follows_the_slipped_chain():
    from trl_mig.builtin.model import TinyModelSpec, WarmStartConfig, cache_key
    from trl_mig.builtin.task import Problem

    problem = Problem(8, (("-", 3), ("*", 2), ("-", 1)))
    assert problem.answer() == "5 10 9"
    slipped = problem.worked_solution(slips=(True, False, False))  # 8-3 added: the chain goes on from 11
    assert "8-3=11\n### Step 2\n11*2=22\n### Step 3\n22-1=21\n" in slipped
    assert slipped.endswith("<answer>11 22 21</answer>")
    assert problem.worked_solution(slips=(False, True, True)).endswith("<answer>5 10 11</answer>")  # '*' can't slip
    assert problem.worked_solution(slips=(False,) * 3) == problem.worked_solution()

    warm = BuiltinArguments(warmstart_slip_rate=0.6).warmstart_config()
    assert warm.slip_rate == 0.6
    lines = [line for row in sft_rows(SMALL, 300, seed=0, slip_rate=0.6) for line in row["completion"].splitlines()]
    subtractions = [re.fullmatch(r"(\d+)-(\d+)=(\d+)", line) for line in lines]
    subtractions = [tuple(map(int, m.groups())) for m in subtractions if m]
    added = sum(c == a + b for a, b, c in subtractions)
    assert sum(c == a - b for a, b, c in subtractions) + added == len(subtractions) > 100
    assert 0.5 < added / len(subtractions) < 0.7
    assert all(c == a - b for row in sft_rows(SMALL, 50, seed=0) for line in row["completion"].splitlines()
               for a, b, c in [map(int, m.groups()) for m in [re.fullmatch(r"(\d+)-(\d+)=(\d+)", line)] if m])
    with pytest.raises(ValueError, match="warmstart_slip_rate"):
        sft_rows(SMALL, 10, seed=0, slip_rate=-0.1)
    # a slip rate is part of the warm start's cache key; the default leaves earlier keys unchanged
    assert cache_key(TinyModelSpec(), warm, ArithmeticTaskConfig()) != cache_key(
        TinyModelSpec(), WarmStartConfig(), ArithmeticTaskConfig()) == "76caabb85ada"


def test_dataset_dict_and_task_validation():
    data = load_builtin_dataset("builtin:arithmetic", BuiltinArguments(task_train_size=10, task_validation_size=4,
                                                                       task_test_size=5, task_ood_size=3))
    assert {name: len(split) for name, split in data.items()} == {"train": 10, "validation": 4, "test": 5, "ood": 3}
    assert set(data["train"].column_names) == {"prompt", "solution", "gold_completion", "expression", "num_ops"}
    with pytest.raises(ValueError, match="ood_min_ops=3 must exceed max_ops=4"):
        ArithmeticTaskConfig(ood_min_ops=3)
    with pytest.raises(ValueError, match="min_ops"):
        ArithmeticTaskConfig(min_ops=0)
    with pytest.raises(ValueError, match="answer='last'"):
        ArithmeticTaskConfig(answer="last")


def test_unknown_builtin_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown built-in dataset 'builtin:gsm8k'.*builtin:arithmetic"):
        load_builtin_dataset("builtin:gsm8k")
    with pytest.raises(ValueError, match=r"Unknown built-in model 'builtin:tiny-gpt2'.*builtin:tiny-qwen2"):
        resolve_builtin_model("builtin:tiny-gpt2")


def test_tiny_model_is_warm_started_once_then_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl_mig.builtin.model as model_module

    args = BuiltinArguments(builtin_cache_dir=str(tmp_path), **TINY)
    path = resolve_builtin_model("builtin:tiny-qwen2", args, use_cpu=True)
    info = json.loads((Path(path) / METADATA_FILE).read_text())
    assert info["warmstart"]["steps"] == 3 and info["spec"]["hidden_size"] == 32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    assert len(tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr(model_module, "_warm_start", fail)
    assert resolve_builtin_model("builtin:tiny-qwen2", args, use_cpu=True) == path
    # other settings are another model: the scratch variant is built without SFT
    scratch = resolve_builtin_model("builtin:tiny-llama-scratch", args, use_cpu=True)
    assert scratch != path
    scratch_info = json.loads((Path(scratch) / METADATA_FILE).read_text())
    assert scratch_info["warmstart"] is None and scratch_info["spec"]["architecture"] == "llama"


def test_expression_prompts_and_step_token_shorten_sequences_not_text(tmp_path, capsys):
    from transformers import AutoTokenizer

    from trl_mig.builtin.model import TinyModelSpec, WarmStartConfig, cache_key
    from trl_mig.cli.eval import warn_on_prompt_mismatch

    short = ArithmeticTaskConfig(train_size=20, validation_size=4, test_size=4, ood_size=4, prompt="expression")
    splits = generate_splits(short)
    long = generate_splits(ArithmeticTaskConfig(train_size=20, validation_size=4, test_size=4, ood_size=4))
    for row, long_row in zip(splits["train"], long["train"]):  # the same problems and solutions, asked briefly
        assert row["prompt"] == f"Compute {row['expression']}.\n"
        assert long_row["prompt"].startswith(f"Compute {row['expression']}. Format: <think>")
        assert (row["solution"], row["gold_completion"]) == (long_row["solution"], long_row["gold_completion"])
    assert all(re.fullmatch(r"Compute \S+\.\n", r["prompt"]) for r in sft_rows(short, 5, seed=0))
    with pytest.raises(ValueError, match="prompt='terse'"):
        ArithmeticTaskConfig(prompt="terse")

    args = BuiltinArguments(builtin_cache_dir=str(tmp_path), tiny_step_token=True, task_prompt="expression", **TINY)
    path = resolve_builtin_model("builtin:tiny-qwen2", args, use_cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(path)  # the saved tokenizer keeps the header token
    completion = long["train"][0]["gold_completion"]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == completion
    headers = completion.count("### Step ")
    plain = BuiltinArguments(**TINY)
    assert len(ids) == len(tokenizer_of(plain)(completion, add_special_tokens=False)["input_ids"]) - 8 * headers
    info = json.loads((Path(path) / METADATA_FILE).read_text())
    assert info["spec"]["step_token"] is True and info["task"]["prompt"] == "expression"
    # evaluating it on the other prompts warns, for the cached model and for a train output folder alike
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "run_summary.json").write_text(json.dumps({"model_path": path}))
    for folder in (path, trained):
        warn_on_prompt_mismatch("builtin:arithmetic", folder, BuiltinArguments())
        assert "pass --task_prompt expression" in capsys.readouterr().err
        warn_on_prompt_mismatch("builtin:arithmetic", folder, args)
        assert capsys.readouterr().err == ""
    # the settings' defaults leave the cache keys of models built before they existed unchanged
    key = cache_key(TinyModelSpec(), WarmStartConfig(), ArithmeticTaskConfig())
    assert key == "76caabb85ada"  # computed before the two settings existed
    assert cache_key(TinyModelSpec(step_token=True), WarmStartConfig(), ArithmeticTaskConfig()) != key
    assert cache_key(TinyModelSpec(), WarmStartConfig(), short) != key


def tokenizer_of(args: BuiltinArguments):
    from trl_mig.builtin.model import build_model_and_tokenizer

    return build_model_and_tokenizer(args.model_spec("qwen2"))[1]
