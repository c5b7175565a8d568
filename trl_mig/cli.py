"""The `trl-mig` command line (also `python -m trl_mig`).

    trl-mig train --config RECIPE.yaml [--field value ...]     MIG (or plain GRPO) training from a YAML recipe
    trl-mig eval --model PATH --dataset NAME [--splits test]   pass@1 and format rate, table + JSON
    trl-mig inspect --model PATH --dataset NAME --index 3      per-step MIG credit of a prompt's completions
    trl-mig builtins                                           the `builtin:` datasets and models
    trl-mig accelerate-config NAME                             path of a TRL-packaged accelerate config

`train` parses the recipe with TRL's `TrlParser` into (script arguments, built-in arguments, `MIGConfig`, TRL
`ModelConfig`, TRL `DatasetMixtureConfig`); command-line flags override the YAML. It runs as is under
`accelerate launch -m trl_mig train ...`; given `accelerate launch` options instead (`--accelerate_config zero3`,
`--num_processes 8`, ...), it relaunches itself through `accelerate launch`, like `trl grpo` does.

This module holds the argument dataclasses, the parsers and the commands; the work is done in `trl_mig.train`
(training), `trl_mig.data` (datasets), `trl_mig.evaluation` (accuracy) and `trl_mig.launch` (accelerate).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .builtin import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    TOOL_TASK_DATASETS,
    BuiltinArguments,
    check_answer_match,
    is_builtin,
)
from .config import MIGConfig
from .data import IMAGE_COLUMNS, DataArguments, get_split, load_dataset_dict, prepare_dataset, select_samples
from .errors import CLIError
from .evaluation import evaluate_splits, format_cell, format_table, score_completions, summarize, write_json
from .launch import (
    accelerate_config_names,
    inside_launcher,
    relaunch_with_accelerate,
    remove_subsequence,
    resolve_accelerate_config,
)
from .tokenizer_utils import load_generic_tokenizer
from .train import ALGORITHMS, run_training


# ------------------------------------------------------------------------------------------------------ arguments
@dataclass
class MIGScriptArguments(ScriptArguments, DataArguments):
    """Script arguments of `trl-mig train`: TRL's `ScriptArguments` (dataset_name, splits...) plus the fields below."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, by name: 'answer_accuracy', 'step_format' (trl-mig, answer in tags), "
            "'accuracy_reward', 'reasoning_accuracy_reward', 'think_format_reward' (TRL, \\boxed answers), or a "
            "dotted import path. Default: answer_accuracy + step_format. Weights: `reward_weights`."
        },
    )
    algorithm: str = field(
        default="mig",
        metadata={
            "help": "'mig' trains with MIGGRPOTrainer; 'grpo' with TRL's plain GRPOTrainer and the same settings "
            "(the MIG fields are then unused): a baseline twin.",
            "choices": list(ALGORITHMS),
        },
    )
    accuracy_eval_splits: list[str] | None = field(
        default=None,
        metadata={
            "help": "Dataset splits on which greedy pass@1 and format rate are measured before and after training "
            "(printed, and written to OUTPUT_DIR/accuracy.json). Default: none."
        },
    )
    accuracy_eval_before: bool = field(
        default=True, metadata={"help": "Also measure `accuracy_eval_splits` before training."}
    )
    accuracy_eval_max_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many examples of each accuracy split."}
    )
    accuracy_eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also measure `accuracy_eval_splits` every this many steps while training (HeldOutAccuracyCallback): "
            "logged as heldout/<split>/pass@1 (and format_rate, sampled_accuracy) in trainer_state.json and report_to."
        },
    )
    accuracy_eval_num_samples: int = field(
        default=0,
        metadata={"help": "With accuracy_eval_steps: also the mean accuracy of this many sampled completions per prompt."},
    )
    accuracy_eval_temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature of that sampled accuracy. Default: `temperature`."}
    )
    accuracy_eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch (per rank)."})
    accuracy_eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation length of the accuracy eval. Default: max_completion_length."}
    )
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "When training on CPU (Linux, glibc): malloc keeps freed memory for reuse instead of unmapping "
            "blocks over 32 MB after every pass (measured 1.5-1.7x faster GRPO/MIG steps on 2 cores; resident memory "
            "then stays at its peak). No effect on GPU runs."
        },
    )
    save_rank_logs: bool = field(
        default=False,
        metadata={
            "help": "Every rank writes OUTPUT_DIR/rank_logs/rank<R>.json (rank, world size, host, pid, log "
            "history): shows which processes ran and that they logged the same metrics."
        },
    )


@dataclass
class EvalArguments(DataArguments):
    """Arguments of `trl-mig eval`."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model: a hub id, a local folder (full model or PEFT adapter) or a builtin: name."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Dataset: a hub id, a local file (.jsonl/.json/.csv/.parquet) or folder, or a builtin: name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    splits: list[str] = field(default_factory=lambda: ["test"], metadata={"help": "Splits to evaluate."})
    completions_column: str | None = field(
        default=None,
        metadata={"help": "Score the completions in this dataset column instead of generating (no model needed)."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples per split."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum generated tokens per completion."})
    num_samples: int = field(
        default=1, metadata={"help": "Completions per prompt; pass@1 is their mean accuracy (needs temperature > 0)."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (with temperature > 0)."})
    think_open_tag: str = field(default="<think>", metadata={"help": "Tag that opens the chain of thought."})
    think_close_tag: str = field(default="</think>", metadata={"help": "Tag that closes the chain of thought."})
    step_pattern: str = field(default=r"#+[ \t]*Step[ \t]*\d+", metadata={"help": "Regex of a step header."})
    answer_pattern: str = field(
        default=r"<answer>(.*?)</answer>", metadata={"help": "Regex whose first group is the final answer."}
    )
    answer_match: str | None = field(
        default=None,
        metadata={
            "help": "How answers are compared with the ground truth: 'math' (math-verify) or 'exact' (text up to "
            "whitespace). Default: exact for builtin:arithmetic's running answers, else math.",
            "choices": ["math", "exact"],
        },
    )
    group_by: str | None = field(
        default=None, metadata={"help": "Also report pass@1 per value of this column (e.g. num_ops)."}
    )
    output_file: str = field(default="trl-mig-eval.json", metadata={"help": "Where the JSON results are written."})
    save_completions: bool = field(default=False, metadata={"help": "Also write every completion to the JSON."})
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the model weights.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    device: str | None = field(default=None, metadata={"help": "Device ('cpu', 'cuda', ...). Default: cuda if any."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (temperature > 0)."})


TRAIN_DATACLASSES = (MIGScriptArguments, BuiltinArguments, MIGConfig, ModelConfig, DatasetMixtureConfig)
EVAL_DATACLASSES = (EvalArguments, BuiltinArguments)


def make_train_parser(prog: str = "trl-mig train") -> TrlParser:
    # no abbreviations: `--learning_rat` must be an error, not `--learning_rate`
    return TrlParser(TRAIN_DATACLASSES, prog=prog, allow_abbrev=False)


def make_eval_parser(prog: str = "trl-mig eval") -> TrlParser:
    return TrlParser(EVAL_DATACLASSES, prog=prog, allow_abbrev=False)


def read_recipe(path: str) -> dict:
    """The YAML mapping of a recipe, or a `CLIError` saying why it cannot be read."""
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise CLIError(f"Recipe {path!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"Recipe {path!r} cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise CLIError(f"Recipe {path!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise CLIError(f"Recipe {path!r} must be a YAML mapping of field: value, got {type(data).__name__}.")
    return data


def parse_recipe_args(parser: TrlParser, argv: list[str], dataclass_names: str):
    """
    Parse `argv` (with an optional `--config RECIPE.yaml`) into the parser's dataclasses.

    Returns `(parsed, cli_remaining)`: the dataclass instances and the command-line strings no dataclass knows (the
    caller decides whether they are `accelerate launch` options). Unknown recipe keys are an error.
    """
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise CLIError("--config needs the path of a YAML recipe.")
        read_recipe(argv[index + 1])
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as err:  # a field's own validation (MIGConfig, GRPOConfig, TrainingArguments...)
        raise CLIError(str(err)) from err
    if config_remaining:
        keys = [item[2:] for item in config_remaining[::2]]
        raise CLIError(
            f"Unknown key(s) in recipe {argv[argv.index('--config') + 1]!r}: {keys}. They are not fields of "
            f"{dataclass_names}; check the spelling (see `{parser.prog} --help`)."
        )
    return parsed, cli_remaining


# ---------------------------------------------------------------------------------------------------------- train
def train_command(argv: list[str]) -> int:
    parser = make_train_parser()
    names = "MIGScriptArguments, BuiltinArguments, MIGConfig, ModelConfig or DatasetMixtureConfig"
    (script_args, builtin_args, training_args, model_args, mixture_args), cli_remaining = parse_recipe_args(
        parser, argv, names
    )
    if cli_remaining:
        if inside_launcher():
            raise CLIError(f"Unknown argument(s) {cli_remaining}: not fields of {names}.")
        return relaunch_with_accelerate(cli_remaining, remove_subsequence(argv, cli_remaining))
    _apply_thread_count()
    return run_training(script_args, builtin_args, training_args, model_args, mixture_args)


def _apply_thread_count() -> None:
    """A recipe's `env: {OMP_NUM_THREADS: n}` is set after torch has sized its thread pool: resize it to match."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


# ----------------------------------------------------------------------------------------------------------- eval
def eval_command(argv: list[str]) -> int:
    (args, builtin_args), cli_remaining = parse_recipe_args(make_eval_parser(), argv, "EvalArguments or BuiltinArguments")
    if cli_remaining:
        raise CLIError(f"Unknown argument(s) {cli_remaining} (see `trl-mig eval --help`).")
    run_eval(args, builtin_args)
    return 0


def warn_on_prompt_mismatch(dataset: str, model_path, builtin_args: BuiltinArguments) -> None:
    """Warn when a built-in arithmetic model is evaluated on prompts of another `task_prompt` than it learnt."""
    from .builtin.model import trained_task_prompt

    if dataset != BUILTIN_PREFIX + "arithmetic" or not model_path:
        return
    trained = trained_task_prompt(model_path)
    if trained is not None and trained != builtin_args.task_prompt:
        print(
            f"[trl-mig] warning: {model_path} was warm-started on task_prompt={trained!r} prompts, and this eval "
            f"asks task_prompt={builtin_args.task_prompt!r} ones; pass --task_prompt {trained} to evaluate it on "
            "the prompts it learnt.",
            file=sys.stderr,
        )


def run_eval(args: EvalArguments, builtin_args: BuiltinArguments | None = None) -> dict:
    """
    `trl-mig eval`: score `args.completions_column`, or generate with `args.model`, on each split; print the table,
    write `args.output_file` and return its payload.
    """
    from .segmentation import FormatSpec

    builtin_args = builtin_args or BuiltinArguments()
    started = time.perf_counter()
    data = load_dataset_dict(args.dataset, args.dataset_config, builtin_args, where="--dataset")
    solution_column = "solution"
    splits = {}
    for split in args.splits:
        dataset = get_split(data, split, args.dataset, "--splits")
        if args.completions_column is not None and args.completions_column not in dataset.column_names:
            raise CLIError(
                f"Split {split!r} of {args.dataset!r} has no column {args.completions_column!r} "
                f"(`--completions_column`); its columns are {dataset.column_names}."
            )
        if args.group_by is not None and args.group_by not in dataset.column_names:
            raise CLIError(
                f"Split {split!r} of {args.dataset!r} has no column {args.group_by!r} (`--group_by`); its columns "
                f"are {dataset.column_names}."
            )
        dataset = prepare_dataset(dataset, args, solution_column, f"split {split!r} of {args.dataset!r}")
        if args.completions_column is None and set(IMAGE_COLUMNS) & set(dataset.column_names):
            raise CLIError(
                f"Split {split!r} of {args.dataset!r} has images: `trl-mig eval` generates from text prompts only. "
                "Score saved completions with --completions_column, or evaluate the VLM with your own harness."
            )
        splits[split] = select_samples(dataset, args.max_samples)
    try:
        spec = FormatSpec(
            think_open_tag=args.think_open_tag,
            think_close_tag=args.think_close_tag,
            step_pattern=args.step_pattern,
            answer_pattern=args.answer_pattern,
            answer_match=check_answer_match(args.dataset, builtin_args, args.answer_match, "--answer_match"),
        )
        spec.answer_regex, spec.step_regex  # noqa: B018 - compile now: a bad regex is an input error
    except ValueError as err:
        raise CLIError(str(err)) from None
    except Exception as err:
        raise CLIError(f"Invalid format pattern: {err}") from None

    if args.completions_column is not None:
        results, completions = {}, {}
        for name, dataset in splits.items():
            texts = dataset[args.completions_column]
            correct, formatted = score_completions(texts, dataset[solution_column], spec, solution_column)
            groups = dataset[args.group_by] if args.group_by else None
            results[name] = summarize(correct, formatted, groups)
            completions[name] = [
                {"index": i, "completion": c, "solution": s, "correct": ok, "well_formed": bool(f)}
                for i, (c, s, ok, f) in enumerate(zip(texts, dataset[solution_column], correct, formatted))
            ]
        model_path = None
    else:
        if not args.model:
            raise CLIError("No model: pass --model (a hub id, a local folder or a builtin: name), or "
                           "--completions_column to score a dataset column.")
        model, tokenizer, model_path = load_model_for_eval(args, builtin_args)
        warn_on_prompt_mismatch(args.dataset, model_path, builtin_args)
        if args.dataset in TOOL_TASK_DATASETS:  # solved with its calculator: tool rollouts, as in training
            results, completions = evaluate_with_tools(args, model, tokenizer, splits, spec)
        else:
            results, completions = evaluate_splits(
                model, tokenizer, splits, spec=spec, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                solution_column=solution_column, num_samples=args.num_samples, temperature=args.temperature,
                top_p=args.top_p, group_by=args.group_by, label="eval",
            )
    payload = {
        "model": args.model,
        "model_path": model_path,
        "dataset": args.dataset,
        "completions_column": args.completions_column,
        "decoding": "greedy" if args.temperature <= 0 else f"sampling (T={args.temperature}, top_p={args.top_p})",
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.save_completions:
        payload["completions"] = completions
    header = ["split", "n", "pass@1", "format rate"]
    rows = [[name, r["num_examples"], r["pass@1"], r["format_rate"]] for name, r in results.items()]
    print(format_table(header, rows))
    for name, r in results.items():
        if "pass@1_by_group" in r:
            print(f"  {name} pass@1 by {args.group_by or 'num_ops'}: "
                  + ", ".join(f"{k}: {format_cell(v)}" for k, v in r["pass@1_by_group"].items()))
    write_json(args.output_file, payload)
    print(f"[trl-mig] results written to {args.output_file}")
    return payload


def evaluate_with_tools(args: EvalArguments, model, tokenizer, splits: dict, spec) -> tuple[dict, dict]:
    """`trl-mig eval` on a built-in tool task: one tool rollout per problem (greedy, or sampled at --temperature),
    `--max_new_tokens` tokens in all (turns and tool results), pass@1 per num_ops and the tool-use metrics."""
    from .builtin.tools import evaluate_tool_task

    if args.num_samples != 1:
        raise CLIError(
            f"--num_samples={args.num_samples}: {args.dataset} is evaluated with one tool rollout per problem."
        )
    results, completions = {}, {}
    for name, dataset in splits.items():
        results[name], completions[name] = evaluate_tool_task(
            model, tokenizer, dataset, spec=spec, max_completion_length=args.max_new_tokens,
            batch_size=args.batch_size, temperature=args.temperature,
        )
    return results, completions


def load_model_for_eval(args: EvalArguments, builtin_args: BuiltinArguments):
    """`(model on its device, tokenizer, path)` for `--model`: a hub id, a local folder (a full model or a PEFT
    adapter on its base) or a `builtin:` name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_builtin(path):
        from .builtin import resolve_builtin_model

        try:
            path = resolve_builtin_model(path, builtin_args, use_cpu=device == "cpu", field_name="--model")
        except ValueError as err:
            raise CLIError(str(err)) from None
    _refuse_vision_language_model(path, args.model)
    kwargs = dict(dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = load_generic_tokenizer(path) or AutoTokenizer.from_pretrained(
            path, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise CLIError(f"Could not load the model {args.model!r} (`--model`): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.temperature > 0:
        torch.manual_seed(args.seed)
    return model.to(device), tokenizer, path


def _refuse_vision_language_model(path: str, name: str) -> None:
    """A local vision-language model is a clear error here: eval and inspect generate and score from text only."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file) as f:
        config = json.load(f)
    if "vision_config" in config:
        raise CLIError(
            f"{name!r} is a vision-language model ({config.get('model_type')}): `trl-mig eval` and `trl-mig inspect` "
            "generate and score from text prompts only, without images. `trl-mig train` trains it on image prompts "
            "(docs/vision.md)."
        )


# ----------------------------------------------------------------------------------------------------------- main
def builtins_command(argv: list[str]) -> int:
    print("Built-in datasets (dataset_name / --dataset):")
    for name, text in BUILTIN_DATASETS.items():
        print(f"  {BUILTIN_PREFIX}{name:<22} {text}")
    print("Built-in models (model_name_or_path / --model):")
    for name, text in BUILTIN_MODELS.items():
        print(f"  {BUILTIN_PREFIX}{name:<22} {text}")
    from .builtin import default_cache_dir

    print(f"Cache of built-in models: {default_cache_dir()} (builtin_cache_dir / $TRL_MIG_CACHE)")
    return 0


def accelerate_config_command(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: trl-mig accelerate-config NAME   (NAME: {', '.join(accelerate_config_names())})")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    resolved = resolve_accelerate_config(["--accelerate_config", argv[0]])
    print(resolved[1])
    return 0


def inspect_command(argv: list[str]) -> int:
    from .inspect_cli import inspect_command as run

    return run(argv)


def study_command(argv: list[str]) -> int:
    import argparse

    from .study import StudyConfig, run_study

    parser = argparse.ArgumentParser(
        prog="trl-mig study",
        description="Run a study (arms x sweep settings x seeds of `trl-mig train`), skipping finished runs, and write "
        "study.json, study.md and the plots.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="Study YAML (see recipes/study/).")
    parser.add_argument("--output_dir", help="Override the study's output folder.")
    parser.add_argument("--jobs", type=int, help="Runs at a time (override the study's `jobs`).")
    parser.add_argument("--threads_per_job", type=int, help="Torch threads per run (default: cores / jobs).")
    parser.add_argument("--dry_run", action="store_true", help="List the runs still to do, run nothing.")
    args = parser.parse_args(argv)
    config = StudyConfig.from_yaml(
        args.config, output_dir=args.output_dir, jobs=args.jobs, threads_per_job=args.threads_per_job
    )
    run_study(config, dry_run=args.dry_run)
    return 0


COMMANDS = {
    "train": (train_command, "train with MIG (or plain GRPO) from a YAML recipe; flags override the recipe"),
    "study": (study_command, "arms x sweep x seeds of training runs, resumable; study.json, study.md and plots"),
    "eval": (eval_command, "pass@1 and format rate of a model (or of a completions column) on dataset splits"),
    "inspect": (inspect_command, "per-step MIG credit (l_k, watermark, gains) of a prompt's completions: table, HTML, PNG"),
    "builtins": (builtins_command, "list the builtin: datasets and models"),
    "accelerate-config": (accelerate_config_command, "print the path of an accelerate config packaged by TRL"),
}


def usage() -> str:
    lines = ["usage: trl-mig COMMAND [ARGS]   (also: python -m trl_mig COMMAND [ARGS])", "", "commands:"]
    lines += [f"  {name:<18} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "examples:",
        "  trl-mig train --config recipes/demo/mig.yaml",
        "  trl-mig train --config recipes/Qwen2.5-1.5B-Instruct/mig/config_gsm8k.yaml --accelerate_config zero2 "
        "--num_processes 8",
        "  accelerate launch --config_file $(trl-mig accelerate-config zero3) -m trl_mig train --config RECIPE.yaml",
        "  trl-mig eval --model OUTPUT_DIR --dataset builtin:arithmetic --splits test ood",
        "  trl-mig inspect --config recipes/demo/mig.yaml --model OUTPUT_DIR --split test --index 3",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-mig: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        result = COMMANDS[command][0](rest)
    except CLIError as err:
        if os.environ.get("TRL_MIG_DEBUG"):
            raise
        print(f"trl-mig {command}: error: {err}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
