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
        ({"remove_unused_columns": True}, "remove_unused_columns"),
    ],
)
def test_invalid_fields_name_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=f"MIGConfig.{field_name}"):
        cpu_config(tmp_path, **overrides)
