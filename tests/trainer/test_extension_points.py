"""The public extension points: `MIGMixin.step_log_likelihoods` (another step scorer, here a fixed l_k pattern) and
`build_trainer(trainer_cls=...)` / `train_command(argv, trainer_cls=...)` (the CLI path with a subclass)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer, ModelConfig

from helpers import (
    OUTCOME,
    PROMPTS,
    SCRIPT,
    cpu_config,
    group_normalise,
    scripted_batch,
    scripted_rollout,
    watermark_sum,
)
from trl_mig import FormatSpec, MIGGRPOTrainer, StepBatch, segment_completion
from trl_mig.builtin.tiny import build_tiny_model
from trl_mig.cli.errors import CLIError
from trl_mig.cli.train import TrainingData, build_trainer, resolve_trainer_class, train_command

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
DEMO = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "mig.yaml")

# l_0, l_1, ... of the j-th completion of every group; the scripted completions have 1 or 2 steps
PATTERN = (
    [-3.0, -1.0, -2.0],  # lifts at step 1, drops at step 2: gain 2
    [-2.0, -2.0, -2.0],  # flat: gain 0
    [-4.0, -1.0, -0.5],  # lifts twice: gain 3.5
    [-1.0, -3.0, -0.5],  # pump and dump: only the lift above l_0 counts, 0.5
)


class FixedStepScorer(MIGGRPOTrainer):
    """A step scorer that ignores the model: l_k = PATTERN[row % 4][k]. With `fill_past_last_step`, it writes values
    past K_i too, which MIG must ignore."""

    fill_past_last_step = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[StepBatch] = []

    def step_log_likelihoods(self, batch: StepBatch) -> torch.Tensor:
        self.batches.append(batch)
        loglik = batch.empty_log_likelihoods()
        for row, steps in enumerate(batch.num_steps):
            width = loglik.shape[1] if self.fill_past_last_step else steps + 1
            loglik[row, :width] = torch.tensor(PATTERN[row % 4][:width])
        return loglik  # on the CPU: MIG puts it on the accelerator device


class PaddedFixedStepScorer(FixedStepScorer):
    fill_past_last_step = True


def scripted_trainer(tmp_path, char_tokenizer, trainer_class, rows=None, **overrides):
    trainer = trainer_class(
        build_tiny_model(char_tokenizer).float(),
        args=cpu_config(tmp_path, **overrides),
        train_dataset=Dataset.from_list(rows or scripted_batch()),
        processing_class=char_tokenizer,
        rollout_func=scripted_rollout(SCRIPT),
    )
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("trainer_class", [FixedStepScorer, PaddedFixedStepScorer])
def test_overridden_step_scorer_sets_the_per_token_advantages(tmp_path, char_tokenizer, trainer_class):
    trainer = scripted_trainer(tmp_path, char_tokenizer, trainer_class, mig_weight=0.7, outcome_weight=1.3)
    output = trainer._generate_and_score_completions(scripted_batch())
    (batch,) = trainer.batches
    assert [row["prompt"] for row in batch.rows] == [row["prompt"] for row in scripted_batch()]
    assert [row["solution"] for row in batch.rows] == [row["solution"] for row in scripted_batch()]
    steps = batch.num_steps
    assert steps == [2, 2, 2, 2, 1, 1, 1, 1], "the scripted completions' steps"
    advantages = output["advantages"]
    for group, prompt in enumerate(PROMPTS):
        rows = range(group * 4, group * 4 + 4)
        expected_mig = group_normalise([watermark_sum(PATTERN[row % 4][: steps[row] + 1]) for row in rows])
        expected_outcome = group_normalise(OUTCOME[prompt]) if len(set(OUTCOME[prompt])) > 1 else [0.0] * 4
        for j, row in enumerate(rows):
            bounds = batch.segments[row].boundaries
            length = int(output["completion_mask"][row].sum())
            outcome_part = 1.3 * expected_outcome[j]
            thought = advantages[row, bounds[0] : bounds[-1]]
            outside = torch.cat([advantages[row, : bounds[0]], advantages[row, bounds[-1] : length]])
            assert thought.tolist() == pytest.approx([outcome_part + 0.7 * expected_mig[j]] * len(thought), abs=1e-3)
            assert outside.tolist() == pytest.approx([outcome_part] * len(outside), abs=1e-3)
    # group 2's completions are identical, so only the fixed l_k separate them
    assert advantages[4:].abs().sum() > 0
    # the completions table and the metrics come from the same l_k
    gains = [watermark_sum(PATTERN[row % 4][: steps[row] + 1]) for row in range(8)]
    assert list(trainer._logs["extra"]["mig_gain"]) == pytest.approx(gains)
    assert list(trainer._logs["extra"]["mig_loglik"]) == [PATTERN[row % 4][: steps[row] + 1] for row in range(8)]
    assert trainer._metrics["train"]["mig/loglik_prompt_only"][-1] == pytest.approx(-2.5)


def test_overridden_step_scorer_trains(tmp_path, char_tokenizer):
    """Real training: the override scores every generation batch (with every dataset column), and the policy moves."""
    rows = [dict(row, tag=f"problem-{i}") for i, row in enumerate(scripted_batch()[::4])]  # the sampler repeats them
    trainer = scripted_trainer(tmp_path, char_tokenizer, FixedStepScorer, rows=rows, max_completion_length=64,
                               shuffle_dataset=False, max_steps=2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed
    assert len(trainer.batches) >= 2 and all(len(batch) == 8 for batch in trainer.batches)
    assert {row["tag"] for batch in trainer.batches for row in batch.rows} == {"problem-0", "problem-1"}
    history = trainer.state.log_history
    logged = [entry["mig/loglik_prompt_only"] for entry in history if "mig/loglik_prompt_only" in entry]
    assert logged == pytest.approx([-2.5] * len(logged)) and logged


@pytest.mark.parametrize(
    "returned, error, message",
    [
        (lambda batch: torch.zeros(len(batch), 1), ValueError, r"shape \(B, K_max \+ 1\) = \(8, 3\).*got \(8, 1\)"),
        (lambda batch: batch.empty_log_likelihoods()[:-1], ValueError, r"got \(7, 3\)"),
        (lambda batch: batch.empty_log_likelihoods().tolist(), TypeError, "real-valued torch.Tensor.*got list"),
    ],
)
def test_a_step_scorer_of_the_wrong_shape_is_named(tmp_path, char_tokenizer, returned, error, message):
    class WrongScorer(MIGGRPOTrainer):
        def step_log_likelihoods(self, batch):
            return returned(batch)

    trainer = scripted_trainer(tmp_path, char_tokenizer, WrongScorer)
    with pytest.raises(error, match=message):
        trainer._generate_and_score_completions(scripted_batch())


def test_step_batch_needs_one_entry_per_completion(char_tokenizer):
    text = "<think>### Step 1\n1+1=2\n</think>\n<answer>2</answer>"
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    segments = [segment_completion(char_tokenizer, ids, FormatSpec())] * 2
    batch = StepBatch([{}, {}], [[1], [1]], [ids, ids], segments, [[], []])
    assert len(batch) == 2 and batch.multimodal == [None, None] and batch.width == 2
    with pytest.raises(ValueError, match="segments has 2, but rows has 1, answers has 3"):
        StepBatch([{}], [[1], [1]], [ids, ids], segments, [[], [], []])


# ------------------------------------------------------------------------------------------------- the CLI path
def test_build_trainer_uses_the_given_class(tmp_path, char_tokenizer):
    model_dir = tmp_path / "tiny"
    build_tiny_model(char_tokenizer).float().save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    training_args = cpu_config(tmp_path / "run")
    script_args = SimpleNamespace(algorithm="mig", reward_funcs=None, dataset_name="scripted")
    data = TrainingData(name="scripted", train=Dataset.from_list(scripted_batch()), eval=None, accuracy={})
    build = lambda cls: build_trainer(  # noqa: E731
        script_args, training_args, ModelConfig(model_name_or_path=str(model_dir)), data,
        FormatSpec.from_config(training_args), trainer_cls=cls,
    )
    assert type(build(FixedStepScorer)) is FixedStepScorer
    assert type(build(None)) is MIGGRPOTrainer


def test_build_trainer_rejects_a_class_without_mig_credit():
    script_args = SimpleNamespace(algorithm="mig", reward_funcs=None, dataset_name="scripted")
    with pytest.raises(TypeError, match="algorithm 'mig' needs a trainer_cls with MIG credit.*got GRPOTrainer"):
        build_trainer(script_args, None, None, None, None, trainer_cls=GRPOTrainer)
    with pytest.raises(TypeError, match="subclass of trl.GRPOTrainer, got dict"):
        build_trainer(script_args, None, None, None, None, trainer_cls=dict)
    with pytest.raises(TypeError, match="algorithm 'grpo' trains without MIG credit"):
        resolve_trainer_class("grpo", FixedStepScorer)
    assert resolve_trainer_class("grpo") is GRPOTrainer and resolve_trainer_class("mig") is MIGGRPOTrainer


def test_train_command_does_not_relaunch_with_a_trainer_class(monkeypatch):
    """`accelerate launch` options relaunch `-m trl_mig train`, which would drop the class: an error instead."""
    import accelerate.commands.launch as launch_module

    launched = []
    monkeypatch.setattr(launch_module, "launch_command", launched.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(CLIError, match="cannot take the trainer class FixedStepScorer"):
        train_command(["--config", DEMO, "--num_processes", "2"], trainer_cls=FixedStepScorer)
    assert not launched
    assert train_command(["--config", DEMO, "--num_processes", "2"]) == 0 and launched, "without a class it relaunches"
