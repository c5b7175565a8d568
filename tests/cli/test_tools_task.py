"""The built-in tool task (builtin:tools): problems and worked tool conversations, the tool-calling char tokenizer
(TRL renders and parses its calls), the warm start, MIG training through TRL's tool loop, and the CLI recipe path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_mig.builtin import BuiltinArguments, check_answer_match, load_builtin_dataset
from trl_mig.builtin.tools import (
    TOOLS,
    ToolTaskConfig,
    calculator,
    conversation_ids,
    generate_tool_splits,
    parse_expression,
    tool_conversation,
    tool_prompt,
    tool_response_ids,
)
from trl_mig.builtin.tiny import build_tool_char_tokenizer

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "tools.yaml")
SMALL = ToolTaskConfig(train_size=60, validation_size=20, test_size=20, ood_size=10)
# a tiny model and a short warm start: enough to learn the call format, shared by the training tests
TINY = dict(tiny_hidden_size=64, tiny_num_layers=2, tools_warmstart_max_steps=60, tools_warmstart_batch_size=8,
            tools_warmstart_learning_rate=5e-3, tools_warmstart_skip_rate=0.0, warmstart_min_ops=2, warmstart_max_ops=4,
            tools_warmstart_base="scratch")
TINY_TASK = dict(task_train_size=32, task_validation_size=4, task_test_size=4, task_ood_size=2)


@pytest.fixture(scope="module")
def tool_tokenizer():
    return build_tool_char_tokenizer()


def test_calculator_computes_one_operation_and_names_bad_input():
    assert calculator("47+38") == "85" and calculator(" 85 * 6 ") == "510" and calculator("510-91") == "419"
    assert calculator("3-5") == "-2"
    with pytest.raises(ValueError, match=r"two integers joined by \+, - or \*.*'47\+'"):
        calculator("47+")
    with pytest.raises(ValueError, match="at most 12 digits"):
        calculator("1" * 13 + "+1")


def test_splits_are_deterministic_disjoint_and_answers_are_the_running_results():
    first, again = generate_tool_splits(SMALL), generate_tool_splits(SMALL)
    assert first == again
    assert {name: len(rows) for name, rows in first.items()} == {"train": 60, "validation": 20, "test": 20, "ood": 10}
    expressions = {name: {row["expression"] for row in rows} for name, rows in first.items()}
    assert not expressions["train"] & expressions["test"] and not expressions["train"] & expressions["validation"]
    assert {row["num_ops"] for row in first["train"]} <= {2, 3, 4} and min(r["num_ops"] for r in first["ood"]) >= 5
    for row in first["train"] + first["ood"]:
        # the answer, recomputed with the calculator from the prompt's expression read left to right
        problem = parse_expression(row["expression"])
        value, results = problem.start, []
        for op, operand in problem.ops:
            value = int(calculator(f"{value}{op}{operand}"))
            results.append(str(value))
        assert row["solution"] == " ".join(results) and row["expression"] in row["prompt"][0]["content"]
        assert all(0 <= int(r) <= SMALL.max_value for r in results)
    # numbers beyond what the tiny model can compute: many intermediate results have two digits
    values = [int(v) for row in first["train"] for v in row["solution"].split()]
    assert sum(v >= 10 for v in values) > len(values) / 4


def test_builtin_tools_dataset_and_answer_match():
    args = BuiltinArguments(task_train_size=6, task_validation_size=2, task_test_size=3, task_ood_size=2)
    data = load_builtin_dataset("builtin:tools", args)
    assert {name: len(split) for name, split in data.items()} == {"train": 6, "validation": 2, "test": 3, "ood": 2}
    assert data["train"][0]["prompt"][0]["role"] == "user"
    assert check_answer_match("builtin:tools", args, None, "answer_match") == "exact"
    with pytest.raises(ValueError, match="running answers of builtin:tools"):
        check_answer_match("builtin:tools", args, "math", "answer_match")
    with pytest.raises(ValueError, match="max_value"):
        ToolTaskConfig(max_operand=60)


def test_chat_template_renders_tools_calls_and_results_and_trl_parses_the_calls(tool_tokenizer):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    assert supports_tool_calling(tool_tokenizer) and is_chat_template_prefix_preserving(tool_tokenizer)
    problem = parse_expression("((47+38)*6)-91")
    rendered = tool_tokenizer.apply_chat_template(
        tool_prompt(problem) + tool_conversation(problem), tools=list(TOOLS), tokenize=False
    )
    assert rendered.startswith("<|system|>Tools: calculator(expression)\n<|user|>Compute ((47+38)*6)-91.\n")
    first_call = "<tool_call>calculator\nexpression=47+38\n</tool_call><eos>"
    assert f"<|assistant|><think>### Step 1\n{first_call}<|tool|>85\n<|assistant|>### Step 2\n" in rendered
    assert rendered.endswith("<|assistant|></think>\n<answer>85 510 419</answer><eos>")
    # a generated turn, as ids, parses into a calculator call whose arguments run the tool
    prompt_ids = tool_tokenizer.apply_chat_template(
        tool_prompt(problem), tools=list(TOOLS), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    turn = tool_tokenizer("<think>### Step 1\n<tool_call>calculator\nexpression=47+38\n</tool_call><eos>",
                          add_special_tokens=False)["input_ids"]
    parsed = parse_response(tool_tokenizer, turn, prefix=prompt_ids, tools=list(TOOLS))
    assert parsed["tool_calls"] == [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "47+38"}}}
    ]
    assert calculator(**parsed["tool_calls"][0]["function"]["arguments"]) == "85"
    answer = tool_tokenizer("</think>\n<answer>85 510 419</answer><eos>", add_special_tokens=False)["input_ids"]
    parsed = parse_response(tool_tokenizer, answer, prefix=prompt_ids, tools=list(TOOLS))
    assert "tool_calls" not in parsed and parsed["content"] == "</think>\n<answer>85 510 419</answer>"
    # what the tool loop appends after a call: the result and the next generation prompt
    suffix = tool_response_ids(tool_tokenizer, [{"role": "tool", "name": "calculator", "content": "85"}])
    assert tool_tokenizer.decode(suffix) == "<|tool|>85\n<|assistant|>"


def test_plain_char_tokenizer_is_unchanged(tool_tokenizer):
    """The arithmetic task's tokenizer keeps its ids and template (its cached warm starts stay valid)."""
    from trl_mig.builtin.model import WARMSTART_VERSION
    from trl_mig.builtin.tiny import CHAT_TEMPLATE, TOOL_TOKENS, build_char_tokenizer

    plain = build_char_tokenizer()
    assert plain.chat_template == CHAT_TEMPLATE and WARMSTART_VERSION == 3
    assert len(tool_tokenizer) == len(plain) + len(TOOL_TOKENS)
    assert {token: plain.convert_tokens_to_ids(token) for token in plain.get_vocab()} == {
        token: tool_tokenizer.convert_tokens_to_ids(token) for token in plain.get_vocab()
    }


def test_warm_start_rows_train_the_assistant_turns_only(tool_tokenizer):
    from trl_mig.builtin.tools import tool_sft_rows

    problem = parse_expression("((47+38)*6)-91")
    messages = tool_conversation(problem, skipped=(False, True, False))
    input_ids, labels = conversation_ids(tool_tokenizer, tool_prompt(problem), messages)
    full = tool_tokenizer.apply_chat_template(tool_prompt(problem) + messages, tools=list(TOOLS), tokenize=False)
    assert tool_tokenizer.decode(input_ids) == full  # the same ids as the rendered conversation
    trained = tool_tokenizer.decode([i for i, label in zip(input_ids, labels) if label != -100])
    assert trained == (
        "<think>### Step 1\n<tool_call>calculator\nexpression=47+38\n</tool_call><eos>"
        "### Step 2\n85*6=510\n### Step 3\n<tool_call>calculator\nexpression=510-91\n</tool_call><eos>"
        "</think>\n<answer>85 510 419</answer><eos>"
    )
    assert "<|tool|>" not in trained and "Compute" not in trained
    rows = tool_sft_rows(SMALL, tool_tokenizer, 20, seed=1, skip_rate=0.5)
    assert rows == tool_sft_rows(SMALL, tool_tokenizer, 20, seed=1, skip_rate=0.5)  # deterministic
    texts = [tool_tokenizer.decode(row["input_ids"]) for row in rows]
    splits = generate_tool_splits(SMALL)
    held_out = {row["expression"] for split in ("validation", "test", "ood") for row in splits[split]}
    assert not any(f"Compute {expression}." in text for text in texts for expression in held_out)
    assert any("=" in text.split("<tool_call>")[0].split("### Step 1\n")[1] for text in texts)  # a skipped step
    with pytest.raises(ValueError, match="tools_warmstart_skip_rate"):
        tool_sft_rows(SMALL, tool_tokenizer, 1, seed=0, skip_rate=1.5)


def test_tool_warm_start_from_the_arithmetic_warm_start(tmp_path):
    """The default base: the cached arithmetic model of the same shape, its char ids kept and the tool tokens added."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_mig.builtin import resolve_builtin_model
    from trl_mig.builtin.model import METADATA_FILE

    args = BuiltinArguments(builtin_cache_dir=str(tmp_path), tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2,
                            tiny_num_kv_heads=1, warmstart_max_steps=2, warmstart_batch_size=2,
                            tools_warmstart_max_steps=0, **TINY_TASK)
    path = resolve_builtin_model("builtin:tiny-qwen2-tools", args, use_cpu=True)
    base = json.loads((Path(path) / METADATA_FILE).read_text())["base"]
    assert base.startswith("tiny-qwen2-") and (tmp_path / base / METADATA_FILE).is_file()
    tools_model = AutoModelForCausalLM.from_pretrained(path)
    arithmetic_model = AutoModelForCausalLM.from_pretrained(tmp_path / base)
    old, new = arithmetic_model.get_input_embeddings().weight, tools_model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 3 and torch.equal(new[: old.shape[0]], old)
    with pytest.raises(ValueError, match="tools_warmstart_base='zero'"):
        BuiltinArguments(tools_warmstart_base="zero").tools_warmstart_config()


@pytest.fixture(scope="module")
def tiny_tool_model(tmp_path_factory):
    """A tiny tool model warm-started for 60 steps (a few seconds): it writes calls, often malformed or wrong."""
    from trl_mig.builtin import resolve_builtin_model

    args = BuiltinArguments(builtin_cache_dir=str(tmp_path_factory.mktemp("cache")), **TINY, **TINY_TASK)
    return resolve_builtin_model("builtin:tiny-qwen2-tools", args, use_cpu=True), args


def test_mig_training_calls_the_tool_and_changes_the_model(tiny_tool_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import cpu_config
    from trl_mig import MIGGRPOTrainer
    from trl_mig.rewards import AnswerAccuracyReward
    from trl_mig.segmentation import FormatSpec

    path, args = tiny_tool_model
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.response_template is not None  # saved with the tokenizer, so TRL can parse calls after a reload
    model = AutoModelForCausalLM.from_pretrained(path)
    train = load_builtin_dataset("builtin:tools", args)["train"]
    trainer = MIGGRPOTrainer(
        model,
        reward_funcs=[AnswerAccuracyReward(FormatSpec(answer_match="exact"))],
        args=cpu_config(tmp_path, max_completion_length=160, max_tool_calling_iterations=4, answer_match="exact",
                        mig_scaffold="</think>\n<answer>", learning_rate=1e-3, temperature=1.0),
        train_dataset=train,
        processing_class=tokenizer,
        tools=list(TOOLS),
    )
    # the tool loop appends results exactly as the warm start rendered them
    message = [{"role": "tool", "name": "calculator", "content": "85"}]
    assert trainer._get_tool_suffix_ids(message) == tool_response_ids(tokenizer, message)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "tools/call_frequency" in entry]
    assert len(logged) == 2 and all(entry["tools/call_frequency"] > 0 for entry in logged)
    # MIG scored the multi-turn completions (steps found across the turns, every row with its ground truth)
    assert all(entry["mig/unscorable_frac"] == 0 and entry["mig/steps"] > 0 for entry in logged)
    # every call answered by a result is a step of its own (turn steps); TRL also counts a call it left unanswered
    # when the completion reached its length limit
    for entry in logged:
        assert 0 < entry["tools/mig_call_steps"] <= entry["tools/call_frequency"]
        assert entry["mig/steps"] >= entry["tools/mig_call_steps"]


def test_train_tools_recipe_end_to_end(tiny_tool_model, tmp_path, monkeypatch, capsys):
    """`trl-mig train --config recipes/demo/tools.yaml`, shrunk: the tools reach the trainer, and held-out accuracy
    and tool use are measured with tool rollouts before and after training."""
    from trl_mig.cli.main import main

    _, args = tiny_tool_model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    overrides = [item for key, value in {**TINY, **TINY_TASK}.items() for item in (f"--{key}", str(value))]
    code = main([
        "train", "--config", RECIPE, "--output_dir", str(out), "--builtin_cache_dir", args.builtin_cache_dir,
        *overrides, "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
        "--max_completion_length", "160", "--accuracy_eval_max_new_tokens", "160", "--logging_steps", "1",
    ])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "warm-starting" not in stdout  # the fixture's cached model: the recipe's settings give the same key
    assert "tool calls per problem" in stdout
    summary = json.loads((out / "accuracy.json").read_text())
    for phase in ("before", "after"):
        assert set(summary["accuracy"][phase]) == {"test", "ood"}
        test = summary["accuracy"][phase]["test"]
        assert test["num_examples"] == 4 and test["tool_calls_per_problem"] > 0 and 0 <= test["pass@1"] <= 1
    completions = json.loads((out / "accuracy_completions.json").read_text())["test"]
    assert all("<|tool|>" in record["completion"] for record in completions if record["tool_calls"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any(entry.get("tools/call_frequency", 0) > 0 for entry in history)


def test_tools_recipe_rejects_the_callback_and_a_model_without_tool_template(tmp_path, monkeypatch, capsys):
    from trl_mig.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "cache"))
    code = main(["train", "--config", RECIPE, "--accuracy_eval_steps", "5"])
    assert code != 0 and "accuracy_eval_steps" in capsys.readouterr().err
    code = main([
        "train", "--config", RECIPE, "--model_name_or_path", "builtin:tiny-qwen2-scratch", "--tiny_hidden_size", "32",
        "--tiny_num_layers", "1", "--task_train_size", "8", "--task_test_size", "2", "--task_ood_size", "2",
        "--task_validation_size", "2",
    ])
    assert code != 0 and "builtin:tiny-qwen2-tools" in capsys.readouterr().err


def test_eval_cli_runs_tool_rollouts(tiny_tool_model, tmp_path, monkeypatch, capsys):
    """`trl-mig eval --dataset builtin:tools` evaluates with the calculator, as training does."""
    from trl_mig.cli.main import main

    path, _ = tiny_tool_model
    monkeypatch.chdir(tmp_path)
    sizes = [item for key, value in TINY_TASK.items() for item in (f"--{key}", str(value))]
    args = ["eval", "--model", path, "--dataset", "builtin:tools", "--splits", "test", "--max_new_tokens", "160",
            "--output_file", str(tmp_path / "eval.json"), *sizes]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval.json").read_text())["results"]["test"]
    assert results["num_examples"] == 4 and results["tool_calls_per_problem"] > 0
    assert "pass@1 by num_ops" in capsys.readouterr().out
    assert main([*args, "--num_samples", "2", "--temperature", "1.0"]) != 0
    assert "one tool rollout per problem" in capsys.readouterr().err
