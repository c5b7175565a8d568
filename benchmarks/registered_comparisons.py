"""The pre-registered comparisons of a finished study, against every comparator the registration names.

`trl-mig study` compares every arm with one `reference_arm`. A registration may name several comparators (e.g.
docs/benchmark.md, section 12: each MIG variant against `grpo` and against `grpo_partial_credit`) and a corrected
confidence level for them (Bonferroni: 1 - 0.05 / number of comparisons). This reads the study's study.json, keeps
every arm at the setting its validation score selected, and writes for each (arm, comparator) pair the study's own
primary metric, paired by seed: per-seed differences, mean, t-interval and bootstrap interval over seeds x problems
(`trl_mig.study.statistics.compare_arms`, the computation study.md uses), at each confidence level asked for; the
verdict the registration defines (beats: both intervals above 0; loses: both below; else a tie); and each arm's
wall-clock seconds per run against the comparator's, paired by seed; and the primary AUC with compute matched, read
two ways: at each seed's own comparator run's training seconds (`compute_matched`), and at the arm's cost measured over
all seeds (`compute_matched_at_pooled_cost`). Writes OUTPUT.json and OUTPUT.md and ends with one JSON line. A
pilot that declared no primary can be read on a metric given with `--exploratory-primary`, labelled exploratory.

    python benchmarks/registered_comparisons.py docs/study/cpu_arms/study.json \
        --arms mig_rtg mig_failure_scaled --against grpo grpo_partial_credit --confidence 0.95 0.9875 \
        --output docs/study/cpu_arms/registered_comparisons
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trl_mig.study.statistics import check_primary, compare_arms, describe_primary, t_interval


def selected_cells(study: dict) -> dict:
    """arm -> its runs (study.json records) at the setting the study selected for it."""
    chosen = {arm: entry["setting"] for arm, entry in study["selection"].items()}
    cells: dict[str, list] = {}
    for run in study["runs"]:
        if run["setting"] == chosen.get(run["arm"]):
            cells.setdefault(run["arm"], []).append(run)
    return cells


def pooled(studies: list[dict]) -> dict:
    """
    One study made of several finished ones with the same primary metric and evaluation interval and no seed in
    common between them (e.g. a replication on fresh seeds and the study it replicates): every arm's runs at the
    setting each study selected for it, the settings named in its selection.
    """
    first = studies[0]["config"]
    cells, settings = {}, {}
    for study in studies:
        config = study["config"]
        if (config.get("primary"), config["eval_steps"]) != (first.get("primary"), first["eval_steps"]):
            raise SystemExit("Pooled studies must declare the same `primary` and `eval_steps`.")
        for arm, cell in selected_cells(study).items():
            cells.setdefault(arm, []).extend(cell)
            settings.setdefault(arm, []).append(json.dumps(study["selection"][arm]["setting"], sort_keys=True))
    repeated = {arm: seeds for arm, seeds in ((a, [r["seed"] for r in c]) for a, c in cells.items())
                if len(set(seeds)) != len(seeds)}
    if repeated:
        raise SystemExit(f"Pooled studies share seeds: {repeated}.")
    label = {arm: " + ".join(settings[arm]) for arm in cells}  # the pooled arm's setting: each study's, named
    return {"config": first, "runs": [{**run, "setting": label[arm]} for arm, cell in cells.items() for run in cell],
            "selection": {arm: {"setting": label[arm]} for arm in cells}}


def schedule(config: dict) -> str:
    """How the study ran its runs, which the wall-clock times depend on."""
    jobs, threads = config.get("jobs", 1), config.get("threads_per_job")
    return f"{jobs} run(s) at a time" + (f", {threads} thread(s) each" if threads else "")


def verdict(entry: dict, lower_is_better: bool) -> str:
    bounds = [entry["t_low"], entry["t_high"], entry["bootstrap_low"], entry["bootstrap_high"]]
    if any(b is None for b in bounds):
        return "no interval"
    above, below = min(bounds[0], bounds[2]) > 0, max(bounds[1], bounds[3]) < 0
    if lower_is_better:  # steps_to: fewer steps is better
        above, below = below, above
    return "beats" if above else "loses" if below else "tie"


def compare(study: dict, arms: list[str], against: list[str], levels: list[float], resamples: int,
            given_cost: tuple[float, float] | None = None, exploratory_primary: dict | None = None) -> dict:
    """`exploratory_primary`: a metric for a study that declared none (a pilot), read as an exploratory one."""
    config, cells = study["config"], selected_cells(study)
    primary = config.get("primary") or study.get("primary", {}).get("primary")
    if primary and exploratory_primary:
        raise SystemExit("The study declares a primary metric; --exploratory-primary is for studies that declare none.")
    if exploratory_primary:
        splits = sorted({split for cell in cells.values() for run in cell for split in run["curves"]})
        try:
            check_primary(exploratory_primary, splits=splits, eval_steps=config["eval_steps"],
                          max_steps=[run["curves"][splits[0]][-1][0] for cell in cells.values() for run in cell])
        except ValueError as err:
            raise SystemExit(f"--exploratory-primary: {err}") from None
        primary = exploratory_primary
    if not primary:
        raise SystemExit("The study declares no primary metric: nothing was registered to compare (a pilot's "
                         "metric can be given with --exploratory-primary).")
    missing = [arm for arm in [*arms, *against] if arm not in cells]
    if missing:
        raise SystemExit(f"Arm(s) {missing} are not in the study; it has {sorted(cells)}.")
    scale = 1.0 if primary["metric"] == "steps_to" else 100.0  # pass@1 in points, as study.md shows it
    rows, arm_means = [], {}
    for comparator in against:
        for level in levels:
            result = compare_arms(primary, {a: cells[a] for a in dict.fromkeys([comparator, *arms])}, comparator,
                                  eval_steps=config["eval_steps"], resamples=resamples, confidence=level)
            for arm, values in result["arms"].items():
                arm_means.setdefault(arm, None if values["mean"] is None else round(scale * values["mean"], 4))
            for arm in arms:
                if arm == comparator:
                    continue
                entry = result["differences"][arm]
                rows.append({
                    "arm": arm, "comparator": comparator, "confidence": level,
                    "per_seed": {str(s): scale * v for s, v in zip(entry["seeds"], entry["values"])},
                    **{k: None if entry[k] is None else scale * entry[k]
                       for k in ("mean", "t_low", "t_high", "bootstrap_low", "bootstrap_high")},
                    "bootstrap_over": entry["bootstrap_over"],
                    "verdict": verdict(entry, result["lower_is_better"]),
                })
    seconds = {}
    for arm in dict.fromkeys([*arms, *against]):
        per_seed = {run["seed"]: run["seconds"] for run in cells[arm]}
        seconds[arm] = {"per_seed": per_seed, "mean": round(sum(per_seed.values()) / len(per_seed), 1)}
    cost = []
    for comparator in against:
        for arm in arms:
            if arm == comparator:
                continue
            ratios = {s: seconds[arm]["per_seed"][s] / seconds[comparator]["per_seed"][s]
                      for s in sorted(seconds[arm]["per_seed"]) if s in seconds[comparator]["per_seed"]}
            mean, low, high = t_interval(list(ratios.values()))
            cost.append({"arm": arm, "comparator": comparator, "time_ratio_per_seed": {str(s): round(r, 3) for s, r in
                         ratios.items()}, "mean": round(mean, 3), "t95": [round(low, 3), round(high, 3)]})
    auc = primary["metric"] == "auc"
    matched = compute_matched(cells, arms, against, primary) if auc else []
    at_pooled_cost = compute_matched_at_pooled_cost(cells, arms, against, primary, given_cost, levels) if auc else []
    return {"primary": primary, "description": describe_primary(primary, config["eval_steps"]),
            "exploratory": exploratory_primary is not None,
            "selection": {arm: study["selection"][arm]["setting"] for arm in dict.fromkeys([*arms, *against])},
            "comparisons": rows, "arm_means": arm_means, "seconds": seconds, "time_ratios": cost,
            "compute_matched": matched,
            "compute_matched_at_pooled_cost": at_pooled_cost,
            "per_evaluation": per_evaluation_differences(cells, arms, against, primary["split"]),
            "schedule": schedule(config)}


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of `points` ((x, y), x increasing) at `x`; the last y beyond the last x."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def _paired_runs(cells: dict, arms: list[str], against: list[str]):
    """(arm, comparator, [(arm's run, comparator's run) per seed both have]) for every pair, no arm against itself."""
    for comparator in against:
        for arm in arms:
            if arm != comparator:
                runs = {r["seed"]: r for r in cells[arm]}
                yield arm, comparator, [(runs[ref["seed"]], ref) for ref in cells[comparator] if ref["seed"] in runs]


def _matched_differences(pairs: list, primary: dict, read_arm) -> dict:
    """
    Per seed, 100 x (the arm's mean where `read_arm(run, ref, step)` reads its curve, at each of the comparator's
    evaluation steps in the primary's window, - the comparator's mean there), with the mean and a 95 % t-interval.
    """
    split, (first, last) = primary["split"], primary["steps"]
    diffs = {}
    for run, ref in pairs:
        ref_curve = [(int(step), value) for step, value in ref["curves"][split] if first <= step <= last]
        at = [read_arm(run, ref, step) for step, _ in ref_curve]
        diffs[ref["seed"]] = 100 * (sum(at) / len(at) - sum(v for _, v in ref_curve) / len(ref_curve))
    mean, low, high = t_interval(list(diffs.values()))
    return {"per_seed": {str(k): round(v, 4) for k, v in sorted(diffs.items())},
            "mean": round(mean, 4), "t95": [round(low, 4), round(high, 4)]}


def compute_matched(cells: dict, arms: list[str], against: list[str], primary: dict) -> list[dict]:
    """
    The primary AUC at equal training wall-clock time, each seed's runs against each other (section 15's reading).
    Per seed, the comparator's evaluations in the primary's step window give the times (its `train_seconds` there);
    the arm's held-out curve, linear in its own `train_seconds`, is read at those times (its last value past its
    end). The arm's mean there minus the comparator's mean: points of pass@1, with a 95 % t-interval over seeds.
    """
    split = primary["split"]

    def at_comparators_seconds(run, ref, step):
        ref_time = {int(s): seconds for s, seconds, _ in ref["compute"]}
        arm_time = {int(s): seconds for s, seconds, _ in run["compute"]}
        return interpolate([(arm_time[int(s)], value) for s, value in run["curves"][split]], ref_time[step])

    return [{"arm": arm, "comparator": comparator, **_matched_differences(pairs, primary, at_comparators_seconds)}
            for arm, comparator, pairs in _paired_runs(cells, arms, against)]


def compute_matched_at_pooled_cost(
    cells: dict, arms: list[str], against: list[str], primary: dict, given_cost: tuple[float, float] | None = None,
    levels: list[float] = (0.95,),
) -> list[dict]:
    """
    The primary AUC at equal training time, with the arm's cost measured once over all seeds: R = the arm's training
    seconds summed over the paired seeds / the comparator's (held-out evaluations excluded). Per seed, the arm's
    held-out curve (linear in steps) is read at step s / R for each of the comparator's evaluation steps s in the
    primary's window: where the arm would be after the comparator's training time at step s. Unlike
    `compute_matched`, a run's own wall-clock noise (another process, a slow start) does not move its seed's
    difference; the cost of the method does, through R. Points of pass@1, 95 % t-interval over seeds; the same at
    R's upper 95 % t-bound over the per-seed ratios (a pessimistic cost) as a sensitivity. `given_cost` = (R, upper
    bound) measured elsewhere (`--cost-ratio`: e.g. a cost check of a cheaper implementation of the same arm, whose
    learning per step it does not change) replaces both: a projection, not a measurement of these runs. `levels`:
    the confidence levels asked for; each one other than 0.95 adds its t-interval at R (`t_intervals`, e.g. a
    two-look level such as 0.9714).
    """
    split = primary["split"]
    rows = []
    for arm, comparator, pairs in _paired_runs(cells, arms, against):
        trained = [(run["compute"][-1][1], ref["compute"][-1][1]) for run, ref in pairs]
        ratio = sum(a for a, _ in trained) / sum(c for _, c in trained)
        _, _, ratio_high = t_interval([a / c for a, c in trained])
        if given_cost is not None:
            ratio, ratio_high = given_cost
        row = {"arm": arm, "comparator": comparator, "cost_ratio": round(ratio, 4),
               "cost_ratio_t95_high": round(ratio_high, 4), "cost_given": given_cost is not None}
        for key, cost in (("", ratio), ("_at_high_cost", ratio_high)):
            def at_equal_cost(run, ref, step, cost=cost):
                return interpolate([(int(s), value) for s, value in run["curves"][split]], step / cost)

            row.update({f"{name}{key}": value
                        for name, value in _matched_differences(pairs, primary, at_equal_cost).items()})
        row["t_intervals"] = {}
        for level in levels:
            if level != 0.95:
                _, low, high = t_interval(list(row["per_seed"].values()), level)
                row["t_intervals"][str(level)] = [round(low, 4), round(high, 4)]
        rows.append(row)
    return rows


def per_evaluation_differences(cells: dict, arms: list[str], against: list[str], split: str) -> list[dict]:
    """
    Secondary: pass@1 on `split` at every evaluation step after the start (the last one is the final pass@1), arm -
    comparator in points, paired by seed: the mean and a 95 % t-interval over seeds at each step. Runs are paired at
    equal steps, and a step is reported only where every paired run has an evaluation (a run that stopped early, or a
    study with another schedule, leaves its missing steps out rather than pairing unequal steps).
    """
    rows = []
    for arm, comparator, pairs in _paired_runs(cells, arms, against):
        curves = [({int(s): v for s, v in run["curves"][split]}, {int(s): v for s, v in ref["curves"][split]})
                  for run, ref in pairs]
        common = sorted(set.intersection(*(set(a) & set(c) for a, c in curves)) - {0}) if curves else []
        steps = {}
        for step in common:
            mean, low, high = t_interval([100 * (a[step] - c[step]) for a, c in curves])
            steps[str(step)] = {"mean": round(mean, 2), "t95": [round(low, 2), round(high, 2)]}
        rows.append({"arm": arm, "comparator": comparator, "split": split, "steps": steps})
    return rows


def markdown(result: dict, study_path: str, registered_reading: str | None = None) -> str:
    """`registered_reading`: which compute-matched reading the registration declared before the study ran ("own_run":
    `compute_matched`, "pooled_cost": `compute_matched_at_pooled_cost`, None: neither); the others are secondary."""
    lines = [
        f"# {'Exploratory' if result.get('exploratory') else 'Registered'} comparisons: {study_path}",
        "",
        ("Exploratory metric (the study declared no primary; given with --exploratory-primary after it ran): "
         if result.get("exploratory") else "Primary: ")
        + f"{result['description']} (`{json.dumps(result['primary'])}`); every arm at its selected setting "
        f"({', '.join(f'{a}: {s}' for a, s in result['selection'].items())}). Difference = arm - comparator "
        "(points of pass@1, or steps for steps_to), paired by seed. Verdict: beats when the t-interval and the bootstrap interval both lie "
        "above 0, loses when both lie below, else a tie.",
        "",
        "| arm - comparator | confidence | per seed | mean | t-interval | bootstrap interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["comparisons"]:
        seeds = " / ".join(f"{v:+.1f}" for v in row["per_seed"].values())
        lines.append(
            f"| {row['arm']} - {row['comparator']} | {100 * row['confidence']:.2f} % | {seeds} | {row['mean']:+.1f} | "
            f"[{row['t_low']:+.1f}, {row['t_high']:+.1f}] | [{row['bootstrap_low']:+.1f}, {row['bootstrap_high']:+.1f}]"
            f" ({row['bootstrap_over']}) | {row['verdict']} |"
        )
    if result.get("arm_means"):
        lines += ["", "Each arm's metric, mean over its seeds: " + ", ".join(
            f"{arm} {value:.1f}" for arm, value in result["arm_means"].items() if value is not None) + "."]
    lines += ["", "Wall-clock seconds per run, arm / comparator, paired by seed (start-up and held-out evaluations "
              f"included; {result['schedule']}):", "", "| arm / comparator | per seed | mean | 95 % t-interval |",
              "|---|---|---|---|"]
    for row in result["time_ratios"]:
        seeds = " / ".join(f"{v:.2f}" for v in row["time_ratio_per_seed"].values())
        lines.append(f"| {row['arm']} / {row['comparator']} | {seeds} | {row['mean']:.2f} | "
                     f"[{row['t95'][0]:.2f}, {row['t95'][1]:.2f}] |")
    if result["compute_matched"]:
        when = "Registered with the study" if registered_reading == "own_run" else (
            "Secondary, registered as such" if registered_reading else "Secondary, defined after the study ran")
        lines += ["", f"{when}: the primary at equal training wall-clock time (the arm's "
                  "curve read at the comparator's `train_seconds` of the primary's evaluations, held-out evaluation "
                  "time excluded), arm - comparator in points, 95 % t-interval over seeds:", "",
                  "| arm - comparator | per seed | mean | 95 % t-interval |", "|---|---|---|---|"]
        for row in result["compute_matched"]:
            seeds = " / ".join(f"{v:+.1f}" for v in row["per_seed"].values())
            lines.append(f"| {row['arm']} - {row['comparator']} | {seeds} | {row['mean']:+.1f} | "
                         f"[{row['t95'][0]:+.1f}, {row['t95'][1]:+.1f}] |")
    if result.get("compute_matched_at_pooled_cost"):
        when = ("Registered with the study" if registered_reading == "pooled_cost"
                else "Secondary, defined after the study ran")
        cost = ("the arm's cost measured over all seeds (R = the arm's training seconds / the comparator's, summed "
                "over the paired seeds")
        upper = "R's upper 95 % bound"
        if result.get("cost_ratio_given"):
            when = "Projection, not a measurement (secondary, defined after the study ran)"
            cost = (f"a cost measured elsewhere (R = {result['cost_ratio_given'][0]}, given with `--cost-ratio`: these "
                    "runs' learning per step, read at the cost another study measured for the same arm")
            upper = f"the given upper bound, {result['cost_ratio_given'][1]}"
        lines += ["", f"{when}: the primary at equal training time with {cost}; the arm's curve read at step s / R "
                  "for each comparator evaluation step s; a run's own timing noise left out), arm - comparator in "
                  f"points, 95 % t-interval over seeds; and the same at {upper}:", "",
                  "| arm - comparator | R | per seed | mean | 95 % t-interval | at R's upper bound | mean | 95 % t-interval |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["compute_matched_at_pooled_cost"]:
            seeds = " / ".join(f"{v:+.1f}" for v in row["per_seed"].values())
            high = " / ".join(f"{v:+.1f}" for v in row["per_seed_at_high_cost"].values())
            lines.append(f"| {row['arm']} - {row['comparator']} | {row['cost_ratio']:.3f} | {seeds} | {row['mean']:+.1f} | "
                         f"[{row['t95'][0]:+.1f}, {row['t95'][1]:+.1f}] | {row['cost_ratio_t95_high']:.3f}: {high} | "
                         f"{row['mean_at_high_cost']:+.1f} | [{row['t95_at_high_cost'][0]:+.1f}, "
                         f"{row['t95_at_high_cost'][1]:+.1f}] |")
        for row in result["compute_matched_at_pooled_cost"]:
            for level, (low, high) in row.get("t_intervals", {}).items():
                lines += ["", f"At confidence {100 * float(level):.2f} %, {row['arm']} - {row['comparator']} at R "
                          f"{row['cost_ratio']:.3f}: {row['mean']:+.1f} [{low:+.1f}, {high:+.1f}]."]
    if result.get("per_evaluation"):
        steps = list(result["per_evaluation"][0]["steps"])
        lines += ["", f"Secondary: {result['per_evaluation'][0]['split']} pass@1 at each evaluation step (the last: "
                  "the final pass@1), arm - comparator in points, paired by seed, mean [95 % t-interval]:", "",
                  "| arm - comparator | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for row in result["per_evaluation"]:
            cells = [f"{v['mean']:+.1f} [{v['t95'][0]:+.1f}, {v['t95'][1]:+.1f}]" for v in row["steps"].values()]
            lines.append(f"| {row['arm']} - {row['comparator']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="+", help="A finished study's study.json; several (no seed in common) are "
                        "pooled into one analysis, each arm at each study's selected setting.")
    parser.add_argument("--arms", nargs="+", required=True, help="The arms whose comparisons were registered.")
    parser.add_argument("--against", nargs="+", required=True, help="The comparators, e.g. grpo grpo_partial_credit.")
    parser.add_argument("--confidence", nargs="+", type=float, default=[0.95], help="Levels, e.g. 0.95 0.9875.")
    parser.add_argument("--resamples", type=int, default=10_000, help="Bootstrap resamples (the study's: 10000).")
    parser.add_argument("--output", required=True, help="Path without suffix: writes OUTPUT.json and OUTPUT.md.")
    parser.add_argument("--cost-ratio", nargs=2, type=float, metavar=("R", "R_HIGH"),
                        help="Read the pooled-cost comparison at this cost and upper bound, measured elsewhere (a "
                        "projection, labelled so) instead of the runs' own.")
    parser.add_argument("--exploratory-primary", type=json.loads, metavar="JSON",
                        help="For a study that declared no primary (a pilot): the metric to compare, e.g. "
                        '\'{"metric": "auc", "split": "validation", "steps": [5, 20]}\'; labelled exploratory.')
    registered = parser.add_mutually_exclusive_group()
    registered.add_argument("--pooled-cost-registered", action="store_true",
                            help="The registration declared the compute-matched reading at the arm's cost measured "
                            "over all seeds before the study ran (docs/benchmark.md, section 16).")
    registered.add_argument("--compute-matched-registered", action="store_true",
                            help="The registration declared the compute-matched reading at each seed's own "
                            "comparator run's seconds before the study ran (sections 14-15). Without either flag both "
                            "readings are labelled secondaries defined afterwards.")
    args = parser.parse_args(argv)
    studies = [json.loads(Path(path).read_text()) for path in args.study]
    study = studies[0] if len(studies) == 1 else pooled(studies)
    if args.cost_ratio and args.pooled_cost_registered:
        parser.error("--cost-ratio gives a projection, which no registration declared: drop --pooled-cost-registered.")
    given = tuple(args.cost_ratio) if args.cost_ratio else None
    if args.exploratory_primary and (args.pooled_cost_registered or args.compute_matched_registered):
        parser.error("--exploratory-primary is a metric chosen after the study ran: nothing about it was registered.")
    result = compare(study, args.arms, args.against, args.confidence, args.resamples, given, args.exploratory_primary)
    result["cost_ratio_given"] = list(given) if given else None
    result["compute_matched_registered"] = args.compute_matched_registered
    result["pooled_cost_registered"] = args.pooled_cost_registered
    reading = "own_run" if args.compute_matched_registered else "pooled_cost" if args.pooled_cost_registered else None
    if len(studies) > 1:
        result["pooled_from"] = args.study
        result["schedule"] = " / ".join(schedule(s["config"]) for s in studies)
    Path(args.output).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.output).with_suffix(".md").write_text(markdown(result, " + ".join(args.study),
                                                             reading))
    print(Path(args.output).with_suffix(".md").read_text())
    summary = {f"{r['arm']}-{r['comparator']}@{r['confidence']}": r["verdict"] for r in result["comparisons"]}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
