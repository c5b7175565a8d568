"""The `trl-mig` command line (also `python -m trl_mig`).

    trl-mig train --config RECIPE.yaml [--field value ...]     MIG (or plain GRPO) training from a YAML recipe
    trl-mig eval --model PATH --dataset NAME [--splits test]   pass@1 and format rate, table + JSON
    trl-mig builtins                                           the `builtin:` datasets and models
    trl-mig accelerate-config NAME                             path of a TRL-packaged accelerate config

`train` parses the recipe with TRL's `TrlParser` into (script arguments, built-in arguments, `MIGConfig`, TRL
`ModelConfig`, TRL `DatasetMixtureConfig`); command-line flags override the YAML. It runs as is under
`accelerate launch -m trl_mig train ...`; given `accelerate launch` options instead (`--accelerate_config zero3`,
`--num_processes 8`, ...), it relaunches itself through `accelerate launch`, like `trl grpo` does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .builtin import BUILTIN_DATASETS, BUILTIN_MODELS, BUILTIN_PREFIX, BuiltinArguments, is_builtin
from .config import MIGConfig

logger = logging.getLogger("trl_mig.cli")

ANSWER_EXTRACTIONS = ("none", "gsm8k", "boxed")
ALGORITHMS = ("mig", "grpo")
# Short names for the accelerate configs that TRL packages in `trl/accelerate_configs` (no copies here).
ACCELERATE_CONFIG_ALIASES = {"ddp": "multi_gpu", "fsdp": "fsdp2"}
DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class CLIError(Exception):
    """An input error: printed as one line, without a traceback (set TRL_MIG_DEBUG=1 for the traceback)."""


# ------------------------------------------------------------------------------------------------------ arguments
@dataclass
class DataArguments:
    """How the dataset's columns become a prompt and a ground-truth answer."""

    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Dataset column with the prompt (a string, or a list of chat messages)."},
    )
    answer_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column with the ground truth, copied (after `answer_extraction`) into the MIG solution "
            "column. Default: the solution column itself (`solution_column`, 'solution')."
        },
    )
    answer_extraction: str = field(
        default="none",
        metadata={
            "help": "How the ground truth is read from `answer_column`: 'none' (as is), 'gsm8k' (the text after the "
            "last '####', commas removed) or 'boxed' (the content of the last \\boxed{...}).",
            "choices": list(ANSWER_EXTRACTIONS),
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt. When set, string prompts become chat messages [system, user]."},
    )
    conversational: bool = field(
        default=False,
        metadata={"help": "Turn string prompts into chat messages ([user]) even without a system prompt."},
    )


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
    accuracy_eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch (per rank)."})
    accuracy_eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation length of the accuracy eval. Default: max_completion_length."}
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


# ------------------------------------------------------------------------------------------------------- datasets
def load_dataset_dict(name: str, config_name: str | None = None, builtin_args=None, *, streaming=False, where="dataset_name"):
    """A `DatasetDict` from a `builtin:` name, a local file or folder, or a hub id. A single file is the split 'train'."""
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

    if not name:
        raise CLIError(f"No dataset: set `{where}` (a hub id, a local path, or builtin:arithmetic).")
    if is_builtin(name):
        from .builtin import load_builtin_dataset

        try:
            return load_builtin_dataset(name, builtin_args, where)
        except ValueError as err:
            raise CLIError(str(err)) from None
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise CLIError(
                    f"Cannot read the dataset file {name!r} (`{where}`): expected one of "
                    f"{sorted(DATASET_FILE_BUILDERS)}."
                )
            data = load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            data = load_from_disk(str(path))
        else:
            data = load_dataset(name, name=config_name, streaming=streaming)
    except CLIError:
        raise
    except Exception as err:  # hub/network/format problems: name the dataset and the field
        raise CLIError(f"Could not load the dataset {name!r} (`{where}`): {type(err).__name__}: {err}") from err
    if isinstance(data, (Dataset, IterableDataset)):
        data = DatasetDict({"train": data})
    return data


def get_split(data, split: str, name: str, where: str):
    if split not in data:
        raise CLIError(f"The dataset {name!r} has no split {split!r} (`{where}`); its splits are {list(data)}.")
    return data[split]


def extract_gsm8k(text) -> str | None:
    if not isinstance(text, str) or "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def extract_boxed(text) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start + len("\\boxed") :].strip().split()
        return rest[0].rstrip("$") if rest else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip() or None
    return None


EXTRACTORS = {"none": lambda value: value, "gsm8k": extract_gsm8k, "boxed": extract_boxed}


def prepare_dataset(dataset, data_args: DataArguments, solution_column: str, where: str):
    """
    Map a split to what the trainer reads: `prompt` (text, or chat messages when a system prompt is set or
    `conversational`) and `solution_column` (the ground truth, from `answer_column` through `answer_extraction`).
    """
    from trl.data_utils import get_dataset_column_names

    answer_column = data_args.answer_column or solution_column
    if data_args.answer_extraction not in EXTRACTORS:
        raise CLIError(
            f"answer_extraction={data_args.answer_extraction!r} is not one of {list(ANSWER_EXTRACTIONS)}."
        )
    columns = get_dataset_column_names(dataset)
    if columns is not None:
        for column, field_name in ((data_args.prompt_column, "prompt_column"), (answer_column, "answer_column")):
            if column not in columns:
                raise CLIError(
                    f"{where} has no column {column!r} (`{field_name}`); its columns are {list(columns)}. Map the "
                    "dataset's columns with `prompt_column` / `answer_column` in the recipe."
                )
    extract = EXTRACTORS[data_args.answer_extraction]
    system_prompt = data_args.system_prompt
    chat = bool(system_prompt) or data_args.conversational

    def convert(row):
        if data_args.prompt_column not in row or answer_column not in row:
            raise CLIError(f"A row of {where} lacks column {data_args.prompt_column!r} or {answer_column!r}.")
        prompt = row[data_args.prompt_column]
        if isinstance(prompt, str):
            if chat:
                prompt = [{"role": "user", "content": prompt}]
                if system_prompt:
                    prompt = [{"role": "system", "content": system_prompt}, *prompt]
        elif isinstance(prompt, list):
            if system_prompt and not (prompt and prompt[0].get("role") == "system"):
                prompt = [{"role": "system", "content": system_prompt}, *prompt]
        else:
            raise CLIError(
                f"Column {data_args.prompt_column!r} of {where} must hold text or chat messages, got "
                f"{type(prompt).__name__}: {prompt!r}."
            )
        return {"prompt": prompt, solution_column: extract(row[answer_column])}

    if data_args.prompt_column == "prompt" and answer_column == solution_column and not chat and (
        data_args.answer_extraction == "none"
    ):
        return dataset  # already in shape
    mapped = dataset.map(convert)
    if data_args.answer_extraction != "none" and hasattr(mapped, "__len__"):  # not for streaming datasets
        missing = sum(value is None for value in mapped[solution_column])
        if missing == len(mapped) and len(mapped) > 0:
            raise CLIError(
                f"answer_extraction={data_args.answer_extraction!r} found no answer in column {answer_column!r} of "
                f"{where} (e.g. {dataset[0][answer_column]!r})."
            )
        if missing:
            logger.warning(
                "%d of %d rows of %s have no %s answer in column %r: they get no accuracy or MIG credit.",
                missing, len(mapped), where, data_args.answer_extraction, answer_column,
            )
    return mapped


def select_samples(dataset, max_samples: int | None):
    if max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


# -------------------------------------------------------------------------------------------------------- rewards
def build_reward_funcs(names: list[str] | None, training_args: MIGConfig, solution_column: str):
    """Reward functions from names (see `MIGScriptArguments.reward_funcs`); None keeps the trainer's default."""
    import importlib

    from .rewards import AnswerAccuracyReward, StepFormatReward
    from .segmentation import FormatSpec

    spec = FormatSpec.from_config(training_args)
    if names is None:
        return None
    own = {
        "answer_accuracy": lambda: AnswerAccuracyReward(spec, solution_column),
        "step_format": lambda: StepFormatReward(spec),
    }
    own["answer_accuracy_reward"], own["step_format_reward"] = own["answer_accuracy"], own["step_format"]
    trl_names = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")
    funcs = []
    for name in names:
        if name in own:
            funcs.append(own[name]())
        elif name in trl_names:
            import trl.rewards

            funcs.append(getattr(trl.rewards, name))
        elif "." in name:
            module_path, attr = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module_path), attr))
            except (ImportError, AttributeError) as err:
                raise CLIError(f"reward_funcs: cannot import {name!r}: {err}") from None
        else:
            raise CLIError(
                f"reward_funcs: unknown reward function {name!r}; expected one of "
                f"{['answer_accuracy', 'step_format', *trl_names]} or a dotted import path."
            )
    if not funcs:
        raise CLIError("reward_funcs is empty: name at least one reward function, or leave it unset.")
    return funcs


# ----------------------------------------------------------------------------------------------------- evaluation
def score_completions(completions, solutions, spec, solution_column: str = "solution"):
    """Per completion: (correct, well_formed) as floats, correct None when the row has no ground truth."""
    from .rewards import AnswerAccuracyReward, StepFormatReward

    correct = AnswerAccuracyReward(spec, solution_column)(completions, **{solution_column: solutions})
    formatted = StepFormatReward(spec)(completions)
    return correct, formatted


def summarize(correct, formatted, groups=None, num_samples: int = 1) -> dict:
    scored = [c for c in correct if c is not None]
    out = {
        "num_examples": len(correct) // max(1, num_samples),
        "num_completions": len(correct),
        "num_scorable": len(scored),
        "pass@1": sum(scored) / len(scored) if scored else float("nan"),
        "format_rate": sum(formatted) / len(formatted) if formatted else float("nan"),
    }
    if groups is not None:
        by_group: dict[str, list[float]] = {}
        for group, value in zip(groups, correct):
            if value is not None:
                by_group.setdefault(str(group), []).append(value)
        out["pass@1_by_group"] = {
            key: sum(values) / len(values) for key, values in sorted(by_group.items(), key=lambda kv: _sort_key(kv[0]))
        }
    return out


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def prompt_texts(prompts, tokenizer) -> list[str]:
    """Prompts as the text the model sees: chat messages through the chat template, strings as they are."""
    from trl.data_utils import maybe_apply_chat_template

    return [maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"] for prompt in prompts]


def generate_completions(
    model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_p: float = 1.0, desc: str = "eval", show_progress: bool = True,
) -> list[str]:
    """Batched generation (greedy when temperature is 0), `num_samples` completions per prompt, prompt order."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1 or num_samples < 1:
        raise CLIError("batch_size, max_new_tokens and num_samples must be >= 1.")
    if num_samples > 1 and temperature <= 0:
        raise CLIError("num_samples > 1 needs temperature > 0 (greedy decoding gives the same completion).")
    texts = prompt_texts(prompts, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if temperature > 0:
        generation.update(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=num_samples)
    else:
        generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.no_grad():
                output = model.generate(**batch, **generation)
            completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def evaluate_splits(
    model, tokenizer, splits: dict, *, spec, batch_size: int, max_new_tokens: int, solution_column: str = "solution",
    num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, group_by: str | None = None,
    accelerator=None, label: str = "eval",
) -> tuple[dict, dict]:
    """
    pass@1 and format rate of `model` on each split (a dataset with `prompt` and `solution_column`). Under several
    processes each rank generates a shard and the results are gathered. Returns (metrics per split, completions).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    results, all_completions = {}, {}
    for name, dataset in splits.items():
        indices = list(range(state.process_index, len(dataset), state.num_processes))
        shard = dataset.select(indices)
        if accelerator is not None:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(model, accelerator) as unwrapped:
                completions = generate_completions(
                    unwrapped, tokenizer, shard["prompt"], batch_size=batch_size, max_new_tokens=max_new_tokens,
                    num_samples=num_samples, temperature=temperature, top_p=top_p, desc=f"{label} {name}",
                    show_progress=state.is_main_process,
                )
        else:
            completions = generate_completions(
                model, tokenizer, shard["prompt"], batch_size=batch_size, max_new_tokens=max_new_tokens,
                num_samples=num_samples, temperature=temperature, top_p=top_p, desc=f"{label} {name}",
                show_progress=state.is_main_process,
            )
        records = [
            (index, sample, completion)
            for position, index in enumerate(indices)
            for sample, completion in enumerate(completions[position * num_samples : (position + 1) * num_samples])
        ]
        if state.num_processes > 1:
            records = sorted(gather_object(records))
        completions = [completion for _, _, completion in records]
        rows = [index for index, _, _ in records]
        solutions = [dataset[i][solution_column] for i in rows]
        correct, formatted = score_completions(completions, solutions, spec, solution_column)
        groups = [dataset[i][group_by] for i in rows] if group_by else None
        results[name] = summarize(correct, formatted, groups, num_samples)
        all_completions[name] = [
            {"index": i, "completion": c, "solution": s, "correct": ok, "well_formed": bool(f)}
            for i, c, s, ok, f in zip(rows, completions, solutions, correct, formatted)
        ]
    return results, all_completions


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
    return str(value)


def write_json(path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_nan_to_none(payload), indent=2, default=str)  # NaN -> null: strict JSON has no NaN
    path.write_text(text + "\n")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------------- tokenizers
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_generic_tokenizer(path: str, **kwargs):
    """
    The tokenizer saved in a local folder when it was saved as a generic `tokenizers` tokenizer (the built-in char
    tokenizer), else None (load as usual).

    transformers 5 maps some model types (e.g. qwen2) to their own tokenizer class whatever `tokenizer_class` the
    folder declares, and `Qwen2Tokenizer` rebuilt from a char-level `tokenizer.json` drops spaces and newlines.
    Loading the generic class keeps the tokenizer exactly as saved.
    """
    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file() or not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if declared not in GENERIC_TOKENIZER_CLASSES:
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)


# ---------------------------------------------------------------------------------------------------------- train
def _inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|PATH` to `--config_file PATH`, with TRL's packaged configs (plus ddp/fsdp aliases)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    launch_args = list(launch_args)
    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config")
        if index + 1 < len(launch_args):
            value = launch_args[index + 1]
            launch_args[index + 1] = ACCELERATE_CONFIG_ALIASES.get(value, value)
    try:
        return resolve_accelerate_config_argument(launch_args)
    except ValueError as err:
        raise CLIError(f"{err} Names: {accelerate_config_names()}.") from None


def accelerate_config_names() -> list[str]:
    import importlib.resources as resources

    names = [p.name[: -len(".yaml")] for p in resources.files("trl.accelerate_configs").iterdir()
             if p.name.endswith(".yaml")]
    return sorted(names) + sorted(ACCELERATE_CONFIG_ALIASES)


def relaunch_with_accelerate(launch_args: list[str], train_argv: list[str]) -> int:
    """Run `accelerate launch [launch_args] -m trl_mig train [train_argv]`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args = resolve_accelerate_config(launch_args)
    parser = launch_command_parser()
    try:
        launch_namespace = parser.parse_args([*launch_args, "--module", "trl_mig", "train", *train_argv])
    except SystemExit:
        raise CLIError(
            f"Unknown argument(s) {launch_args}: they are neither recipe fields (script, builtin, MIGConfig, "
            "ModelConfig, DatasetMixtureConfig) nor `accelerate launch` options."
        ) from None
    launch_command(launch_namespace)
    return 0


def _subtract(items: list[str], remove: list[str]) -> list[str]:
    """`items` without the ordered subsequence `remove`."""
    out, pending = [], iter(remove)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            out.append(item)
    return out


def train_command(argv: list[str]) -> int:
    parser = make_train_parser()
    names = "MIGScriptArguments, BuiltinArguments, MIGConfig, ModelConfig or DatasetMixtureConfig"
    (script_args, builtin_args, training_args, model_args, mixture_args), cli_remaining = parse_recipe_args(
        parser, argv, names
    )
    if cli_remaining:
        if _inside_launcher():
            raise CLIError(f"Unknown argument(s) {cli_remaining}: not fields of {names}.")
        return relaunch_with_accelerate(cli_remaining, _subtract(argv, cli_remaining))
    return run_training(script_args, builtin_args, training_args, model_args, mixture_args)


def run_training(script_args, builtin_args, training_args, model_args, mixture_args) -> int:
    """Load model and data, (optionally) measure accuracy, train with MIG (or GRPO), save, measure again."""
    from accelerate import PartialState
    from trl import GRPOTrainer, get_dataset, get_peft_config, get_quantization_config

    from .segmentation import FormatSpec
    from .trainer import MIGGRPOTrainer

    state = PartialState()
    if script_args.algorithm not in ALGORITHMS:
        raise CLIError(f"algorithm={script_args.algorithm!r} is not one of {list(ALGORITHMS)}.")
    solution_column = training_args.solution_column
    started = time.perf_counter()
    timings = {}

    # data
    dataset_name = script_args.dataset_name
    with training_args.main_process_first(desc="load and map the dataset"):
        if mixture_args.datasets:
            if dataset_name:
                logger.warning("Both `datasets` and `dataset_name` are set: `datasets` is used.")
            try:
                data = get_dataset(mixture_args)
            except Exception as err:
                raise CLIError(f"Could not load the dataset mixture `datasets`: {type(err).__name__}: {err}") from err
            dataset_name = ", ".join(d.path for d in mixture_args.datasets)
        else:
            data = load_dataset_dict(
                dataset_name, script_args.dataset_config, builtin_args, streaming=script_args.dataset_streaming
            )
        train_dataset = prepare_dataset(
            get_split(data, script_args.dataset_train_split, dataset_name, "dataset_train_split"),
            script_args, solution_column, f"split {script_args.dataset_train_split!r} of {dataset_name!r}",
        )
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = prepare_dataset(
                get_split(data, script_args.dataset_test_split, dataset_name, "dataset_test_split"),
                script_args, solution_column, f"split {script_args.dataset_test_split!r} of {dataset_name!r}",
            )
        accuracy_splits = {
            split: select_samples(
                prepare_dataset(
                    get_split(data, split, dataset_name, "accuracy_eval_splits"),
                    script_args, solution_column, f"split {split!r} of {dataset_name!r}",
                ),
                script_args.accuracy_eval_max_samples,
            )
            for split in script_args.accuracy_eval_splits or []
        }

    # model (after the data: data errors are cheaper to find than a warm start)
    model_name = model_args.model_name_or_path
    if not model_name:
        raise CLIError(
            "No model: set `model_name_or_path` (a hub id, a local folder, or "
            f"{', '.join(BUILTIN_PREFIX + name for name in BUILTIN_MODELS)})."
        )
    if is_builtin(model_name):
        from .builtin import resolve_builtin_model

        try:
            model_args.model_name_or_path = resolve_builtin_model(
                model_name, builtin_args, use_cpu=training_args.use_cpu, bf16=training_args.bf16,
                fp16=training_args.fp16,
            )
        except ValueError as err:
            raise CLIError(str(err)) from None
        timings["builtin_model_seconds"] = round(time.perf_counter() - started, 2)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    # trainer
    reward_funcs = build_reward_funcs(script_args.reward_funcs, training_args, solution_column)
    spec = FormatSpec.from_config(training_args)
    trainer_kwargs = dict(
        args=training_args,
        processing_class=load_generic_tokenizer(model_args.model_name_or_path),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    try:
        if script_args.algorithm == "mig":
            trainer = MIGGRPOTrainer(model_args.model_name_or_path, reward_funcs=reward_funcs, **trainer_kwargs)
        else:
            if reward_funcs is None:
                from .rewards import default_reward_funcs

                reward_funcs = default_reward_funcs(spec, solution_column)
            trainer = GRPOTrainer(model_args.model_name_or_path, reward_funcs=reward_funcs, **trainer_kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise CLIError(f"Could not build the {script_args.algorithm} trainer: {err}") from err
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer

    eval_kwargs = dict(
        spec=spec,
        batch_size=script_args.accuracy_eval_batch_size,
        max_new_tokens=script_args.accuracy_eval_max_new_tokens or training_args.max_completion_length,
        solution_column=solution_column,
        group_by="num_ops" if accuracy_splits and all("num_ops" in d.column_names for d in accuracy_splits.values())
        else None,
        accelerator=trainer.accelerator,
    )
    accuracy = {}
    if accuracy_splits and script_args.accuracy_eval_before:
        t0 = time.perf_counter()
        accuracy["before"], _ = evaluate_splits(trainer.model, tokenizer, accuracy_splits, label="before", **eval_kwargs)
        timings["eval_before_seconds"] = round(time.perf_counter() - t0, 2)
        state.print(_accuracy_table(accuracy, "before training"))

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    timings["train_seconds"] = round(time.perf_counter() - t0, 2)
    state.print(f"[trl-mig] training done: {trainer.state.global_step} steps in {timings['train_seconds']:.0f}s")

    if accuracy_splits:
        t0 = time.perf_counter()
        accuracy["after"], completions = evaluate_splits(
            trainer.model_wrapped, tokenizer, accuracy_splits, label="after", **eval_kwargs
        )
        timings["eval_after_seconds"] = round(time.perf_counter() - t0, 2)

    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    output_dir = Path(training_args.output_dir)
    if state.is_main_process:
        summary = {
            "algorithm": script_args.algorithm,
            "model": model_name,
            "model_path": model_args.model_name_or_path,
            "dataset": dataset_name,
            "global_steps": trainer.state.global_step,
            "num_processes": state.num_processes,
            "timings": timings,
        }
        if accuracy_splits:
            summary["accuracy"] = accuracy
            write_json(output_dir / "accuracy.json", summary)
            write_json(output_dir / "accuracy_completions.json", completions)
            print(_accuracy_table(accuracy, "held-out accuracy (greedy pass@1)"))
        write_json(output_dir / "run_summary.json", summary)
        print(f"[trl-mig] model, trainer_state.json (logs) and run_summary.json are in {output_dir}")
    if script_args.save_rank_logs:
        write_json(
            output_dir / "rank_logs" / f"rank{state.process_index}.json",
            {
                "rank": state.process_index,
                "local_rank": state.local_process_index,
                "world_size": state.num_processes,
                "distributed_type": str(state.distributed_type),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "log_history": trainer.state.log_history,
            },
        )
    state.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    return 0


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
                f"{key}: " + " -> ".join(_cell(groups[p].get(key, float("nan"))) for p in phases) for key in keys
            )
            lines.append(f"  {split} by num_ops: {cells}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- eval
def eval_command(argv: list[str]) -> int:
    (args, builtin_args), cli_remaining = parse_recipe_args(make_eval_parser(), argv, "EvalArguments or BuiltinArguments")
    if cli_remaining:
        raise CLIError(f"Unknown argument(s) {cli_remaining} (see `trl-mig eval --help`).")
    return run_eval(args, builtin_args)


def run_eval(args: EvalArguments, builtin_args: BuiltinArguments | None = None) -> dict:
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
        splits[split] = select_samples(dataset, args.max_samples)
    try:
        spec = FormatSpec(
            think_open_tag=args.think_open_tag,
            think_close_tag=args.think_close_tag,
            step_pattern=args.step_pattern,
            answer_pattern=args.answer_pattern,
        )
        spec.answer_regex, spec.step_regex  # noqa: B018 - compile now: a bad regex is an input error
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
            print(f"  {name} pass@1 by {args.group_by}: "
                  + ", ".join(f"{k}: {_cell(v)}" for k, v in r["pass@1_by_group"].items()))
    write_json(args.output_file, payload)
    print(f"[trl-mig] results written to {args.output_file}")
    return payload


def load_model_for_eval(args: EvalArguments, builtin_args: BuiltinArguments):
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


COMMANDS = {
    "train": (train_command, "train with MIG (or plain GRPO) from a YAML recipe; flags override the recipe"),
    "eval": (eval_command, "pass@1 and format rate of a model (or of a completions column) on dataset splits"),
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
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
