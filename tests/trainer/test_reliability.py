"""The catalogue of bad inputs and faults (docs/reliability.md): each entry has a defined, tested outcome.

Entries checked elsewhere: 1 (test_trainer: missing column), 9 (test_trainer: identical group), 11 (test_scoring:
rows per forward), 12 and 16 (test_multiprocess), 13 (test_config), anti-hacking properties (test_credit).
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from datasets import Dataset

from helpers import addition_dataset, cpu_config, scripted_rollout
from trl_mig import MIGGRPOTrainer
from trl_mig.builtin.tiny import build_tiny_model
from trl_mig.scoring import DistinctPrefixes

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

GOOD = "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>"
WRONG = "<think>### Step 1\n2+3=6\n### Step 2\n6*4=24\n</think>\n<answer>24</answer>"


def build(tmp_path, tokenizer, rows, script, reward_funcs=None, model=None, **overrides):
    """A trainer on scripted completions. `rows` make the training dataset when they fit in one Arrow column type;
    tests that only call `_generate_and_score_completions` may pass rows of mixed types."""
    try:
        dataset = Dataset.from_list(rows)
    except Exception:  # mixed types in the solution column: the rows are passed by hand instead
        dataset = Dataset.from_list([{"prompt": "unused", "solution": "0"}] * 8)
    trainer = MIGGRPOTrainer(
        model if model is not None else build_tiny_model(tokenizer).float(),
        reward_funcs=reward_funcs,
        args=cpu_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=scripted_rollout(script),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def rows_for(prompts, solutions):
    return [{"prompt": p, "solution": s} for p, s in zip(prompts, solutions) for _ in range(4)]


def last_metrics(trainer, mode="train"):
    return {name: values[-1] for name, values in trainer._metrics[mode].items()}


def assert_finite_step(trainer, inputs):
    assert torch.isfinite(inputs["advantages"]).all()
    loss = trainer._compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
    loss.backward()
    return loss


# 2 ------------------------------------------------------------------------------------------------- ground truth
def test_missing_or_empty_ground_truth_gets_no_mig_credit(tmp_path, char_tokenizer, caplog):
    prompts = ["A.\n", "B.\n"]
    script = {p: [GOOD, WRONG, GOOD, WRONG] for p in prompts}
    rows = rows_for(prompts, ["20", "20"])
    for row in rows[4:6]:
        row["solution"] = None
    for row in rows[6:]:
        row["solution"] = "  "
    trainer = build(tmp_path, char_tokenizer, rows, script, mig_weight=1.0, outcome_weight=1.0)
    with caplog.at_level(logging.WARNING, logger="trl_mig.trainer"):
        inputs = trainer._generate_and_score_completions(rows)
    assert "no usable ground truth in column 'solution'" in caplog.text
    assert last_metrics(trainer)["mig/unscorable_frac"] == pytest.approx(0.5)
    # the second group has no ground truth: no MIG credit and no outcome reward signal (accuracy None)
    assert (inputs["advantages"][4:] == 0).all()
    assert (inputs["advantages"][:4] != 0).any()
    assert_finite_step(trainer, inputs)


def test_ground_truth_variants_and_numbers(tmp_path, char_tokenizer):
    prompts = ["A.\n", "B.\n"]
    script = {p: [GOOD, WRONG, GOOD, WRONG] for p in prompts}
    trainer = build(tmp_path, char_tokenizer, rows_for(prompts, [["24", "20"], 20]), script, sft_weight=0.0)
    inputs = trainer._generate_and_score_completions(rows_for(prompts, [["24", "20"], 20]))
    assert last_metrics(trainer)["mig/unscorable_frac"] == 0
    assert last_metrics(trainer)["rewards/answer_accuracy_reward/mean"] == pytest.approx(0.75)
    assert_finite_step(trainer, inputs)


def test_ground_truth_of_another_type_is_an_error_naming_the_column(tmp_path, char_tokenizer):
    rows = rows_for(["A.\n"], [{"value": 20}])
    trainer = build(tmp_path, char_tokenizer, rows, {"A.\n": [GOOD] * 4}, reward_funcs=[lambda completions, **k: [0.0] * len(completions)], sft_weight=0.0)
    with pytest.raises(TypeError, match="Column 'solution' must hold a string, a number or a list"):
        trainer._generate_and_score_completions(rows)


def test_streaming_rows_without_the_column_are_an_error(tmp_path, char_tokenizer):
    trainer = build(tmp_path, char_tokenizer, rows_for(["A.\n"], ["20"]), {"A.\n": [GOOD] * 4})
    with pytest.raises(KeyError, match="ground-truth column 'solution'.*\\['prompt'\\]"):
        trainer._answer_blocks_for({"prompt": "A.\n"})


# 3, 4, 5 ---------------------------------------------------------------------------------------- format problems
def test_format_problems_are_counted(tmp_path, char_tokenizer):
    many_steps = "<think>" + "".join(f"### Step {i}\n{i}\n" for i in range(1, 21)) + "</think>\n<answer>20</answer>"
    no_tags = "2+3 is 5.\n\nThen 5*4 is 20. So 20."
    truncated = "<think>### Step 1\n2+3=5\n### Step 2\n5*"
    script = {"A.\n": [many_steps, no_tags, truncated, GOOD]}
    trainer = build(tmp_path, char_tokenizer, rows_for(["A.\n"], ["20"]), script, mig_max_steps=16)
    inputs = trainer._generate_and_score_completions(rows_for(["A.\n"], ["20"]))
    metrics = last_metrics(trainer)
    assert metrics["mig/merged_frac"] == pytest.approx(0.25)
    assert metrics["mig/no_step_frac"] == pytest.approx(0.25)
    assert metrics["mig/truncated_frac"] == pytest.approx(0.5)  # no_tags and truncated never close the thought
    assert metrics["mig/steps"] == pytest.approx((16 + 2 + 2 + 2) / 4)
    assert inputs["sft_gate"][1:3].tolist() == [0.0, 0.0], "no gated SFT without tags or when truncated"
    assert_finite_step(trainer, inputs)


# 6 ---------------------------------------------------------------------------------------------- prompt formats
def test_conversational_and_plain_prompts_train(tmp_path, char_tokenizer):
    for kind in ("plain", "chat"):
        prompt = "Compute (2+3)*4.\n"
        rows = rows_for([prompt], ["20"])
        if kind == "chat":
            rows = [{"prompt": [{"role": "user", "content": prompt}], "solution": "20"} for _ in range(4)]
        trainer = build(tmp_path / kind, char_tokenizer, rows * 2, {prompt: [GOOD, WRONG, GOOD, WRONG]}, max_steps=1)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        assert math.isfinite(trainer.state.log_history[0]["mig/gain_sum"])


# 7 -------------------------------------------------------------------------------------------------- tokenizers
def test_tokenizer_without_pad_token_and_either_padding_side(tmp_path, char_tokenizer):
    results = []
    for side in ("left", "right"):
        tokenizer = char_tokenizer.__class__.from_pretrained(_saved(char_tokenizer, tmp_path / "tok"))
        tokenizer.pad_token = None
        tokenizer.padding_side = side
        torch.manual_seed(0)
        model = build_tiny_model(char_tokenizer).float()
        script = {"Compute 2+3.\n": [GOOD, WRONG, GOOD, "<think>### Step 1\n2+3"]}
        trainer = build(tmp_path / side, tokenizer, rows_for(["Compute 2+3.\n"], ["20"]), script, model=model)
        inputs = trainer._generate_and_score_completions(rows_for(["Compute 2+3.\n"], ["20"]))
        results.append((inputs["advantages"], last_metrics(trainer)["mig/loglik_prompt_only"]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-5)


def _saved(tokenizer, path):
    tokenizer.save_pretrained(path)
    return str(path)


def test_answer_merging_with_the_scaffold_scores_the_same_tokens_after_every_prefix(bpe_tokenizer):
    from trl_mig.scoring import ScoringItem, StepLikelihoodScorer, encode_answer

    scaffold = "\n</think>\n<answer>"
    block = encode_answer(bpe_tokenizer, scaffold, "57")
    joint = bpe_tokenizer(scaffold + "57", add_special_tokens=False)["input_ids"]
    assert list(block.ids) == joint
    merged = encode_answer(bpe_tokenizer, ">", "57")  # the corpus has '>57' as one token
    assert bpe_tokenizer.decode(list(merged.ids[merged.scored[0] : merged.scored[1]])).endswith("57")
    model = build_tiny_model(bpe_tokenizer).float()
    completion = bpe_tokenizer("<think>### Step 1\n12+7=19\n### Step 2\n19*3=57\n", add_special_tokens=False)["input_ids"]
    item = ScoringItem([5, 6, 7], completion, (2, 8, len(completion)), [merged])
    scores = StepLikelihoodScorer("block").score(model, [item])[0]
    for k, boundary in enumerate(item.boundaries):
        ids = [5, 6, 7] + completion[:boundary] + list(merged.ids)
        with torch.no_grad():
            logps = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        first = len(ids) - len(merged.ids) + merged.scored[0]
        expected = sum(logps[t - 1, ids[t]].item() for t in range(first, len(ids))) / (len(ids) - first)
        assert scores[k].item() == pytest.approx(expected, abs=1e-4)


# 8, 9, 10 ---------------------------------------------------------------------------------------- numeric faults
def test_rewards_returning_none_or_nan_never_make_nan_advantages(tmp_path, char_tokenizer):
    def flaky(completions, **kwargs):
        return [None, float("nan"), 1.0, 0.0] * (len(completions) // 4)

    script = {p: [GOOD, WRONG, GOOD, WRONG] for p in ("A.\n", "B.\n")}
    rows = rows_for(["A.\n", "B.\n"], ["20", "20"])
    trainer = build(tmp_path, char_tokenizer, rows, script, reward_funcs=[flaky], sft_weight=0.0)
    assert_finite_step(trainer, trainer._generate_and_score_completions(rows))


@pytest.mark.parametrize("script_kind", ["all_correct", "all_wrong"])
def test_zero_variance_outcome_groups(tmp_path, char_tokenizer, script_kind):
    completion = GOOD if script_kind == "all_correct" else WRONG
    rows = rows_for(["A.\n"], ["20"])
    trainer = build(tmp_path, char_tokenizer, rows, {"A.\n": [completion] * 4})
    inputs = trainer._generate_and_score_completions(rows)
    assert (inputs["advantages"] == 0).all(), "identical completions: identical l_k, zero advantage"
    assert_finite_step(trainer, inputs)


def test_a_shared_prefix_is_scored_once_and_the_share_is_logged(tmp_path, char_tokenizer):
    """GOOD and WRONG share l_0 (after `<think>`), and each is written twice: 5 of the 12 prefixes are scored, and
    the copies get the very values of the completions they repeat."""
    rows = rows_for(["A.\n"], ["20"])
    trainer = build(tmp_path, char_tokenizer, rows, {"A.\n": [GOOD, WRONG, GOOD, WRONG]})
    logged = []
    trainer._log_mig_metrics = lambda mode, loglik, *args: logged.append(loglik) or type(trainer)._log_mig_metrics(
        trainer, mode, loglik, *args)
    trainer._generate_and_score_completions(rows)
    assert last_metrics(trainer)["mig/scored_prefix_frac"] == pytest.approx(5 / 12)
    (loglik,) = logged
    assert torch.equal(loglik[2], loglik[0]) and torch.equal(loglik[3], loglik[1])
    assert loglik[1, 0] == loglik[0, 0] and loglik[1, 1] != loglik[0, 1]


def test_non_finite_likelihoods_are_guarded_and_reported(tmp_path, char_tokenizer, monkeypatch):
    rows = rows_for(["A.\n"], ["20"])
    trainer = build(tmp_path, char_tokenizer, rows, {"A.\n": [GOOD, WRONG, GOOD, WRONG]})
    real_spread = DistinctPrefixes.spread

    def overflowing(self, scores):  # the scorer's values, handed back per completion
        scores = real_spread(self, scores)
        scores[0][1] = float("inf")  # an fp16 overflow
        scores[1][:] = float("nan")  # nothing usable
        scores[2][0] = float("-inf")
        return scores

    monkeypatch.setattr(DistinctPrefixes, "spread", overflowing)
    inputs = trainer._generate_and_score_completions(rows)
    metrics = last_metrics(trainer)
    assert metrics["mig/nonfinite_frac"] == pytest.approx(0.75)
    assert math.isfinite(metrics["mig/loglik_prompt_only"]) and math.isfinite(metrics["mig/gain_sum"])
    assert_finite_step(trainer, inputs)


# 14 --------------------------------------------------------------------------------------------- resume
def test_checkpoint_and_resume(tmp_path, char_tokenizer, caplog):
    from transformers import AutoModelForCausalLM

    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    def run(max_steps, resume=None, **overrides):
        counter = StepCounter()
        trainer = MIGGRPOTrainer(
            build_tiny_model(char_tokenizer),
            args=cpu_config(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, mig_credit="step",
                            **overrides),
            train_dataset=addition_dataset(),
            processing_class=char_tokenizer,
            callbacks=[counter],
        )
        trainer.train(resume_from_checkpoint=resume)
        trainer.steps_run = counter.steps
        return trainer

    first = run(2)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "training_args.bin").exists()
    saved = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert saved.mig_credit == "step" and saved.mig_weight == 1.0
    resumed = run(4, resume=str(checkpoint))
    assert resumed.state.global_step == 4
    assert resumed.resumed_mig_changes == {}
    assert resumed.steps_run == [3, 4], "the resumed run continues after the saved step"
    steps_logged = [entry["step"] for entry in resumed.state.log_history if "mig/gain_sum" in entry]
    assert steps_logged == [1, 2, 3, 4], "MIG metrics of the first two steps come back from the checkpoint"
    resumed.save_model(str(tmp_path / "final"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert first.state.global_step == 2

    with caplog.at_level(logging.WARNING, logger="trl_mig.trainer"):
        changed = run(4, resume=str(checkpoint), mig_weight=0.5)
    assert changed.resumed_mig_changes == {"mig_weight": (1.0, 0.5)}
    assert "mig_weight: 1.0 -> 0.5" in caplog.text


# 15 --------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_likelihoods_gains_and_first_loss(tmp_path, char_tokenizer):
    logs = []
    for run in range(2):
        trainer = MIGGRPOTrainer(
            build_tiny_model(char_tokenizer, seed=1),
            args=cpu_config(tmp_path / str(run), max_steps=1, seed=7),
            train_dataset=addition_dataset(),
            processing_class=char_tokenizer,
        )
        trainer.train()
        logs.append(trainer.state.log_history[0])
    keys = ["loss", "mig/loglik_prompt_only", "mig/loglik_best", "mig/gain_sum", "mig/steps", "reward"]
    assert [logs[0][k] for k in keys] == [logs[1][k] for k in keys]
