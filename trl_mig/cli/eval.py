"""`trl-mig eval`: pass@1 and format rate of a model (or of a completions column) on dataset splits."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields

import torch
from trl import TrlParser

from ..builtin import BUILTIN_PREFIX, TOOL_TASK_DATASETS, BuiltinArguments, check_answer_match
from ..builtin.model import trained_task_prompt
from ..builtin.tools import evaluate_tool_task
from ..config import MIGSettings, field_like
from ..evaluation import evaluate_splits, score_completions, summarize
from ..segmentation import FormatSpec
from .data import IMAGE_COLUMNS, DataArguments, get_split, load_dataset_dict, prepare_dataset, select_samples
from .errors import CLIError
from .models import ModelArguments, load_model_for_eval
from .output import format_cell, format_table, write_json
from .recipes import parse_recipe_args


def answer_match_argument():
    """`--answer_match` of `trl-mig eval` and `trl-mig inspect`: MIGSettings' field, with no default of its own (None:
    exact for the built-in arithmetic task's running answers, else math; see `check_answer_match`)."""
    declared = next(f for f in fields(MIGSettings) if f.name == "answer_match").metadata["help"]
    return field_like(
        MIGSettings, "answer_match", default=None,
        help=f"{declared} Default: exact for builtin:arithmetic's running answers, else math.",
    )


@dataclass
class EvalArguments(ModelArguments, DataArguments):
    """Arguments of `trl-mig eval`."""

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
        default=1,
        metadata={
            "help": "Completions per prompt (needs temperature > 0): pass@1 is their mean accuracy, and pass@k "
            "(k = num_samples) the share of prompts that one of them gets right."
        },
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (with temperature > 0)."})
    # the completion format, as MIGSettings declares it
    think_open_tag: str = field_like(MIGSettings, "think_open_tag")
    think_close_tag: str = field_like(MIGSettings, "think_close_tag")
    step_pattern: str = field_like(MIGSettings, "step_pattern")
    answer_pattern: str = field_like(MIGSettings, "answer_pattern")
    answer_match: str | None = answer_match_argument()
    group_by: str | None = field(
        default=None, metadata={"help": "Also report pass@1 per value of this column (e.g. num_ops)."}
    )
    output_file: str = field(default="trl-mig-eval.json", metadata={"help": "Where the JSON results are written."})
    save_completions: bool = field(default=False, metadata={"help": "Also write every completion to the JSON."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (temperature > 0)."})


EVAL_DATACLASSES = (EvalArguments, BuiltinArguments)


def make_eval_parser(prog: str = "trl-mig eval") -> TrlParser:
    return TrlParser(EVAL_DATACLASSES, prog=prog, allow_abbrev=False)


def eval_command(argv: list[str]) -> int:
    (args, builtin_args), cli_remaining = parse_recipe_args(make_eval_parser(), argv, "EvalArguments or BuiltinArguments")
    if cli_remaining:
        raise CLIError(f"Unknown argument(s) {cli_remaining} (see `trl-mig eval --help`).")
    run_eval(args, builtin_args)
    return 0


def warn_on_prompt_mismatch(dataset: str, model_path, builtin_args: BuiltinArguments) -> None:
    """Warn when a built-in arithmetic model is evaluated on prompts of another `task_prompt` than it learnt."""
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
        answer_match = check_answer_match(args.dataset, builtin_args, args.answer_match, "--answer_match")
        # validated as in training; the fields eval has no flag for (step fallback, step cap) at their defaults
        spec = FormatSpec.from_config(MIGSettings.from_config(args, answer_match=answer_match))
    except ValueError as err:
        raise CLIError(str(err)) from None

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
        torch.manual_seed(args.seed)  # the sampling's (temperature > 0)
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
    pass_at_k = [f"pass@{args.num_samples}"] if args.num_samples > 1 else []
    header = ["split", "n", "pass@1", *pass_at_k, "format rate"]
    rows = [[name, r["num_examples"], r["pass@1"], *(r.get(k) for k in pass_at_k), r["format_rate"]]
            for name, r in results.items()]
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
