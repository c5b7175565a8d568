"""MIGGRPOTrainer: per-token advantages and gates checked against an independent computation, and real training."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from helpers import (
    OUTCOME,
    PROMPTS,
    SCAFFOLD,
    SCRIPT,
    SOLUTIONS,
    addition_dataset,
    assert_loss_is_reference,
    cpu_config,
    group_normalise,
    make_trainer,
    progress,
    reference_logliks,
    scripted_batch,
    scripted_rollout,
    watermark_sum,
)
from trl_mig import MIGGRPOTrainer
from trl_mig.builtin.tiny import build_tiny_model

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"


@pytest.mark.parametrize("architecture, credit", [("qwen2", "trajectory"), ("qwen2", "step"), ("llama", "trajectory")])
def test_per_token_advantages_match_an_independent_computation(tmp_path, char_tokenizer, architecture, credit):
    model = build_tiny_model(char_tokenizer, architecture).float()
    trainer = make_trainer(tmp_path, char_tokenizer, model=model, mig_weight=0.7, outcome_weight=1.3, mig_credit=credit)
    output = trainer._generate_and_score_completions(scripted_batch())
    advantages = output["advantages"]
    assert advantages.shape == output["completion_ids"].shape

    for group, prompt in enumerate(PROMPTS):
        expected_outcome = group_normalise(OUTCOME[prompt])
        logliks = [reference_logliks(trainer.model, char_tokenizer, prompt, c, SOLUTIONS[group]) for c in SCRIPT[prompt]]
        gains = [watermark_sum(values) for values, _ in logliks]
        expected_mig = group_normalise(gains)
        for j, (values, bounds) in enumerate(logliks):
            row = group * 4 + j
            length = int(output["completion_mask"][row].sum())
            tokens = advantages[row, :length]
            outcome_part = 1.3 * expected_outcome[j]
            # tokens outside the thought (tags, answer, EOS) carry only the outcome advantage
            assert tokens[: bounds[0]].tolist() == pytest.approx([outcome_part] * bounds[0], abs=1e-4)
            assert tokens[bounds[-1] :].tolist() == pytest.approx([outcome_part] * (length - bounds[-1]), abs=1e-4)
            for k in range(len(bounds) - 1):
                step_tokens = tokens[bounds[k] : bounds[k + 1]]
                if credit == "trajectory":
                    mig = expected_mig[j]
                else:
                    # progress by step k (watermark lift so far) against the group's completions that reached step k
                    reached = [progress(v)[k] for v, b in logliks if len(b) - 1 > k]
                    spread = torch.tensor(reached, dtype=torch.float64)
                    mig = 0.0
                    if len(reached) >= 2:
                        mig = (progress(values)[k] - spread.mean().item()) / (spread.std().item() + 1e-4)
                expected = outcome_part + 0.7 * mig
                assert step_tokens.tolist() == pytest.approx([expected] * len(step_tokens), abs=2e-3), (row, k)
    assert (advantages[4:] == 0).all(), "a group of identical completions has zero advantage everywhere"


def test_ablations_raw_differences_on_every_token_match_an_independent_computation(tmp_path, char_tokenizer):
    """mig_gain='difference' pays l_K - l_0 (a drop and its recovery both count); mig_token_scope='all' puts the MIG
    advantage on the answer and tag tokens too."""
    model = build_tiny_model(char_tokenizer).float()
    trainer = make_trainer(tmp_path, char_tokenizer, model=model, mig_weight=0.7, outcome_weight=1.3,
                           mig_gain="difference", mig_token_scope="all")
    output = trainer._generate_and_score_completions(scripted_batch())
    advantages = output["advantages"]
    prompt = PROMPTS[0]
    logliks = [reference_logliks(trainer.model, char_tokenizer, prompt, c, SOLUTIONS[0]) for c in SCRIPT[prompt]]
    expected_mig = group_normalise([values[-1] - values[0] for values, _ in logliks])
    expected_outcome = group_normalise(OUTCOME[prompt])
    for j in range(4):
        length = int(output["completion_mask"][j].sum())
        expected = 1.3 * expected_outcome[j] + 0.7 * expected_mig[j]
        assert advantages[j, :length].tolist() == pytest.approx([expected] * length, abs=2e-3), j


def test_gated_sft_gate_and_loss(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, sft_weight=0.5)
    inputs = trainer._generate_and_score_completions(scripted_batch())
    gate = inputs["sft_gate"]

    for group, prompt in enumerate(PROMPTS):
        for j, completion in enumerate(SCRIPT[prompt]):
            values, _ = reference_logliks(trainer.model, char_tokenizer, prompt, completion, SOLUTIONS[group])
            structural = "</think>" in completion and "### Step" in completion and "<answer>" in completion
            correct = completion.endswith(f"<answer>{SOLUTIONS[group]}</answer>")
            assert gate[group * 4 + j].item() == float(structural and correct and watermark_sum(values) > 0)
    assert gate[1:4].tolist() == [0.0, 0.0, 0.0], "wrong, truncated and header-less completions never pass"

    assert gate.sum() > 0, "the scripted batch should have at least one gated completion"
    # the loss is GRPO's policy loss plus 0.5 x the NLL of the gated completions, both computed here
    loss, policy_loss = assert_loss_is_reference(trainer, inputs)
    assert (loss - policy_loss).item() > 0.1, "the SFT term is really there (the NLL of a random model is large)"


def test_sft_weight_zero_changes_nothing(tmp_path, char_tokenizer):
    """sft_weight=0: no gate in the batch, the same advantages, and the loss (value and gradient) is GRPO's policy
    loss alone, computed here from the advantages and a plain forward; with sft_weight=0.5 the same batch's loss is
    that plus 0.5 x the gated NLL."""
    model = build_tiny_model(char_tokenizer).float()
    with_sft = make_trainer(tmp_path / "a", char_tokenizer, model=model, sft_weight=0.5)
    without = make_trainer(tmp_path / "b", char_tokenizer, model=model, sft_weight=0.0)
    out_with = with_sft._generate_and_score_completions(scripted_batch())
    out_without = without._generate_and_score_completions(scripted_batch())
    assert "sft_gate" not in out_without
    assert torch.equal(out_with["advantages"], out_without["advantages"])
    loss, policy_loss = assert_loss_is_reference(without, out_without)
    # on-policy the ratio is 1, so the default loss (dapo) is the mean of -A over the batch's completion tokens
    assert without.args.loss_type == "dapo"
    mask, advantages = out_without["completion_mask"].float(), out_without["advantages"]
    assert loss.item() == pytest.approx((-(advantages * mask).sum() / mask.sum()).item(), rel=1e-5, abs=1e-6)
    assert policy_loss.abs().item() > 1e-3, "a batch with non-zero advantages"
    loss_with_sft, _ = assert_loss_is_reference(with_sft, out_with)
    assert loss_with_sft.item() > loss.item() + 0.1


def test_sft_without_a_correctness_reward_is_off_with_one_warning(tmp_path, char_tokenizer, caplog):
    model = build_tiny_model(char_tokenizer)
    dataset = Dataset.from_list(scripted_batch())

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    with caplog.at_level("WARNING", logger="trl_mig.trainer"):
        trainer = MIGGRPOTrainer(model, reward_funcs=[length_reward], args=cpu_config(tmp_path, sft_weight=0.5),
                                 train_dataset=dataset, processing_class=char_tokenizer,
                                 rollout_func=scripted_rollout(SCRIPT))
    warnings = [r.getMessage() for r in caplog.records if "Gated SFT is off" in r.getMessage()]
    assert len(warnings) == 1 and "sft_correctness_reward=" in warnings[0] and "length_reward" in warnings[0]
    trainer.model.train()
    output = trainer._generate_and_score_completions(scripted_batch())
    assert "sft_gate" not in output
    assert trainer._metrics["train"]["sft/enabled"] == [0.0]
    # MIG credit is still there: thought tokens carry a MIG advantage that the answer tokens of the row do not
    length = int(output["completion_mask"][0].sum())
    assert output["advantages"][0, :length].unique().numel() > 1

    with pytest.raises(ValueError, match="'exact_match' is not one of the reward functions"):
        MIGGRPOTrainer(model, args=cpu_config(tmp_path, sft_correctness_reward="exact_match"),
                       train_dataset=dataset, processing_class=char_tokenizer)
    named = MIGGRPOTrainer(model, reward_funcs=[length_reward],
                           args=cpu_config(tmp_path, sft_correctness_reward="length_reward"),
                           train_dataset=dataset, processing_class=char_tokenizer)
    assert named._sft_reward_index == 0


def test_missing_solution_column_fails_at_construction(tmp_path, char_tokenizer):
    dataset = Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 8)
    with pytest.raises(ValueError, match=r"no ground-truth column 'solution'.*\['prompt', 'answer'\]"):
        MIGGRPOTrainer(build_tiny_model(char_tokenizer), args=cpu_config(tmp_path), train_dataset=dataset,
                       processing_class=char_tokenizer)


def test_grpo_config_is_rejected(tmp_path, char_tokenizer):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="MIGConfig"):
        MIGGRPOTrainer(build_tiny_model(char_tokenizer), args=GRPOConfig(str(tmp_path), use_cpu=True, bf16=False),
                       train_dataset=Dataset.from_list(scripted_batch()), processing_class=char_tokenizer)


# ------------------------------------------------------------------------------------------------ real training
def train_and_check(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert changed, "no trainable parameter changed"
    logged = {key for entry in trainer.state.log_history for key in entry}
    for metric in ("mig/loglik_prompt_only", "mig/loglik_best", "mig/gain_sum", "mig/steps", "mig/breakthrough_frac",
                   "mig/no_step_frac", "sft/gated_frac"):
        assert metric in logged, metric
    return changed


@pytest.mark.parametrize("loss_type, credit", [("grpo", "trajectory"), ("dapo", "step"), ("bnpo", "trajectory")])
def test_training_updates_parameters_and_logs_mig_metrics(tmp_path, char_tokenizer, loss_type, credit):
    trainer = MIGGRPOTrainer(
        build_tiny_model(char_tokenizer),
        args=cpu_config(tmp_path, loss_type=loss_type, mig_credit=credit),
        train_dataset=addition_dataset(),
        processing_class=char_tokenizer,
    )
    changed = train_and_check(trainer)
    assert len(changed) == len(list(trainer.model.parameters()))


def test_training_with_iterations_and_gradient_accumulation(tmp_path, char_tokenizer):
    trainer = MIGGRPOTrainer(
        build_tiny_model(char_tokenizer),
        args=cpu_config(tmp_path, num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                        max_steps=2, sft_weight=1.0),
        train_dataset=addition_dataset(),
        processing_class=char_tokenizer,
    )
    train_and_check(trainer)
    assert trainer.state.global_step == 2


def test_lora_training_and_reference_scoring(tmp_path, char_tokenizer):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = MIGGRPOTrainer(
        build_tiny_model(char_tokenizer),
        args=cpu_config(tmp_path, learning_rate=5e-2, beta=0.1),
        train_dataset=addition_dataset(),
        processing_class=char_tokenizer,
        peft_config=peft_config,
    )
    changed = train_and_check(trainer)
    assert changed and all("lora" in name for name in changed)
    assert any("kl" in entry for entry in trainer.state.log_history)

    # the reference likelihood is the adapter-free base; the policy's is not
    from trl_mig.scoring import ScoringItem, encode_answer

    prompt = char_tokenizer("Compute 2+3.\n", add_special_tokens=False)["input_ids"]
    completion = char_tokenizer("<think>### Step 1\n2+3=5\n</think>", add_special_tokens=False)["input_ids"]
    item = ScoringItem(prompt, completion, (1, len(completion) - 1), [encode_answer(char_tokenizer, SCAFFOLD, "5")])
    trainer.args.mig_likelihood_model = "reference"
    model, context = trainer._scoring_model_context()
    with torch.no_grad(), context:
        reference = trainer.mig_scorer.score(model, [item])[0]
    with torch.no_grad(), trainer.model.disable_adapter():
        base = trainer.mig_scorer.score(trainer.model, [item])[0]
    policy = trainer.mig_scorer.score(trainer.model, [item])[0]
    assert torch.allclose(reference, base, atol=1e-6)
    assert not torch.allclose(policy, base, atol=1e-6), "trained adapters change the policy's likelihoods"


def test_reference_scoring_without_reference_model_is_an_error(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="mig_likelihood_model='reference' needs a reference model"):
        MIGGRPOTrainer(build_tiny_model(char_tokenizer), args=cpu_config(tmp_path, mig_likelihood_model="reference"),
                       train_dataset=addition_dataset(), processing_class=char_tokenizer)
