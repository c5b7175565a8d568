"""`trl_mig.trl_surface`: the private TRL / transformers members trl-mig relies on, checked against the installed
versions, with an error that names the member and the version when one is missing."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
import trl
import trl.data_utils
import trl.trainer.utils
from datasets import Dataset
from trl import GRPOTrainer

from helpers import cpu_config, make_trainer, scripted_batch
from trl_mig import mig_trainer_class
from trl_mig.builtin.tiny import build_tiny_model
from trl_mig.trainer import _keyword_arguments, _takes_sequence_advantages
from trl_mig.trl_surface import (
    PRIVATE_MEMBERS,
    PrivateMember,
    UnsupportedVersionError,
    check_members,
    check_trainer_attributes,
    grpo_parameters_after,
    log_completion_column,
    missing_members,
    sequence_level_trainer_classes,
)

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
METHOD_DOC = Path(__file__).resolve().parents[2] / "docs" / "method.md"


def test_the_installed_versions_have_every_member():
    assert missing_members() == []
    check_members()  # library and application
    assert {member.when for member in PRIVATE_MEMBERS} >= {"import", "construction", "training"}


def test_a_missing_hook_is_named_with_the_installed_version(monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    expected = (
        "trl-mig needs GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list), which "
        f"trl {trl.__version__} does not have"
    )
    with pytest.raises(UnsupportedVersionError, match=re.escape(expected)):
        check_members("library")


def test_a_hook_with_other_parameters_is_named_with_its_signature():
    class ChangedHook(GRPOTrainer):  # a throwaway subclass: the check looks GRPOTrainer's members up on it
        def _calculate_rewards(self, inputs, completions):
            return None

    with pytest.raises(UnsupportedVersionError, match=r"_calculate_rewards\(inputs, prompts, completions, "
                       r"completion_ids_list\), which trl .* \(its signature is \(inputs, completions\)\)"):
        check_members("library", trainer_class=ChangedHook)


def test_a_missing_helper_or_parameter_is_named(monkeypatch):
    monkeypatch.delattr(trl.trainer.utils, "use_adapter")
    with pytest.raises(UnsupportedVersionError,
                       match=r"needs trl\.trainer\.utils\.use_adapter\(model, adapter_name=\)"):
        check_members("library")
    monkeypatch.undo()

    def multimodal_forward(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                           compute_entropy=False, compute_aux_loss=False, pixel_values=None):
        return None

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", multimodal_forward)
    with pytest.raises(UnsupportedVersionError, match=r"_get_per_token_logps_and_entropies\(pixel_values=, "
                       r"image_grid_thw=.*trl-mig uses it in multimodal\.py"):
        check_members("library")


def test_a_missing_transformers_member_names_transformers(monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_load_optimizer_and_scheduler")
    with pytest.raises(UnsupportedVersionError, match=re.escape(
        f"needs transformers.Trainer._load_optimizer_and_scheduler(checkpoint), which transformers "
        f"{transformers.__version__} does not have"
    )):
        check_members("library")


def test_an_optional_member_is_reported_not_raised(monkeypatch):
    import transformers.masking_utils

    monkeypatch.delattr(transformers.masking_utils, "AttentionMaskInterface")
    check_members("library")
    (missing,) = missing_members("library")
    assert missing[0].optional and missing[0].path == "transformers.masking_utils:AttentionMaskInterface.register"


def test_the_application_members_are_checked_apart(monkeypatch):
    monkeypatch.delattr(trl.data_utils, "get_dataset_column_names")
    check_members("library")
    with pytest.raises(UnsupportedVersionError, match=r"trl\.data_utils\.get_dataset_column_names\(dataset\)"):
        check_members("application")


def test_an_attribute_the_training_loop_must_set():
    real = next(m for m in PRIVATE_MEMBERS if m.path.endswith("current_gradient_accumulation_steps"))
    assert real.problem() is None
    gone = PrivateMember("transformers:Trainer.no_such_accumulation_counter", "here", "a test", when="training")
    with pytest.raises(UnsupportedVersionError, match="Trainer.no_such_accumulation_counter.*no method of Trainer"):
        check_members(members=[gone])


def test_instance_attributes_are_checked_on_the_trainer(tmp_path, char_tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, char_tokenizer)
    check_trainer_attributes(trainer)
    with monkeypatch.context() as patch:
        patch.delattr(trainer, "eos_token_ids")
        with pytest.raises(UnsupportedVersionError, match=r"needs GRPOTrainer\.eos_token_ids, which trl .* "
                           "has no attribute 'eos_token_ids'"):
            check_trainer_attributes(trainer)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_logs", {"prompt": []})
        with pytest.raises(UnsupportedVersionError, match=r"GRPOTrainer\._logs, .*'extra' entry is a defaultdict"):
            check_trainer_attributes(trainer)


def test_construction_fails_on_a_trainer_without_an_attribute(tmp_path, char_tokenizer):
    class NoEvalGroups(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self.num_generations_eval

    with pytest.raises(UnsupportedVersionError, match=r"needs GRPOTrainer\.num_generations_eval"):
        mig_trainer_class(NoEvalGroups)(build_tiny_model(char_tokenizer), args=cpu_config(tmp_path),
                                        train_dataset=Dataset.from_list(scripted_batch()),
                                        processing_class=char_tokenizer)


def test_positional_arguments_are_mapped_by_parameter_name(monkeypatch):
    names = grpo_parameters_after("train_dataset")
    assert names[:2] == ["eval_dataset", "processing_class"]
    assert _keyword_arguments(("eval", "tokenizer"), {"peft_config": None}) == {
        "eval_dataset": "eval", "processing_class": "tokenizer", "peft_config": None,
    }

    def reordered(self, model, reward_funcs=None, args=None, extra=None, train_dataset=None, eval_dataset=None):
        pass

    monkeypatch.setattr(GRPOTrainer, "__init__", reordered)
    assert grpo_parameters_after("train_dataset") == ["eval_dataset"]  # not a fixed offset
    with pytest.raises(UnsupportedVersionError, match="no parameter 'processing_class'"):
        grpo_parameters_after("processing_class")


def test_gmpo_is_detected_by_its_class_not_its_name():
    from trl.experimental.gmpo import GMPOTrainer

    assert GMPOTrainer in sequence_level_trainer_classes()
    assert _takes_sequence_advantages(type("MyGMPO", (GMPOTrainer,), {}))
    look_alike = type("GMPOTrainer", (GRPOTrainer,), {"__module__": "trl.experimental.gmpo.gmpo_trainer"})
    assert not _takes_sequence_advantages(look_alike)
    assert not _takes_sequence_advantages(GRPOTrainer)


def test_log_completion_column_appends_to_the_completions_table():
    trainer = SimpleNamespace(_logs={"extra": defaultdict(list)})
    log_completion_column(trainer, "mig_gain", [0.5, None])
    log_completion_column(trainer, "mig_gain", [1.0])
    assert trainer._logs["extra"] == {"mig_gain": [0.5, None, 1.0]}


def test_the_docs_table_lists_every_member():
    text = METHOD_DOC.read_text()
    section = text.split("## The TRL surface", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {line.split("`")[1] for line in rows}
    assert named == {member.name for member in PRIVATE_MEMBERS}


def test_a_member_path_must_name_its_module():
    with pytest.raises(ValueError, match="module:Attribute.path"):
        PrivateMember("GRPOTrainer._logs", "here", "a test")
    with pytest.raises(ValueError, match="when must be one of"):
        PrivateMember("trl:GRPOTrainer._logs", "here", "a test", when="later")
