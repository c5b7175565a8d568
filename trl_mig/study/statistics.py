"""The statistics of a study's primary metric, pure (numpy, no model, no files).

A study declares its primary metric before it runs (`primary` in the study YAML, checked by `check_primary`):

    {metric: auc, split: test, steps: [5, 30]}       mean pass@1 over the evaluations at steps 5..30 (inclusive)
    {metric: final, split: test}                      pass@1 at the last evaluation
    {metric: steps_to, split: test, threshold: 0.6}   the first evaluated step with pass@1 >= 0.6; a run that never
                                                      gets there counts as its last step + the evaluation interval
                                                      (censored), so lower is better

Every arm is compared with the reference arm per seed (`paired_differences`); the mean difference gets a 95 % t-interval
over seeds (`t_interval`) and a bootstrap interval over seeds x problems (`bootstrap_interval`: seeds resampled, then
the problems within each drawn seed, the same problems for both arms of the pair).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from ..evaluation import UNSCORED

METRICS = ("auc", "final", "steps_to")
PRIMARY_KEYS = {"metric", "split", "steps", "threshold"}
CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# pass@1 values recomputed from resampled problems are sums of floats: a value equal to the threshold must count
THRESHOLD_TOLERANCE = 1e-9


# ------------------------------------------------------------------------------------------------- declaration
def check_primary(primary, *, splits: list[str], eval_steps: int, max_steps: list[int | None]) -> None:
    """
    Check a `primary` declaration against the study it belongs to.

    Args:
        primary: the mapping of the study YAML's `primary` key.
        splits: the study's reported splits (the primary is measured on one of them).
        eval_steps: the study's evaluation interval (runs are evaluated at step 0, every `eval_steps` and at the end).
        max_steps: every run's `max_steps` (None or -1 where the recipe does not set one).

    Raises:
        ValueError: naming the field (`primary.metric`, `primary.split`, `primary.steps`, `primary.threshold`).
    """
    if not isinstance(primary, dict):
        raise ValueError(f"`primary` must be a mapping such as {{metric: final, split: test}}, got {primary!r}.")
    unknown = sorted(set(primary) - PRIMARY_KEYS)
    if unknown:
        raise ValueError(f"`primary` has unknown key(s) {unknown}; its keys are {sorted(PRIMARY_KEYS)}.")
    metric = primary.get("metric")
    if metric not in METRICS:
        raise ValueError(f"`primary.metric` must be one of {list(METRICS)}, got {metric!r}.")
    if primary.get("split") not in splits:
        raise ValueError(f"`primary.split` must be one of the reported splits {splits}, got {primary.get('split')!r}.")
    steps, threshold = primary.get("steps"), primary.get("threshold")
    if metric == "auc":
        known = [m for m in max_steps if m is not None and m > 0]
        if (
            not isinstance(steps, list) or len(steps) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            or not 0 <= steps[0] <= steps[1]
        ):
            raise ValueError(f"`primary.steps` (metric auc) must be [first, last] evaluated steps, got {steps!r}.")
        for step in steps:
            if known and step > min(known):
                raise ValueError(f"`primary.steps`: step {step} is after the runs' last step (max_steps {min(known)}).")
            if step % eval_steps != 0 and not (known and all(step == m for m in known)):
                raise ValueError(
                    f"`primary.steps`: step {step} is not an evaluated step (0, every {eval_steps} steps, max_steps)."
                )
    elif steps is not None:
        raise ValueError(f"`primary.steps` applies to metric auc only, not to {metric!r}.")
    if metric == "steps_to":
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"`primary.threshold` (metric steps_to) must be a pass@1 in (0, 1], got {threshold!r}.")
    elif threshold is not None:
        raise ValueError(f"`primary.threshold` applies to metric steps_to only, not to {metric!r}.")


def describe_primary(primary: dict, eval_steps: int) -> str:
    """The primary metric in words, e.g. 'mean test pass@1 over the evaluations at steps 5-30'."""
    split = primary["split"]
    if primary["metric"] == "auc":
        first, last = primary["steps"]
        return f"mean {split} pass@1 over the evaluations at steps {first}-{last}"
    if primary["metric"] == "final":
        return f"{split} pass@1 at the last evaluation"
    return (
        f"steps to reach {100 * primary['threshold']:g} % {split} pass@1 (first evaluated step; a run that never "
        f"reaches it counts as its last step + {eval_steps}, censored; lower is better)"
    )


# ------------------------------------------------------------------------------------------------------ values
def primary_values(steps, values, primary: dict, eval_steps: int | None = None) -> np.ndarray:
    """
    The primary metric of a batch of learning curves measured at the same steps.

    Args:
        steps: `(E,)` the evaluated steps, increasing.
        values: `(..., E)` pass@1 at those steps.
        primary: the declaration (see `check_primary`).
        eval_steps: the evaluation interval; needed by `steps_to` (the censored value is the last step + it).

    Returns:
        `(...)` the metric of every curve.

    Raises:
        ValueError: when `auc`'s step range holds no evaluated step, or `steps_to` has no `eval_steps`.
    """
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    metric = primary["metric"]
    if metric == "final":
        return values[..., -1]
    if metric == "auc":
        first, last = primary["steps"]
        inside = (steps >= first) & (steps <= last)
        if not inside.any():
            raise ValueError(f"primary.steps {primary['steps']} holds none of the evaluated steps {steps.tolist()}.")
        return values[..., inside].mean(-1)
    if metric == "steps_to":
        if eval_steps is None:
            raise ValueError("primary metric steps_to needs eval_steps (the censored value is the last step + it).")
        reached = values >= primary["threshold"] - THRESHOLD_TOLERANCE
        first = steps[reached.argmax(-1)]
        return np.where(reached.any(-1), first, steps[-1] + eval_steps)
    raise ValueError(f"primary.metric must be one of {list(METRICS)}, got {metric!r}.")


def primary_value(curve, primary: dict, eval_steps: int | None = None) -> float | None:
    """The primary metric of one learning curve `[[step, pass@1], ...]` (None for an empty curve)."""
    if not curve:
        return None
    steps, values = zip(*curve)
    return float(primary_values(steps, values, primary, eval_steps))


# ------------------------------------------------------------------------------------------------- comparisons
def paired_differences(values: dict, reference: dict) -> dict:
    """`values[seed] - reference[seed]` for every seed both have a value for, in seed order."""
    return {
        seed: values[seed] - reference[seed]
        for seed in sorted(set(values) & set(reference))
        if values[seed] is not None and reference[seed] is not None
    }


def t_quantile(confidence: float, df: int) -> float:
    """
    The two-sided Student t quantile: the t with P(|T| <= t) = `confidence` for `df` degrees of freedom (e.g. 4.303
    for 0.95 and df 2), by bisection on the exact CDF of an integer `df` (Abramowitz & Stegun 26.7.3-4).
    """
    if not isinstance(df, int) or df < 1 or not 0 < confidence < 1:
        raise ValueError(f"t_quantile needs an integer df >= 1 and a confidence in (0, 1), got {df!r}, {confidence!r}.")
    low, high = 0.0, 1.0
    while _t_central_probability(high, df) < confidence:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if _t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer `df` (a finite series in cos(theta), theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = 1.0, 0.0  # cos(theta) * (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...), df - 2 powers in all
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        series = math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + math.sin(theta) * series)
    term, total = 1.0, 0.0  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ..., up to cos^(df-2)
    for k in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_interval(values, confidence: float = CONFIDENCE) -> tuple:
    """
    `(mean, low, high)`: the mean of `values` (None dropped) and its t-interval, mean ± t(df = n - 1) * sd / sqrt(n);
    `(mean, None, None)` for a single value, `(None, None, None)` for none.
    """
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap_interval(
    pairs, primary: dict, *, eval_steps: int | None = None, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """
    Percentile bootstrap interval of the mean paired difference (arm - reference) of the primary metric, over seeds x
    problems: each resample draws the seeds with replacement, then, within every drawn seed, the problems with
    replacement (the same problems for the arm and the reference), and recomputes both curves' primary metric.

    Args:
        pairs: one per seed, `((arm_steps, arm_correct), (ref_steps, ref_correct))`: each run's evaluated steps `(E,)`
            and its correctness `(E, P)` (0/1, the same P problems in the same order for the two runs of a seed).
            Without per-problem data, pass each run's pass@1 curve as `(E, 1)`: problems are then not resampled, and
            the interval is over seeds only.
        primary: the declaration (see `check_primary`).
        eval_steps: the evaluation interval (for `steps_to`).
        resamples: bootstrap resamples.
        seed: the seed of the resampling (fixed: the same data give the same interval).
        confidence: the interval's coverage.

    Returns:
        `(low, high)`.

    Raises:
        ValueError: without pairs, or when the two runs of a seed have different numbers of problems.
    """
    if not pairs:
        raise ValueError("bootstrap_interval needs at least one seed.")
    rng = np.random.default_rng(seed)
    num_seeds = len(pairs)
    drawn = rng.integers(0, num_seeds, size=(resamples, num_seeds))  # (B, S): the seeds of each resample
    total = np.zeros(resamples)
    for index, ((arm_steps, arm), (ref_steps, ref)) in enumerate(pairs):
        arm, ref = np.asarray(arm, dtype=float), np.asarray(ref, dtype=float)
        if arm.shape[1] != ref.shape[1]:
            raise ValueError(f"seed {index}: the arm has {arm.shape[1]} problems and the reference {ref.shape[1]}.")
        rows, _ = np.nonzero(drawn == index)  # one entry per draw of this seed
        problems = arm.shape[1]
        weights = rng.multinomial(problems, np.full(problems, 1 / problems), size=len(rows)) / problems  # (D, P)
        arm_values = primary_values(arm_steps, weights @ arm.T, primary, eval_steps)  # (D,)
        ref_values = primary_values(ref_steps, weights @ ref.T, primary, eval_steps)
        np.add.at(total, rows, arm_values - ref_values)
    tail = (1 - confidence) / 2
    low, high = np.quantile(total / num_seeds, [tail, 1 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------- the study
def correctness_matrix(points) -> tuple[list[int], np.ndarray] | None:
    """
    `[[step, '0110.'], ...]` (one run's per-problem correctness on a split, `trl_mig.evaluation.encode_correctness`)
    -> `(steps, (E, P) 0/1 matrix)`, the problems without a ground truth (the same at every step) left out; None
    when there are no points or the evaluations do not cover the same problems.
    """
    if not points:
        return None
    texts = [text for _, text in points]
    if len({len(text) for text in texts}) != 1:
        return None
    scored = [i for i, char in enumerate(texts[0]) if char != UNSCORED]
    rows = [[int(text[i]) for i in scored] for text in texts]
    return [int(step) for step, _ in points], np.asarray(rows, dtype=float).reshape(len(points), len(scored))


def compare_arms(
    primary: dict, cells: dict, reference_arm: str | None, *, eval_steps: int, resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE,
) -> dict:
    """
    The primary metric of every arm (at its selected setting) and, with a reference arm, every other arm's paired
    difference with it.

    Args:
        primary: the declaration (see `check_primary`).
        cells: arm -> the records of its runs at the selected setting (`trl_mig.study.read_run`: `seed`, `curves`
            and, when the runs recorded them, `problems`: split -> `[[step, '0110.'], ...]`).
        reference_arm: the arm the others are compared with (None: values only).
        eval_steps, resamples, seed, confidence: see `primary_values` and `bootstrap_interval`.

    Returns:
        `{"primary", "description", "lower_is_better", "confidence", "resamples", "bootstrap_seed", "arms",
        "differences"}`: `arms[arm]` has `seeds`, `values`, `censored` (steps_to: runs that never reached the
        threshold), `mean`, `t_low`, `t_high`; `differences[arm]` (arm - reference) has `seeds`, `values`, `mean`,
        `t_low`, `t_high`, `bootstrap_low`, `bootstrap_high` and `bootstrap_over` ('seeds x problems', or 'seeds'
        when a run has no per-problem data).
    """
    split = primary["split"]
    arms, runs_of = {}, {}
    for arm, records in cells.items():
        runs_of[arm] = {r["seed"]: r for r in records}
        values = {r["seed"]: primary_value(r["curves"].get(split, []), primary, eval_steps) for r in records}
        seeds = sorted(values)
        censored = [
            primary["metric"] == "steps_to" and values[s] is not None
            and values[s] > runs_of[arm][s]["curves"][split][-1][0]
            for s in seeds
        ]
        mean, low, high = t_interval([values[s] for s in seeds], confidence)
        arms[arm] = {"seeds": seeds, "values": [values[s] for s in seeds], "censored": censored,
                     "mean": mean, "t_low": low, "t_high": high}
    differences = {}
    if reference_arm is not None:
        reference = dict(zip(arms[reference_arm]["seeds"], arms[reference_arm]["values"]))
        for arm in cells:
            if arm == reference_arm:
                continue
            diffs = paired_differences(dict(zip(arms[arm]["seeds"], arms[arm]["values"])), reference)
            mean, low, high = t_interval(list(diffs.values()), confidence)
            pairs, over = _bootstrap_pairs([runs_of[arm][s] for s in diffs], [runs_of[reference_arm][s] for s in diffs],
                                           split)
            boot = (
                bootstrap_interval(pairs, primary, eval_steps=eval_steps, resamples=resamples, seed=seed,
                                   confidence=confidence)
                if pairs else (None, None)
            )
            differences[arm] = {"seeds": list(diffs), "values": list(diffs.values()), "mean": mean, "t_low": low,
                                "t_high": high, "bootstrap_low": boot[0], "bootstrap_high": boot[1],
                                "bootstrap_over": over}
    return {
        "primary": dict(primary),
        "description": describe_primary(primary, eval_steps),
        "lower_is_better": primary["metric"] == "steps_to",
        "confidence": confidence,
        "resamples": resamples,
        "bootstrap_seed": seed,
        "reference_arm": reference_arm,
        "arms": arms,
        "differences": differences,
    }


def _bootstrap_pairs(arm_runs: list[dict], ref_runs: list[dict], split: str) -> tuple[list, str]:
    """The `bootstrap_interval` pairs of paired runs: per-problem when every run has it for the same problems."""
    matrices = [
        (correctness_matrix(a.get("problems", {}).get(split)), correctness_matrix(r.get("problems", {}).get(split)))
        for a, r in zip(arm_runs, ref_runs)
    ]
    if matrices and all(a is not None and r is not None and a[1].shape[1] == r[1].shape[1] for a, r in matrices):
        return matrices, "seeds x problems"

    def as_column(run):  # the pass@1 curve as one "problem": only seeds are resampled
        steps, values = zip(*run["curves"][split])
        return list(steps), np.asarray(values, dtype=float)[:, None]

    return [(as_column(a), as_column(r)) for a, r in zip(arm_runs, ref_runs)], "seeds"
