"""How sparse a study's outcome reward was: per run, TRL's logged `frac_reward_zero_std` (the share of groups whose
completions all got the same total reward, so that GRPO's advantage is zero for the whole group) in every logging
window, read from each run's train.log. Writes OUTPUT.json (per run, and per arm the mean over seeds of each window)
and prints one JSON line with each arm's mean over the run.

    python benchmarks/reward_spread.py outputs/study/cpu_small_groups --output docs/study/cpu_small_groups/reward_spread.json
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def logged_windows(train_log: Path) -> list[float]:
    """The `frac_reward_zero_std` of every training log line (Trainer prints one dict per logging window)."""
    values = []
    for line in train_log.read_text().splitlines():
        line = line.strip()
        if line.startswith("{") and "frac_reward_zero_std" in line:
            values.append(float(ast.literal_eval(line)["frac_reward_zero_std"]))
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_output", help="A study's output_dir (its runs/ARM/SETTING/seedN/train.log files).")
    parser.add_argument("--output", required=True, help="The JSON file to write.")
    args = parser.parse_args(argv)
    logs = sorted(Path(args.study_output).glob("runs/*/*/seed*/train.log"))
    if not logs:
        raise SystemExit(f"No runs/*/*/seed*/train.log under {args.study_output}.")
    runs = [{"arm": log.parts[-4], "setting": log.parts[-3], "seed": int(log.parts[-2][4:]),
             "frac_reward_zero_std": logged_windows(log)} for log in logs]
    arms = {}
    for arm in dict.fromkeys(run["arm"] for run in runs):
        series = [run["frac_reward_zero_std"] for run in runs if run["arm"] == arm and run["frac_reward_zero_std"]]
        if not series:
            raise SystemExit(f"Arm {arm!r} logged no `frac_reward_zero_std` in any train.log (no logging window ran).")
        windows = min(len(s) for s in series)
        per_window = [round(sum(s[i] for s in series) / len(series), 4) for i in range(windows)]
        arms[arm] = {"seeds": len(series), "mean_per_window": per_window,
                     "mean": round(sum(map(sum, series)) / sum(map(len, series)), 4)}
    result = {"study_output": args.study_output, "arms": arms, "runs": runs}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({arm: entry["mean"] for arm, entry in arms.items()}))
    return result


if __name__ == "__main__":
    main()
