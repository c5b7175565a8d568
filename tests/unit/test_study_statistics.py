"""trl_mig.study.statistics: the primary metric of a learning curve, paired differences, t and bootstrap intervals,
checked on hand-made data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trl_mig.study.statistics import (
    bootstrap_interval,
    check_primary,
    compare_arms,
    correctness_matrix,
    paired_differences,
    primary_value,
    t_interval,
    t_quantile,
)

CURVE = [[0, 0.1], [5, 0.3], [10, 0.6], [15, 0.5], [20, 0.8]]


@pytest.mark.parametrize(
    "confidence, df, expected",
    # two-sided Student t quantiles as printed in tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
    [(0.95, 1, 12.706), (0.95, 2, 4.303), (0.95, 3, 3.182), (0.95, 4, 2.776), (0.95, 10, 2.228), (0.95, 29, 2.045),
     (0.95, 30, 2.042), (0.95, 100, 1.984), (0.90, 5, 2.015), (0.99, 3, 5.841)],
)
def test_t_quantiles_match_the_tables(confidence, df, expected):
    assert t_quantile(confidence, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(0.95, 100_000) == pytest.approx(1.959964, abs=1e-4)
    with pytest.raises(ValueError, match="integer df >= 1"):
        t_quantile(0.95, 0)


def test_t_interval_of_known_values():
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3
    half = 4.302652729749464 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-12)
    assert t_interval([0.5, None, 0.7])[0] == pytest.approx(0.6)  # None dropped
    assert t_interval([5.0]) == (5.0, None, None)  # one value: no spread
    assert t_interval([]) == (None, None, None)


def test_paired_differences_pair_by_seed():
    differences = paired_differences({2: 0.9, 0: 0.5, 1: 0.7}, {0: 0.4, 1: 0.7, 3: 0.1})
    assert list(differences) == [0, 1]  # seed 2 has no reference, seed 3 no arm value
    assert differences == pytest.approx({0: 0.1, 1: 0.0})


def test_primary_value_of_each_metric():
    assert primary_value(CURVE, {"metric": "final", "split": "test"}) == 0.8
    assert primary_value(CURVE, {"metric": "auc", "split": "test", "steps": [5, 15]}) == pytest.approx(1.4 / 3)
    assert primary_value(CURVE, {"metric": "auc", "split": "test", "steps": [0, 20]}) == pytest.approx(2.3 / 5)
    steps_to = {"metric": "steps_to", "split": "test"}
    assert primary_value(CURVE, {**steps_to, "threshold": 0.6}, eval_steps=5) == 10  # reached exactly at step 10
    assert primary_value(CURVE, {**steps_to, "threshold": 0.55}, eval_steps=5) == 10
    assert primary_value(CURVE, {**steps_to, "threshold": 0.9}, eval_steps=5) == 25  # censored: last step + interval
    assert primary_value([], {"metric": "final", "split": "test"}) is None
    with pytest.raises(ValueError, match="holds none of the evaluated steps"):
        primary_value(CURVE, {"metric": "auc", "split": "test", "steps": [21, 30]})
    with pytest.raises(ValueError, match="needs eval_steps"):
        primary_value(CURVE, {**steps_to, "threshold": 0.6})


def _column(values):  # a pass@1 curve at steps 0..len-1 as one "problem": bootstrap over seeds only
    return list(range(len(values))), np.asarray(values, dtype=float)[:, None]


FINAL = {"metric": "final", "split": "test"}


def test_bootstrap_over_seeds_only_has_the_known_distribution():
    # one seed's difference is 0, the other's 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    pairs = [(_column([0.3, 0.5]), _column([0.3, 0.5])), (_column([0.3, 0.9]), _column([0.3, -0.1]))]
    assert bootstrap_interval(pairs, FINAL) == (0.0, 1.0)
    # every seed differs by the same amount: the interval is that amount
    same = [(_column([0.2, 0.6]), _column([0.2, 0.5])) for _ in range(3)]
    assert bootstrap_interval(same, FINAL) == pytest.approx((0.1, 0.1))


def test_bootstrap_resamples_the_same_problems_for_both_arms():
    steps = [0, 1]
    # both arms solve the same problems: each resample changes both curves alike, the difference stays 0
    correct = np.array([[1, 0, 0, 1], [1, 1, 0, 1]])
    assert bootstrap_interval([((steps, correct), (steps, correct))], FINAL) == (0.0, 0.0)
    # 400 problems, the arm solves 40 more than the reference (and all the reference's): the difference of a resample
    # is the fraction of those 40 drawn, ~ Binomial(400, 0.1) / 400, i.e. 0.1 ± 1.96 * 0.015
    arm = np.zeros((1, 400))
    arm[0, :240] = 1
    ref = np.zeros((1, 400))
    ref[0, :200] = 1
    low, high = bootstrap_interval([(([5], arm), ([5], ref))], FINAL)
    half = 1.959964 * math.sqrt(0.1 * 0.9 / 400)
    assert low == pytest.approx(0.1 - half, abs=0.006) and high == pytest.approx(0.1 + half, abs=0.006)
    assert bootstrap_interval([(([5], arm), ([5], ref))], FINAL) == (low, high)  # a fixed RNG seed
    with pytest.raises(ValueError, match="3 problems and the reference 4"):
        bootstrap_interval([((steps, correct[:, :3]), (steps, correct))], FINAL)


def test_bootstrap_of_steps_to_recomputes_the_threshold_on_resampled_problems():
    steps = [0, 1, 2]
    # two problems; the arm solves problem 0 from step 1 and problem 1 from step 2, the reference never solves either
    arm = np.array([[0, 0], [1, 0], [1, 1]])
    ref = np.zeros((3, 2))
    primary = {"metric": "steps_to", "split": "test", "threshold": 1.0}
    # resampled problems {0, 0}: the arm reaches 100 % at step 1, {0, 1}: step 2, {1, 1}: step 2; the reference is
    # censored at 2 + 1 = 3: the difference is -2 (probability 1/4) or -1 (3/4)
    assert bootstrap_interval([((steps, arm), (steps, ref))], primary, eval_steps=1) == (-2.0, -1.0)


def test_correctness_matrix_leaves_out_problems_without_ground_truth():
    steps, matrix = correctness_matrix([[0, "10.1"], [5, "11.0"]])
    assert steps == [0, 5] and matrix.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert correctness_matrix([[0, "101"], [5, "11"]]) is None  # not the same problems
    assert correctness_matrix([]) is None


def _record(seed, curve, problems=None):
    return {"seed": seed, "curves": {"test": curve}, **({"problems": {"test": problems}} if problems else {})}


def test_compare_arms_pairs_every_arm_with_the_reference_by_seed():
    # mig's auc over steps 1-2 beats grpo's by 0.1, 0.2, 0.3 on seeds 0, 1, 2 (10 problems each)
    def problems(counts):
        return [[step, "1" * count + "0" * (10 - count)] for step, count in enumerate(counts)]

    grpo = [_record(s, [[0, 0.1], [1, 0.3], [2, 0.4]], problems([1, 3, 4])) for s in range(3)]
    mig = [
        _record(s, [[0, 0.1], [1, 0.3 + (s + 1) / 10], [2, 0.4 + (s + 1) / 10]], problems([1, 4 + s, 5 + s]))
        for s in range(3)
    ]
    primary = {"metric": "auc", "split": "test", "steps": [1, 2]}
    result = compare_arms(primary, {"grpo": grpo, "mig": mig}, "grpo", eval_steps=1, resamples=2000)
    assert result["arms"]["grpo"]["values"] == pytest.approx([0.35] * 3)
    difference = result["differences"]["mig"]
    assert difference["seeds"] == [0, 1, 2] and difference["values"] == pytest.approx([0.1, 0.2, 0.3])
    half = 4.302652729749464 * 0.1 / math.sqrt(3)
    assert (difference["mean"], difference["t_low"], difference["t_high"]) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert difference["bootstrap_over"] == "seeds x problems"
    # the bootstrap over problems is wider than the spread of the three seed differences alone
    assert difference["bootstrap_low"] < 0.1 and difference["bootstrap_high"] > 0.3
    assert "grpo" not in result["differences"] and not result["lower_is_better"]

    # without per-problem results the bootstrap is over seeds: the means of 3 draws from {0.1, 0.2, 0.3}
    bare = compare_arms(primary, {"grpo": [_record(r["seed"], r["curves"]["test"]) for r in grpo], "mig": mig},
                        "grpo", eval_steps=1, resamples=2000)["differences"]["mig"]
    assert bare["bootstrap_over"] == "seeds"
    assert 0.1 - 1e-9 <= bare["bootstrap_low"] < 0.2 < bare["bootstrap_high"] <= 0.3 + 1e-9


def test_compare_arms_marks_censored_runs():
    primary = {"metric": "steps_to", "split": "test", "threshold": 0.5}
    cells = {"grpo": [_record(0, [[0, 0.1], [5, 0.2], [10, 0.3]])], "mig": [_record(0, [[0, 0.1], [5, 0.5], [10, 0.6]])]}
    result = compare_arms(primary, cells, "grpo", eval_steps=5)
    assert result["arms"]["grpo"]["values"] == [15.0] and result["arms"]["grpo"]["censored"] == [True]
    assert result["arms"]["mig"]["values"] == [5.0] and result["arms"]["mig"]["censored"] == [False]
    assert result["differences"]["mig"]["values"] == [-10.0] and result["lower_is_better"]
    assert result["differences"]["mig"]["t_low"] is None  # one seed: no t-interval


@pytest.mark.parametrize(
    "primary, message",
    [
        ([1], "`primary` must be a mapping"),
        ({"metric": "final", "split": "test", "window": 3}, "unknown key(s) ['window']"),
        ({"metric": "area", "split": "test"}, "`primary.metric` must be one of ['auc', 'final', 'steps_to']"),
        ({"metric": "final", "split": "validation"}, "`primary.split` must be one of the reported splits ['test']"),
        ({"metric": "auc", "split": "test"}, "`primary.steps` (metric auc) must be [first, last]"),
        ({"metric": "auc", "split": "test", "steps": [30, 5]}, "`primary.steps` (metric auc) must be [first, last]"),
        ({"metric": "auc", "split": "test", "steps": [5, 45]}, "`primary.steps`: step 45 is after the runs' last step"),
        ({"metric": "auc", "split": "test", "steps": [3, 30]}, "`primary.steps`: step 3 is not an evaluated step"),
        ({"metric": "final", "split": "test", "steps": [5, 30]}, "`primary.steps` applies to metric auc only"),
        ({"metric": "steps_to", "split": "test"}, "`primary.threshold` (metric steps_to) must be a pass@1 in (0, 1]"),
        ({"metric": "steps_to", "split": "test", "threshold": 0}, "`primary.threshold`"),
        ({"metric": "steps_to", "split": "test", "threshold": 1.5}, "`primary.threshold`"),
        ({"metric": "final", "split": "test", "threshold": 0.5}, "`primary.threshold` applies to metric steps_to"),
    ],
)
def test_check_primary_names_the_field(primary, message):
    with pytest.raises(ValueError) as error:
        check_primary(primary, splits=["test"], eval_steps=5, max_steps=[40, 40])
    assert message in str(error.value)


def test_check_primary_accepts_the_declarations_of_the_docs():
    for primary in ({"metric": "auc", "split": "test", "steps": [5, 30]}, {"metric": "final", "split": "test"},
                    {"metric": "steps_to", "split": "test", "threshold": 0.6},
                    {"metric": "auc", "split": "test", "steps": [0, 42]}):  # max_steps is evaluated, off the interval
        check_primary(primary, splits=["test"], eval_steps=5, max_steps=[42])
    check_primary({"metric": "auc", "split": "test", "steps": [5, 500]}, splits=["test"], eval_steps=5, max_steps=[None])
