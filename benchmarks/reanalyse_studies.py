"""Paired re-analysis of the committed MIG-vs-GRPO studies (docs/study/*/study.json), after the fact.

These studies were run before `trl-mig study` had a declared primary metric, so the metrics below are chosen after
looking and are labelled post hoc. For every study with a `grpo` and a `mig` arm, each arm at the setting its
validation score selected, paired by seed: MIG - GRPO in held-out pass@1 points, per seed, with the mean and its 95 %
t-interval over seeds (no bootstrap over problems: these runs stored no per-problem results), for
- `auc`: the mean pass@1 over every evaluation after step 0 (the area under the learning curve, rectangle rule),
- `final`: pass@1 at the last evaluation,
- `best_step`: pass@1 at each evaluation step (the largest mean difference is the one a reader's eye picks),
and the run-time ratio MIG / GRPO per seed (each run's wall-clock `seconds`: start-up and held-out evaluations
included). The `*_oracle` studies are left out: their grpo and mig runs are their base study's. Writes
docs/study/reanalysis.json and docs/study/reanalysis.md; ends with one JSON line.

    python benchmarks/reanalyse_studies.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trl_mig.study.statistics import paired_differences, primary_value, t_interval

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("test", "validation")


def selected_curves(study: dict) -> dict:
    """arm -> seed -> split -> [[step, pass@1], ...] for each arm's selected setting; arm -> seed -> seconds."""
    chosen = {arm: entry["setting"] for arm, entry in study["selection"].items()}
    curves, seconds = {}, {}
    for run in study["runs"]:
        if run["setting"] != chosen.get(run["arm"]):
            continue
        curves.setdefault(run["arm"], {})[run["seed"]] = run["curves"]
        seconds.setdefault(run["arm"], {})[run["seed"]] = run["seconds"]
    return curves, seconds


def interval(values: list[float]) -> dict:
    mean, low, high = t_interval(values)
    return {"per_seed": [round(v, 2) for v in values], "mean": _round(mean), "t95": [_round(low), _round(high)]}


def _round(value):
    return None if value is None else round(value, 2)


def reanalyse(study: dict) -> dict | None:
    curves, seconds = selected_curves(study)
    if "grpo" not in curves or "mig" not in curves:
        return None
    eval_steps = study["config"].get("eval_steps")
    out = {"seeds": sorted(set(curves["grpo"]) & set(curves["mig"])), "setting": study["selection"]["mig"]["setting"]}
    for split in SPLITS:
        if split not in next(iter(curves["grpo"].values())):
            continue
        steps = [int(step) for step, _ in next(iter(curves["grpo"].values()))[split] if int(step) > 0]
        metrics = {
            "auc": {"metric": "auc", "split": split, "steps": [steps[0], steps[-1]]},
            "final": {"metric": "final", "split": split},
        }
        result = {}
        for name, spec in metrics.items():
            values = {arm: {seed: 100 * primary_value(c[split], spec, eval_steps) for seed, c in curves[arm].items()}
                      for arm in ("grpo", "mig")}
            result[name] = interval(list(paired_differences(values["mig"], values["grpo"]).values()))
        by_step = {}
        for step in steps:
            at = {arm: {seed: 100 * dict((int(s), v) for s, v in c[split])[step] for seed, c in curves[arm].items()}
                  for arm in ("grpo", "mig")}
            by_step[step] = interval(list(paired_differences(at["mig"], at["grpo"]).values()))
        result["by_step"] = by_step
        out[split] = result
    ratios = paired_differences(
        {seed: seconds["mig"][seed] for seed in seconds["mig"]}, {seed: 0.0 for seed in seconds["grpo"]}
    )
    out["time_ratio"] = [round(seconds["mig"][s] / seconds["grpo"][s], 2) for s in ratios]
    return out


def markdown(results: dict) -> str:
    lines = [
        "# Paired re-analysis of the committed studies (post hoc)",
        "",
        "Written by `python benchmarks/reanalyse_studies.py` from each study's `study.json`. None of these studies "
        "declared a primary metric before it ran: the metrics are chosen after looking, so read the intervals as "
        "descriptions, not tests. MIG - GRPO in pass@1 points, paired by seed, each arm at its selected setting; "
        "mean [95 % t-interval over seeds]; no bootstrap over problems (no per-problem results were stored).",
        "",
        "| study | seeds | test AUC | test final | validation AUC | largest test step difference | MIG / GRPO run time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        test, validation = result.get("test", {}), result.get("validation", {})
        steps = test.get("by_step", {})
        top = max(steps, key=lambda s: steps[s]["mean"]) if steps else None
        top_text = f"step {top}: {_cell(steps[top])}" if top is not None else "-"
        lines.append(
            f"| [{name}]({name}/study.md) | {len(result['seeds'])} | {_cell(test.get('auc'))} | "
            f"{_cell(test.get('final'))} | {_cell(validation.get('auc'))} | {top_text} | "
            f"{min(result['time_ratio']):.2f}-{max(result['time_ratio']):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _cell(entry) -> str:
    if not entry or entry["mean"] is None:
        return "-"
    low, high = entry["t95"]
    if low is None:
        return f"{entry['mean']:+.1f}"
    return f"{entry['mean']:+.1f} [{low:+.1f}, {high:+.1f}]"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default=str(ROOT / "docs" / "study"), help="Folder of study folders.")
    parser.add_argument("--output", default=None, help="Folder for reanalysis.json/.md (default: --studies).")
    args = parser.parse_args(argv)
    folder = Path(args.studies)
    results = {}
    for path in sorted(folder.glob("*/study.json")):
        if path.parent.name.endswith("_oracle"):  # the oracle studies repeat their base study's grpo and mig runs
            continue
        result = reanalyse(json.loads(path.read_text()))
        if result is not None:
            results[path.parent.name] = result
    output = Path(args.output or folder)
    output.mkdir(parents=True, exist_ok=True)
    (output / "reanalysis.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "reanalysis.md").write_text(markdown(results))
    print(markdown(results))
    summary = {name: {"test_auc": r.get("test", {}).get("auc"), "time_ratio": r["time_ratio"]} for name, r in results.items()}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
