"""Pure credit math, without any model: watermark gains, normalisation, step credit, masking, gated SFT."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_mig import (
    Credit,
    compose_credit,
    gated_sft_loss,
    group_failure_rates,
    hwm_gains,
    likelihood_differences,
    mig_advantages,
    normalize_rewards,
    outcome_advantages,
    per_token_advantages,
    return_to_go_advantages,
    step_advantages,
    step_gains,
)
from trl_mig.credit import NOT_COT, correctness_reward_index

logliks = st.lists(st.floats(-20, 0, allow_nan=False, allow_infinity=False), min_size=1, max_size=24)


def total_gain(values):
    gains, _ = hwm_gains(torch.tensor(values, dtype=torch.float64))
    return gains.sum().item()


def test_watermark_example():
    gains, watermark = hwm_gains(torch.tensor([-3.0, -2.0, -2.5, -1.0, -1.5]))
    assert gains.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])
    assert watermark.tolist() == pytest.approx([-3.0, -2.0, -2.0, -1.0, -1.0])


def test_pump_and_dump_earns_nothing_for_recovery():
    # l drops from -2 to -5, then "recovers" to -2: the recovery does not lift the watermark
    dump = [-3.0, -2.0, -5.0, -2.0]
    assert total_gain(dump) == pytest.approx(1.0)
    assert hwm_gains(torch.tensor(dump))[0].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_batched_shapes():
    values = torch.randn(3, 5, 7)
    gains, watermark = hwm_gains(values)
    assert gains.shape == (3, 5, 6) and watermark.shape == (3, 5, 7)
    single = hwm_gains(values[1, 2])[0]
    assert torch.equal(gains[1, 2], single)


def test_k_zero_has_no_gains():
    gains, watermark = hwm_gains(torch.tensor([[-1.0]]))
    assert gains.shape == (1, 0) and watermark.tolist() == [[-1.0]]


@pytest.mark.parametrize("missing", [float("nan"), float("inf"), float("-inf")])
def test_missing_steps_earn_nothing_and_keep_the_watermark(missing):
    gains, watermark = hwm_gains(torch.tensor([-3.0, missing, -2.0, missing]))
    assert gains.tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert watermark.tolist() == pytest.approx([-3.0, -3.0, -2.0, -2.0])


def test_missing_first_entry_starts_the_watermark_later():
    gains, watermark = hwm_gains(torch.tensor([float("nan"), -4.0, -1.0]))
    assert gains.tolist() == pytest.approx([0.0, 3.0])
    assert math.isnan(watermark[0].item()) and watermark[1:].tolist() == pytest.approx([-4.0, -1.0])


@settings(max_examples=300, deadline=None)
@given(logliks)
def test_gains_are_nonnegative_and_sum_to_best_minus_baseline(values):
    gains, watermark = hwm_gains(torch.tensor(values, dtype=torch.float64))
    assert (gains >= 0).all()
    assert gains.sum().item() == pytest.approx(max(values) - values[0], abs=1e-9)
    assert (watermark[1:] >= watermark[:-1]).all(), "the watermark is monotone"
    assert watermark[-1].item() == pytest.approx(max(values))


@settings(max_examples=300, deadline=None)
@given(logliks, st.data())
def test_inserting_or_duplicating_a_step_never_raises_the_reward(values, data):
    position = data.draw(st.integers(1, len(values)))
    duplicate = data.draw(st.sampled_from(values))
    below_best = data.draw(st.floats(-40, max(values), allow_nan=False))
    for inserted in (duplicate, below_best):
        longer = values[:position] + [inserted] + values[position:]
        assert total_gain(longer) <= total_gain(values) + 1e-9


@settings(max_examples=300, deadline=None)
@given(logliks, st.floats(0.01, 10), st.integers(1, 4))
def test_pump_and_dump_never_beats_the_direct_path(values, depth, repeats):
    # after any prefix, dip below the watermark and climb back to it, several times: no extra reward
    position = len(values)
    watermark = max(values)
    detour = [watermark - depth, watermark] * repeats
    assert total_gain(values + detour) == pytest.approx(total_gain(values), abs=1e-9)
    assert total_gain(values[:position] + detour + [watermark + 1]) == pytest.approx(total_gain(values + [watermark + 1]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 0) | st.just(float("nan")), min_size=1, max_size=16))
def test_no_sequence_earns_more_than_best_minus_first(values):
    tensor = torch.tensor(values, dtype=torch.float64)
    gains, _ = hwm_gains(tensor)
    finite = [v for v in values if math.isfinite(v)]
    bound = max(finite) - finite[0] if finite else 0.0
    assert torch.isfinite(gains).all() and (gains >= 0).all()
    assert gains.sum().item() == pytest.approx(bound, abs=1e-9)


# ------------------------------------------------------------------------------------------------- normalisation
def test_group_normalisation_matches_grpo_formula():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 2.0])
    advantages, baseline, divisor = normalize_rewards(rewards, group_size=4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std() + 1e-4)
    assert torch.allclose(advantages[:4], expected)
    assert baseline.tolist() == pytest.approx([2.5] * 4 + [0.5] * 4)
    assert divisor[0].item() == pytest.approx(first.std().item() + 1e-4)


def test_mig_advantages_trajectory_and_step_leave_out_unscorable_completions():
    # two groups of 3; gains are 0 past each completion's steps; the last completion has no usable likelihoods
    gains = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5], [2.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    num_steps = torch.tensor([2, 1, 2, 1, 2, 2])
    scorable = torch.tensor([True, True, True, True, True, False])
    trajectory = mig_advantages(gains, num_steps, scorable, group_size=3)
    first = torch.tensor([1.0, 0.0, 1.0])  # gain sums of group 1
    assert torch.allclose(trajectory[:3], (first - first.mean()) / (first.std() + 1e-4))
    second = torch.tensor([2.0, 1.0])  # group 2 without the unscorable completion, which gets 0
    assert torch.allclose(trajectory[3:5], (second - second.mean()) / (second.std() + 1e-4))
    assert trajectory[5].item() == 0.0

    # step credit, by hand: progress by step k against the group's scorable completions that reached step k
    step = mig_advantages(gains, num_steps, scorable, group_size=3, credit="step")
    first_step = [1.0, 0.0, 0.5]  # group 1 after step 1: spread 0.5; after step 2 only rows 0 and 2, both at 1.0
    a = 0.5 / (sample_std(first_step) + 1e-4)
    b = 1.0 / (sample_std([2.0, 0.0]) + 1e-4)  # group 2 after step 1, without the unscorable row; step 2: row 4 alone
    expected = [[a, 0.0], [-a, 0.0], [0.0, 0.0], [b, 0.0], [-b, 0.0], [0.0, 0.0]]
    assert step.shape == (6, 2)
    assert step.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    with pytest.raises(ValueError, match="Unknown MIG credit 'turn'"):
        mig_advantages(gains, num_steps, scorable, group_size=3, credit="turn")


def test_zero_std_group_gets_zero_advantage():
    advantages, _, _ = normalize_rewards(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0]), group_size=3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all()


def test_nan_rewards_are_left_out_and_get_zero():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan")])
    advantages, baseline, _ = normalize_rewards(rewards, group_size=2)
    assert advantages[1].item() == 0.0 and advantages[3].item() == 0.0
    assert advantages[0].item() == 0.0, "a group with one valid reward has no spread"
    assert baseline.tolist() == pytest.approx([1.0, 1.0, 3.0, 3.0])
    all_nan, _, _ = normalize_rewards(torch.full((4,), float("nan")), group_size=2)
    assert all_nan.tolist() == [0.0] * 4


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])
    batch, _, divisor = normalize_rewards(rewards, 2, "batch")
    assert divisor[0].item() == pytest.approx(rewards.std().item() + 1e-4)
    assert batch.tolist() == pytest.approx([(-1) / divisor[0].item(), 1 / divisor[0].item(), -2 / divisor[0].item(), 2 / divisor[0].item()])
    centred, _, _ = normalize_rewards(rewards, 2, "none")
    assert centred.tolist() == pytest.approx([-1.0, 1.0, -2.0, 2.0])
    with pytest.raises(ValueError, match="scaling"):
        normalize_rewards(rewards, 2, "max")
    with pytest.raises(ValueError, match="multiple of group_size"):
        normalize_rewards(rewards, 3)


# ----------------------------------------------------------------------------------------------- raw differences
def test_likelihood_differences_example_and_missing_entries():
    # the "pump-and-dump" is paid twice by raw differences: the drop is negative, the recovery positive
    diffs = likelihood_differences(torch.tensor([-3.0, -2.0, -5.0, -2.0]))
    assert diffs.tolist() == pytest.approx([1.0, -3.0, 3.0])
    missing = likelihood_differences(torch.tensor([[float("nan"), -4.0, float("nan"), -1.0], [-2.0] + [float("nan")] * 3]))
    assert missing.flatten().tolist() == pytest.approx([0.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    assert step_gains(torch.tensor([-3.0, -2.0, -5.0, -2.0]), "watermark").tolist() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="watermark"):
        step_gains(torch.zeros(3), "ratio")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(-20, 0), st.just(float("nan"))), min_size=1, max_size=16))
def test_differences_sum_to_last_minus_first_finite(values):
    diffs = likelihood_differences(torch.tensor(values, dtype=torch.float64))
    finite = [v for v in values if not math.isnan(v)]
    expected = finite[-1] - finite[0] if finite else 0.0
    assert diffs.sum().item() == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------------ step credit
def sample_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_step_credit_by_hand_a_failed_completion_keeps_credit_for_its_correct_first_step():
    # one group of 4, two steps each. Completion 0 lifts the answer likelihood at step 1 (a correct first step) and
    # then fails (no further lift); completion 2 only lifts at its last step; 1 and 3 never lift.
    gains = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    credit = step_advantages(gains, torch.tensor([2, 2, 2, 2]), group_size=4)
    step1 = [1.0, 0.0, 0.0, 0.0]  # progress after step 1
    step2 = [1.0, 0.0, 2.0, 0.0]  # progress after step 2
    expected = [
        [(a - sum(step1) / 4) / (sample_std(step1) + 1e-4), (b - sum(step2) / 4) / (sample_std(step2) + 1e-4)]
        for a, b in zip(step1, step2)
    ]
    assert credit.tolist() == [pytest.approx(row, abs=1e-9) for row in expected]
    assert credit[0, 0] > 0, "the correct first step of a failed completion gets positive credit"
    assert credit[0, 1] > 0, "a step that keeps earlier progress is not punished for not lifting itself"
    assert credit[2, 0] < 0 < credit[2, 1]


def test_step_credit_never_punishes_a_group_that_does_not_lift():
    gains = torch.zeros(4, 3)
    assert step_advantages(gains, torch.tensor([3, 2, 3, 1]), group_size=2).abs().max() == 0
    # the old design, (K * g_k - mean R) / std R, gave every non-lifting step negative credit: here it stays 0
    gains = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert step_advantages(gains, torch.tensor([3, 3]), group_size=2).abs().max() == 0


def test_step_credit_masks_completions_that_ended():
    # completion 1 has one step: it is left out of step 2's statistics, which then has a single member (credit 0)
    gains = torch.tensor([[0.5, 1.0], [0.0, 9.0]])
    credit = step_advantages(gains, torch.tensor([2, 1]), group_size=2)
    assert credit[1, 1] == 0 and credit[0, 1] == 0
    assert credit[0, 0] > 0 > credit[1, 0]
    # three completions: the ended one does not pull the baseline of step 2 down
    gains = torch.tensor([[1.0, 1.0], [1.0, 3.0], [0.0, 0.0]])
    credit = step_advantages(gains, torch.tensor([2, 2, 1]), group_size=3, scale="none")
    assert credit[:, 1].tolist() == pytest.approx([-1.0, 1.0, 0.0])
    assert credit[:, 0].tolist() == pytest.approx([1 / 3, 1 / 3, -2 / 3])


def test_step_credit_leaves_out_unscorable_rows_and_scales():
    gains = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, 0.0], [3.0, 0.0]])
    credit = step_advantages(gains, torch.tensor([2, 2, 2, 2]), group_size=4, scale="none")
    assert credit[1].tolist() == [0.0, 0.0]
    assert credit[[0, 2, 3], 0].tolist() == pytest.approx([1 - 4 / 3, -4 / 3, 3 - 4 / 3])
    batch = step_advantages(gains, torch.tensor([2, 2, 2, 2]), group_size=2, scale="batch")
    assert torch.isfinite(batch).all()
    with pytest.raises(ValueError, match="scaling"):
        step_advantages(gains, torch.tensor([2, 2, 2, 2]), group_size=4, scale="max")
    with pytest.raises(ValueError, match="multiple of group_size"):
        step_advantages(gains, torch.tensor([2, 2, 2, 2]), group_size=3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(0, 5), min_size=1, max_size=6), min_size=4, max_size=4))
def test_step_credit_is_centred_per_step_index(groups):
    width = max(len(values) for values in groups)
    gains = torch.zeros(4, width, dtype=torch.float64)
    for row, values in enumerate(groups):
        gains[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    num_steps = torch.tensor([len(values) for values in groups])
    credit = step_advantages(gains, num_steps, group_size=4, scale="none")
    for k in range(width):
        members = num_steps > k
        assert (credit[~members, k] == 0).all()
        if members.sum() >= 2:
            assert credit[members, k].sum().item() == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------- return-to-go credit
def test_return_to_go_by_hand_a_wrong_step_after_a_right_one_gets_negative_credit():
    # one group of 2 completions x 3 steps. Completion 0 lifts the answer likelihood at step 1 (a right step), then
    # writes two steps that lift nothing (wrong); completion 1 lifts nothing until its last step.
    gains = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    num_steps = torch.tensor([3, 3])
    # G_{i,k} = sum_{j>=k} g_{i,j}: completion 0 [1, 0, 0], completion 1 [1, 1, 1]; per index mean [1, .5, .5]
    centred = return_to_go_advantages(gains, num_steps, group_size=2, scale="none")
    assert centred.tolist() == [pytest.approx([0.0, -0.5, -0.5]), pytest.approx([0.0, 0.5, 0.5])]
    # scaled: each index k >= 2 has the values {0, 1}: sample std 1/sqrt(2)
    scaled = return_to_go_advantages(gains, num_steps, group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert scaled.tolist() == [pytest.approx([0.0, -a, -a], abs=1e-12), pytest.approx([0.0, a, a], abs=1e-12)]
    assert scaled[0, 1] < 0 and scaled[0, 2] < 0, "the wrong steps after a right one are punished"
    assert scaled[1, 0] == 0 and scaled[1, 1] > 0, "the steps before a breakthrough share it"
    # step credit ("progress so far") reads the same group the other way round: completion 0's wrong step 2 keeps
    # the credit of its right step 1
    progress = step_advantages(gains, num_steps, group_size=2, scale="none")
    assert progress.tolist() == [pytest.approx([0.5, 0.5, 0.0]), pytest.approx([-0.5, -0.5, 0.0])]


def test_return_to_go_masks_ended_completions_and_ignores_values_past_their_steps():
    # completion 1 has one step: the 9.0 past it is padding, not a gain, and it is left out of step 2's statistics
    gains = torch.tensor([[0.5, 1.0], [0.0, 9.0]])
    credit = return_to_go_advantages(gains, torch.tensor([2, 1]), group_size=2, scale="none")
    assert credit.tolist() == [pytest.approx([0.75, 0.0]), pytest.approx([-0.75, 0.0])]  # G = [1.5, 1] and [0]
    # three completions: the ended one does not move step 2's baseline; an unscorable (NaN) row gets 0
    gains = torch.tensor([[1.0, 1.0], [1.0, 3.0], [2.0, 0.0], [float("nan")] * 2])
    credit = return_to_go_advantages(gains, torch.tensor([2, 2, 1, 2]), group_size=4, scale="none")
    assert credit[:, 1].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    assert credit[:, 0].tolist() == pytest.approx([2 - 8 / 3, 4 - 8 / 3, 2 - 8 / 3, 0.0])
    assert torch.isfinite(return_to_go_advantages(gains, torch.tensor([2, 2, 1, 2]), 2, "batch")).all()
    with pytest.raises(ValueError, match="return_to_go_advantages needs gains of shape"):
        return_to_go_advantages(gains, torch.tensor([2, 2, 1, 2]), group_size=3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(0, 5), min_size=1, max_size=6), min_size=4, max_size=4))
def test_return_to_go_is_centred_per_step_index_and_starts_at_the_trajectory_credit(groups):
    width = max(len(values) for values in groups)
    gains = torch.zeros(4, width, dtype=torch.float64)
    for row, values in enumerate(groups):
        gains[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    num_steps = torch.tensor([len(values) for values in groups])
    credit = return_to_go_advantages(gains, num_steps, group_size=4, scale="none")
    for k in range(width):
        members = num_steps > k
        assert (credit[~members, k] == 0).all()
        if members.sum() >= 2:
            assert credit[members, k].sum().item() == pytest.approx(0.0, abs=1e-9)
    # step 1 is credited with every gain of the completion: the trajectory MIG advantage
    scorable = torch.ones(4, dtype=torch.bool)
    trajectory = mig_advantages(gains, num_steps, scorable, group_size=4)
    via_mig = mig_advantages(gains, num_steps, scorable, group_size=4, credit="return_to_go")
    assert via_mig[:, 0].tolist() == pytest.approx(trajectory.tolist(), abs=1e-6)


# --------------------------------------------------------------------------------------------------- failure scaling
def test_group_failure_rates_count_wrong_and_missing_answers():
    correctness = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, float("nan"), 0.5])
    assert group_failure_rates(correctness, 2).tolist() == [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0]
    assert group_failure_rates(correctness, 2, threshold=0.5).tolist() == [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert group_failure_rates(correctness, 4).tolist() == [0.5] * 4 + [0.75] * 4
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_failure_rates(correctness, 3)


def test_correctness_reward_is_the_named_one_or_the_first_accuracy():
    names = ["step_format_reward", "answer_accuracy_reward", "accuracy_2"]
    assert correctness_reward_index(names) == 1
    assert correctness_reward_index(names, "step_format_reward") == 0
    assert correctness_reward_index(["step_format_reward"]) is None
    with pytest.raises(ValueError, match="sft_correctness_reward='length' is not one of the reward functions"):
        correctness_reward_index(names, "length")


# three groups of two: all correct, all wrong, one of each; column 0 is the correctness reward
SCALING_REWARDS = torch.tensor([[1.0, 0.2], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SCALING_GAINS = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5], [1.0, 1.0]])
SCALING_STEP_IDS = torch.tensor([[NOT_COT, 0, 1, NOT_COT]] * 6)


@pytest.mark.parametrize("credit", ["trajectory", "return_to_go"])
def test_failure_scaling_by_hand(credit):
    options = dict(mig_weight=0.7, outcome_weight=1.3, mig_credit=credit, correctness_index=0)
    inputs = (SCALING_REWARDS, SCALING_GAINS, torch.tensor([2] * 6), torch.ones(6, dtype=torch.bool),
              SCALING_STEP_IDS, 2)
    plain = compose_credit(*inputs, **options)
    linear = compose_credit(*inputs, mig_failure_scaling=1.0, **options)
    squared = compose_credit(*inputs, mig_failure_scaling=2.0, **options)
    assert plain.mig_scale.tolist() == [1.0] * 6
    assert linear.mig_scale.tolist() == [0.0, 0.0, 1.0, 1.0, 0.5, 0.5]
    assert squared.mig_scale.tolist() == [0.0, 0.0, 1.0, 1.0, 0.25, 0.25]
    assert plain.mig_advantages[:2].abs().sum() > 0, "the all-correct group has MIG credit to remove"
    assert torch.equal(plain.outcome_advantages, linear.outcome_advantages)
    factor = linear.mig_scale if credit == "trajectory" else linear.mig_scale.unsqueeze(1)
    assert torch.allclose(linear.mig_advantages, plain.mig_advantages * factor)
    assert torch.allclose(linear.trajectory_mig_advantages, plain.trajectory_mig_advantages * linear.mig_scale)
    # per token: the all-correct group keeps only the outcome advantage, the all-wrong group all of its MIG credit,
    # the mixed group half of it (a quarter with p = 2)
    outcome_part = 1.3 * plain.outcome_advantages.unsqueeze(1)
    mig_part = plain.advantages - outcome_part
    assert mig_part[:2].abs().sum() > 0 and mig_part[4:].abs().sum() > 0
    assert torch.allclose(linear.advantages[:2], outcome_part[:2].expand(-1, 4))
    assert torch.allclose(linear.advantages[2:4], plain.advantages[2:4])
    assert torch.allclose(linear.advantages[4:], outcome_part[4:] + 0.5 * mig_part[4:])
    assert torch.allclose(squared.advantages[4:], outcome_part[4:] + 0.25 * mig_part[4:])


def test_failure_scaling_needs_a_correctness_reward_and_a_valid_exponent():
    inputs = (SCALING_REWARDS, SCALING_GAINS, torch.tensor([2] * 6), torch.ones(6, dtype=torch.bool),
              SCALING_STEP_IDS, 2)
    with pytest.raises(ValueError, match="mig_failure_scaling=1.0 .* pass correctness_index"):
        compose_credit(*inputs, mig_failure_scaling=1.0)
    with pytest.raises(ValueError, match="correctness_index=2 is not a column"):
        compose_credit(*inputs, mig_failure_scaling=1.0, correctness_index=2)
    with pytest.raises(ValueError, match="mig_failure_scaling must be a finite number >= 0"):
        compose_credit(*inputs, mig_failure_scaling=-1.0, correctness_index=0)
    # off: no correctness reward needed, and a threshold that makes every answer wrong changes nothing
    assert compose_credit(*inputs, correctness_threshold=5.0).mig_scale.tolist() == [1.0] * 6
    scaled = compose_credit(*inputs, mig_failure_scaling=1.0, correctness_index=0, correctness_threshold=5.0)
    assert scaled.mig_scale.tolist() == [1.0] * 6, "nothing reaches the threshold: every group fails"


# ------------------------------------------------------------------------------------------------------- masking
def test_answer_tokens_get_only_outcome_advantage_in_both_credit_modes():
    outcome = torch.tensor([1.0, -1.0])
    step_ids = torch.tensor([[NOT_COT, 0, 0, 1, 1, NOT_COT, NOT_COT], [0, 0, 0, 0, NOT_COT, NOT_COT, NOT_COT]])
    trajectory = per_token_advantages(outcome, torch.tensor([2.0, 0.5]), step_ids, mig_weight=0.5, outcome_weight=2.0)
    assert trajectory[0].tolist() == pytest.approx([2.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0])
    assert trajectory[1].tolist() == pytest.approx([-1.75] * 4 + [-2.0] * 3)
    per_step = torch.tensor([[4.0, -2.0], [1.0, 0.0]])
    stepwise = per_token_advantages(outcome, per_step, step_ids, mig_weight=1.0, outcome_weight=1.0)
    assert stepwise[0].tolist() == pytest.approx([1.0, 5.0, 5.0, -1.0, -1.0, 1.0, 1.0])
    assert stepwise[1].tolist() == pytest.approx([0.0] * 4 + [-1.0] * 3)


def test_mig_credit_on_all_tokens_ablation():
    outcome = torch.tensor([1.0, -1.0])
    step_ids = torch.tensor([[NOT_COT, 0, 0, 1, 1, NOT_COT, NOT_COT], [0, 0, 0, 0, NOT_COT, NOT_COT, NOT_COT]])
    trajectory = per_token_advantages(outcome, torch.tensor([2.0, 0.5]), step_ids, 0.5, 2.0, scope="all")
    assert trajectory[0].tolist() == pytest.approx([3.0] * 7)
    assert trajectory[1].tolist() == pytest.approx([-1.75] * 7)
    per_step = torch.tensor([[4.0, -2.0], [1.0, 0.0]])
    stepwise = per_token_advantages(outcome, per_step, step_ids, scope="all")
    # the leading tag takes step 1's credit, the answer part the last step's
    assert stepwise[0].tolist() == pytest.approx([5.0, 5.0, 5.0, -1.0, -1.0, -1.0, -1.0])
    assert stepwise[1].tolist() == pytest.approx([0.0] * 7)
    with pytest.raises(ValueError, match="scope"):
        per_token_advantages(outcome, per_step, step_ids, scope="answer")


def test_masking_with_zero_steps_everywhere():
    step_ids = torch.full((2, 3), NOT_COT)
    advantages = per_token_advantages(torch.tensor([1.0, 2.0]), torch.zeros(2, 0), step_ids)
    assert advantages.tolist() == [[1.0] * 3, [2.0] * 3]


# ---------------------------------------------------------------------------------------------- composed credit
def _mean(values):
    return sum(values) / len(values)


def _sample_std(values):
    """Bessel-corrected std, None with fewer than two values (TRL's nanstd gives NaN there)."""
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reference_outcome(rewards, group_size, weights, scale, aggregation):
    """
    GRPO's outcome advantage written out with plain Python floats, from TRL 1.16's description: None rewards are left
    out; a completion without any reward gets 0; a NaN advantage (a spread from fewer than two rewards) becomes 0.
    """
    eps = 1e-4
    weights = weights or [1.0] * len(rewards[0])
    groups = [range(start, start + group_size) for start in range(0, len(rewards), group_size)]
    unrewarded = [all(r is None for r in row) for row in rewards]
    if aggregation == "sum_then_normalize":
        totals = [None if none else sum(w * r for w, r in zip(weights, row) if r is not None)
                  for row, none in zip(rewards, unrewarded)]
        batch_std = _sample_std([t for t in totals if t is not None])
        advantages = [0.0] * len(rewards)
        for group in groups:
            valid = [totals[i] for i in group if totals[i] is not None]
            std = {"group": _sample_std(valid) if group_size > 1 else 0.0, "batch": batch_std, "none": 0.0}[scale]
            divisor = 1.0 if scale == "none" else None if std is None else std + eps
            for i in group:
                if totals[i] is not None and divisor is not None:
                    advantages[i] = (totals[i] - _mean(valid)) / divisor
        return advantages
    normalised = [[None] * len(weights) for _ in rewards]
    for group in groups:
        for f in range(len(weights)):
            valid = [rewards[i][f] for i in group if rewards[i][f] is not None]
            std = _sample_std(valid) if group_size > 1 else 0.0
            for i in group:
                if rewards[i][f] is not None and std is not None:
                    normalised[i][f] = (rewards[i][f] - _mean(valid)) / (std + eps)
    totals = [None if none else sum(w * n for w, n in zip(weights, row) if n is not None)
              for row, none in zip(normalised, unrewarded)]
    valid = [t for t in totals if t is not None]
    std = _sample_std(valid)
    return [0.0 if t is None or std is None else (t - _mean(valid)) / (std + eps) for t in totals]


def as_tensor(rewards):
    return torch.tensor([[float("nan") if r is None else r for r in row] for row in rewards])


# three groups of four, two reward functions: a None reward, a completion without any, a group without spread, a
# function that is constant within a group
REWARDS = [
    [1.0, 1.0], [0.0, 1.0], [0.0, None], [1.0, 0.0],
    [1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5],
    [0.0, 0.2], [None, None], [1.0, 0.9], [1.0, 0.0],
]


@pytest.mark.parametrize("weights", [None, [1.0, 0.5]])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_outcome_advantage_equals_grpos_for_every_option(scale, aggregation, weights):
    rewards, advantages = outcome_advantages(as_tensor(REWARDS), 4, weights, scale, aggregation)
    expected = reference_outcome(REWARDS, 4, weights, scale, aggregation)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-5)
    assert advantages[9].item() == 0.0 and math.isnan(rewards[9].item())
    w = weights or [1.0, 1.0]
    assert rewards[2].item() == pytest.approx(0.0) and rewards[0].item() == pytest.approx(w[0] + w[1])
    if aggregation == "sum_then_normalize":
        assert advantages[4:8].tolist() == [0.0] * 4, "a group without spread gets 0"


def test_outcome_options_change_the_advantage():
    """Each option really reaches the computation (so the parametrised comparison above can fail)."""
    rewards = as_tensor(REWARDS)
    results = {
        (scale, aggregation, weights): outcome_advantages(rewards, 4, weights, scale, aggregation)[1]
        for scale in ("group", "batch", "none")
        for aggregation in ("sum_then_normalize", "normalize_then_sum")
        for weights in (None, (1.0, 0.5))
    }
    sum_first = [v for (_, aggregation, _), v in results.items() if aggregation == "sum_then_normalize"]
    assert all(not torch.allclose(a, b) for i, a in enumerate(sum_first) for b in sum_first[i + 1 :])
    # normalize_then_sum normalises over the batch whatever scale_rewards says, as TRL does
    for weights in (None, (1.0, 0.5)):
        first = results[("group", "normalize_then_sum", weights)]
        assert torch.equal(first, results[("none", "normalize_then_sum", weights)])
        assert not torch.allclose(first, results[("group", "sum_then_normalize", weights)])


def test_outcome_advantage_bool_scale_and_bad_options():
    rewards = as_tensor(REWARDS)
    assert torch.equal(outcome_advantages(rewards, 4, scale_rewards=True)[1], outcome_advantages(rewards, 4)[1])
    assert torch.equal(outcome_advantages(rewards, 4, scale_rewards=False)[1],
                       outcome_advantages(rewards, 4, scale_rewards="none")[1])
    with pytest.raises(ValueError, match="reward_weights has 3 weights for 2 reward functions"):
        outcome_advantages(rewards, 4, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale_rewards 'max'"):
        outcome_advantages(rewards, 4, scale_rewards="max")
    with pytest.raises(ValueError, match="multi_objective_aggregation 'mean'"):
        outcome_advantages(rewards, 4, multi_objective_aggregation="mean")
    with pytest.raises(ValueError, match="multiple of group_size"):
        outcome_advantages(rewards, 5)


def test_one_completion_per_group_gets_zero_outcome_advantage():
    """Evaluation with num_generations_eval=1: no spread, so 0 (TRL sets the std to 0 there)."""
    rewards = torch.tensor([[1.0], [3.0]])
    for scale in ("group", "none"):
        assert outcome_advantages(rewards, 1, scale_rewards=scale)[1].tolist() == [0.0, 0.0]
    batch = outcome_advantages(rewards, 1, scale_rewards="batch")[1]
    assert batch.tolist() == [0.0, 0.0], "centred on its own group, so 0 whatever the divisor"


# two groups of two completions; step ids: a tag, steps, the answer part
STEP_IDS = torch.tensor([[NOT_COT, 0, 1, NOT_COT]] * 4)
GAINS = torch.tensor([[0.5, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
NUM_STEPS = torch.tensor([2, 2, 2, 2])
SCORABLE = torch.tensor([True, True, True, False])
OUTCOME_REWARDS = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])


@pytest.mark.parametrize("credit", ["trajectory", "step", "return_to_go"])
@pytest.mark.parametrize("scope", ["cot", "all"])
def test_compose_credit_is_the_pieces_combined(credit, scope):
    composed = compose_credit(
        OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, STEP_IDS, 2, reward_weights=[1.0, 0.5], scale_rewards="batch",
        multi_objective_aggregation="normalize_then_sum", mig_weight=0.7, outcome_weight=1.3, mig_credit=credit,
        mig_scale_rewards="none", mig_token_scope=scope,
    )
    assert isinstance(composed, Credit)
    rewards, outcome = outcome_advantages(OUTCOME_REWARDS, 2, [1.0, 0.5], "batch", "normalize_then_sum")
    assert torch.equal(composed.outcome_advantages, outcome) and torch.equal(composed.outcome_rewards, rewards)
    assert composed.outcome_rewards.tolist() == pytest.approx([1.5, 0.5, 0.0, 1.0])
    trajectory = mig_advantages(GAINS, NUM_STEPS, SCORABLE, 2, "trajectory", "none")
    assert composed.trajectory_mig_advantages.tolist() == pytest.approx([0.25, -0.25, 0.0, 0.0])
    assert torch.equal(composed.trajectory_mig_advantages, trajectory)
    assert composed.mig_rewards[:3].tolist() == [0.5, 0.0, 2.0] and math.isnan(composed.mig_rewards[3].item())
    mig = mig_advantages(GAINS, NUM_STEPS, SCORABLE, 2, credit, "none")
    assert torch.equal(composed.mig_advantages, mig)
    assert composed.mig_advantages.dim() == (1 if credit == "trajectory" else 2)
    assert composed.mig_scale.tolist() == [1.0] * 4, "failure scaling is off by default"
    expected = per_token_advantages(outcome, mig, STEP_IDS, 0.7, 1.3, scope)
    assert composed.advantages.shape == (4, 4) and torch.equal(composed.advantages, expected)
    if scope == "cot":  # the answer part gets the outcome advantage only
        assert composed.advantages[:, -1].tolist() == pytest.approx((1.3 * outcome).tolist())


def test_compose_credit_rows_and_sequence_level_advantages():
    options = dict(mig_weight=0.7, outcome_weight=1.3, mig_token_scope="all")
    composed = compose_credit(OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, None, 2, token_level=False, **options)
    assert composed.advantages.shape == (4,)
    expected = 1.3 * composed.outcome_advantages + 0.7 * composed.trajectory_mig_advantages
    assert torch.allclose(composed.advantages, expected)
    # what every token gets with token-level advantages and mig_token_scope="all"
    per_token = compose_credit(OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, STEP_IDS, 2, **options)
    assert torch.allclose(per_token.advantages, expected.unsqueeze(1).expand(-1, 4))
    mine = per_token.rows(slice(2, 4))  # e.g. the second process's completions
    assert torch.equal(mine.advantages, per_token.advantages[2:]) and mine.outcome_advantages.shape == (2,)
    with pytest.raises(ValueError, match="token_level=False"):
        compose_credit(OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, None, 2, token_level=False, mig_credit="step",
                       mig_token_scope="all")
    with pytest.raises(ValueError, match="mig_token_scope='all'"):
        compose_credit(OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, None, 2, token_level=False)
    with pytest.raises(ValueError, match="needs step_ids of shape"):
        compose_credit(OUTCOME_REWARDS, GAINS, NUM_STEPS, SCORABLE, None, 2)
    with pytest.raises(ValueError, match="one row per completion"):
        compose_credit(OUTCOME_REWARDS[:2], GAINS, NUM_STEPS, SCORABLE, STEP_IDS, 2)


# ---------------------------------------------------------------------------------------------------- gated SFT
def test_gated_sft_loss_uses_only_gated_completions():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    loss = gated_sft_loss(logps, mask, torch.tensor([1.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx((1 + 2 + 7) / 3)
    loss.backward()
    assert logps.grad[1].abs().sum() == 0 and logps.grad[0, 2] == 0
    assert logps.grad[0, 0].item() == pytest.approx(-1 / 3)


def test_gated_sft_loss_with_no_gated_completion_is_zero_and_differentiable():
    logps = torch.randn(2, 4, requires_grad=True)
    loss = gated_sft_loss(logps, torch.ones(2, 4), torch.zeros(2))
    assert loss.item() == 0.0
    loss.backward()
    assert logps.grad is not None and logps.grad.abs().sum() == 0
