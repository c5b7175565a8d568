"""MIGConfig: GRPOConfig options keep working, MIG fields have defaults, bad values name the field."""

import pytest
from trl import GRPOConfig

from trl_mig import MIGConfig
from helpers import cpu_config


def test_defaults_and_grpo_fields(tmp_path):
    config = cpu_config(tmp_path, loss_type="dapo", scale_rewards="batch", beta=0.04)
    assert isinstance(config, GRPOConfig)
    assert (config.mig_weight, config.outcome_weight, config.sft_weight) == (1.0, 1.0, 0.1)
    assert config.mig_credit == "trajectory" and config.mig_scale_rewards == "group"
    assert config.solution_column == "solution" and config.mig_likelihood_model == "policy"
    assert config.loss_type == "dapo" and config.scale_rewards == "batch" and config.beta == 0.04


def test_every_mig_field_has_help():
    from dataclasses import fields

    grpo_fields = {f.name for f in fields(GRPOConfig)}
    mig_fields = [f for f in fields(MIGConfig) if f.name not in grpo_fields]
    assert len(mig_fields) >= 15
    assert all(f.metadata.get("help") for f in mig_fields)


@pytest.mark.parametrize(
    "overrides, field_name",
    [
        ({"mig_weight": -1.0}, "mig_weight"),
        ({"sft_weight": float("nan")}, "sft_weight"),
        ({"mig_weight": 0.0, "outcome_weight": 0.0}, "outcome_weight"),
        ({"mig_credit": "token"}, "mig_credit"),
        ({"mig_gain": "ratio"}, "mig_gain"),
        ({"mig_token_scope": "answer"}, "mig_token_scope"),
        ({"answer_match": "fuzzy"}, "answer_match"),
        ({"mig_scale_rewards": "max"}, "mig_scale_rewards"),
        ({"mig_likelihood_model": "critic"}, "mig_likelihood_model"),
        ({"step_fallback": "sentence"}, "step_fallback"),
        ({"mig_scoring_method": "fast"}, "mig_scoring_method"),
        ({"step_pattern": ""}, "step_pattern"),
        ({"step_pattern": "(unclosed"}, "step_pattern"),
        ({"step_pattern": "x*"}, "step_pattern"),
        ({"answer_pattern": "<answer>.*</answer>"}, "answer_pattern"),
        ({"mig_scaffold": ""}, "mig_scaffold"),
        ({"mig_scaffold": "</think><answer>{answer}</answer>"}, "mig_scaffold"),
        ({"think_close_tag": ""}, "think_close_tag"),
        ({"solution_column": ""}, "solution_column"),
        ({"mig_max_steps": 0}, "mig_max_steps"),
        ({"mig_scoring_batch_size": 0}, "mig_scoring_batch_size"),
        ({"sft_correctness_threshold": float("inf")}, "sft_correctness_threshold"),
        ({"mig_failure_scaling": -0.5}, "mig_failure_scaling"),
        ({"mig_failure_scaling": float("nan")}, "mig_failure_scaling"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
    ],
)
def test_invalid_fields_name_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=f"MIGConfig.{field_name}"):
        cpu_config(tmp_path, **overrides)


# ------------------------------------------------------------------------------------- one declaration of the settings
def _declared():
    from dataclasses import fields

    from trl_mig import MIGSettings

    return {f.name: f for f in fields(MIGSettings)}


def test_mig_config_is_grpo_config_plus_mig_settings(tmp_path):
    """MIGConfig's MIG fields are MIGSettings' (same defaults, help, choices), after GRPOConfig's as in `--help`."""
    from dataclasses import fields

    from trl_mig import MIGSettings
    from trl_mig.config import mig_field_names

    declared = _declared()
    config_fields = [f.name for f in fields(MIGConfig)]
    grpo_fields = [f.name for f in fields(GRPOConfig)]
    assert config_fields == grpo_fields + list(declared)
    assert mig_field_names() == tuple(declared) and len(declared) >= 20
    for f in fields(MIGConfig):
        if f.name in declared:
            assert (f.default, dict(f.metadata)) == (declared[f.name].default, dict(declared[f.name].metadata))
    config = cpu_config(tmp_path)
    assert isinstance(config, MIGSettings)
    assert {name: getattr(config, name) for name in declared} == {name: f.default for name, f in declared.items()}
    assert MIGSettings() == MIGSettings.from_config(config)  # the MIG part of a config, read back


def test_every_derived_declaration_agrees_with_mig_settings():
    """FormatSpec(), CreditSettings.from_config(None), `trl-mig inspect`'s and `trl-mig eval`'s arguments carry
    MIGSettings' defaults and help: a default retyped in one of them and changed in the other fails here."""
    from dataclasses import fields

    from trl_mig import FormatSpec
    from trl_mig.cli.eval import EvalArguments, make_eval_parser
    from trl_mig.cli.inspect import _NOT_INSPECT_SETTINGS, parse_inspect_args
    from trl_mig.inspection import CreditSettings

    declared = _declared()
    defaults = {name: f.default for name, f in declared.items()}
    grpo = {f.name: f for f in fields(GRPOConfig)}

    spec = FormatSpec()
    assert set(spec.to_settings()) <= set(declared) and len(spec.to_settings()) == 7
    assert spec.to_settings() == {name: defaults[name] for name in spec.to_settings()}
    assert spec.max_steps == defaults["mig_max_steps"]

    credit = CreditSettings.from_config(None)
    assert {name: getattr(credit, name) for name in declared} == defaults
    assert credit.spec == spec
    extra = {"scale_rewards", "reward_weights", "multi_objective_aggregation"}
    assert {f.name for f in fields(CreditSettings)} == set(declared) | extra
    assert {name: getattr(credit, name) for name in extra} == {name: grpo[name].default for name in extra}
    assert credit.multi_objective_aggregation == "sum_then_normalize"

    # inspect: MIGSettings minus the fields a text view does not use, plus GRPO's reward fields, GRPO's help
    _, settings, _ = parse_inspect_args(["--model", "m"])
    inspect_fields = {f.name: f for f in fields(settings)}
    assert set(inspect_fields) == (set(declared) - _NOT_INSPECT_SETTINGS) | extra
    for name, f in inspect_fields.items():
        source = declared.get(name) or grpo[name]
        if name == "answer_match":  # None: exact for builtin:arithmetic's running answers, else math
            assert settings.answer_match is None and f.metadata["help"].startswith(source.metadata["help"])
            assert f.metadata["choices"] == declared["answer_match"].metadata["choices"]
            continue
        assert getattr(settings, name) == source.default, name
        assert f.metadata["help"] == source.metadata["help"], name

    # eval: the format fields
    eval_args, _ = make_eval_parser().parse_args_into_dataclasses(args=[])
    shared = {f.name: f for f in fields(EvalArguments) if f.name in declared}
    assert set(shared) == {"think_open_tag", "think_close_tag", "step_pattern", "answer_pattern", "answer_match"}
    for name, f in shared.items():
        assert f.metadata["help"].startswith(declared[name].metadata["help"])
        assert getattr(eval_args, name) == (None if name == "answer_match" else defaults[name]), name


def test_default_step_pattern_is_the_one_the_docs_quote():
    """The step-header default is one constant; the docstring, README and method page quote that same text, and every
    default the MIGSettings docstring quotes is the field's."""
    import ast
    import re
    from pathlib import Path

    from trl_mig import FormatSpec, MIGSettings
    from trl_mig.config import DEFAULT_STEP_PATTERN

    assert MIGSettings().step_pattern == FormatSpec().step_pattern == DEFAULT_STEP_PATTERN
    assert re.fullmatch(DEFAULT_STEP_PATTERN, "### Step 12") and not re.search(DEFAULT_STEP_PATTERN, "Step 1")
    root = Path(__file__).resolve().parents[2]
    for page in ("README.md", "docs/method.md"):
        assert f"`{DEFAULT_STEP_PATTERN}`" in (root / page).read_text(), page
    quoted = dict(re.findall(r"^ {8}(\w+) \(`[^`]*`, defaults to `([^`]*)`\)", MIGSettings.__doc__, re.MULTILINE))
    declared = _declared()
    assert len(quoted) >= 20 and set(quoted) <= set(declared)
    for name, text in quoted.items():
        assert ast.literal_eval(text) == declared[name].default, name


def test_the_config_reference_lists_every_field_with_its_default():
    """docs/config.md has a row for every MIGSettings field, whose default column is the field's default."""
    import ast
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    rows = {}
    for names, defaults in re.findall(r"^\| ([^|]+) \| ([^|]+) \|", page, re.MULTILINE):
        listed = re.findall(r"`(\w+)`", names)
        values = [value.strip("`") for value in defaults.split(", ")]
        rows.update(zip(listed, values) if len(values) == len(listed) else ((name, None) for name in listed))
    declared = _declared()
    assert set(declared) <= set(rows), sorted(set(declared) - set(rows))
    for name, text in rows.items():
        if name in declared and text is not None and declared[name].default is not None:
            # a regex default is written bare, every other default as a Python literal
            bare = isinstance(declared[name].default, str) and not text.startswith('"')
            assert (text if bare else ast.literal_eval(text)) == declared[name].default, name


BAD_VALUES = [
    ("mig_weight", -1.0, "must be a finite number >= 0"),
    ("mig_credit", "token", "is not one of"),
    ("step_pattern", "(unclosed", "is not a valid regular expression"),
    ("answer_pattern", "<answer>.*</answer>", "needs a capture group"),
    ("mig_max_steps", 0, "must be an integer >= 1"),
    ("mig_failure_scaling", -1.0, "must be a finite number >= 0"),
]
CHOICE_FIELDS = {"mig_credit"}


@pytest.mark.parametrize("name, value, problem", BAD_VALUES)
def test_a_bad_value_names_the_field_through_every_entry_point(tmp_path, capsys, name, value, problem):
    from trl_mig import MIGSettings
    from trl_mig.cli.main import main
    from trl_mig.inspection import CreditSettings

    with pytest.raises(ValueError, match=f"MIGSettings.{name}.*{problem}"):
        MIGSettings(**{name: value})
    with pytest.raises(ValueError, match=f"MIGConfig.{name}.*{problem}"):
        cpu_config(tmp_path, **{name: value})
    with pytest.raises(ValueError, match=f"CreditSettings.{name}.*{problem}"):
        CreditSettings.from_config(None, **{name: value})
    # the command refuses it before loading any model; argparse itself refuses a value outside a field's choices
    try:
        code = main(["inspect", "--model", "unused", "--prompt", "Compute 2+3.", "--solution", "5", "--completion",
                     "x", f"--{name}", str(value)])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    cli_problem = "invalid choice" if name in CHOICE_FIELDS else problem
    assert code == 2 and name in err and cli_problem in err, err


@pytest.mark.parametrize("name, value, problem", [item for item in BAD_VALUES if "pattern" in item[0]])
def test_eval_refuses_a_bad_format_naming_the_field(tmp_path, capsys, name, value, problem):
    import json

    from trl_mig.cli.main import main

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Compute 2+3.", "solution": "5", "completion": "<answer>5</answer>"}) + "\n")
    code = main(["eval", "--dataset", str(data), "--splits", "train", "--completions_column", "completion",
                 "--output_file", str(tmp_path / "out.json"), f"--{name}", value])
    err = capsys.readouterr().err
    assert code == 2 and f"MIGSettings.{name}" in err and problem in err, err
    assert not (tmp_path / "out.json").exists()


def test_settings_read_from_any_source(tmp_path):
    """FormatSpec.from_config / CreditSettings.from_config read a MIGConfig, MIGSettings, a FormatSpec, or a partial
    object (missing names at their defaults); the GRPO reward fields come from the config."""
    from types import SimpleNamespace

    from trl_mig import FormatSpec, MIGSettings
    from trl_mig.inspection import CreditSettings

    config = cpu_config(tmp_path, mig_max_steps=3, step_fallback="line", mig_weight=0.5, scale_rewards="batch",
                        reward_weights=[1, 0.5], multi_objective_aggregation="normalize_then_sum")
    assert FormatSpec.from_config(config) == FormatSpec(max_steps=3, step_fallback="line")
    assert FormatSpec.from_config(MIGSettings(mig_max_steps=3, step_fallback="line")) == FormatSpec.from_config(config)
    assert FormatSpec.from_config(SimpleNamespace(step_pattern=r"Step \d")) == FormatSpec(step_pattern=r"Step \d")
    assert FormatSpec.from_config(config, answer_match="exact").answer_match == "exact"

    credit = CreditSettings.from_config(config)
    assert (credit.mig_weight, credit.spec.max_steps, credit.scale_rewards) == (0.5, 3, "batch")
    assert credit.reward_weights == (1.0, 0.5) and credit.multi_objective_aggregation == "normalize_then_sum"
    assert CreditSettings.from_config(credit) == credit
    from_spec = CreditSettings.from_config(FormatSpec(max_steps=5, answer_match="exact"), mig_gain="difference")
    assert (from_spec.mig_max_steps, from_spec.answer_match, from_spec.mig_gain) == (5, "exact", "difference")
    assert from_spec.mig_weight == _declared()["mig_weight"].default
    assert CreditSettings.from_config(credit, spec=FormatSpec(step_fallback="none")).spec.step_fallback == "none"
    assert CreditSettings.from_config(None, scale_rewards=False).scale_rewards == "none"  # as GRPOConfig reads it
    with pytest.raises(ValueError, match="CreditSettings.multi_objective_aggregation='mean'"):
        CreditSettings.from_config(None, multi_objective_aggregation="mean")
