"""Drop-in compatibility: GRPOConfig option families and GRPOTrainer constructor features, trained a few steps with
MIGGRPOTrainer on tiny local models, asserting what TRL's GRPOTrainer tests assert (parameters changed, metrics
logged) plus the MIG metrics, and, for each option of the option matrix, the effect it has (advantage scaling, loss
normalisation, entropy mask and bonus, generation reuse, importance-sampling level, delta clipping, step credit),
computed in the test from what TRL's hooks see.

Not covered here: vision inputs (the vision issue), vLLM and Liger kernels (not installed on CPU CI; vLLM generation
only replaces how completions are produced, which MIG reads afterwards, so it is not blocked, but it is untested).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from helpers import (
    addition_dataset,
    build_qwen3_tool_tokenizer,
    cpu_config,
    group_normalise,
    grpo_loss_options,
    multiply_tool,
    policy_logps_and_entropies,
    progress,
    reference_logliks,
    reference_policy_loss,
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


# ---------------------------------------------------------------------------------------------- option families
# One training run per row, several options per run so that the matrix stays small; each option's effect is checked
# against a computation written here (`check_*` below). The scaling rows switch MIG credit off (mig_weight=0) so that
# the advantage is GRPO's outcome advantage alone; the step-credit row trains on scripted two-step completions.

# two two-step completions per prompt; for the first prompt the completion ahead after step 1 is behind after step 2
# (under the tiny policy), so step credit differs from trajectory credit
STEP_SCRIPT = {
    "Compute (2+3)*4.\n": ["<think>### Step 1\n2+3=6\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>",
                           "<think>### Step 1\nhmm\n### Step 2\nso 20\n</think>\n<answer>20</answer>"],
    "Compute 7-1.\n": ["<think>### Step 1\n7-1=5\n### Step 2\n6\n</think>\n<answer>6</answer>",
                       "<think>### Step 1\nhmm\n### Step 2\nok\n</think>\n<answer>6</answer>"],
}
STEP_SOLUTIONS = {"Compute (2+3)*4.\n": "20", "Compute 7-1.\n": "6"}

OPTION_MATRIX = {
    "grpo": dict(loss_type="grpo"),
    "bnpo-batch-scaling": dict(loss_type="bnpo", scale_rewards="batch", mig_weight=0.0, outcome_weight=1.5),
    "dr_grpo-no-scaling": dict(loss_type="dr_grpo", scale_rewards=False, mig_weight=0.0),
    "dapo-entropy-mask-bonus": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01),
    "cispo-iterations": dict(loss_type="cispo", num_iterations=2, max_steps=2),
    "sapo-steps-per-generation": dict(loss_type="sapo", steps_per_generation=2, max_steps=2),
    "luspo-sequence-is-iterations": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2,
                                         max_steps=2),
    # trains only: the off-policy mask and VESPO's weights are not asserted here (their semantics are decided apart)
    "vespo-off-policy-mask": dict(loss_type="vespo", off_policy_mask_threshold=0.5),
    "grpo-sequence-is-delta-step-credit": dict(loss_type="grpo", importance_sampling_level="sequence", delta=2.0,
                                               mig_credit="step", max_completion_length=64, script=STEP_SCRIPT),
}


def recording(reward_func, calls: list):
    """`reward_func`, keeping what it returns (one list per call) in `calls`; TRL names it as `reward_func`."""

    @functools.wraps(reward_func)
    def reward(completions, **kwargs):
        values = reward_func(completions, **kwargs)
        calls.append(values)
        return values

    return reward


def _tensors(batch: dict) -> dict:
    return {key: value.detach().clone() for key, value in batch.items() if isinstance(value, torch.Tensor)}


def _row_keys(batch: dict) -> list[tuple]:
    """Each row of a GRPO batch as (prompt tokens, completion tokens), padding left out."""
    prompts = zip(batch["prompt_ids"], batch["prompt_mask"])
    completions = zip(batch["completion_ids"], batch["completion_mask"])
    return [(tuple(p[m.bool()].tolist()), tuple(c[n.bool()].tolist())) for (p, m), (c, n) in zip(prompts, completions)]


class HookRecorder:
    """
    Wraps two of TRL's hooks on `trainer` and records what they see during training: every generation
    (`_generate_and_score_completions`: the dataset rows and the output, in generation order) and every micro-batch
    loss (`compute_loss`: the batch, the loss, and the policy's per-token log-probs and entropies from a plain forward
    at that moment, before the optimizer step). `compute_loss` keeps the unwrapped hook, for checks after training.
    """

    def __init__(self, trainer):
        self.generations, self.losses = [], []
        generate, self.compute_loss = trainer._generate_and_score_completions, trainer.compute_loss

        def recorded_generate(inputs):
            output = generate(inputs)
            self.generations.append({"rows": list(inputs), **_tensors(output)})
            return output

        def recorded_compute_loss(model, inputs, *args, **kwargs):
            loss = self.compute_loss(model, inputs, *args, **kwargs)
            with torch.no_grad():
                logps, entropies = policy_logps_and_entropies(model, inputs, trainer.args.temperature)
            self.losses.append(dict(loss=loss.item(), inputs=_tensors(inputs), logps=logps, entropies=entropies,
                                    generation=len(self.generations) - 1))
            return loss

        trainer._generate_and_score_completions = recorded_generate
        trainer.compute_loss = recorded_compute_loss

    def loss_tokens(self, call) -> torch.Tensor:
        """The completion tokens of the generation batch a micro-batch comes from (dapo's and cispo's normaliser)."""
        return self.generations[call["generation"]]["completion_mask"].sum()


def check_generation_reuse(args, recorder):
    """num_iterations and steps_per_generation: one generation feeds `steps_per_generation * num_iterations`
    micro-batches (one optimizer step each here), which together hold each of its completions `num_iterations` times.
    A reused generation comes with the generating policy's log-probs: the first micro-batch's policy still has them,
    and after an optimizer step the policy's differ from them (the ratio is not 1)."""
    assert args.gradient_accumulation_steps == 1
    assert len(recorder.generations) == math.ceil(args.max_steps / (args.steps_per_generation * args.num_iterations))
    assert len(recorder.losses) == args.max_steps
    for index, generation in enumerate(recorder.generations):
        calls = [call for call in recorder.losses if call["generation"] == index]
        seen = Counter(key for call in calls for key in _row_keys(call["inputs"]))
        assert seen == Counter({key: n * args.num_iterations for key, n in Counter(_row_keys(generation)).items()})
        for position, call in enumerate(calls):
            old = call["inputs"].get("old_per_token_logps")
            assert (old is not None) == (len(calls) > 1)
            if old is not None:
                drift = (call["logps"] - old)[call["inputs"]["completion_mask"].bool()].abs().max().item()
                assert (drift < 1e-4) if position == 0 else (drift > 1e-3), (position, drift)


def check_losses(args, recorder):
    """Every micro-batch's loss is GRPO's for the options (`reference_policy_loss`), from the batch's advantages
    and old log-probs and the recorded forward; the entropy mask and bonus each change it."""
    options = grpo_loss_options(args)
    for call in recorder.losses:
        batch, num_items = call["inputs"], recorder.loss_tokens(call)
        reference = functools.partial(reference_policy_loss, batch, call["logps"], call["entropies"],
                                      batch.get("old_per_token_logps"), num_items)
        assert call["loss"] == pytest.approx(reference(**options).item(), rel=1e-5, abs=1e-6)
        if args.top_entropy_quantile < 1.0:
            assert abs(call["loss"] - reference(**{**options, "top_entropy_quantile": 1.0}).item()) > 1e-4
        if args.entropy_coef:
            assert abs(call["loss"] - reference(**{**options, "entropy_coef": 0.0}).item()) > 1e-4


def check_off_policy_loss(trainer, recorder):
    """
    The last micro-batch again, with old log-probs set below the policy's (ratios around 3, alternating
    between e^{1.1 +- 0.6} along each completion): the loss is GRPO's for the options, computed here. With
    importance_sampling_level="sequence" one ratio per completion (not per token) enters it, and `delta` clips the
    ratio of negative-advantage tokens (checked by comparing with the other choice, which gives another loss).
    """
    call = recorder.losses[-1]
    batch, options = call["inputs"], grpo_loss_options(trainer.args)
    trainer.model.train()
    with torch.no_grad():
        logps, entropies = policy_logps_and_entropies(trainer.model, batch, trainer.args.temperature)
        alternating = 0.6 * (1 - 2 * (torch.arange(logps.shape[1]) % 2))
        batch = {**batch, "old_per_token_logps": logps - math.log(3) - alternating}
        loss = recorder.compute_loss(trainer.model, batch).item()
    reference = functools.partial(reference_policy_loss, batch, logps, entropies, batch["old_per_token_logps"],
                                  recorder.loss_tokens(call))
    assert loss == pytest.approx(reference(**options).item(), rel=1e-5, abs=1e-6)
    mask = batch["completion_mask"].bool()
    assert (batch["advantages"][mask] < 0).any(), "negative advantages, where the clipping differs"
    if trainer.args.importance_sampling_level == "sequence":
        assert abs(loss - reference(**{**options, "importance_sampling_level": "token"}).item()) > 1e-3
    if trainer.args.delta is not None:
        assert abs(loss - reference(**{**options, "delta": None}).item()) > 1e-3


def check_outcome_advantages(args, recorder, reward_calls):
    """With mig_weight=0 every completion token carries outcome_weight x GRPO's outcome advantage of the rewards
    the reward functions returned, normalised here as `scale_rewards` says (group, batch or none)."""
    for index, generation in enumerate(recorder.generations):
        rewards = [sum(values) for values in zip(*(calls[index] for calls in reward_calls.values()))]
        expected = group_normalise(rewards, args.scale_rewards, args.num_generations)
        assert any(abs(value) > 1e-3 for value in expected), "some spread in the rewards"
        for row, value in enumerate(expected):
            tokens = generation["advantages"][row][generation["completion_mask"][row].bool()]
            assert tokens.tolist() == pytest.approx([args.outcome_weight * value] * len(tokens), abs=1e-5), row


def check_step_credit(args, recorder, reward_calls, logliks):
    """mig_credit="step" on scripted two-step completions: the tokens of step k carry the outcome advantage plus the
    watermark progress by step k normalised within the group (both computed here, l_k by plain forwards), the
    tokens outside the thought the outcome advantage only; the two steps of a completion get different credit."""
    (generation,) = recorder.generations
    rewards = [sum(values) for values in zip(*(calls[0] for calls in reward_calls.values()))]
    outcome = group_normalise(rewards, args.scale_rewards, args.num_generations)
    # the scripted rollout gives the i-th row of a batch the (i mod G)-th completion of its prompt
    texts = [STEP_SCRIPT[row["prompt"]][i % args.num_generations] for i, row in enumerate(generation["rows"])]
    curves = [logliks[(row["prompt"], text)] for row, text in zip(generation["rows"], texts)]  # (l_k, bounds)
    differs = False
    for row, (values, bounds) in enumerate(curves):
        first_of_group = row - row % args.num_generations
        group = curves[first_of_group : first_of_group + args.num_generations]
        length = int(generation["completion_mask"][row].sum())
        tokens = generation["advantages"][row, :length].tolist()
        outcome_part = args.outcome_weight * outcome[row]
        assert tokens[: bounds[0]] == pytest.approx([outcome_part] * bounds[0], abs=1e-4)
        assert tokens[bounds[-1] :] == pytest.approx([outcome_part] * (length - bounds[-1]), abs=1e-4)
        credits = []
        for k in range(len(bounds) - 1):
            reached = torch.tensor([progress(v)[k] for v, b in group if len(b) - 1 > k], dtype=torch.float64)
            credits.append((progress(values)[k] - reached.mean().item()) / (reached.std().item() + 1e-4))
            step_tokens = tokens[bounds[k] : bounds[k + 1]]
            expected = outcome_part + args.mig_weight * credits[-1]
            assert step_tokens == pytest.approx([expected] * len(step_tokens), abs=2e-3), (row, k)
        differs |= abs(credits[0] - credits[1]) > 0.1
    assert differs, "some completion's two steps get different credit"


@pytest.mark.parametrize("options", OPTION_MATRIX.values(), ids=OPTION_MATRIX.keys())
def test_option_families_train(tmp_path, char_tokenizer, tiny_dirs, options):
    options = dict(options)
    script = options.pop("script", None)
    reward_calls = {"length_reward": [], "digit_reward": []}
    if script is None:
        dataset, rollout = problems(), None
    else:
        dataset = Dataset.from_list([{"prompt": p, "solution": STEP_SOLUTIONS[p]} for p in script])
        rollout = scripted_rollout(script)
    trainer = MIGGRPOTrainer(
        tiny_dirs["policy"],
        reward_funcs=[recording(length_reward, reward_calls["length_reward"]),
                      recording(digit_reward, reward_calls["digit_reward"])],
        args=compat_config(tmp_path, **options),
        train_dataset=dataset,
        processing_class=char_tokenizer,
        rollout_func=rollout,
    )
    args = trainer.args
    # l_k of the scripted completions under the policy that generates them (the first generation: before any step)
    logliks = {
        (prompt, text): reference_logliks(trainer.model, char_tokenizer, prompt, text, STEP_SOLUTIONS[prompt])
        for prompt, texts in (script or {}).items()
        for text in texts
    }
    recorder = HookRecorder(trainer)
    train_and_check(trainer)
    assert first(trainer, "sft/enabled") == 0.0, "no correctness reward: gated SFT is off"

    check_generation_reuse(args, recorder)
    if args.mig_weight == 0:
        check_outcome_advantages(args, recorder, reward_calls)
    if args.mig_credit == "step":
        check_step_credit(args, recorder, reward_calls, logliks)
    if args.loss_type != "vespo":
        check_losses(args, recorder)
        check_off_policy_loss(trainer, recorder)


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
