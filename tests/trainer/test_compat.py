"""Drop-in compatibility: GRPOConfig option families and GRPOTrainer constructor features, trained a few steps with
MIGGRPOTrainer on tiny local models, asserting what TRL's GRPOTrainer tests assert (parameters changed, metrics
logged) plus the MIG metrics.

Not covered here: vision inputs (the vision issue), vLLM and Liger kernels (not installed on CPU CI; vLLM generation
only replaces how completions are produced, which MIG reads afterwards, so it is not blocked, but it is untested).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from helpers import (
    addition_dataset,
    build_qwen3_tool_tokenizer,
    cpu_config,
    multiply_tool,
    save_tiny_model,
    scripted_rollout,
)
from trl_mig import MIGConfig, MIGGRPOTrainer
from trl_mig.builtin.tiny import build_tiny_model

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

MIG_METRICS = ("mig/gain_sum", "mig/loglik_prompt_only", "mig/steps", "mig/breakthrough_frac", "sft/enabled")


def length_reward(completions, **kwargs):
    """A reward that is not a correctness check (so the gated SFT term is off by default)."""
    return [len(c) / 10.0 for c in completions]


def digit_reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def problems(n=8):
    return addition_dataset(n, operands=3)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, char_tokenizer):
    """A tiny causal LM and a tiny reward model (Qwen2ForSequenceClassification, 1 label) saved with the tokenizer,
    so that trainers load them by path as TRL's tests load the hub's tiny models."""
    root = tmp_path_factory.mktemp("tiny")
    policy = save_tiny_model(root / "tiny-Qwen2ForCausalLM", char_tokenizer)
    reward = root / "tiny-Qwen2ForSequenceClassification"
    config = Qwen2Config(
        vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=char_tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(config).save_pretrained(reward)
    char_tokenizer.save_pretrained(reward)
    return {"policy": str(policy), "reward": str(reward)}


def compat_config(output_dir, **overrides):
    defaults = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=10, max_steps=1)
    defaults.update(overrides)
    return cpu_config(output_dir, **defaults)


def train_and_check(trainer, expect_all_changed=True):
    """Train; every trainable parameter (or at least one, for adapters) changed; loss, reward and MIG metrics
    logged."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    if expect_all_changed:
        assert sorted(changed) == sorted(before), f"unchanged: {sorted(set(before) - set(changed))}"
    else:
        assert changed, "no trainable parameter changed"
    assert trainer.state.log_history[-1]["train_loss"] is not None
    logged = {key for entry in trainer.state.log_history for key in entry}
    for metric in (*MIG_METRICS, "reward", "entropy"):
        assert metric in logged, metric
    for name in trainer.reward_func_names:
        assert f"rewards/{name}/mean" in logged, name
    return logged


def first(trainer, name):
    return next(entry[name] for entry in trainer.state.log_history if name in entry)


# one training run per row: the option families of GRPOConfig, several per run so that the matrix stays small
OPTION_MATRIX = {
    "grpo": dict(loss_type="grpo"),
    "bnpo-batch-scaling": dict(loss_type="bnpo", scale_rewards="batch"),
    "dr_grpo-no-scaling": dict(loss_type="dr_grpo", scale_rewards=False),
    "dapo-entropy-mask-bonus": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01),
    "cispo-iterations": dict(loss_type="cispo", num_iterations=2, max_steps=2),
    "sapo-steps-per-generation": dict(loss_type="sapo", steps_per_generation=2, max_steps=2),
    "luspo-sequence-is": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo-off-policy-mask": dict(loss_type="vespo", off_policy_mask_threshold=0.5),
    "grpo-sequence-is-delta-step-credit": dict(loss_type="grpo", importance_sampling_level="sequence", delta=2.0,
                                               mig_credit="step"),
}


@pytest.mark.parametrize("options", OPTION_MATRIX.values(), ids=OPTION_MATRIX.keys())
def test_option_families_train(tmp_path, char_tokenizer, tiny_dirs, options):
    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"],
        reward_funcs=[length_reward, digit_reward],
        args=compat_config(tmp_path, **options),
        train_dataset=problems(),
        processing_class=char_tokenizer,
    )
    train_and_check(trainer)
    assert first(trainer, "sft/enabled") == 0.0, "no correctness reward: gated SFT is off"


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_reward_models_processing_classes_and_weights(tmp_path, char_tokenizer, tiny_dirs, aggregation):
    """A reward model by path (with and without its processing class), a reward model object, a function and an
    accuracy reward, with reward weights: the weighted reward is what TRL logs, and the accuracy reward gates SFT."""
    from trl_mig.rewards import AnswerAccuracyReward

    reward_model = Qwen2ForSequenceClassification.from_pretrained(tiny_dirs["reward"])
    weights = [1.0, 0.5, 2.0, 0.0]
    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"],
        reward_funcs=[tiny_dirs["reward"], reward_model, length_reward, AnswerAccuracyReward()],
        args=compat_config(tmp_path, reward_weights=weights, multi_objective_aggregation=aggregation),
        train_dataset=problems(),
        processing_class=char_tokenizer,
        reward_processing_classes=[char_tokenizer, char_tokenizer, None, None],
    )
    assert trainer.reward_func_names[0] == "tiny-Qwen2ForSequenceClassification"
    assert trainer._sft_reward_index == 3
    train_and_check(trainer)
    assert first(trainer, "sft/enabled") == 1.0
    logged = trainer.state.log_history[0]
    if aggregation == "sum_then_normalize":
        per_func = [logged[f"rewards/{name}/mean"] for name in trainer.reward_func_names]
        assert logged["reward"] == pytest.approx(sum(w * r for w, r in zip(weights, per_func)), abs=1e-4)


def test_reward_model_tokenizer_loaded_from_its_path(tmp_path, char_tokenizer, tiny_dirs):
    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"], reward_funcs=tiny_dirs["reward"], args=compat_config(tmp_path),
        train_dataset=problems(), processing_class=char_tokenizer,
    )
    assert trainer.reward_processing_classes[0] is not None
    train_and_check(trainer)


def test_reference_model_eval_dataset_and_log_completions(tmp_path, char_tokenizer, tiny_dirs):
    """beta > 0 loads a reference model (also the MIG scorer here), with reference-model syncing; an eval dataset
    is evaluated with the MIG metrics; log_completions prints the table; positional arguments as GRPOTrainer's."""
    args = compat_config(tmp_path, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, max_steps=2,
                         mig_likelihood_model="reference", eval_strategy="steps", eval_steps=2,
                         per_device_eval_batch_size=4, log_completions=True)
    # every argument by position, in GRPOTrainer's order
    trainer = MIGGRPOTrainer(tiny_dirs["policy"], length_reward, args, problems(), problems(4), char_tokenizer)
    assert trainer.ref_model is not None
    logged = train_and_check(trainer)
    assert "kl" in logged
    assert {"eval_loss", "eval_mig/gain_sum", "eval_sft/enabled"} <= logged
    assert len(trainer._logs["extra"]["mig_gain"]) > 0


def test_lora(tmp_path, char_tokenizer, tiny_dirs):
    from peft import LoraConfig

    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"],
        reward_funcs=digit_reward,
        args=compat_config(tmp_path, learning_rate=5e-2),
        train_dataset=problems(),
        processing_class=char_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    train_and_check(trainer, expect_all_changed=False)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert changed and all("lora" in n for n in changed)


SCRIPT = {
    "Compute 2+3.\n": ["<think>### Step 1\n2+3=5\n</think>\n<answer>5</answer>", "<think>### Step 1\n2+3=6"],
    "Compute 4-1.\n": ["<think>### Step 1\n4-1=3\n</think>\n<answer>3</answer>",
                       "<think>### Step 1\n4-1=2\n</think>\n<answer>2</answer>"],
}


def test_rollout_func_and_mask_truncated_completions(tmp_path, char_tokenizer, tiny_dirs):
    """A custom rollout_func, with mask_truncated_completions: the truncated completion (no EOS) is left out of the
    loss, and the rest still trains; default rewards (reward_funcs=None) with gated SFT on."""
    rows = [{"prompt": p, "solution": s} for p, s in zip(SCRIPT, ["5", "3"])] * 4
    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"],
        args=compat_config(tmp_path, mask_truncated_completions=True, max_completion_length=64, max_steps=2,
                           shuffle_dataset=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=char_tokenizer,
        rollout_func=scripted_rollout(SCRIPT),
    )
    assert trainer.reward_func_names == ["answer_accuracy_reward", "step_format_reward"]
    train_and_check(trainer)
    assert first(trainer, "sft/enabled") == 1.0
    assert first(trainer, "completions/clipped_ratio") == pytest.approx(0.25)
    assert first(trainer, "mig/truncated_frac") == pytest.approx(0.25)


def test_minimal_constructor_without_args(tmp_path, char_tokenizer, tiny_dirs, monkeypatch, caplog):
    """`MIGGRPOTrainer(model, reward_funcs=...)` with no `args`, as TRL's minimal GRPOTrainer call: a default
    MIGConfig, gated SFT off with one warning. (GRPOConfig's default bf16 needs a bf16 device; on CPU GRPOTrainer
    fails the same way, so the check pretends one is there.)"""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_mig.trainer"):
        trainer = MIGGRPOTrainer(tiny_dirs["policy"], reward_funcs=tiny_dirs["reward"], train_dataset=problems())
    assert isinstance(trainer.args, MIGConfig)
    assert trainer.args.output_dir.endswith("tiny-Qwen2ForCausalLM-MIG-GRPO")
    assert trainer._sft_reward_index is None
    warnings = [r.getMessage() for r in caplog.records if "Gated SFT is off" in r.getMessage()]
    assert len(warnings) == 1 and "sft_correctness_reward=" in warnings[0]


@pytest.fixture(scope="session")
def tool_tokenizer():
    return build_qwen3_tool_tokenizer()


def test_tools(tmp_path, tool_tokenizer):
    """Tool calling: two of each group's completions call the tool (one with a wrong argument), the tool's result
    is appended and generation continues; MIG scores the whole completion, tool output included."""
    from unittest.mock import patch

    tokenizer = tool_tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first_turn = [
        '<tool_call>\n{"name": "multiply_tool", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>',
        '<tool_call>\n{"name": "multiply_tool", "arguments": {"a": 3, "c": 4}}\n</tool_call><|im_end|>',
        "<think>### Step 1\n3*4=12\n</think>\n<answer>12</answer><|im_end|>",
    ]
    calls = []

    def fake_generate(input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        texts = first_turn if len(calls) == 1 else ["<answer>12</answer><|im_end|>"] * input_ids.shape[0]
        rows = [encode(texts[i % len(texts)]) for i in range(input_ids.shape[0])]
        width = max(map(len, rows))
        padded = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=-1)

    rows = [{"prompt": [{"role": "user", "content": "What is 3*4?"}], "solution": "12"}] * 6
    trainer = MIGGRPOTrainer(
        build_tiny_model(tokenizer).float(),
        reward_funcs=length_reward,
        args=compat_config(tmp_path, per_device_train_batch_size=3, num_generations=3, max_completion_length=128),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        tools=[multiply_tool],
    )
    with patch.object(trainer.model, "generate", side_effect=fake_generate):
        train_and_check(trainer)
    assert calls[0] == 3 and len(calls) > 1, "tool results are fed back for another generation"
    assert first(trainer, "tools/call_frequency") == pytest.approx(2 / 3)
    assert first(trainer, "tools/failure_frequency") == pytest.approx(1 / 2)


class GuessEnvironment:
    def reset(self, **kwargs):
        return "Guess the number."

    def guess(self, number: int) -> str:
        """
        Guess the number.

        Args:
            number: The guess.

        Returns:
            Whether it is right.
        """
        return "right" if number == 4 else "wrong"

    def get_reward(self) -> float:
        return 1.0


def test_environments(tmp_path, tool_tokenizer, tiny_dirs):
    """Environment-owned data (no train_dataset) has no ground truth: a construction error. With a dataset that has
    one, an environment that owns the reward is, as in GRPOTrainer, the only reward when reward_funcs is None."""
    with pytest.raises(ValueError, match="environment-owned data .* has none"):
        MIGGRPOTrainer(tiny_dirs["policy"], reward_funcs=length_reward, args=compat_config(tmp_path),
                       processing_class=tool_tokenizer, environment_factory=GuessEnvironment)
    rows = [{"prompt": [{"role": "user", "content": "Guess."}], "solution": "4"}] * 4
    trainer = MIGGRPOTrainer(build_tiny_model(tool_tokenizer), args=compat_config(tmp_path),
                             train_dataset=Dataset.from_list(rows), processing_class=tool_tokenizer,
                             environment_factory=GuessEnvironment)
    assert trainer.reward_func_names == ["GuessEnvironment"]
    assert trainer._sft_reward_index is None
