"""What an arm's runs cost against a comparator's in finished studies, paired by seed: run time and training time.

For each study.json given: per seed, the arm's run seconds over the comparator's (`seconds`: the whole `trl-mig train`
process, warm start loading and held-out evaluations included) and its training seconds over the comparator's (the
`train_seconds` at the last evaluation, `compute`); the mean ratio and its 95 % t-interval over seeds. With
`--before STUDY.json`, the same seeds' ratios in that (earlier) study too, and the per-seed change. Writes OUTPUT.json
and ends with one JSON line.

    python benchmarks/run_costs.py docs/study/cpu_iterations2_cost/study.json --arm mig_failure_scaled \
        --against grpo --before docs/study/cpu_iterations2_replication2/study.json \
        --output docs/study/cpu_iterations2_cost/run_costs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trl_mig.study.statistics import t_interval


def ratios(study: dict, arm: str, comparator: str) -> dict:
    """seed -> {"run": run-time ratio, "train": training-time ratio} for the seeds both arms ran."""
    runs = {(run["arm"], run["seed"]): run for run in study["runs"]}
    missing = {arm, comparator} - {run["arm"] for run in study["runs"]}
    if missing:
        raise SystemExit(f"run_costs: the study has no runs of {sorted(missing)}")
    out = {}
    for (name, seed), run in sorted(runs.items(), key=lambda item: item[0][1]):
        other = runs.get((comparator, seed))
        if name != arm or other is None:
            continue
        out[seed] = {
            "run": run["seconds"] / other["seconds"],
            "train": run["compute"][-1][1] / other["compute"][-1][1],
        }
    return out


def summary(per_seed: dict) -> dict:
    result = {}
    for kind in ("run", "train"):
        mean, low, high = t_interval([values[kind] for values in per_seed.values()])
        result[kind] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)] if low is not None else None}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a finished study's study.json")
    parser.add_argument("--arm", required=True)
    parser.add_argument("--against", required=True, help="the comparator arm")
    parser.add_argument("--before", help="an earlier study.json with runs of the same arms and seeds")
    parser.add_argument("--output", help="write OUTPUT.json")
    args = parser.parse_args(argv)
    now = ratios(json.loads(Path(args.study).read_text()), args.arm, args.against)
    result = {"study": args.study, "arm": args.arm, "against": args.against, "seeds": sorted(now),
              "per_seed": {str(s): {k: round(v, 4) for k, v in values.items()} for s, values in now.items()},
              **summary(now)}
    print(f"{args.arm} / {args.against}, {len(now)} seeds: run time {result['run']['mean']:.3f}x "
          f"{result['run']['ci95']}, training time {result['train']['mean']:.3f}x {result['train']['ci95']}")
    if args.before:
        before = ratios(json.loads(Path(args.before).read_text()), args.arm, args.against)
        shared = {s: before[s] for s in now if s in before}
        if not shared:
            raise SystemExit(f"run_costs: {args.before} has none of the seeds {sorted(now)}")
        change = {s: {k: now[s][k] - shared[s][k] for k in ("run", "train")} for s in shared}
        result["before"] = {"study": args.before, "seeds": sorted(shared), **summary(shared)}
        result["change"] = summary(change)
        print(f"  the same {len(shared)} seeds in {args.before}: run time {result['before']['run']['mean']:.3f}x "
              f"{result['before']['run']['ci95']}, training time {result['before']['train']['mean']:.3f}x; change "
              f"{result['change']['run']['mean']:+.3f} {result['change']['run']['ci95']} (run), "
              f"{result['change']['train']['mean']:+.3f} {result['change']['train']['ci95']} (training)")
    if args.output:
        Path(args.output).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
