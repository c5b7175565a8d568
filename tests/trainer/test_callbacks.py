"""HeldOutAccuracyCallback: held-out accuracy logged as ordinary Trainer metrics at the right steps."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from helpers import addition_dataset, cpu_config
from trl_mig import HeldOutAccuracyCallback, MIGGRPOTrainer
from trl_mig.rewards import default_reward_funcs
from trl_mig.segmentation import FormatSpec
from trl_mig.builtin.tiny import build_tiny_model

OPERANDS = 5  # 25 additions: the first 16 to train on, the others held out


def mig_trainer(tmp_path, tokenizer, **overrides):
    return MIGGRPOTrainer(
        build_tiny_model(tokenizer),
        args=cpu_config(tmp_path, max_completion_length=8, **overrides),
        train_dataset=addition_dataset(16, operands=OPERANDS),
        processing_class=tokenizer,
    )


def heldout_entries(trainer):
    return [entry for entry in trainer.state.log_history if "heldout/test/pass@1" in entry]


def test_logs_heldout_accuracy_at_start_every_n_steps_and_at_the_end(tmp_path, char_tokenizer):
    trainer = mig_trainer(tmp_path, char_tokenizer, max_steps=5, logging_steps=1, save_strategy="steps", save_steps=5)
    splits = {"test": addition_dataset(4, 16, operands=OPERANDS), "ood": addition_dataset(3, 20, operands=OPERANDS)}
    callback = HeldOutAccuracyCallback(trainer, splits, eval_steps=2, batch_size=3, num_samples=2)
    trainer.add_callback(callback)
    trainer.train()

    entries = heldout_entries(trainer)
    assert [entry["step"] for entry in entries] == [0, 2, 4, 5]
    for entry in entries:
        for split in ("test", "ood"):
            for metric in ("pass@1", "format_rate", "sampled_accuracy"):
                assert 0.0 <= entry[f"heldout/{split}/{metric}"] <= 1.0
        assert entry["heldout/seconds"] > 0
    assert [e["step"] for e in callback.history] == [0, 2, 4, 5]
    # compute at each measurement: training seconds (measurements left out) and TRL's rollout token count
    seconds = [entry["heldout/train_seconds"] for entry in entries]
    assert seconds[0] < 0.5 and seconds == sorted(seconds) and seconds[-1] > 0
    # 8 completions a step, each at most its prompt's characters (a character tokenizer) + max_completion_length tokens
    per_step = 8 * (len("<think>### Step 1\n4+4=") + 8)
    tokens = [entry["heldout/num_tokens"] for entry in entries]
    assert tokens[0] == 0 and tokens[-1] == trainer.state.num_input_tokens_seen
    assert all(0 < b - a <= per_step * (step_b - step_a) for a, b, step_a, step_b in zip(tokens, tokens[1:], [0, 2, 4],
                                                                                       [2, 4, 5]))
    # and every problem's greedy correctness, in dataset order, matching pass@1
    records = [json.loads(line) for line in (tmp_path / "heldout_problems.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    for record, entry in zip(records, entries):
        assert record["num_tokens"] == entry["heldout/num_tokens"]
        for split, size in (("test", 4), ("ood", 3)):
            text = record["correct"][split]
            assert len(text) == size and set(text) <= {"0", "1"}
            assert text.count("1") / size == entry[f"heldout/{split}/pass@1"]
    # the training metrics of GRPO/MIG are still logged every step, in entries of their own
    assert sum("mig/gain_sum" in entry for entry in trainer.state.log_history) == 5
    # and they reach trainer_state.json like any metric
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "heldout/ood/pass@1" in e] == [0, 2, 4, 5]


def test_a_model_that_learned_the_answers_scores_full_marks(tmp_path, char_tokenizer):
    """pass@1 is measured, not assumed: a model trained (by SFT) on the held-out answers gets them right."""
    trainer = mig_trainer(tmp_path, char_tokenizer, max_steps=1)
    held_out = Dataset.from_list([{"prompt": f"Compute 3+{b}.\n", "solution": str(3 + b)} for b in (1, 2)])
    model = trainer.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    texts = [f"Compute 3+{b}.\n<think>### Step 1\n3+{b}={3 + b}\n</think>\n<answer>{3 + b}</answer>" for b in (1, 2)]
    prompts = [len(char_tokenizer(row["prompt"])["input_ids"]) for row in held_out]
    for _ in range(1000):  # until the two answers are memorised
        losses = []
        for text, start in zip(texts, prompts):
            ids = torch.tensor([char_tokenizer(text)["input_ids"] + [char_tokenizer.eos_token_id]])
            labels = ids.clone()
            labels[:, :start] = -100
            loss = model(ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        if max(losses) < 1e-3:
            break
    callback = HeldOutAccuracyCallback(trainer, {"test": held_out}, eval_steps=1, max_new_tokens=40)
    metrics = callback.measure()
    assert metrics["heldout/test/pass@1"] == 1.0 and metrics["heldout/test/format_rate"] == 1.0
    untrained = mig_trainer(tmp_path / "other", char_tokenizer, max_steps=1)
    assert HeldOutAccuracyCallback(untrained, {"test": held_out}, eval_steps=1).measure()["heldout/test/pass@1"] == 0.0


def test_sampled_accuracy_does_not_change_the_training_run(tmp_path, char_tokenizer):
    def final_parameters(num_samples):
        trainer = mig_trainer(tmp_path / str(num_samples), char_tokenizer, max_steps=3)
        held_out = {"test": addition_dataset(3, 16, operands=OPERANDS)}
        trainer.add_callback(HeldOutAccuracyCallback(trainer, held_out, eval_steps=1, num_samples=num_samples,
                                                     temperature=1.0))
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    for with_sampling, without in zip(final_parameters(3), final_parameters(0)):
        assert torch.equal(with_sampling, without)


def test_works_with_plain_grpo_trainer(tmp_path, char_tokenizer):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=2, report_to="none", save_strategy="no", use_cpu=True, bf16=False, logging_steps=1)
    trainer = GRPOTrainer(build_tiny_model(char_tokenizer), reward_funcs=default_reward_funcs(FormatSpec()), args=args,
                          train_dataset=addition_dataset(8, operands=OPERANDS), processing_class=char_tokenizer)
    held_out = {"test": addition_dataset(2, 16, operands=OPERANDS)}
    trainer.add_callback(HeldOutAccuracyCallback(trainer, held_out, eval_steps=1))
    trainer.train()
    assert [entry["step"] for entry in heldout_entries(trainer)] == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(splits={}), "at least one held-out split"),
        (dict(eval_steps=0), "eval_steps"),
        (dict(splits={"test": Dataset.from_list([{"prompt": "x", "answer": "1"}])}), "no column(s) ['solution']"),
        (dict(num_samples=2, temperature=0.0), "temperature > 0"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, char_tokenizer, kwargs, message):
    trainer = mig_trainer(tmp_path, char_tokenizer, max_steps=1)
    settings = dict(splits={"test": addition_dataset(2, 16, operands=OPERANDS)}, eval_steps=2) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        HeldOutAccuracyCallback(trainer, settings.pop("splits"), **settings)
