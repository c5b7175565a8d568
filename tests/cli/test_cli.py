"""The `trl-mig` CLI: recipes, `train` end to end (one and two processes), `eval`, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SMALLEST_MODEL, save_tiny_model
from trl_mig.cli.errors import CLIError
from trl_mig.cli.main import main
from trl_mig.cli.recipes import make_train_parser, parse_recipe_args
from trl_mig.cli.data import extract_boxed, extract_gsm8k

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "study" not in p.parts)  # studies: test_study.py
DEMO = str(ROOT / "recipes" / "demo" / "mig.yaml")
# Shrinks the demo recipe to a smoke test: tiny model, 3 warm-start steps, 2 MIG steps, a few eval examples.
TINY_BUILTIN = [
    "--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2", "--tiny_num_kv_heads", "1",
    "--warmstart_max_steps", "3", "--warmstart_batch_size", "4",
    "--task_train_size", "64", "--task_test_size", "8", "--task_ood_size", "4",
]
SMOKE = [
    *TINY_BUILTIN, "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
    "--max_completion_length", "24", "--logging_steps", "1", "--accuracy_eval_max_samples", "4",
    "--accuracy_eval_max_new_tokens", "24", "--learning_rate", "1e-3",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl_mig_cache"))


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    """No test may warm-start into (or read) the user's ~/.cache/trl-mig, nor leave files in the working folder."""
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.chdir(tmp_path)


def run_main(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------------- recipes
def test_recipe_folder_has_the_promised_recipes():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    assert {"demo/mig.yaml", "demo/grpo.yaml"} <= names
    for model in ("Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct"):
        for data in ("gsm8k", "math"):
            assert {f"{model}/mig/config_{data}.yaml", f"{model}/mig/config_{data}_lora.yaml"} <= names
    vlm = "Qwen2.5-VL-3B-Instruct/mig/config_clevr"
    assert {f"{vlm}.yaml", f"{vlm}_lora.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_parses_with_no_unknown_keys(recipe):
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set
    extra = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    (script_args, builtin_args, training_args, model_args, _), remaining = parse_recipe_args(
        make_train_parser(), ["--config", str(recipe), *extra], "the train dataclasses"
    )
    assert remaining == []
    assert model_args.model_name_or_path and (script_args.dataset_name or script_args.datasets)
    assert training_args.solution_column == "solution" and script_args.algorithm in ("mig", "grpo")
    if "lora" in recipe.name:
        assert model_args.use_peft and model_args.lora_target_modules
    if "Qwen" in str(recipe):
        assert "### Step 1" in script_args.system_prompt and "<think>" in script_args.system_prompt
        assert script_args.answer_extraction in ("gsm8k", "boxed", "answer_tag")
    if "-VL-" in str(recipe):  # vision-language: the image column is mapped, and no text-only accuracy eval
        assert script_args.image_column and not script_args.accuracy_eval_splits


def test_demo_twins_differ_only_in_algorithm_and_output_dir():
    import yaml

    mig = yaml.safe_load((ROOT / "recipes/demo/mig.yaml").read_text())
    grpo = yaml.safe_load((ROOT / "recipes/demo/grpo.yaml").read_text())
    assert mig["algorithm"] == "mig" and grpo["algorithm"] == "grpo"
    assert {k for k in mig if mig[k] != grpo.get(k)} == {"algorithm", "output_dir"}


# --------------------------------------------------------------------------------------------------------- train
def test_train_demo_recipe_end_to_end(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        ["train", "--config", DEMO, "--output_dir", str(out), "--builtin_cache_dir", cache_dir, *SMOKE], capsys
    )
    assert code == 0, stderr
    assert "before training" in stdout and "held-out accuracy" in stdout
    summary = json.loads((out / "accuracy.json").read_text())
    assert set(summary["accuracy"]) == {"before", "after"}
    for phase in ("before", "after"):
        assert set(summary["accuracy"][phase]) == {"test", "ood"}
        assert summary["accuracy"][phase]["test"]["num_examples"] == 4
    assert summary["global_steps"] == 2 and summary["algorithm"] == "mig"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("mig/gain_sum" in entry for entry in history)
    # the recipe's accuracy_eval_steps: held-out learning curves at the start and after the last step
    curve = [(e["step"], e["heldout/test/pass@1"]) for e in history if "heldout/test/pass@1" in e]
    assert [step for step, _ in curve] == [0, 2]
    assert curve[0][1] == summary["accuracy"]["before"]["test"]["pass@1"]
    assert curve[-1][1] == summary["accuracy"]["after"]["test"]["pass@1"]


def test_running_answers_are_never_compared_by_math_verify(tmp_path, cache_dir, capsys):
    code, _, stderr = run_main(
        ["train", "--config", DEMO, "--output_dir", str(tmp_path / "x"), "--builtin_cache_dir", cache_dir, *SMOKE,
         "--answer_match", "math"], capsys
    )
    assert code == 2 and "answer_match='math' cannot compare the running answers" in stderr
    code, _, stderr = run_main(
        ["eval", "--dataset", "builtin:arithmetic", "--completions_column", "gold_completion", "--answer_match", "math"],
        capsys,
    )
    assert code == 2 and "--answer_match='math'" in stderr
    # the final-answer variant of the task may use math-verify
    code, _, stderr = run_main(
        ["eval", "--dataset", "builtin:arithmetic", "--completions_column", "gold_completion", "--answer_match", "math",
         "--task_answer", "final", "--splits", "test", "--max_samples", "5"], capsys,
    )
    assert code == 0, stderr


def test_train_grpo_twin_runs_plain_grpo(tmp_path, cache_dir, capsys):
    grpo = str(ROOT / "recipes" / "demo" / "grpo.yaml")
    out = tmp_path / "grpo"
    code, _, stderr = run_main(
        ["train", "--config", grpo, "--output_dir", str(out), "--builtin_cache_dir", cache_dir, *SMOKE,
         "--max_steps", "1", "--accuracy_eval_splits", "test", "--accuracy_eval_before", "false"], capsys
    )
    assert code == 0, stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history and not any(key.startswith("mig/") for entry in history for key in entry)
    assert set(json.loads((out / "accuracy.json").read_text())["accuracy"]) == {"after"}


def test_grpo_with_partial_credit_and_the_final_value_eval(tmp_path, cache_dir, capsys, monkeypatch):
    """The grpo_partial_credit arm of recipes/study/cpu_arms.yaml: partial credit by name, accuracy logged at weight
    0, and the accuracy eval comparing final values while training compares every value."""
    import trl_mig.cli.train as train_module

    specs = []
    real_evaluate = train_module.evaluate_splits

    def recording_evaluate(*args, **kwargs):
        specs.append(kwargs["spec"])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_splits", recording_evaluate)
    out = tmp_path / "partial"
    code, _, stderr = run_main(
        ["train", "--config", str(ROOT / "recipes" / "demo" / "grpo.yaml"), "--output_dir", str(out),
         "--builtin_cache_dir", cache_dir, *SMOKE, "--max_steps", "1", "--accuracy_eval_splits", "test",
         "--accuracy_eval_steps", "0", "--reward_funcs", "answer_accuracy", "partial_credit", "step_format",
         "--reward_weights", "0.0", "1.0", "0.2", "--accuracy_eval_answer_match", "last"], capsys
    )
    assert code == 0, stderr
    assert [spec.answer_match for spec in specs] == ["last", "last"]  # before and after training
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = {key for entry in history for key in entry}
    assert {"rewards/partial_credit_reward/mean", "rewards/answer_accuracy_reward/mean"} <= logged
    code, _, stderr = run_main(
        ["train", "--config", DEMO, "--output_dir", str(tmp_path / "x"), "--builtin_cache_dir", cache_dir, *SMOKE,
         "--accuracy_eval_answer_match", "math"], capsys
    )
    assert code == 2 and "accuracy_eval_answer_match='math' cannot compare the running answers" in stderr


def _local_model_and_data(tmp_path):
    """A tiny model saved with save_pretrained and a GSM8K-like JSONL file: the local-path route of real users."""
    model_dir = save_tiny_model(tmp_path / "local-model", **SMALLEST_MODEL)
    data = tmp_path / "gsm8k-like.jsonl"
    rows = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a:,}"} for a in (3, 500, 7, 9)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data


def test_train_local_model_and_jsonl_with_column_mapping_and_lora(tmp_path, capsys):
    model_dir, data = _local_model_and_data(tmp_path)
    out = tmp_path / "lora-out"
    code, _, stderr = run_main(
        [
            "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--prompt_column", "question", "--answer_column", "answer", "--answer_extraction", "gsm8k",
            "--system_prompt", "Think in steps.", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
            "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(out), "--use_cpu", "true",
            "--bf16", "false", "--gradient_checkpointing", "false", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "16",
            "--report_to", "none", "--save_strategy", "no", "--accuracy_eval_splits", "train",
            "--accuracy_eval_before", "false", "--accuracy_eval_max_new_tokens", "8",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert (out / "adapter_config.json").exists()
    completions = json.loads((out / "accuracy_completions.json").read_text())["train"]
    assert sorted(row["solution"] for row in completions) == ["1000", "14", "18", "6"]  # '#### 1,000' -> '1000'

    # eval loads the saved adapter on its base model
    report = tmp_path / "eval.json"
    code, stdout, stderr = run_main(
        ["eval", "--model", str(out), "--dataset", str(data), "--splits", "train", "--prompt_column", "question",
         "--answer_column", "answer", "--answer_extraction", "gsm8k", "--system_prompt", "Think in steps.",
         "--max_new_tokens", "8", "--batch_size", "3", "--output_file", str(report)],
        capsys,
    )
    assert code == 0, stderr
    result = json.loads(report.read_text())["results"]["train"]
    assert result["num_examples"] == 4 and 0.0 <= result["pass@1"] <= 1.0
    assert "pass@1" in stdout and "format rate" in stdout


def test_two_processes_really_run_and_agree_on_mig_metrics(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU runs two ranks (torchrun + gloo); the ranks also run
    the warm start together (an empty cache) and agree on every logged MIG metric."""
    out = tmp_path / "ddp"
    cache_dir = str(tmp_path / "cache")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "trl_mig", "train", "--config", DEMO, "--output_dir", str(out), "--builtin_cache_dir", cache_dir,
        *SMOKE, "--accuracy_eval_splits", "test", "--save_rank_logs", "true",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logs = [json.loads((out / "rank_logs" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [log["rank"] for log in logs] == [0, 1]
    assert all(log["world_size"] == 2 for log in logs)
    assert logs[0]["pid"] != logs[1]["pid"]
    assert "MULTI_CPU" in logs[0]["distributed_type"]

    def mig_metrics(log):
        return [{k: v for k, v in entry.items() if k.startswith("mig/")} for entry in log["log_history"]
                if any(k.startswith("mig/") for k in entry)]

    assert len(mig_metrics(logs[0])) == 2  # logged at both steps
    assert mig_metrics(logs[0]) == mig_metrics(logs[1])
    summary = json.loads((out / "accuracy.json").read_text())
    assert summary["num_processes"] == 2 and summary["accuracy"]["after"]["test"]["num_examples"] == 4
    (built,) = Path(cache_dir).iterdir()  # one model, written once, by the ranks' joint warm start
    info = json.loads((built / "trl_mig_builtin.json").read_text())
    assert info["warmstart"]["num_processes"] == 2 and info["warmstart"]["steps"] == 3


def test_accelerate_options_relaunch_through_accelerate(monkeypatch, capsys):
    import accelerate.commands.launch as launch_module

    captured = {}
    monkeypatch.setattr(launch_module, "launch_command", lambda args: captured.setdefault("args", args))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    code = main(["train", "--config", DEMO, "--accelerate_config", "ddp", "--num_processes", "2", "--max_steps", "1"])
    assert code == 0
    args = captured["args"]
    assert args.config_file.endswith("multi_gpu.yaml") and args.num_processes == 2
    assert args.module and args.training_script == "trl_mig"
    assert args.training_script_args == ["train", "--config", DEMO, "--max_steps", "1"]


def test_accelerate_config_names_resolve_to_trl_packaged_files(capsys):
    for name, file in (("zero2", "zero2.yaml"), ("zero3", "zero3.yaml"), ("fsdp", "fsdp2.yaml"), ("ddp", "multi_gpu.yaml")):
        code, stdout, _ = run_main(["accelerate-config", name], capsys)
        path = Path(stdout.strip())
        assert code == 0 and path.name == file and path.is_file() and "trl" in path.parts
    code, _, stderr = run_main(["accelerate-config", "zero9"], capsys)
    assert code == 2 and "zero9" in stderr and "zero3" in stderr


def test_builtins_and_help(capsys):
    code, stdout, _ = run_main(["builtins"], capsys)
    assert code == 0 and "builtin:arithmetic" in stdout and "builtin:tiny-qwen2" in stdout
    code, stdout, _ = run_main(["--help"], capsys)
    assert code == 0 and "train" in stdout and "eval" in stdout
    assert subprocess.run([sys.executable, "-m", "trl_mig", "--help"], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------------------- eval
def test_eval_is_100_percent_on_gold_solutions(tmp_path, capsys):
    report = tmp_path / "gold.json"
    code, stdout, stderr = run_main(
        ["eval", "--dataset", "builtin:arithmetic", "--completions_column", "gold_completion", "--splits", "test",
         "ood", "--task_test_size", "30", "--task_ood_size", "20", "--group_by", "num_ops",
         "--output_file", str(report)],
        capsys,
    )
    assert code == 0, stderr
    results = json.loads(report.read_text())["results"]
    for split, n in (("test", 30), ("ood", 20)):
        assert results[split]["num_examples"] == n
        assert results[split]["pass@1"] == 1.0 and results[split]["format_rate"] == 1.0
    from trl_mig.builtin import ArithmeticTaskConfig

    task = ArithmeticTaskConfig()
    assert set(results["ood"]["pass@1_by_group"]) <= {str(n) for n in range(task.ood_min_ops, task.ood_max_ops + 1)}
    assert json.loads(report.read_text())["results"]["test"]["pass@1"] == 1.0
    assert "100.0%" in stdout


def test_eval_is_0_percent_on_wrong_answers(tmp_path, capsys):
    from trl_mig.builtin import generate_splits

    rows = generate_splits(splits=("test",))["test"][:12]
    wrong = tmp_path / "wrong.jsonl"
    with wrong.open("w") as handle:
        for row in rows:
            *head, last = row["solution"].split()
            wrong_answer = " ".join([*head, str(int(last) + 1)])  # one wrong value in the running answer
            bad = row["gold_completion"].replace(f"<answer>{row['solution']}<", f"<answer>{wrong_answer}<")
            handle.write(json.dumps({"prompt": row["prompt"], "solution": row["solution"], "completion": bad}) + "\n")
    report = tmp_path / "wrong.json"
    code, _, stderr = run_main(
        ["eval", "--dataset", str(wrong), "--splits", "train", "--completions_column", "completion", "--answer_match", "exact",
         "--output_file", str(report), "--save_completions", "true"],
        capsys,
    )
    assert code == 0, stderr
    payload = json.loads(report.read_text())
    assert payload["results"]["train"]["pass@1"] == 0.0 and payload["results"]["train"]["format_rate"] == 1.0
    assert len(payload["completions"]["train"]) == 12


def test_eval_generates_with_a_builtin_model(tmp_path, cache_dir, capsys):
    report = tmp_path / "model.json"
    code, stdout, stderr = run_main(
        ["eval", "--model", "builtin:tiny-qwen2", "--dataset", "builtin:arithmetic", "--splits", "test",
         "--builtin_cache_dir", cache_dir, *TINY_BUILTIN, "--max_new_tokens", "16", "--batch_size", "3",
         "--output_file", str(report)],
        capsys,
    )
    assert code == 0, stderr
    result = json.loads(report.read_text())["results"]["test"]
    assert result["num_examples"] == 8 and result["num_completions"] == 8
    assert "eval test" in stderr  # the progress bar


def test_answer_extraction():
    assert extract_gsm8k("Some work.\n#### 1,234") == "1234"
    assert extract_gsm8k("no marker") is None
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$ and") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{\sqrt{x^{2}}}") == r"\sqrt{x^{2}}"
    assert extract_boxed("no box") is None


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--config", "/nonexistent/recipe.yaml"], "does not exist"),
        (["train", "--config", DEMO, "--model_name_or_path", "builtin:tiny-gpt2"], "Unknown built-in model 'builtin:tiny-gpt2'"),
        (["train", "--config", DEMO, "--dataset_name", "builtin:gsm8k"], "Unknown built-in dataset 'builtin:gsm8k'"),
        (["eval", "--model", "builtin:nope", "--dataset", "builtin:arithmetic"], "builtin:tiny-qwen2"),
        (["eval", "--dataset", "builtin:arithmetic", "--splits", "dev", "--completions_column", "gold_completion"],
         "no split 'dev'"),
        (["eval", "--dataset", "builtin:arithmetic", "--completions_column", "answer_text"], "'answer_text'"),
        (["eval", "--dataset", "builtin:arithmetic"], "No model"),
    ],
)
def test_bad_input_gives_a_clear_error(args, expected, capsys, tmp_path):
    code, _, stderr = run_main(args, capsys)
    assert code == 2 and expected in stderr and "Traceback" not in stderr
    assert not (tmp_path / "default-cache").exists()  # failed before building any model


def test_bad_recipes_give_clear_errors(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-4\n")
    code, _, stderr = run_main(["train", "--config", str(broken)], capsys)
    assert code == 2 and "not valid YAML" in stderr
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    code, _, stderr = run_main(["train", "--config", str(listing)], capsys)
    assert code == 2 and "YAML mapping" in stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text((ROOT / "recipes/demo/mig.yaml").read_text() + "\nmig_wieght: 2.0\n")
    code, _, stderr = run_main(["train", "--config", str(unknown)], capsys)
    assert code == 2 and "mig_wieght" in stderr and "Unknown key" in stderr
    unreadable = tmp_path / "folder.yaml"
    unreadable.mkdir()
    code, _, stderr = run_main(["train", "--config", str(unreadable)], capsys)
    assert code == 2 and "cannot be read" in stderr
    bad_value = tmp_path / "bad-value.yaml"
    bad_value.write_text((ROOT / "recipes/demo/mig.yaml").read_text() + "\nmig_scoring_batch_size: 0\n")
    code, _, stderr = run_main(["train", "--config", str(bad_value)], capsys)
    assert code == 2 and "mig_scoring_batch_size" in stderr


def test_missing_dataset_column_is_a_clear_error(tmp_path, capsys):
    model_dir, data = _local_model_and_data(tmp_path)
    code, _, stderr = run_main(
        ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
         str(tmp_path / "o"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"],
        capsys,
    )
    assert code == 2 and "no column 'prompt' (`prompt_column`)" in stderr and "'question'" in stderr
    code, _, stderr = run_main(
        ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--prompt_column", "question",
         "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"],
        capsys,
    )
    assert code == 2 and "no column 'solution' (`answer_column`)" in stderr
    code, _, stderr = run_main(
        ["train", "--config", DEMO, *TINY_BUILTIN, "--dataset_name", str(data), "--dataset_train_split", "training"],
        capsys,
    )
    assert code == 2 and "no split 'training'" in stderr
    assert not (tmp_path / "default-cache").exists()  # the data is checked before any model is built


def test_unknown_command_line_argument_is_a_clear_error(capsys):
    # neither a field nor an accelerate option; and no abbreviation of `--learning_rate` either
    for typo in ("--learnig_rate", "--learning_rat"):
        code, _, stderr = run_main(["train", "--config", DEMO, *TINY_BUILTIN, typo, "1e-4"], capsys)
        assert code == 2 and typo in stderr


def _error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"trl-mig {command}: error: ")]


def test_library_errors_through_a_command_are_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    # a TypeError of the library (trl_mig.rewards reads the ground truth): a solution column of dicts
    data = tmp_path / "dicts.jsonl"
    row = {"prompt": "1+1?", "solution": {"value": 2}, "completion": "<think>### Step 1\n1+1=2</think><answer>2</answer>"}
    data.write_text(json.dumps(row) + "\n")
    args = ["eval", "--dataset", str(data), "--splits", "train", "--completions_column", "completion",
            "--output_file", str(tmp_path / "eval.json")]
    code, _, stderr = run_main(args, capsys)
    assert code == 2 and "Traceback" not in stderr
    [line] = _error_lines(stderr, "eval")
    assert "Column 'solution'" in line and "got dict" in line
    assert not (tmp_path / "eval.json").exists()

    # a ValueError of the library (trl_mig.evaluation), raised after the model is loaded
    model_dir, jsonl = _local_model_and_data(tmp_path)
    sampled = ["eval", "--model", str(model_dir), "--dataset", str(jsonl), "--splits", "train", "--prompt_column",
               "question", "--answer_column", "answer", "--answer_extraction", "gsm8k", "--num_samples", "2",
               "--device", "cpu", "--output_file", str(tmp_path / "sampled.json")]
    code, _, stderr = run_main(sampled, capsys)
    assert code == 2 and "Traceback" not in stderr
    [line] = _error_lines(stderr, "eval")
    assert "num_samples > 1 needs temperature > 0" in line

    # TRL_MIG_DEBUG=1: the same errors propagate, with their traceback
    monkeypatch.setenv("TRL_MIG_DEBUG", "1")
    with pytest.raises(TypeError, match="Column 'solution'"):
        main(args)
    with pytest.raises(ValueError, match="num_samples > 1"):
        main(sampled)
    monkeypatch.setenv("TRL_MIG_DEBUG", "0")  # off again
    assert main(args) == 2


def test_a_recipe_given_as_a_dict_parses_as_its_yaml_file(monkeypatch):
    import dataclasses

    import yaml

    from trl_mig.cli.recipes import parse_recipe_dict, read_recipe

    recipe = read_recipe(DEMO)
    from_file, remaining = parse_recipe_args(make_train_parser(), ["--config", DEMO, "--seed", "7"], "the dataclasses")
    from_dict, remaining_dict = parse_recipe_dict(make_train_parser(), recipe, ["--seed", "7"])
    assert remaining == remaining_dict == []
    def values(parsed):
        return [{f.name: getattr(a, f.name) for f in dataclasses.fields(a)} for a in parsed]

    assert values(from_dict) == values(from_file)
    assert from_dict[2].seed == 7 and from_dict[2].learning_rate == recipe["learning_rate"]
    assert recipe == yaml.safe_load(Path(DEMO).read_text())  # the caller's mapping is left as it was

    # `env:` is set in os.environ before the fields are parsed, as TrlParser does for a YAML file
    monkeypatch.delenv("TRL_MIG_TEST_VARIABLE", raising=False)
    parse_recipe_dict(make_train_parser(), {**recipe, "env": {"TRL_MIG_TEST_VARIABLE": 3}})
    assert os.environ["TRL_MIG_TEST_VARIABLE"] == "3"
    monkeypatch.delenv("TRL_MIG_TEST_VARIABLE")

    # the messages of a recipe file, naming the recipe as the caller does
    with pytest.raises(CLIError, match=r"Unknown key\(s\) in the run's recipe: \['mig_wieght'\]"):
        parse_recipe_dict(make_train_parser(), {**recipe, "mig_wieght": 2.0}, source="the run's recipe")
    with pytest.raises(CLIError, match="mig_scoring_batch_size"):
        parse_recipe_dict(make_train_parser(), {**recipe, "mig_scoring_batch_size": 0})
    with pytest.raises(CLIError, match="`env` in the recipe must be a mapping"):
        parse_recipe_dict(make_train_parser(), {**recipe, "env": ["A=1"]})
    with pytest.raises(CLIError, match="must be a mapping of field: value, got list"):
        parse_recipe_dict(make_train_parser(), ["learning_rate", 1e-4])


def test_dotted_reward_functions_are_found_in_the_working_directory_without_changing_sys_path(tmp_path):
    from trl_mig import MIGConfig, answer_accuracy_reward, step_format_reward
    from trl_mig.cli.train import build_reward_funcs

    # tmp_path is the working directory (the autouse fixture): a module and a package with a relative import
    (tmp_path / "my_rewards_mod.py").write_text("def length_reward(completions, **kwargs):\n"
                                                "    return [float(len(c)) for c in completions]\n")
    package = tmp_path / "my_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text("BONUS = 2.0\n")
    (package / "scores.py").write_text("from .common import BONUS\n\ndef bonus(completions, **kwargs):\n"
                                       "    return [BONUS] * len(completions)\n")
    (tmp_path / "broken_rewards_mod.py").write_text("import a_module_that_is_not_installed\n")
    args = MIGConfig(output_dir=str(tmp_path / "out"), answer_pattern=r"ANSWER: (\S+)", report_to="none", use_cpu=True,
                     bf16=False)
    path_before = list(sys.path)
    try:
        length, bonus, accuracy, fmt = build_reward_funcs(
            ["my_rewards_mod.length_reward", "my_rewards_pkg.scores.bonus", "trl_mig.answer_accuracy_reward",
             "trl_mig.rewards.step_format_reward"], args, "answer",
        )
        assert sys.path == path_before
        assert length(["ab", "abcd"]) == [2.0, 4.0] and bonus(["x"]) == [2.0]
        # the library's default-format rewards are built from the recipe's format and column instead
        assert accuracy is not answer_accuracy_reward and fmt is not step_format_reward
        text = "<think>### Step 1\n2+3=5</think>ANSWER: 5"
        assert accuracy([text], answer=["5"]) == [1.0] and answer_accuracy_reward([text], solution=["5"]) == [0.0]
        assert fmt([text]) == [1.0] and step_format_reward([text]) == [0.0]

        with pytest.raises(CLIError, match="cannot import 'no_such_rewards_mod.f'.*no_such_rewards_mod"):
            build_reward_funcs(["no_such_rewards_mod.f"], args, "answer")
        with pytest.raises(CLIError, match="a_module_that_is_not_installed"):  # the module's own failing import
            build_reward_funcs(["broken_rewards_mod.f"], args, "answer")
        assert "broken_rewards_mod" not in sys.modules
        with pytest.raises(CLIError, match="'my_rewards_mod' has no 'missing'"):
            build_reward_funcs(["my_rewards_mod.missing"], args, "answer")
        assert sys.path == path_before
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in ("my_rewards_mod", "my_rewards_pkg")]:
            del sys.modules[name]


def test_keep_freed_memory_takes_effect_with_glibc():
    import ctypes
    import platform

    from trl_mig.cli.cpu import keep_freed_memory

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        assert keep_freed_memory() is False
        return

    class MallInfo(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo
    assert keep_freed_memory() is True
    before = libc.mallinfo2()
    big = torch.empty(64 * 2**20, dtype=torch.uint8)  # above glibc's largest mmap threshold
    during = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # served from the heap, not by mmap
    assert during.uordblks >= before.uordblks + 64 * 2**20
    del big
    assert libc.mallinfo2().arena == during.arena  # freed, and kept for the next pass
