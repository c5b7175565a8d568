"""The work of `trl-mig train` once the recipe is parsed: load and map the data splits, resolve the model, build the
MIG (or plain GRPO) trainer, measure accuracy before and after training, and write the summary files.

`run_training` is the entry point; the steps below it each do one of those things, in the order it calls them.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trl.rewards
from accelerate import PartialState
from trl import GRPOTrainer, get_dataset, get_peft_config, get_quantization_config
from trl.models.utils import unwrap_model_for_generation

from ..builtin import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    TOOL_TASK_DATASETS,
    check_answer_match,
    is_builtin,
    resolve_builtin_model,
)
from ..builtin.tools import TOOLS, evaluate_tool_task
from ..callbacks import HeldOutAccuracyCallback
from ..config import MIGConfig
from ..evaluation import evaluate_splits
from ..rewards import (
    AnswerAccuracyReward,
    DigitCreditReward,
    PartialCreditReward,
    StepFormatReward,
    answer_accuracy_reward,
    default_reward_funcs,
    step_format_reward,
)
from ..segmentation import FormatSpec
from ..trainer import MIGGRPOTrainer, MIGMixin
from .cpu import keep_freed_memory
from .data import IMAGE_COLUMNS, get_split, load_dataset_dict, prepare_dataset, select_samples
from .errors import CLIError
from .launch import inside_launcher, relaunch_with_accelerate, remove_subsequence
from .models import load_processing_class
from .output import format_cell, format_table, write_json
from .recipes import ALGORITHMS, make_train_parser, parse_recipe_args

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The mapped splits of a run (see `load_training_data`)."""

    name: str  # the dataset_name, or the mixture's paths joined by ', ': for messages and run_summary.json
    train: Any
    eval: Any | None  # `dataset_test_split`, only when `eval_strategy` is not 'no'
    accuracy: dict  # split -> dataset, for `accuracy_eval_splits` (at most `accuracy_eval_max_samples` rows each)


def run_training(script_args, builtin_args, training_args, model_args, mixture_args, trainer_cls=None) -> int:
    """
    Load model and data, (optionally) measure accuracy, train with MIG (or GRPO), save, measure again. `trainer_cls`:
    the trainer class to build instead of the algorithm's default (see `build_trainer`).
    """
    state = PartialState()
    if script_args.algorithm not in ALGORITHMS:
        raise CLIError(f"algorithm={script_args.algorithm!r} is not one of {list(ALGORITHMS)}.")
    trainer_cls = resolve_trainer_class(script_args.algorithm, trainer_cls)  # before any data or model is loaded
    started = time.perf_counter()
    timings = {}

    if script_args.cpu_keep_freed_memory and state.device.type == "cpu":
        keep_freed_memory()
    tool_task = uses_builtin_tools(script_args, mixture_args)
    if tool_task and script_args.accuracy_eval_steps:
        raise CLIError(
            f"accuracy_eval_steps: the held-out callback generates without tools, and {script_args.dataset_name} "
            "is solved with them. Leave accuracy_eval_steps unset: accuracy_eval_splits are then measured with tool "
            "rollouts before and after training."
        )
    data = load_training_data(script_args, builtin_args, training_args, mixture_args)
    # the model after the data: data errors are cheaper to find than a warm start
    model_name = resolve_model(model_args, builtin_args, training_args)
    if is_builtin(model_name):
        timings["builtin_model_seconds"] = round(time.perf_counter() - started, 2)
    set_model_init_kwargs(training_args, model_args)

    spec = FormatSpec.from_config(training_args)
    trainer = build_trainer(script_args, training_args, model_args, data, spec, tool_task=tool_task,
                            trainer_cls=trainer_cls)
    # the accuracy eval reads answers as training does, unless it is told to compare them another way
    eval_spec = FormatSpec.from_config(
        training_args, answer_match=script_args.accuracy_eval_answer_match or spec.answer_match
    )
    eval_kwargs = accuracy_eval_kwargs(script_args, training_args, trainer, data.accuracy, eval_spec)
    if tool_task:  # rollouts with the calculator, as in training (evaluate_splits generates single turns)
        eval_kwargs = tool_eval_kwargs(script_args, training_args, trainer, eval_spec)
    if script_args.accuracy_eval_steps:
        add_heldout_callback(script_args, trainer, data.accuracy, eval_kwargs)
    accuracy, completions = {}, {}
    if data.accuracy and script_args.accuracy_eval_before:
        accuracy["before"], _ = measure_accuracy(trainer.model, data.accuracy, "before", eval_kwargs, timings)
        state.print(_accuracy_table(accuracy, "before training"))

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    timings["train_seconds"] = round(time.perf_counter() - t0, 2)
    state.print(f"[trl-mig] training done: {trainer.state.global_step} steps in {timings['train_seconds']:.0f}s")

    if data.accuracy:
        accuracy["after"], completions = measure_accuracy(
            trainer.model_wrapped, data.accuracy, "after", eval_kwargs, timings
        )

    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    output_dir = Path(training_args.output_dir)
    if state.is_main_process:
        summary = {
            "algorithm": script_args.algorithm,
            "model": model_name,
            "model_path": model_args.model_name_or_path,
            "dataset": data.name,
            "global_steps": trainer.state.global_step,
            "num_processes": state.num_processes,
            "timings": timings,
        }
        write_summary_files(output_dir, summary, accuracy, completions)
    if script_args.save_rank_logs:
        write_rank_log(output_dir, state, trainer.state.log_history)
    state.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    # left to interpreter exit, a gloo group's teardown can abort a rank (SIGABRT) after all work is saved
    state.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------------- data
def load_training_data(script_args, builtin_args, training_args, mixture_args) -> TrainingData:
    """
    The train split, the eval split (when `eval_strategy` is not 'no') and the `accuracy_eval_splits`, each mapped to
    `prompt` + the solution column (see `trl_mig.cli.data.prepare_dataset`). The main process loads and maps first, so
    the other ranks read its cache.
    """
    solution_column = training_args.solution_column
    if not mixture_args.datasets:
        try:
            check_answer_match(script_args.dataset_name, builtin_args, training_args.answer_match, "answer_match")
            if script_args.accuracy_eval_answer_match is not None:
                check_answer_match(script_args.dataset_name, builtin_args, script_args.accuracy_eval_answer_match,
                                   "accuracy_eval_answer_match")
        except ValueError as err:
            raise CLIError(str(err)) from None
    with training_args.main_process_first(desc="load and map the dataset"):
        data, name = load_training_source(script_args, builtin_args, mixture_args)

        data_dir = _local_data_dir(script_args.dataset_name) if not mixture_args.datasets else None

        def mapped_split(split: str, where: str):
            return prepare_dataset(
                get_split(data, split, name, where), script_args, solution_column, f"split {split!r} of {name!r}",
                data_dir=data_dir,
            )

        train_dataset = mapped_split(script_args.dataset_train_split, "dataset_train_split")
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = mapped_split(script_args.dataset_test_split, "dataset_test_split")
        accuracy_splits = {
            split: select_samples(mapped_split(split, "accuracy_eval_splits"), script_args.accuracy_eval_max_samples)
            for split in script_args.accuracy_eval_splits or []
        }
    for split, dataset in accuracy_splits.items():
        if set(IMAGE_COLUMNS) & set(dataset.column_names or ()):
            raise CLIError(
                f"accuracy_eval_splits: split {split!r} of {name!r} has images, and the accuracy eval generates from "
                "text prompts only. Leave accuracy_eval_splits unset for image datasets (see docs/vision.md)."
            )
    return TrainingData(name=name, train=train_dataset, eval=eval_dataset, accuracy=accuracy_splits)


def _local_data_dir(name) -> str | None:
    """The folder of a local dataset file or folder (where relative image paths start), else None."""
    if not name or is_builtin(name):
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return str(path.parent)
    return str(path) if path.is_dir() else None


def load_training_source(script_args, builtin_args, mixture_args):
    """`(DatasetDict, name)`: TRL's dataset mixture (`datasets`) when set, else `dataset_name`."""
    if mixture_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set: `datasets` is used.")
        try:
            data = get_dataset(mixture_args)
        except Exception as err:
            raise CLIError(f"Could not load the dataset mixture `datasets`: {type(err).__name__}: {err}") from err
        return data, ", ".join(d.path for d in mixture_args.datasets)
    data = load_dataset_dict(
        script_args.dataset_name, script_args.dataset_config, builtin_args, streaming=script_args.dataset_streaming
    )
    return data, script_args.dataset_name


# ---------------------------------------------------------------------------------------------------------- model
def resolve_model(model_args, builtin_args, training_args) -> str:
    """
    Check that a model is named. A `builtin:` name is built (or found in the cache) and `model_name_or_path` is set
    to its folder. Returns the name as the recipe gave it.
    """
    model_name = model_args.model_name_or_path
    if not model_name:
        raise CLIError(
            "No model: set `model_name_or_path` (a hub id, a local folder, or "
            f"{', '.join(BUILTIN_PREFIX + name for name in BUILTIN_MODELS)})."
        )
    if is_builtin(model_name):
        try:
            model_args.model_name_or_path = resolve_builtin_model(
                model_name, builtin_args, use_cpu=training_args.use_cpu, bf16=training_args.bf16,
                fp16=training_args.fp16,
            )
        except ValueError as err:
            raise CLIError(str(err)) from None
    return model_name


def set_model_init_kwargs(training_args, model_args) -> None:
    """`ModelConfig`'s loading settings into `training_args.model_init_kwargs` (recipe `model_init_kwargs` win)."""
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs


# -------------------------------------------------------------------------------------------------------- trainer
def build_reward_funcs(names: list[str] | None, training_args: MIGConfig, solution_column: str):
    """Reward functions from names (see `MIGScriptArguments.reward_funcs`); None keeps the trainer's default."""
    spec = FormatSpec.from_config(training_args)
    if names is None:
        return None
    own = {
        "answer_accuracy": lambda: AnswerAccuracyReward(spec, solution_column),
        "partial_credit": lambda: PartialCreditReward(spec, solution_column),
        "digit_credit": lambda: DigitCreditReward(spec, solution_column),
        "step_format": lambda: StepFormatReward(spec),
    }
    own_names = list(own)
    own.update({f"{name}_reward": build for name, build in list(own.items())})  # the functions' own names too
    trl_names = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")
    funcs = []
    for name in names:
        if name in own:
            funcs.append(own[name]())
        elif name in trl_names:
            funcs.append(getattr(trl.rewards, name))
        elif "." in name:
            func = import_reward_function(name)
            # the library's module-level rewards read the default format: build them from the recipe's instead
            if func is answer_accuracy_reward or func is step_format_reward:
                func = own[func.__name__]()
            funcs.append(func)
        else:
            raise CLIError(
                f"reward_funcs: unknown reward function {name!r}; expected one of "
                f"{[*own_names, *trl_names]} or a dotted import path."
            )
    if not funcs:
        raise CLIError("reward_funcs is empty: name at least one reward function, or leave it unset.")
    return funcs


def import_reward_function(name: str):
    """
    The reward function at the dotted path `name` ('module.function', 'package.module.function'): from an importable
    module (installed, on PYTHONPATH, or on `sys.path` as `python -m` sets it), else from a module or package in the
    working directory, as `trl grpo` finds them, but without adding the working directory to `sys.path`. A module
    found there is imported under its name; the modules it imports must be importable themselves (a package's relative
    imports are).
    """
    module_path, attr = name.rsplit(".", 1)
    top = module_path.split(".")[0]
    try:
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            _import_from_working_directory(top)
        module = importlib.import_module(module_path)
    except ImportError as err:
        raise CLIError(f"reward_funcs: cannot import {name!r}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CLIError(f"reward_funcs: module {module_path!r} has no {attr!r} (in {name!r}).") from None


def _import_from_working_directory(top: str) -> None:
    """Import the top-level module or package `top` from the working directory (registered in `sys.modules`, so that
    its submodules import as usual); an ImportError naming `top` when there is none."""
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {top!r}: not importable, and no {top}.py or {top}/ in the working directory "
            f"{os.getcwd()}", name=top,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)  # as the import system does: no half-initialised module stays behind
        raise


def uses_builtin_tools(script_args, mixture_args) -> bool:
    """Whether the run trains on a built-in tool task (`builtin:tools`), whose rollouts call its tools."""
    return not mixture_args.datasets and script_args.dataset_name in TOOL_TASK_DATASETS


def resolve_trainer_class(algorithm: str, trainer_cls: type | None = None) -> type:
    """
    The trainer class of `algorithm`: `trainer_cls` when given, else `MIGGRPOTrainer` ('mig') or `GRPOTrainer`
    ('grpo'). For 'mig' a given class must have MIG credit (a `MIGMixin` subclass on a GRPOTrainer, e.g. one that
    overrides `step_log_likelihoods`); for 'grpo' it must be a GRPOTrainer subclass without MIG credit.
    """
    if trainer_cls is None:
        return MIGGRPOTrainer if algorithm == "mig" else GRPOTrainer
    name = getattr(trainer_cls, "__name__", repr(trainer_cls))
    if not isinstance(trainer_cls, type) or not issubclass(trainer_cls, GRPOTrainer):
        raise TypeError(f"trainer_cls must be a subclass of trl.GRPOTrainer, got {name}.")
    if algorithm == "mig" and not issubclass(trainer_cls, MIGMixin):
        raise TypeError(
            f"algorithm 'mig' needs a trainer_cls with MIG credit, a subclass of trl_mig.MIGMixin (e.g. of "
            f"MIGGRPOTrainer, or mig_trainer_class({name})), got {name}."
        )
    if algorithm == "grpo" and issubclass(trainer_cls, MIGMixin):
        raise TypeError(f"algorithm 'grpo' trains without MIG credit, but trainer_cls {name} is a MIGMixin subclass.")
    return trainer_cls


def build_trainer(script_args, training_args, model_args, data: TrainingData, spec, tool_task: bool = False,
                  trainer_cls: type | None = None):
    """
    `MIGGRPOTrainer` (algorithm 'mig') or TRL's `GRPOTrainer` ('grpo', with the same default rewards, read with
    `spec`) on the train and eval splits, with the recipe's rewards, PEFT and quantization settings; with
    `tool_task`, the built-in tool task's tools (`trl_mig.builtin.tools.TOOLS`) for TRL's multi-turn tool loop.

    `trainer_cls` builds another class instead, with the same arguments: for 'mig' a `MIGMixin` subclass (e.g. one
    overriding `step_log_likelihoods`), for 'grpo' a GRPOTrainer subclass (see `resolve_trainer_class`; TypeError
    otherwise).
    """
    trainer_cls = resolve_trainer_class(script_args.algorithm, trainer_cls)
    solution_column = training_args.solution_column
    reward_funcs = build_reward_funcs(script_args.reward_funcs, training_args, solution_column)
    trainer_kwargs = dict(
        args=training_args,
        processing_class=load_processing_class(model_args.model_name_or_path),
        train_dataset=data.train,
        eval_dataset=data.eval,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if tool_task:
        trainer_kwargs["tools"] = list(TOOLS)
    try:
        if script_args.algorithm == "grpo" and reward_funcs is None:  # GRPOTrainer has no default rewards
            reward_funcs = default_reward_funcs(spec, solution_column)
        return trainer_cls(model_args.model_name_or_path, reward_funcs=reward_funcs, **trainer_kwargs)
    except (ValueError, KeyError, TypeError) as err:
        hint = ""
        if tool_task and "chat template" in str(err):
            hint = (
                f" {script_args.dataset_name} needs a model whose chat template renders tool calls and whose tokenizer "
                "parses them, e.g. builtin:tiny-qwen2-tools."
            )
        raise CLIError(f"Could not build the {script_args.algorithm} trainer: {err}{hint}") from err


# ------------------------------------------------------------------------------------------------------- accuracy
def accuracy_eval_kwargs(script_args, training_args, trainer, splits: dict, spec) -> dict:
    """
    The `evaluate_splits` keyword arguments of the accuracy eval: the trainer's tokenizer and accelerator, the
    recipe's `accuracy_eval_*` settings, and pass@1 per `num_ops` when every split has that column (builtin data).
    """
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    return dict(
        tokenizer=tokenizer,
        spec=spec,
        batch_size=script_args.accuracy_eval_batch_size,
        max_new_tokens=script_args.accuracy_eval_max_new_tokens or training_args.max_completion_length,
        solution_column=training_args.solution_column,
        group_by="num_ops" if splits and all("num_ops" in d.column_names for d in splits.values()) else None,
        accelerator=trainer.accelerator,
    )


def add_heldout_callback(script_args, trainer, splits: dict, eval_kwargs: dict) -> None:
    """Learning curves: `HeldOutAccuracyCallback` on the accuracy splits every `accuracy_eval_steps` steps."""
    if not splits:
        raise CLIError("accuracy_eval_steps needs accuracy_eval_splits: the splits to measure while training.")
    try:
        callback = HeldOutAccuracyCallback(
            trainer, splits, script_args.accuracy_eval_steps, spec=eval_kwargs["spec"],
            solution_column=eval_kwargs["solution_column"], batch_size=eval_kwargs["batch_size"],
            max_new_tokens=eval_kwargs["max_new_tokens"], num_samples=script_args.accuracy_eval_num_samples,
            temperature=script_args.accuracy_eval_temperature,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    trainer.add_callback(callback)


def tool_eval_kwargs(script_args, training_args, trainer, spec) -> dict:
    """The `evaluate_tool_splits` keyword arguments: tool rollouts as long as in training, greedy."""
    tokenizer = trainer.processing_class
    return dict(
        tool_rollouts=True,
        tokenizer=getattr(tokenizer, "tokenizer", tokenizer),
        spec=spec,
        batch_size=script_args.accuracy_eval_batch_size,
        max_completion_length=script_args.accuracy_eval_max_new_tokens or training_args.max_completion_length,
        # TRL caps tool-calling rounds; the eval caps calls, the same when every turn makes one call (as taught here)
        max_tool_calls=training_args.max_tool_calling_iterations or 8,
        accelerator=trainer.accelerator,
    )


def evaluate_tool_splits(model, splits: dict, *, tokenizer, spec, batch_size, max_completion_length, max_tool_calls,
                         accelerator, label: str, tool_rollouts: bool = True) -> tuple[dict, dict]:
    """
    `trl_mig.builtin.tools.evaluate_tool_task` on each split (every process evaluates every row: the splits are
    small), the model unwrapped for generation as in `evaluate_splits`. `tool_rollouts` only marks these keyword
    arguments (see `measure_accuracy`).
    """
    results, completions = {}, {}
    for name, dataset in splits.items():
        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            results[name], completions[name] = evaluate_tool_task(
                unwrapped, tokenizer, dataset, spec=spec, max_completion_length=max_completion_length,
                max_tool_calls=max_tool_calls, batch_size=batch_size,
            )
        PartialState().print(
            f"[trl-mig] {label} {name}: pass@1 {format_cell(results[name]['pass@1'])}, "
            f"{results[name]['tool_calls_per_problem']:.2f} tool calls per problem "
            f"({format_cell(results[name]['tool_call_rate'])} of the operations), "
            f"failed calls {format_cell(results[name]['tool_failure_rate'])}"
        )
    return results, completions


def measure_accuracy(model, splits: dict, phase: str, eval_kwargs: dict, timings: dict) -> tuple[dict, dict]:
    """
    `evaluate_splits` (or, for a tool task, `evaluate_tool_splits`) of `model` on the accuracy splits, its duration
    stored as `timings['eval_<phase>_seconds']`.
    """
    t0 = time.perf_counter()
    evaluate = evaluate_tool_splits if eval_kwargs.get("tool_rollouts") else evaluate_splits
    results, completions = evaluate(model, splits=splits, label=phase, **eval_kwargs)
    timings[f"eval_{phase}_seconds"] = round(time.perf_counter() - t0, 2)
    return results, completions


def _accuracy_table(accuracy: dict, title: str) -> str:
    phases = list(accuracy)
    splits = list(next(iter(accuracy.values())))
    header = ["split", "n"] + [f"pass@1 {p}" for p in phases] + [f"format {p}" for p in phases]
    rows = []
    for split in splits:
        first = accuracy[phases[0]][split]
        rows.append(
            [split, first["num_examples"]]
            + [accuracy[p][split]["pass@1"] for p in phases]
            + [accuracy[p][split]["format_rate"] for p in phases]
        )
    lines = [f"\n[trl-mig] {title}", format_table(header, rows)]
    for split in splits:
        groups = {p: accuracy[p][split].get("pass@1_by_group") for p in phases}
        if all(groups.values()):
            keys = list(groups[phases[-1]])
            cells = ", ".join(
                f"{key}: " + " -> ".join(format_cell(groups[p].get(key, float("nan"))) for p in phases) for key in keys
            )
            lines.append(f"  {split} by num_ops: {cells}")
    return "\n".join(lines) + "\n"



# -------------------------------------------------------------------------------------------------------- outputs
def write_summary_files(output_dir: Path, summary: dict, accuracy: dict, completions: dict) -> None:
    """
    OUTPUT_DIR/run_summary.json; with accuracy results also accuracy.json (the summary with them),
    accuracy_completions.json and the printed before/after table. Main process only.
    """
    if accuracy:
        summary["accuracy"] = accuracy
        write_json(output_dir / "accuracy.json", summary)
        write_json(output_dir / "accuracy_completions.json", completions)
        print(_accuracy_table(accuracy, "held-out accuracy (greedy pass@1)"))
    write_json(output_dir / "run_summary.json", summary)
    print(f"[trl-mig] model, trainer_state.json (logs) and run_summary.json are in {output_dir}")


def write_rank_log(output_dir: Path, state, log_history: list) -> None:
    """OUTPUT_DIR/rank_logs/rank<R>.json: which process this is (rank, world size, host, pid) and its log history."""
    write_json(
        output_dir / "rank_logs" / f"rank{state.process_index}.json",
        {
            "rank": state.process_index,
            "local_rank": state.local_process_index,
            "world_size": state.num_processes,
            "distributed_type": str(state.distributed_type),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "log_history": log_history,
        },
    )


def train_command(argv: list[str], trainer_cls: type | None = None) -> int:
    """
    `trl-mig train ARGV`. `trainer_cls`: the trainer class to train instead of the algorithm's default, e.g. a
    `MIGGRPOTrainer` subclass that overrides `step_log_likelihoods` (see `build_trainer`), so a script can run the
    whole command with its own trainer: `train_command(["--config", "recipe.yaml"], trainer_cls=MyTrainer)`.
    """
    parser = make_train_parser()
    names = "MIGScriptArguments, BuiltinArguments, MIGConfig, ModelConfig or DatasetMixtureConfig"
    (script_args, builtin_args, training_args, model_args, mixture_args), cli_remaining = parse_recipe_args(
        parser, argv, names
    )
    if cli_remaining:
        if inside_launcher():
            raise CLIError(f"Unknown argument(s) {cli_remaining}: not fields of {names}.")
        if trainer_cls is not None:
            # the relaunched `-m trl_mig train` processes would build the default trainer, not this class
            raise CLIError(
                f"{cli_remaining}: `accelerate launch` options relaunch `trl-mig train`, which cannot take the "
                f"trainer class {getattr(trainer_cls, '__name__', trainer_cls)}. Start your script with `accelerate "
                "launch` instead."
            )
        return relaunch_with_accelerate(cli_remaining, remove_subsequence(argv, cli_remaining))
    _apply_thread_count()
    return run_training(script_args, builtin_args, training_args, model_args, mixture_args, trainer_cls=trainer_cls)


def _apply_thread_count() -> None:
    """A recipe's `env: {OMP_NUM_THREADS: n}` is set after torch has sized its thread pool: resize it to match."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))

