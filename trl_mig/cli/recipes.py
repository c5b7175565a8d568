"""The recipe of `trl-mig train`: its script arguments, its parser (TRL's `TrlParser` over five dataclasses) and the
reading of a YAML recipe, shared by `train`, `inspect --config` and the study runner."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..builtin import BuiltinArguments
from ..config import ANSWER_MATCHES, MIGConfig
from .data import DataArguments
from .errors import CLIError

ALGORITHMS = ("mig", "grpo")


@dataclass
class MIGScriptArguments(ScriptArguments, DataArguments):
    """Script arguments of `trl-mig train`: TRL's `ScriptArguments` (dataset_name, splits...) plus the fields below."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, by name: 'answer_accuracy', 'partial_credit' (the leading right values of an "
            "answer that lists values), 'digit_credit' (the right digits of an integer answer from the units up), "
            "'step_format' (trl-mig, answer in tags), "
            "'accuracy_reward', 'reasoning_accuracy_reward', 'think_format_reward' (TRL, \\boxed answers), or a "
            "dotted import path (an importable module, or a module or package in the working directory). Default: "
            "answer_accuracy + step_format. Weights: `reward_weights`."
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
    accuracy_eval_answer_match: str | None = field(
        default=None,
        metadata={
            "help": "How the accuracy eval compares answers with the ground truth: 'math', 'exact' or 'last' (the "
            "final values equal: runs trained on a list of values, task_answer: running, and runs trained on the final "
            "value alone, task_answer: final, get the same held-out score). Default: answer_match, as training.",
            "choices": list(ANSWER_MATCHES),
        },
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


TRAIN_DATACLASSES = (MIGScriptArguments, BuiltinArguments, MIGConfig, ModelConfig, DatasetMixtureConfig)


def make_train_parser(prog: str = "trl-mig train") -> TrlParser:
    # no abbreviations: `--learning_rat` must be an error, not `--learning_rate`
    return TrlParser(TRAIN_DATACLASSES, prog=prog, allow_abbrev=False)


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
    Parse `argv` (with an optional `--config RECIPE.yaml`) into the parser's dataclasses: the YAML recipe is read once
    ([`read_recipe`]) and parsed by [`parse_recipe_dict`], command-line flags overriding it.

    Returns `(parsed, cli_remaining)`: the dataclass instances and the command-line strings no dataclass knows (the
    caller decides whether they are `accelerate launch` options). Unknown recipe keys are an error.
    """
    argv = list(argv)
    recipe, source = {}, "the recipe"
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise CLIError("--config needs the path of a YAML recipe.")
        path = argv[index + 1]
        recipe, source = read_recipe(path), f"recipe {path!r}"
        del argv[index : index + 2]
    return parse_recipe_dict(parser, recipe, argv, dataclass_names=dataclass_names, source=source)


def parse_recipe_dict(
    parser: TrlParser,
    recipe: Mapping,
    argv: Sequence[str] = (),
    *,
    dataclass_names: str = "the train dataclasses",
    source: str = "the recipe",
):
    """
    Parse a recipe given as a mapping of field: value (what a YAML recipe holds), then the command-line strings
    `argv`, into the parser's dataclasses, as `TrlParser.parse_args_and_config` parses a `--config` file: the recipe's
    values become the parser's defaults, flags override them, and an `env:` mapping is set in `os.environ` first.

    The parser's defaults are changed: use a new parser per recipe (e.g. [`make_train_parser`]). `source` names the
    recipe in the error messages (e.g. "recipe 'mig.yaml'"). Returns `(parsed, cli_remaining)` like
    [`parse_recipe_args`]; unknown recipe keys, a bad `env` and a field's own validation error are `CLIError`s.
    """
    if not isinstance(recipe, Mapping):
        raise CLIError(f"{source[0].upper()}{source[1:]} must be a mapping of field: value, got {type(recipe).__name__}.")
    # a copy: the parsed dataclasses must not share (and later mutate) the caller's lists and dicts
    values = {str(key): value for key, value in copy.deepcopy(dict(recipe)).items()}
    if "env" in values:
        env = values.pop("env")
        if not isinstance(env, Mapping):
            raise CLIError(
                f"`env` in {source} must be a mapping of environment variable: value, got {type(env).__name__}."
            )
        for name, value in env.items():  # before parsing: fields may read the environment (TrlParser does the same)
            os.environ[str(name)] = str(value)
    config_remaining = parser.set_defaults_with_config(**values)
    try:
        *parsed, cli_remaining = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    except ValueError as err:  # a field's own validation (MIGConfig, GRPOConfig, TrainingArguments...)
        raise CLIError(str(err)) from err
    if config_remaining:
        keys = [item[2:] for item in config_remaining[::2]]
        raise CLIError(
            f"Unknown key(s) in {source}: {keys}. They are not fields of {dataclass_names}; check the spelling (see "
            f"`{parser.prog} --help`)."
        )
    return parsed, cli_remaining
