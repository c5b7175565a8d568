"""Held-out metrics of scored completions (`trl_mig.evaluation.summarize`)."""

from __future__ import annotations

import math

import pytest

from trl_mig.evaluation import summarize


def test_pass_at_k_counts_the_rows_that_one_sample_solves():
    # 4 rows x 2 samples (a row's samples adjacent): solved by its 1st sample, by none, no ground truth, by its 2nd
    correct = [1.0, 0.0, 0.0, 0.0, None, None, 0.0, 1.0]
    out = summarize(correct, [1.0] * 8, num_samples=2)
    assert out["num_examples"] == 4 and out["num_scorable"] == 6
    assert out["pass@1"] == pytest.approx(2 / 6) and out["pass@2"] == pytest.approx(2 / 3)
    assert "pass@2" not in summarize([1.0, 0.0], [1.0, 1.0])  # one sample per row: pass@1 only
    assert math.isnan(summarize([None, None], [0.0, 0.0], num_samples=2)["pass@2"])
