"""MIG on other GRPOTrainer subclasses: MIGMixin / mig_trainer_class with a user's subclass and TRL's GMPOTrainer."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from helpers import SCRIPT, addition_dataset, cpu_config, make_trainer, scripted_batch, scripted_rollout
from trl_mig import MIGConfig, MIGGRPOTrainer, MIGMixin, mig_config_class, mig_trainer_class
from trl_mig.builtin.tiny import build_tiny_model

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

MIG_METRICS = ("mig/gain_sum", "mig/loglik_best", "mig/steps", "sft/enabled")


class BonusGRPOTrainer(GRPOTrainer):
    """A user's GRPO variant: every reward gets +1, and its loss records the advantages it is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.advantage_shapes = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list) + 1.0

    def _compute_loss(self, model, inputs):
        self.advantage_shapes.append(tuple(inputs["advantages"].shape))
        return super()._compute_loss(model, inputs)


class MIGBonusTrainer(MIGMixin, BonusGRPOTrainer):
    pass


def train(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert set(MIG_METRICS) <= logged
    return trainer.state.log_history[0]


def test_mig_trainer_class_on_grpo_trainer_is_mig_grpo_trainer(tmp_path, char_tokenizer):
    """One implementation: the factory's class computes the same advantages as MIGGRPOTrainer."""
    model = build_tiny_model(char_tokenizer).float()
    built = mig_trainer_class(GRPOTrainer)
    assert built.__name__ == "MIGGRPOTrainer" and built.mig_config_class is MIGConfig
    assert built._name == MIGGRPOTrainer._name
    expected = make_trainer(tmp_path / "a", char_tokenizer, model=model)._generate_and_score_completions(
        scripted_batch())
    trainer = built(model, args=cpu_config(tmp_path / "b"), train_dataset=Dataset.from_list(scripted_batch()),
                    processing_class=char_tokenizer, rollout_func=scripted_rollout(SCRIPT))
    trainer.model.train()
    output = trainer._generate_and_score_completions(scripted_batch())
    assert torch.equal(output["advantages"], expected["advantages"])
    assert torch.equal(output["sft_gate"], expected["sft_gate"])


def test_users_subclass_keeps_its_overrides(tmp_path, char_tokenizer):
    """The subclass's reward bonus reaches the logged rewards, its loss receives MIG's per-token advantages, and the
    gated SFT term (default rewards: accuracy found) is added to its loss."""
    rows = [{"prompt": p, "solution": s} for p, s in zip(SCRIPT, ["20", "6"])]  # the sampler repeats each 4 times
    trainer = MIGBonusTrainer(
        build_tiny_model(char_tokenizer).float(),
        args=cpu_config(tmp_path, max_completion_length=64, shuffle_dataset=False, max_steps=1, sft_weight=1.0),
        train_dataset=Dataset.from_list(rows),
        processing_class=char_tokenizer,
        rollout_func=scripted_rollout(SCRIPT),
    )
    assert isinstance(trainer, BonusGRPOTrainer) and isinstance(trainer, MIGMixin)
    logged = train(trainer)
    # accuracy: 6 of the 8 scripted completions are correct; step format: 6 of 8 are well formed; both get +1
    assert logged["rewards/answer_accuracy_reward/mean"] == pytest.approx(1 + 6 / 8)
    assert logged["rewards/step_format_reward/mean"] == pytest.approx(1 + 6 / 8)
    assert trainer.advantage_shapes and all(len(shape) == 2 for shape in trainer.advantage_shapes)
    assert logged["sft/enabled"] == 1.0 and "sft/loss" in logged


def test_gmpo_with_mig(tmp_path, char_tokenizer):
    """TRL's experimental GMPOTrainer (a geometric-mean, sequence-level loss): MIG gives it one advantage per
    completion, which needs mig_token_scope='all' and trajectory credit; its config keeps GMPO's defaults."""
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    trainer_class = mig_trainer_class(GMPOTrainer, GMPOConfig)
    config_class = trainer_class.mig_config_class
    assert issubclass(config_class, GMPOConfig) and issubclass(config_class, MIGConfig)
    assert trainer_class.mig_token_level_advantages is False
    assert config_class is mig_config_class(GMPOConfig) and trainer_class is mig_trainer_class(GMPOTrainer, GMPOConfig)
    model = build_tiny_model(char_tokenizer).float()
    dataset = addition_dataset(9, operands=3)

    with pytest.raises(ValueError, match="mig_token_scope='all' and mig_credit='trajectory'"):
        trainer_class(model, args=cpu_config(tmp_path, config_class=config_class), train_dataset=dataset,
                      processing_class=char_tokenizer)
    with pytest.raises(TypeError, match="needs `args` to be a MIGGMPOConfig.*every GMPOConfig option"):
        trainer_class(model, args=cpu_config(tmp_path), train_dataset=dataset, processing_class=char_tokenizer)

    args = cpu_config(tmp_path, config_class=config_class, mig_token_scope="all", per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=10, max_steps=1)
    assert args.epsilon == pytest.approx(0.4), "GMPO's default clipping range"
    trainer = trainer_class(model, args=args, train_dataset=dataset, processing_class=char_tokenizer)
    seen = []
    original = GMPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append(inputs["advantages"].clone())
        return original(self, model, inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GMPOTrainer, "_compute_loss", spy)
        logged = train(trainer)
    assert seen and all(a.dim() == 1 for a in seen)
    assert "clip_ratio/region_mean" in logged, "GMPO's own loss ran"

    # the (B,) advantage is what MIGGRPOTrainer gives every token with mig_token_scope='all'
    scripted = dict(args=cpu_config(tmp_path, config_class=config_class, mig_token_scope="all", mig_weight=0.7),
                    train_dataset=Dataset.from_list(scripted_batch()), processing_class=char_tokenizer,
                    rollout_func=scripted_rollout(SCRIPT))
    gmpo = trainer_class(model, **scripted)
    gmpo.model.train()
    sequence_level = gmpo._generate_and_score_completions(scripted_batch())["advantages"]
    token_level = make_trainer(tmp_path, char_tokenizer, model=model, mig_token_scope="all", mig_weight=0.7)
    expected = token_level._generate_and_score_completions(scripted_batch())
    assert sequence_level.shape == (8,)
    assert torch.allclose(sequence_level, expected["advantages"][:, 0], atol=1e-6)
    assert sequence_level[:4].unique().numel() > 2, "outcome and MIG credit both vary within the first group"


def test_factory_rejects_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="subclass of trl.GRPOTrainer"):
        mig_trainer_class(object)
    with pytest.raises(TypeError, match="already has MIG credit"):
        mig_trainer_class(MIGGRPOTrainer)
    with pytest.raises(TypeError, match="subclass of trl.GRPOConfig"):
        mig_config_class(dict)
    assert mig_config_class(GRPOConfig) is MIGConfig
