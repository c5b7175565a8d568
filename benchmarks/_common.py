"""Helpers shared by the benchmark scripts."""

import os
import platform


def machine() -> str:
    """The device, CPU model, torch version and thread count the numbers were measured on."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device} ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def library_commit() -> str:
    """The commit of the `trl_mig` the numbers were measured with (the one imported, wherever it lies), with
    "+changes" when its files differ from that commit; "unknown" outside a git checkout."""
    import subprocess

    import trl_mig

    folder = os.path.dirname(os.path.abspath(trl_mig.__file__))

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def recipe_and_model(config_path: str, model_path: str | None = None):
    """
    The settings of a recipe with a `builtin:` model and dataset, and that model (or the one in `model_path`), for the
    credit diagnostics: `(script_args, builtin_args, mig_config, tokenizer, model)`.
    """
    from transformers import AutoModelForCausalLM

    from trl_mig.builtin import resolve_builtin_model
    from trl_mig.cli.recipes import make_train_parser, parse_recipe_args
    from trl_mig.cli.models import load_generic_tokenizer

    (script, builtin, config, model_args, _), _ = parse_recipe_args(
        make_train_parser(), ["--config", config_path], "the recipe"
    )
    path = model_path or resolve_builtin_model(model_args.model_name_or_path, builtin, use_cpu=True)
    return script, builtin, config, load_generic_tokenizer(path), AutoModelForCausalLM.from_pretrained(path)


STEP_CALCULATION = r"\d+[-+*]\d+=\d+"  # a built-in arithmetic step's calculation, e.g. `19*3=57`


def grade_steps(expression: str, step_texts: list[str]) -> list[bool]:
    """
    Grade the steps of a built-in arithmetic completion against the gold solution of `expression`, up to the first
    wrong one (a wrong operand, operator or result; later steps build on a wrong value and are not graded): one bool
    per graded step, so every entry but the last is True, and the last is False if a step was wrong.
    """
    import re

    from trl_mig.builtin.tools import parse_expression

    gold = [f"{a}{op}{b}={c}" for a, op, b, c in parse_expression(expression).steps()]
    grades = []
    for k, text in enumerate(step_texts):
        found = re.search(STEP_CALCULATION, text)
        grades.append(found is not None and k < len(gold) and found.group() == gold[k])
        if not grades[-1]:
            break
    return grades


def every_step_right(expression: str, step_texts: list[str]) -> bool:
    """Whether the completion's steps are exactly the gold solution's, all of them."""
    from trl_mig.builtin.tools import parse_expression

    grades = grade_steps(expression, step_texts)
    return all(grades) and len(grades) == len(parse_expression(expression).steps())
