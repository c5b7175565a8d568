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

This package is the application; the library it drives is `trl_mig` itself. One module per command (`train`, `eval`,
`inspect`, `study`), with `recipes` (the train recipe's dataclasses and parser), `data` (datasets), `models` (loading
models and tokenizers), `launch` (accelerate) and `errors` (the one-line input error) beside them; this module only
dispatches.
"""
from __future__ import annotations

import logging
import os
import sys

from ..builtin import BUILTIN_DATASETS, BUILTIN_MODELS, BUILTIN_PREFIX, default_cache_dir
from .errors import CLIError
from .eval import eval_command
from .inspect import inspect_command
from .launch import accelerate_config_command
from .study import study_command
from .train import train_command


def builtins_command(argv: list[str]) -> int:
    if argv:
        print("usage: trl-mig builtins\n\nLists the builtin: datasets and models, and the cache of built-in models.")
        return 0 if argv[0] in ("-h", "--help") else 2
    print("Built-in datasets (dataset_name / --dataset):")
    for name, text in BUILTIN_DATASETS.items():
        print(f"  {BUILTIN_PREFIX}{name:<22} {text}")
    print("Built-in models (model_name_or_path / --model):")
    for name, text in BUILTIN_MODELS.items():
        print(f"  {BUILTIN_PREFIX}{name:<22} {text}")
    print(f"Cache of built-in models: {default_cache_dir()} (builtin_cache_dir / $TRL_MIG_CACHE)")
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


# Bad input: the commands raise CLIError; the library (and trl_mig.builtin) raise ValueError for a bad value and
# TypeError for a value of the wrong type (e.g. a dataset column of dicts), each naming the field or column. KeyError
# is left out: from a command it is far more often a bug than input, and its traceback is what finds the bug.
INPUT_ERRORS = (CLIError, ValueError, TypeError)


def debug_enabled() -> bool:
    """TRL_MIG_DEBUG=1 (any value but '', '0', 'false', 'no'): input errors show their traceback."""
    return os.environ.get("TRL_MIG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a message of several lines is joined), or its type when it has none."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


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
    except INPUT_ERRORS as err:
        if debug_enabled():
            raise
        print(f"trl-mig {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
