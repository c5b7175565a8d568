"""Credit is composed in one place (`compose_credit`): the trainer's outcome advantage is TRL's own for every option,
`inspect_completion` gives the trainer's per-token advantages, a subclass can override the hook, and TRL's
sequence-level masks act per token on MIG's `(B, T)` advantages."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer

from helpers import (
    OUTCOME,
    PROMPTS,
    SCRIPT,
    SOLUTIONS,
    assert_loss_is_reference,
    cpu_config,
    group_normalise,
    make_trainer,
    reference_logliks,
    scripted_batch,
    scripted_rollout,
)
from trl_mig import MIGGRPOTrainer, compose_credit, inspect_completion, mig_trainer_class, outcome_advantages
from trl_mig.builtin.tiny import build_tiny_model
from trl_mig.credit import NOT_COT
from trl_mig.rewards import default_reward_funcs
from trl_mig.segmentation import FormatSpec, content_token_ids

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

WEIGHTS = [1.0, 0.5, 2.0]
MISMATCH = "outcome advantages differ"


def answer_length_reward(completions, **kwargs):
    """A third outcome reward that abstains (None) on a completion without an answer tag, as TRL allows."""
    return [None if "<answer>" not in text else (len(text) % 7) / 7 for text in completions]


class _Recorded(list):
    inputs: list

    def __init__(self):
        super().__init__()
        self.inputs = []


def build(tmp_path, tokenizer, rows=None, trainer_class=MIGGRPOTrainer, **options):
    """A trainer on the scripted completions with three outcome rewards: accuracy, step format and one with Nones."""
    args = cpu_config(tmp_path, **options)
    trainer = trainer_class(
        build_tiny_model(tokenizer).float(),
        reward_funcs=[*default_reward_funcs(FormatSpec.from_config(args)), answer_length_reward],
        args=args,
        train_dataset=Dataset.from_list(rows or scripted_batch()),
        processing_class=tokenizer,
        rollout_func=scripted_rollout(SCRIPT),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def capture_credit(trainer) -> list:
    """Record every `Credit` the trainer's hook returns (and, as `.inputs`, the arguments it was given)."""
    composed, hook = _Recorded(), trainer.compose_credit

    def spy(*args):
        composed.inputs.append(args)
        composed.append(hook(*args))
        return composed[-1]

    trainer.compose_credit = spy
    return composed


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_outcome_advantage_is_trls_own(tmp_path, char_tokenizer, caplog, scale, aggregation):
    trainer = build(tmp_path, char_tokenizer, scale_rewards=scale, multi_objective_aggregation=aggregation,
                    reward_weights=WEIGHTS, mig_weight=0.7, outcome_weight=1.3)
    trls = GRPOTrainer._generate_and_score_completions(trainer, scripted_batch())["advantages"]  # TRL alone
    composed = capture_credit(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_mig.trainer"):
        output = trainer._generate_and_score_completions(scripted_batch())
    assert trls.shape == (8,) and trls.abs().sum() > 0
    assert torch.equal(composed[0].outcome_advantages, trls)
    # `<think>` (the first token) lies outside the thought: it gets outcome_weight * TRL's advantage, nothing else
    assert output["advantages"][:, 0].tolist() == pytest.approx((1.3 * trls).tolist(), abs=1e-6)
    assert MISMATCH not in caplog.text


def test_options_reach_the_trainers_outcome_advantage(tmp_path, char_tokenizer):
    """The comparison above can fail: each option changes TRL's advantages on this batch, and MIG's with them."""
    seen = {}
    options = [("group", "sum_then_normalize", None), ("batch", "sum_then_normalize", None),
               ("group", "normalize_then_sum", None), ("group", "sum_then_normalize", WEIGHTS)]
    for scale, aggregation, weights in options:
        trainer = build(tmp_path, char_tokenizer, scale_rewards=scale, multi_objective_aggregation=aggregation,
                        reward_weights=weights)
        composed = capture_credit(trainer)
        trainer._generate_and_score_completions(scripted_batch())
        seen[(scale, aggregation, weights is None)] = composed[0].outcome_advantages
    values = list(seen.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(values) for b in values[i + 1 :]), seen


@pytest.mark.parametrize(
    "aggregation, scale, credit, failure_scaling",
    [
        ("sum_then_normalize", "group", "trajectory", 0.0),
        ("normalize_then_sum", "group", "trajectory", 0.0),
        ("normalize_then_sum", "none", "step", 0.0),
        ("sum_then_normalize", "batch", "step", 0.0),
        ("sum_then_normalize", "group", "return_to_go", 1.0),
    ],
)
def test_inspect_gives_the_trainers_per_token_advantages(
    tmp_path, char_tokenizer, aggregation, scale, credit, failure_scaling
):
    """One group is the whole batch, so the batch-level options normalise the same completions in both."""
    group = scripted_batch()[:4]
    trainer = build(tmp_path, char_tokenizer, rows=group, per_device_train_batch_size=4, reward_weights=WEIGHTS,
                    scale_rewards=scale, multi_objective_aggregation=aggregation, mig_credit=credit,
                    mig_weight=0.7, outcome_weight=1.3, mig_failure_scaling=failure_scaling)
    composed = capture_credit(trainer)
    output = trainer._generate_and_score_completions(group)
    credits = inspect_completion(trainer.model, char_tokenizer, PROMPTS[0], SCRIPT[PROMPTS[0]], SOLUTIONS[0],
                                 trainer.args, reward_funcs=trainer.reward_funcs)
    for row, item in enumerate(credits):
        assert item.outcome_advantage == pytest.approx(composed[0].outcome_advantages[row].item(), abs=1e-6)
        length = int(output["completion_mask"][row].sum())
        expected = [item.outside_advantage] * length
        for step in item.steps:
            lo, hi = step.token_span
            expected[lo:hi] = [step.advantage] * (hi - lo)
        assert output["advantages"][row, :length].tolist() == pytest.approx(expected, abs=1e-4), row
    if failure_scaling:  # half of this group fails: its MIG credit is halved, in both
        assert composed[0].mig_scale.tolist() == [0.5] * 4
    if aggregation == "normalize_then_sum":  # inspect really used it: summing first gives other advantages
        rewards = composed.inputs[0][0]  # the trainer's rewards_per_func, (4, 3), NaN for the abstentions
        assert torch.isnan(rewards).any()
        summed_first = outcome_advantages(rewards, 4, WEIGHTS, scale, "sum_then_normalize")[1]
        assert not torch.allclose(summed_first, torch.tensor([c.outcome_advantage for c in credits]), atol=1e-3)
        assert any("normalize_then_sum" in m for m in credits[0].messages), credits[0].messages


class DoubledGRPOTrainer(GRPOTrainer):
    """A base trainer that changes the advantages after TRL computed them."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        output["advantages"] = 2 * output["advantages"]
        return output


def test_base_trainer_that_changes_advantages_is_named_once(tmp_path, char_tokenizer, caplog):
    trainer = build(tmp_path, char_tokenizer, trainer_class=mig_trainer_class(DoubledGRPOTrainer))
    composed = capture_credit(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_mig.trainer"):
        output = trainer._generate_and_score_completions(scripted_batch())
        trainer._generate_and_score_completions(scripted_batch())
    assert caplog.text.count(MISMATCH) == 1 and "override MIGMixin.compose_credit" in caplog.text
    assert output["advantages"][:, 0].tolist() == pytest.approx(composed[0].outcome_advantages.tolist(), abs=1e-6)


class OutcomeOnlyTrainer(MIGGRPOTrainer):
    """A user's credit composition: the outcome advantage on every token (MIG metrics still logged)."""

    def compose_credit(self, *args):
        credit = super().compose_credit(*args)
        everywhere = credit.outcome_advantages.unsqueeze(1).expand_as(credit.advantages)
        return dataclasses.replace(credit, advantages=everywhere)


def test_subclass_overrides_credit_composition(tmp_path, char_tokenizer):
    trainer = build(tmp_path, char_tokenizer, trainer_class=OutcomeOnlyTrainer, mig_weight=3.0)
    trls = GRPOTrainer._generate_and_score_completions(trainer, scripted_batch())["advantages"]
    output = trainer._generate_and_score_completions(scripted_batch())
    assert torch.equal(output["advantages"], trls.unsqueeze(1).expand_as(output["advantages"]))
    # the default composition gives the thought other values
    default = build(tmp_path, char_tokenizer, mig_weight=3.0)._generate_and_score_completions(scripted_batch())
    assert not torch.allclose(default["advantages"], output["advantages"])


def test_trainer_and_inspect_strip_the_same_end_of_generation(tmp_path, char_tokenizer):
    eos, pad = char_tokenizer.eos_token_id, char_tokenizer.pad_token_id
    assert content_token_ids([5, eos, 6, eos, pad, eos], {eos, pad}) == [5, eos, 6], "only trailing stop ids go"
    assert content_token_ids([eos, pad], {eos, pad}) == [] and content_token_ids([], {eos}) == []
    trainer = build(tmp_path, char_tokenizer)
    ids = char_tokenizer(SCRIPT[PROMPTS[0]][0], add_special_tokens=False)["input_ids"]
    assert trainer._content_ids(ids + [eos, pad, pad]) == ids
    credit = inspect_completion(trainer.model, char_tokenizer, PROMPTS[0], ids + [eos, pad], SOLUTIONS[0])
    assert credit.completion == SCRIPT[PROMPTS[0]][0]


# ---------------------------------------------------------------------------------------- pre-registered variants
def test_return_to_go_and_failure_scaling_reach_the_loss(tmp_path, char_tokenizer):
    """mig_credit="return_to_go" with mig_failure_scaling=1: the step tokens' advantages equal an independent
    computation (l_k by plain forwards, G_k = sum of the watermark gains from step k on, normalised per step index,
    times the group's failure rate), and the loss is GRPO's on those advantages."""
    model = build_tiny_model(char_tokenizer).float()
    trainer = make_trainer(tmp_path, char_tokenizer, model=model, mig_weight=0.7, outcome_weight=1.3,
                           mig_credit="return_to_go", mig_failure_scaling=1.0, sft_weight=0.0)
    output = trainer._generate_and_score_completions(scripted_batch())
    prompt = PROMPTS[0]  # the other group's completions are identical: no advantage at all
    # accuracy: completions 0 and 3 are right, 1 wrong, 2 truncated: the group's failure rate is 1/2
    failure_rate = 0.5
    logliks = [reference_logliks(trainer.model, char_tokenizer, prompt, c, SOLUTIONS[0]) for c in SCRIPT[prompt]]
    to_go = []
    for values, _ in logliks:
        gains = [max(0.0, values[k] - max(values[:k])) for k in range(1, len(values))]
        to_go.append([sum(gains[k:]) for k in range(len(gains))])
    outcome = group_normalise(OUTCOME[prompt])
    lifted = 0
    for j, (values, bounds) in enumerate(logliks):
        tokens = output["advantages"][j, : int(output["completion_mask"][j].sum())]
        for k in range(len(bounds) - 1):
            peers = torch.tensor([g[k] for g in to_go if len(g) > k], dtype=torch.float64)
            mig = (to_go[j][k] - peers.mean().item()) / (peers.std().item() + 1e-4)
            lifted += abs(mig) > 0.1
            expected = 1.3 * outcome[j] + 0.7 * failure_rate * mig
            step_tokens = tokens[bounds[k] : bounds[k + 1]]
            assert step_tokens.tolist() == pytest.approx([expected] * len(step_tokens), abs=2e-3), (j, k)
    assert lifted, "the scripted group has return-to-go credit to scale"
    assert (output["advantages"][4:] == 0).all()
    assert_loss_is_reference(trainer, output)


def test_failure_scaling_without_a_correctness_reward_fails_at_construction(tmp_path, char_tokenizer):
    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    with pytest.raises(ValueError, match=r"mig_failure_scaling=1.0 .*'accuracy' among \['length_reward'\]"):
        MIGGRPOTrainer(build_tiny_model(char_tokenizer), reward_funcs=[length_reward],
                       args=cpu_config(tmp_path, mig_failure_scaling=1.0, sft_weight=0.0),
                       train_dataset=Dataset.from_list(scripted_batch()), processing_class=char_tokenizer)


# ------------------------------------------------------------------------------------- TRL's sequence-level masks
def mixed_sign_credit():
    """One group of two with one step each: completion 0 fails (negative outcome advantage) but its step lifts the
    answer likelihood, completion 1 succeeds without a lift. Tokens: a tag, two step tokens, the answer."""
    step_ids = torch.tensor([[NOT_COT, 0, 0, NOT_COT]] * 2)
    credit = compose_credit(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([1, 1]),
                            torch.tensor([True, True]), step_ids, 2, mig_weight=2.0)
    advantages = credit.advantages
    assert credit.outcome_advantages[0] < 0 and (advantages[0, 1:3] > 0).all()
    assert credit.outcome_advantages[1] > 0 and (advantages[1, 1:3] < 0).all()
    return credit


def test_off_policy_mask_drops_the_negative_tokens_of_an_off_policy_sequence():
    """Per token: a failed completion keeps its lifting step's tokens, a correct one loses its non-lifting step's."""
    advantages = mixed_sign_credit().advantages
    mask = torch.ones(2, 4)
    far = GRPOTrainer.get_off_policy_mask(advantages, torch.zeros(2, 4), torch.ones(2, 4), mask, 0.5)  # KL 1 > 0.5
    assert far.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
    near = GRPOTrainer.get_off_policy_mask(advantages, torch.zeros(2, 4), torch.full((2, 4), 0.1), mask, 0.5)
    assert near.tolist() == [[1.0] * 4] * 2, "on-policy sequences keep every token"


def test_vespo_gamma_weights_follow_each_tokens_sign():
    advantages = mixed_sign_credit().advantages
    log_ratio = torch.full((2, 4), 0.1)  # sequence ratio w = e^0.4
    phi = GRPOTrainer.get_gamma_weights(advantages, log_ratio, torch.ones(2, 4), None, k_pos=2.0, lambda_pos=3.0,
                                        k_neg=3.0, lambda_neg=2.0)
    w = math.exp(0.4)
    positive, negative = math.exp(3.0 + 2.0 * 0.4 - 3.0 * w), math.exp(2.0 + 3.0 * 0.4 - 2.0 * w)
    assert phi.tolist() == [pytest.approx([negative, positive, positive, negative]),
                            pytest.approx([positive, negative, negative, positive])]


def test_trainers_loss_masks_tokens_by_their_own_advantage(tmp_path, char_tokenizer):
    """In the trainer's VESPO loss with off-policy masking, TRL gets MIG's (B, T) advantages and masks per token."""
    # a threshold below any KL: every sequence counts as off-policy, so the advantage's sign alone decides
    trainer = build(tmp_path, char_tokenizer, loss_type="vespo", off_policy_mask_threshold=-1.0, mig_weight=3.0,
                    mig_credit="step")
    seen = {}
    for name in ("get_off_policy_mask", "get_gamma_weights"):
        original = getattr(trainer, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen[_name] = (kwargs["advantages"], _original(*args, **kwargs))
            return seen[_name][1]

        setattr(trainer, name, spy)
    output = trainer._generate_and_score_completions(scripted_batch())
    trainer._compute_loss(trainer.model, output)
    advantages, mask = seen["get_off_policy_mask"]
    assert torch.equal(advantages, output["advantages"]) and advantages.shape == output["completion_ids"].shape
    assert torch.equal(seen["get_gamma_weights"][0], output["advantages"])
    assert mask.shape == advantages.shape and torch.equal(mask, (advantages >= 0).to(mask.dtype))
    # a completion whose outcome advantage (on `<think>`, outside the thought) and some step tokens disagree in sign
    real = output["completion_mask"].bool()
    mixed = [row for row in range(8) if (real[row] & ((advantages[row] >= 0) != (advantages[row, 0] >= 0))).any()]
    assert mixed, advantages
    for row in mixed:
        kept = mask[row][real[row]]
        assert kept.min() == 0 and kept.max() == 1, "part of the sequence kept, part dropped"
