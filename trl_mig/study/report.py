"""What a study writes: study.json, study.md (tables) and the PNG plots (matplotlib, the optional `plots` extra)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..cli.output import write_json
from ..render import new_agg_figure


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
    for split in config.report_splits:
        ref = config.reference_arm
        lines += [f"## {split}: greedy pass@1 (%), mean ± std over seeds", ""]
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


def plot_study(config, results: dict, output: Path) -> list[Path]:
    """
    The study's PNG plots in `output`: held-out greedy pass@1 over training steps per split (`pass_at_1_<split>.png`,
    each arm's mean with a ± std band over seeds) and the training accuracy reward (`train_reward.png`). Drawn on
    matplotlib figures with their own Agg canvas (no pyplot, no change of backend). Returns the paths.

    Raises:
        ImportError: when matplotlib (the `plots` extra, `pip install 'trl-mig[plots]'`) is not installed.
    """
    summary, paths = results["summary"], []
    for split in [config.select_split, *config.report_splits]:
        figure = new_agg_figure("plot_study", figsize=(7, 4.2))
        ax = figure.subplots()
        for index, (arm, entry) in enumerate(summary.items()):
            curve = entry["splits"][split]["curve"]
            if not curve:
                continue
            steps = [p[0] for p in curve]
            mean = [100 * p[1] for p in curve]
            low = [100 * (p[1] - p[2]) for p in curve]
            high = [100 * (p[1] + p[2]) for p in curve]
            color = f"C{index}"  # the colour cycle: one colour per arm, the same in every plot
            label = f"{arm} ({setting_name(entry['setting']) or 'default'})"
            ax.plot(steps, mean, label=label, color=color, linewidth=2)
            ax.fill_between(steps, low, high, color=color, alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{split} greedy pass@1 (%)")
        seeds = len(config.seeds)
        ax.set_title(f"Held-out {split} accuracy, " + ("one seed" if seeds == 1 else f"mean ± std over {seeds} seeds"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no curve, no legend (matplotlib would warn)
            ax.legend(fontsize=8)
        figure.tight_layout()
        path = output / f"pass_at_1_{split}.png"
        figure.savefig(path, dpi=120)
        paths.append(path)
    figure = new_agg_figure("plot_study", figsize=(7, 4.2))
    ax = figure.subplots()
    for index, (arm, entry) in enumerate(summary.items()):
        curve = entry["train_reward"]
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=arm, color=f"C{index}")
    ax.set_xlabel("training step")
    ax.set_ylabel("training accuracy reward (sampled)")
    ax.set_title("Training reward, mean over seeds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()
    path = output / "train_reward.png"
    figure.savefig(path, dpi=120)
    paths.append(path)
    return paths
