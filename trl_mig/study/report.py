"""What a study writes: study.json, study.md (tables) and the PNG plots (matplotlib, the optional `plots` extra)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..cli.output import write_json
from ..render import new_agg_figure
from .statistics import t_interval


def setting_name(setting: dict) -> str:
    return ",".join(f"{key}={_compact(value)}" for key, value in setting.items())


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def write_outputs(config, results: dict) -> list[Path]:
    """
    study.json, study.md and the plots in the study's output folder; returns the paths written. Without matplotlib
    (an optional dependency) the plots are skipped with one line saying how to get them.
    """
    output = Path(config.output_dir)
    written = [output / "study.json", output / "study.md"]
    write_json(written[0], results)
    written[1].write_text(study_markdown(config, results))
    try:
        written += plot_study(config, results, output)
    except ImportError as err:
        if err.name != "matplotlib":
            raise
        print(f"[trl-mig study] plots skipped: {err}", file=sys.stderr)
        print(f"[trl-mig study] wrote {written[0]} and {written[1]}")
        return written
    print(f"[trl-mig study] wrote {written[0]}, {written[1]} and the plots in {output}")
    return written


def _pct(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def study_markdown(config, results: dict) -> str:
    """
    study.md: how the study was run, then the primary metric (each arm's value and its paired difference with the
    reference arm, with 95 % intervals) when the study declared one, then the secondary tables (start, final and best
    pass@1 per reported split), the sweep and the arms. A split on which every run scored 0 % at every evaluation gets
    one sentence instead of a table.
    """
    summary, selection = results["summary"], results["selection"]
    # named after its YAML file, so a study written to a scratch folder keeps its name
    title = Path(config.source).stem if config.source else Path(config.output_dir).name
    lines = [f"# Study: {title}", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    reproduce = config.reproduce or f"trl-mig study --config {config.source}"
    lines += [
        f"Reproduce: `{reproduce}`. Base recipe `{os.path.normpath(config.recipe)}`; "
        f"{len(config.arms)} arms, each run at every one of {len(config.settings())} sweep settings with seed(s) "
        f"{config.selection_seeds}, and reported at the setting with the best {config.select_by} "
        f"`{config.select_split}` pass@1 (mean over those seeds)"
        + (f", where seeds {config.other_seeds} were then run too" if config.other_seeds else "")
        + f". Held-out greedy pass@1 every {config.eval_steps} steps. The reported splits "
        f"({', '.join(config.report_splits)}) played no part in choosing settings.",
        "",
    ]
    if results.get("primary"):
        lines += primary_markdown(results["primary"], summary)
    else:
        lines += ["No primary metric was declared (`primary` in the study YAML): every table below is secondary.", ""]
    zero = zero_splits(results, config.report_splits)
    for split in config.report_splits:
        if split in zero:
            lines += [_zero_sentence(results, split), ""]
            continue
        ref = config.reference_arm
        lines += [f"## Secondary: {split} greedy pass@1 (%), mean ± std over seeds", ""]
        header = ["arm", "setting", "start", "final", "best", "final per seed"]
        if ref:
            header += [f"steps to {ref}'s best"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm, entry in summary.items():
            stats = entry["splits"][split]
            row = [
                arm, setting_name(entry["setting"]) or "-", _pct(stats["start_mean"]),
                _pct(stats["final_mean"], stats["final_std"]), _pct(stats["best_mean"], stats["best_std"]),
                " / ".join(_pct(v) for v in stats["final_per_seed"]),
            ]
            if ref:
                reached = stats.get("steps_to_reference_best")
                if not stats.get("reference_improved"):
                    row.append("n/a")
                else:
                    row.append("not reached" if reached is None else f"{reached} ({stats['steps_ratio']:.2f}x)")
            lines.append("| " + " | ".join(row) + " |")
        if ref:
            ref_stats = summary[ref]["splits"][split]
            lines += ["", f"{ref}'s best mean {split} pass@1 after training started: {_pct(ref_stats.get('reference_best'))}"
                      + ("." if ref_stats.get("reference_improved") else
                         f", never above its start ({_pct(ref_stats['start_mean'])}): 'steps to' is not defined (n/a).")]
        lines.append("")
    lines += [f"## Sweep ({config.select_by} `{config.select_split}` pass@1, mean over seeds {config.selection_seeds})", ""]
    settings = [setting_name(s) or "-" for s in config.settings()]
    lines += ["| arm | " + " | ".join(settings) + " | selected |", "|" + "---|" * (len(settings) + 2)]
    for arm in config.arms:
        scores = [_pct(row["score"]) for row in results["sweep"] if row["arm"] == arm]
        lines.append(f"| {arm} | " + " | ".join(scores) + f" | {setting_name(selection[arm]['setting']) or '-'} |")
    lines += ["", "## Arms", ""]
    for arm, overrides in config.arms.items():
        lines.append(f"- `{arm}`: " + (", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "the base recipe"))
    lines.append("")
    return "\n".join(lines)


def primary_markdown(primary: dict, summary: dict) -> list[str]:
    """The lines of study.md's primary section, from `trl_mig.study.statistics.compare_arms`'s result."""
    spec, steps_to = primary["primary"], primary["lower_is_better"]
    level = f"{100 * primary['confidence']:g} %"
    declared = ", ".join(f"{key}: {value}" for key, value in spec.items())
    lines = [
        f"## Primary: {primary['description']}", "",
        f"Declared in the study YAML before it ran (`primary: {{{declared}}}`); every arm at its selected setting.",
    ]
    if steps_to:
        censored = sum(sum(entry["censored"]) for entry in primary["arms"].values())
        runs = sum(len(entry["censored"]) for entry in primary["arms"].values())
        lines[-1] += (
            f" A run that never reaches {100 * spec['threshold']:g} % counts as its last evaluated step plus the "
            f"evaluation interval (censored: {censored} of these {runs} runs; a censored value is a lower bound on the "
            "steps that run would need)."
        )
    unit = "steps" if steps_to else "%"
    lines += ["", f"| arm | setting | per seed ({unit}) | mean | {level} t-interval |", "|---|---|---|---|---|"]
    for arm, entry in primary["arms"].items():
        name = f"{arm} (reference)" if arm == primary["reference_arm"] else arm
        per_seed = " / ".join(
            f"{_primary_cell(v, steps_to)}{'*' if censored else ''} (seed {s})"
            for s, v, censored in zip(entry["seeds"], entry["values"], entry["censored"])
        )
        interval = _interval(entry["t_low"], entry["t_high"], steps_to)
        lines.append(f"| {name} | {setting_name(summary[arm]['setting']) or '-'} | {per_seed} | "
                     f"{_primary_cell(entry['mean'], steps_to)} | {interval} |")
    if steps_to and any(any(entry["censored"]) for entry in primary["arms"].values()):
        lines += ["", "\\* censored: never reached the threshold."]
    reference = primary["reference_arm"]
    if primary["differences"]:
        points = "steps (lower is better)" if steps_to else "points of pass@1"
        lines += [
            "", f"Paired by seed with the reference arm `{reference}`: difference = arm - {reference}, in {points}.", "",
            f"| arm - {reference} | per seed | mean | {level} t-interval over seeds | {level} bootstrap interval |",
            "|---|---|---|---|---|",
        ]
        for arm, entry in primary["differences"].items():
            per_seed = " / ".join(f"{_primary_cell(v, steps_to, signed=True)} (seed {s})"
                                  for s, v in zip(entry["seeds"], entry["values"]))
            boot = _interval(entry["bootstrap_low"], entry["bootstrap_high"], steps_to, signed=True)
            lines.append(
                f"| {arm} | {per_seed} | {_primary_cell(entry['mean'], steps_to, signed=True)} | "
                f"{_interval(entry['t_low'], entry['t_high'], steps_to, signed=True)} | {boot} over "
                f"{entry['bootstrap_over']} |"
            )
        lines += [
            "",
            f"t-interval: mean ± t(df = n - 1) · sd / √n over the n paired seeds (none for one seed). Bootstrap: "
            f"{primary['resamples']} resamples (RNG seed {primary['bootstrap_seed']}) of the seeds, then of the "
            "problems within each drawn seed (the same problems for both arms; 'over seeds' when the runs did not "
            "record per-problem results), percentile interval.",
        ]
    elif reference is None:
        lines += ["", "No `reference_arm`: no paired differences."]
    lines.append("")
    return lines


def _primary_cell(value, steps_to: bool, signed: bool = False) -> str:
    """A primary value (steps, or pass@1 shown in %) or difference (signed)."""
    if value is None:
        return "n/a"
    number = value if steps_to else 100 * value
    return f"{number:+.1f}" if signed else f"{number:.1f}"


def _interval(low, high, steps_to: bool, signed: bool = False) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{_primary_cell(low, steps_to, signed)}, {_primary_cell(high, steps_to, signed)}]"


def zero_splits(results: dict, splits) -> list[str]:
    """The splits on which every run (of every arm and setting) scored 0 pass@1 at every evaluation."""
    zero = []
    for split in splits:
        values = [value for run in results["runs"] for _, value in run["curves"].get(split, [])]
        if values and all(value == 0 for value in values):
            zero.append(split)
    return zero


def _zero_sentence(results: dict, split: str) -> str:
    steps = sorted({step for run in results["runs"] for step, _ in run["curves"].get(split, [])})
    return (
        f"**{split}**: every one of the {len(results['runs'])} runs scored 0 % greedy pass@1 at every evaluation "
        f"(steps {steps[0]}-{steps[-1]}), so it has no table and no plot."
    )


# ----------------------------------------------------------------------------------------------------- plots
def selected_runs(results: dict, arm: str) -> list[dict]:
    """The run records of `arm` at its selected setting, in seed order."""
    setting = results["summary"][arm]["setting"]
    return sorted((r for r in results["runs"] if r["arm"] == arm and r["setting"] == setting), key=lambda r: r["seed"])


def _label(arm: str, entry: dict) -> str:
    return f"{arm} ({setting_name(entry['setting']) or 'default'})"


def pass_at_1_series(results: dict, split: str) -> list[dict]:
    """
    What `pass_at_1_<split>.png` draws, per arm at its selected setting: `steps`, the `mean` over seeds and its 95 %
    t-interval (`low`, `high`; None with one seed) at every step all seeds measured, and `per_seed` curves
    (`{"seed", "steps", "values"}`), pass@1 as fractions.
    """
    series = []
    for arm, entry in results["summary"].items():
        runs = selected_runs(results, arm)
        curves = [dict(map(tuple, run["curves"].get(split, []))) for run in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        intervals = [t_interval([c[step] for c in curves]) for step in steps]
        series.append({
            "arm": arm, "label": _label(arm, entry), "steps": steps,
            "mean": [i[0] for i in intervals], "low": [i[1] for i in intervals], "high": [i[2] for i in intervals],
            "per_seed": [{"seed": run["seed"], "steps": sorted(c), "values": [c[s] for s in sorted(c)]}
                         for run, c in zip(runs, curves)],
        })
    return series


def compute_series(results: dict, split: str) -> list[dict]:
    """
    What `pass_at_1_<split>_compute.png` draws, per arm at its selected setting whose runs logged their compute:
    `per_seed` (`{"seed", "seconds", "tokens", "values"}`: training wall-clock seconds, rollout tokens (TRL's
    `num_tokens`) and pass@1 at every held-out evaluation) and `mean` (the same keys, means over seeds at every step
    all seeds measured). Empty when no run logged its compute (studies run before it was recorded).
    """
    series = []
    for arm, entry in results["summary"].items():
        per_seed = []
        for run in selected_runs(results, arm):
            curve = dict(map(tuple, run["curves"].get(split, [])))
            points = [(step, seconds, tokens, curve[step]) for step, seconds, tokens in run.get("compute", [])
                      if step in curve and seconds is not None and tokens is not None]
            if points:
                steps, seconds, tokens, values = (list(column) for column in zip(*points))
                per_seed.append({"seed": run["seed"], "steps": steps, "seconds": seconds, "tokens": tokens,
                                 "values": values})
        if not per_seed:
            continue
        steps = sorted(set.intersection(*(set(seed["steps"]) for seed in per_seed)))
        mean = {key: [_mean_at(per_seed, key, step) for step in steps] for key in ("seconds", "tokens", "values")}
        series.append({"arm": arm, "label": _label(arm, entry), "per_seed": per_seed, "mean": {"steps": steps, **mean}})
    return series


def _mean_at(per_seed: list[dict], key: str, step) -> float:
    values = [seed[key][seed["steps"].index(step)] for seed in per_seed]
    return sum(values) / len(values)


COMPUTE_AXES = (
    "training wall-clock seconds (held-out evaluation excluded)",
    "rollout tokens (prompt + completion, TRL's num_tokens)",
)


def plot_study(config, results: dict, output: Path, per_seed_lines: bool = True) -> list[Path]:
    """
    The study's PNG plots in `output`: held-out greedy pass@1 over training steps per split (`pass_at_1_<split>.png`:
    each arm's mean over seeds with its 95 % t-interval band, clipped to 0-100 %, from 3 seeds on, and thin per-seed
    lines with `per_seed_lines` or below 3 seeds),
    the same against compute for each reported split (`pass_at_1_<split>_compute.png`: against training wall-clock
    seconds and against rollout tokens, when the runs logged them) and the training accuracy reward
    (`train_reward.png`). A split on which every run scored 0 % gets no plot (study.md says so). Drawn on matplotlib
    figures with their own Agg canvas (no pyplot, no change of backend). Returns the paths.

    Raises:
        ImportError: when matplotlib (the `plots` extra, `pip install 'trl-mig[plots]'`) is not installed.
    """
    paths = []
    colors = {arm: f"C{index}" for index, arm in enumerate(results["summary"])}  # one colour per arm in every plot
    zero = zero_splits(results, [config.select_split, *config.report_splits])
    seeds = len(config.seeds)
    if seeds < MIN_SEEDS_FOR_BAND:
        band = "one seed" if seeds == 1 else f"mean of {seeds} seeds (thin: per seed)"
    else:
        band = f"mean and 95 % t-interval over {seeds} seeds"
    for split in [config.select_split, *config.report_splits]:
        if split in zero:
            continue
        figure = new_agg_figure("plot_study", figsize=(7, 4.2))
        ax = figure.subplots()
        for arm_series in pass_at_1_series(results, split):
            color = colors[arm_series["arm"]]
            ax.plot(arm_series["steps"], _percent(arm_series["mean"]), label=arm_series["label"], color=color,
                    linewidth=2)
            limits = band_limits(arm_series, seeds)
            if limits is not None:
                ax.fill_between(arm_series["steps"], *limits, color=color, alpha=0.15)
            if per_seed_lines or seeds < MIN_SEEDS_FOR_BAND:
                for seed in arm_series["per_seed"]:
                    ax.plot(seed["steps"], _percent(seed["values"]), color=color, linewidth=0.6, alpha=0.5)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{split} greedy pass@1 (%)")
        ax.set_title(f"Held-out {split} accuracy, {band}")
        _finish(figure, ax)
        paths.append(_save(figure, output / f"pass_at_1_{split}.png"))
    for split in config.report_splits:
        series = compute_series(results, split)
        if split in zero or not series:
            continue
        figure = new_agg_figure("plot_study", figsize=(11, 4.2))
        axes = figure.subplots(1, 2, sharey=True)
        for ax, key, xlabel in zip(axes, ("seconds", "tokens"), COMPUTE_AXES):
            for arm_series in series:
                color = colors[arm_series["arm"]]
                mean = arm_series["mean"]
                ax.plot(mean[key], _percent(mean["values"]), label=arm_series["label"], color=color, linewidth=2,
                        marker=".")
                if per_seed_lines:
                    for seed in arm_series["per_seed"]:
                        ax.plot(seed[key], _percent(seed["values"]), color=color, linewidth=0.6, alpha=0.5)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"{split} greedy pass@1 (%)")
        figure.suptitle(f"Held-out {split} accuracy against compute, " + ("one seed" if seeds == 1 else
                        f"mean over {seeds} seeds at each evaluation (thin: per seed)"))
        _finish(figure, axes[0])
        paths.append(_save(figure, output / f"pass_at_1_{split}_compute.png"))
    figure = new_agg_figure("plot_study", figsize=(7, 4.2))
    ax = figure.subplots()
    for arm, entry in results["summary"].items():
        curve = entry["train_reward"]
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=arm, color=colors[arm])
    ax.set_xlabel("training step")
    ax.set_ylabel("training accuracy reward (sampled)")
    ax.set_title("Training reward, mean over seeds")
    _finish(figure, ax)
    paths.append(_save(figure, output / "train_reward.png"))
    return paths


# with two seeds the t-interval has one degree of freedom (t = 12.7): a band wider than the axis says nothing that
# the two per-seed lines do not
MIN_SEEDS_FOR_BAND = 3


def band_limits(arm_series: dict, seeds: int) -> tuple[list[float], list[float]] | None:
    """The band `pass_at_1_<split>.png` draws for one arm: its 95 % t-interval in %, clipped to [0, 100] (pass@1
    cannot leave it), or None below `MIN_SEEDS_FOR_BAND` seeds (the per-seed lines are drawn instead)."""
    if seeds < MIN_SEEDS_FOR_BAND or None in arm_series["low"]:
        return None
    return tuple([min(max(v, 0.0), 100.0) for v in _percent(arm_series[key])] for key in ("low", "high"))


def _percent(values) -> list[float]:
    return [100 * v for v in values]


def _finish(figure, ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no curve, no legend (matplotlib would warn)
        ax.legend(fontsize=8)
    figure.tight_layout()


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    return path
