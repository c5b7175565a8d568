"""`trl-mig study`: arms x sweep settings x seeds of `trl-mig train` runs, resumable, summarised and plotted.

A study YAML names a base recipe, the arms (each a set of recipe overrides), the seeds and a sweep grid that every arm
runs in full. Each arm is reported at its own best sweep setting, chosen on a validation split (never on the splits
reported), so that no arm is tuned on the test split and every arm gets the same tuning budget.

    trl-mig study --config recipes/study/full.yaml [--jobs 2] [--output_dir DIR]

Every run is an ordinary `trl-mig train` in a subprocess, with its merged recipe saved as `RUN_DIR/recipe.yaml`; a run
is finished when `RUN_DIR/run_summary.json` exists, so re-running the command skips finished runs and continues an
interrupted study. Outputs, in the study's output folder: `study.json` (every run's curves, per-problem results,
compute and numbers, the selection, the summary and the primary metric's statistics), `study.md` (the declared
`primary` metric first, then the secondary tables) and PNG plots (`pass_at_1_<split>.png`,
`pass_at_1_<split>_compute.png`, `train_reward.png`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..builtin import is_builtin, resolve_builtin_model
from ..cli.errors import CLIError
from ..cli.recipes import make_train_parser, parse_recipe_dict, read_recipe
from .report import setting_name, write_outputs
from .statistics import check_primary, compare_arms

STUDY_KEYS = {
    "recipe", "output_dir", "overrides", "arms", "seeds", "sweep", "sweep_seeds", "select_split", "select_by",
    "report_splits", "eval_steps", "eval_max_samples", "reference_arm", "jobs", "threads_per_job", "description",
    "primary",
    "warmstart_per_seed",
    "seed_overrides",
}
SELECT_BY = ("final", "best")
# recipe fields a study sets itself for every run
MANAGED_FIELDS = ("output_dir", "seed", "accuracy_eval_splits", "accuracy_eval_steps", "save_strategy")
# the built-in model's seeds, set to each run's seed by `warmstart_per_seed`
PER_SEED_WARMSTART_FIELDS = ("tiny_seed", "warmstart_seed")


@dataclass
class StudyConfig:
    """A study: `arms` x `sweep` grid x `seeds` runs of the base `recipe`."""

    recipe: str
    output_dir: str
    arms: dict[str, dict]
    seeds: list[int]
    sweep: dict[str, list] = field(default_factory=dict)
    sweep_seeds: list[int] | None = None  # seeds that choose each arm's setting; default: all seeds
    overrides: dict = field(default_factory=dict)
    select_split: str = "validation"
    select_by: str = "final"
    report_splits: list[str] = field(default_factory=lambda: ["test"])
    eval_steps: int = 25
    eval_max_samples: int | None = None
    reference_arm: str | None = None
    primary: dict | None = None  # the primary metric, declared before the study runs (see `statistics.check_primary`)
    jobs: int = 1
    threads_per_job: int | None = None
    # each seed its own built-in warm start (tiny_seed = warmstart_seed = the run's seed), shared by the seed's arms
    warmstart_per_seed: bool = False
    # seed -> recipe fields for every run of that seed, over `overrides` (e.g. a warm start's length calibrated per
    # seed); fields that no arm and no sweep sets, so the arms of a seed stay alike
    seed_overrides: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""  # the YAML file it was read from
    reproduce: str = ""  # the command that reproduces it, when not `trl-mig study --config SOURCE` (a benchmark's)

    @classmethod
    def from_yaml(cls, path: str, **cli_overrides) -> StudyConfig:
        data = read_recipe(path)
        unknown = sorted(set(data) - STUDY_KEYS)
        if unknown:
            raise CLIError(f"Unknown key(s) {unknown} in study {path!r}; the keys of a study are {sorted(STUDY_KEYS)}.")
        data.update({key: value for key, value in cli_overrides.items() if value is not None})
        for key in ("recipe", "output_dir", "arms", "seeds"):
            if key not in data:
                raise CLIError(f"Study {path!r} has no `{key}`.")
        recipe = Path(data["recipe"])
        if not recipe.is_absolute() and not recipe.exists():
            beside = Path(path).parent / recipe
            recipe = beside if beside.exists() else recipe
        data["recipe"] = str(recipe)
        config = cls(**data, source=str(path))
        config.validate()
        return config

    def validate(self) -> None:
        base = read_recipe(self.recipe)  # exists and is a YAML mapping
        if not isinstance(self.arms, dict) or not self.arms:
            raise CLIError("Study `arms` must be a mapping of arm name -> recipe overrides, with at least one arm.")
        for name, overrides in self.arms.items():
            if not isinstance(overrides, dict):
                raise CLIError(f"Study arm {name!r} must be a mapping of recipe overrides, got {overrides!r}.")
            if "/" in str(name) or not str(name):
                raise CLIError(f"Study arm name {name!r} must be a non-empty name without '/'.")
        if not isinstance(self.seeds, list) or not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise CLIError(f"Study `seeds` must be a non-empty list of integers, got {self.seeds!r}.")
        if self.sweep_seeds is not None and (
            not isinstance(self.sweep_seeds, list) or not self.sweep_seeds or not set(self.sweep_seeds) <= set(self.seeds)
        ):
            raise CLIError(f"Study `sweep_seeds` must be a non-empty list of the study's seeds, got {self.sweep_seeds!r}.")
        if not isinstance(self.sweep, dict) or not all(isinstance(v, list) and v for v in self.sweep.values()):
            raise CLIError(f"Study `sweep` must map recipe fields to non-empty lists of values, got {self.sweep!r}.")
        for scope, mapping in [("overrides", self.overrides), ("sweep", self.sweep)] + [
            (f"arm {name!r}", arm) for name, arm in self.arms.items()
        ]:
            managed = sorted(set(mapping) & set(MANAGED_FIELDS))
            if managed:
                raise CLIError(f"Study {scope} sets {managed}, which the study sets for every run; remove them.")
        self._validate_seed_overrides()  # before any run is planned below
        if self.select_by not in SELECT_BY:
            raise CLIError(f"Study `select_by` must be one of {list(SELECT_BY)}, got {self.select_by!r}.")
        if self.select_split in self.report_splits:
            raise CLIError(
                f"Study `select_split` ({self.select_split!r}) is also a reported split: settings must be chosen on a "
                "split that is not reported (e.g. validation), never on the test split."
            )
        if self.reference_arm is not None and self.reference_arm not in self.arms:
            raise CLIError(f"Study `reference_arm` {self.reference_arm!r} is not one of the arms {list(self.arms)}.")
        if not isinstance(self.eval_steps, int) or self.eval_steps < 1:
            raise CLIError(f"Study `eval_steps` must be an integer >= 1, got {self.eval_steps!r}.")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise CLIError(f"Study `jobs` must be an integer >= 1, got {self.jobs!r}.")
        if self.primary is not None:
            max_steps = [
                make_run(self, base, arm, setting, self.seeds[0]).recipe.get("max_steps")
                for arm in self.arms for setting in self.settings()
            ]
            try:
                check_primary(self.primary, splits=self.report_splits, eval_steps=self.eval_steps, max_steps=max_steps)
            except ValueError as err:
                raise CLIError(f"Study {err}") from None
        self._validate_warmstart_per_seed(base)

    def _validate_seed_overrides(self) -> None:
        if not isinstance(self.seed_overrides, dict):
            raise CLIError(f"Study `seed_overrides` must map seeds to recipe overrides, got {self.seed_overrides!r}.")
        varied = {"sweep": self.sweep, **{f"arm {a!r}": o for a, o in self.arms.items()}}
        for seed, overrides in self.seed_overrides.items():
            if seed not in self.seeds:
                raise CLIError(f"Study `seed_overrides` names seed {seed!r}, which is not one of `seeds` {self.seeds}.")
            if not isinstance(overrides, dict) or not overrides:
                raise CLIError(f"Study `seed_overrides` of seed {seed} must be a non-empty mapping, got {overrides!r}.")
            own = MANAGED_FIELDS + ("seed",) + (PER_SEED_WARMSTART_FIELDS if self.warmstart_per_seed is True else ())
            reserved = sorted(set(overrides) & set(own))
            if reserved:
                raise CLIError(f"Study `seed_overrides` of seed {seed} sets {reserved}, which the study sets itself.")
            for scope, mapping in varied.items():
                clash = sorted(set(overrides) & set(mapping))
                if clash:
                    raise CLIError(
                        f"Study `seed_overrides` of seed {seed} sets {clash}, which the study's {scope} sets too: a "
                        "seed's overrides must apply alike to all its arms and settings."
                    )

    def _validate_warmstart_per_seed(self, base: dict) -> None:
        if not isinstance(self.warmstart_per_seed, bool):
            raise CLIError(f"Study `warmstart_per_seed` must be true or false, got {self.warmstart_per_seed!r}.")
        if not self.warmstart_per_seed:
            return
        for scope, mapping in [("recipe", base), ("overrides", self.overrides), ("sweep", self.sweep)] + [
            (f"arm {name!r}", arm) for name, arm in self.arms.items()
        ]:
            fixed = sorted(set(mapping) & set(PER_SEED_WARMSTART_FIELDS))
            if fixed:
                raise CLIError(
                    f"Study {scope} sets {fixed}, which `warmstart_per_seed: true` sets to each run's seed; remove "
                    "them, or the option."
                )
        for arm in self.arms:
            for setting in self.settings():
                model = run_recipe(self, base, arm, setting).get("model_name_or_path")
                if not is_builtin(model):
                    raise CLIError(
                        f"Study `warmstart_per_seed: true` needs a built-in model (builtin:..., whose initialisation "
                        f"and warm start its seeds decide), but arm {arm!r} trains {model!r}."
                    )

    def settings(self) -> list[dict]:
        """The sweep grid: one dict of field -> value per setting (a single empty setting without a sweep)."""
        keys = list(self.sweep)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.sweep[k] for k in keys))]

    @property
    def selection_seeds(self) -> list[int]:
        return list(self.sweep_seeds or self.seeds)

    @property
    def other_seeds(self) -> list[int]:
        """Seeds run only at each arm's selected setting."""
        return [seed for seed in self.seeds if seed not in self.selection_seeds]


@dataclass
class Run:
    arm: str
    setting: dict
    seed: int
    directory: Path
    recipe: dict

    @property
    def label(self) -> str:
        return f"{self.arm} {setting_name(self.setting) or '-'} seed {self.seed}"

    @property
    def finished(self) -> bool:
        return (self.directory / "run_summary.json").is_file()


def run_recipe(config: StudyConfig, base: dict, arm: str, setting: dict) -> dict:
    """The base recipe, the study's overrides, the arm's, then the sweep setting (before the study's own fields)."""
    return {**base, **config.overrides, **config.arms[arm], **setting}


def make_run(config: StudyConfig, base: dict, arm: str, setting: dict, seed: int) -> Run:
    """One run: the base recipe, the study's overrides, the arm's, the sweep setting, then the study's own fields."""
    splits = [config.select_split, *[s for s in config.report_splits if s != config.select_split]]
    directory = Path(config.output_dir) / "runs" / arm / (setting_name(setting) or "default") / f"seed{seed}"
    recipe = run_recipe(config, base, arm, setting)
    recipe.update(
        output_dir=str(directory),
        seed=seed,
        accuracy_eval_splits=splits,
        accuracy_eval_steps=config.eval_steps,
        save_strategy="no",
    )
    recipe.update(config.seed_overrides.get(seed, {}))
    if config.warmstart_per_seed:
        recipe.update(dict.fromkeys(PER_SEED_WARMSTART_FIELDS, seed))
    if config.eval_max_samples is not None:
        recipe["accuracy_eval_max_samples"] = config.eval_max_samples
    return Run(arm, setting, seed, directory, recipe)


def plan_runs(config: StudyConfig, selection: dict | None = None) -> list[Run]:
    """
    The sweep runs (every arm x setting x selection seed), then, when `selection` (arm -> chosen setting) is given,
    the runs of the other seeds at each arm's chosen setting. Seed-major, so early results cover every arm.
    """
    base = read_recipe(config.recipe)
    runs = [
        make_run(config, base, arm, setting, seed)
        for seed in config.selection_seeds
        for setting in config.settings()
        for arm in config.arms
    ]
    if selection is not None:
        runs += [make_run(config, base, arm, selection[arm], seed) for seed in config.other_seeds for arm in config.arms]
    return runs


# ----------------------------------------------------------------------------------------------------------- run
def run_study(config: StudyConfig, *, dry_run: bool = False, train_command=None) -> dict:
    """
    Run the unfinished runs of `config` (`jobs` at a time): the sweep on the selection seeds, then the other seeds at
    each arm's chosen setting; then write study.json, study.md and the plots.

    `train_command(run)`: the command line (before `--config RECIPE`) that trains a run; default `trl-mig train`
    (`python -m trl_mig train`). A benchmark can train some arms with a trainer of its own this way.
    """
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    sweep_runs = plan_runs(config)
    total = len(sweep_runs) + len(config.arms) * len(config.other_seeds)
    print(
        f"[trl-mig study] {total} runs: {len(config.arms)} arms x {len(config.settings())} settings x "
        f"{len(config.selection_seeds)} seed(s) to choose each arm's setting on `{config.select_split}`"
        + (f", then {len(config.other_seeds)} more seed(s) at the chosen settings" if config.other_seeds else "")
        + f"; {config.jobs} at a time; output in {output}",
        flush=True,
    )
    if dry_run:
        for run in sweep_runs:
            print(f"  {'finished' if run.finished else 'to run'}: {run.label}")
        return {}
    _run_all(sweep_runs, config, train_command)
    selection = select_settings(sweep_scores(config, [read_run(run) for run in sweep_runs]))
    runs = plan_runs(config, {arm: chosen["setting"] for arm, chosen in selection.items()})
    if config.other_seeds:
        _run_all(runs[len(sweep_runs):], config, train_command)
    results = summarize_study(config, runs)
    write_outputs(config, results)
    return results


def _run_all(runs: list[Run], config: StudyConfig, train_command=None) -> None:
    todo = [run for run in runs if not run.finished]
    print(f"[trl-mig study] {len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    if todo:
        prepare_builtin_models(todo)
        execute(todo, config, train_command)
    failed = [run for run in runs if not run.finished]
    if failed:
        raise CLIError(
            f"{len(failed)} run(s) did not finish, e.g. {failed[0].label}: see {failed[0].directory / 'train.log'}. "
            "Run the same command again to retry them (finished runs are kept)."
        )


def prepare_builtin_models(runs: list[Run]) -> list[str]:
    """
    Build every `builtin:` warm start the runs need once, one after the other, before they start, so parallel runs
    never race on it (with `warmstart_per_seed`, one per seed and answer format, shared by the seed's arms); the cache
    keeps them for later studies. Returns the distinct models' folders, in the order of the runs.
    """
    seen, paths = set(), []
    for run in runs:
        if not is_builtin(run.recipe.get("model_name_or_path")):
            continue
        recipe_name = f"the recipe of run {run.label!r}"
        _, builtin_args, training_args, model_args, _ = parse_run_recipe(run.recipe, recipe_name)
        key = (model_args.model_name_or_path, json.dumps(vars(builtin_args), sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        try:
            path = resolve_builtin_model(model_args.model_name_or_path, builtin_args, use_cpu=training_args.use_cpu)
        except ValueError as err:
            raise CLIError(str(err)) from None
        if path not in paths:  # settings that do not shape the model (e.g. visual_*) give the same folder
            paths.append(path)
    return paths


def parse_run_recipe(recipe: dict, name: str = "the run's recipe"):
    """
    A run's recipe parsed exactly as `trl-mig train --config` parses it (same parser, validation and messages): the
    five train dataclasses. `name` names the recipe in the error messages.
    """
    parsed, _ = parse_recipe_dict(make_train_parser(), recipe, dataclass_names="the train dataclasses", source=name)
    return parsed


def default_train_command(run: Run) -> list[str]:
    return [sys.executable, "-m", "trl_mig", "train"]


def execute(runs: list[Run], config: StudyConfig, train_command=None) -> None:
    train_command = train_command or default_train_command
    threads = config.threads_per_job or max(1, (os.cpu_count() or 1) // config.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    started, done, lock = time.perf_counter(), [0], threading.Lock()

    def launch(run: Run) -> None:
        run.directory.mkdir(parents=True, exist_ok=True)
        recipe_file = run.directory / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(run.recipe, sort_keys=False))
        t0 = time.perf_counter()
        with open(run.directory / "train.log", "w") as log:
            code = subprocess.run(
                [*train_command(run), "--config", str(recipe_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
            ).returncode
        with lock:
            done[0] += 1
            elapsed = time.perf_counter() - started
            left = elapsed / done[0] * (len(runs) - done[0])
            status = "done" if code == 0 and run.finished else f"FAILED (exit {code}, see {run.directory / 'train.log'})"
            extra = ""
            if run.finished:
                final = read_run(run)["final"]
                extra = "  " + " ".join(f"{s} {v:.3f}" for s, v in final.items() if v is not None)
            print(
                f"[trl-mig study] {done[0]}/{len(runs)} {run.label}: {status} in {time.perf_counter() - t0:.0f}s{extra}"
                f"  (elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left)",
                flush=True,
            )

    with concurrent.futures.ThreadPoolExecutor(max_workers=config.jobs) as pool:
        list(pool.map(launch, runs))


# ------------------------------------------------------------------------------------------------------ results
def read_run(run: Run) -> dict:
    """
    Curves and final numbers of a finished run, from its trainer_state.json log history: held-out pass@1 per split
    (`curves`), the training accuracy reward, `compute` (`[step, train_seconds, num_tokens]` at every held-out
    measurement, when the run logged them) and `problems` (split -> `[step, per-problem correctness]`, from
    `heldout_problems.jsonl` when the run wrote it; see `HeldOutAccuracyCallback`).
    """
    state = json.loads((run.directory / "trainer_state.json").read_text())
    curves: dict[str, list[list[float]]] = {}
    reward: list[list[float]] = []
    compute: list[list[float]] = []
    for entry in state["log_history"]:
        for key, value in entry.items():
            if key.startswith("heldout/") and key.endswith("/pass@1") and value is not None:
                curves.setdefault(key.split("/")[1], []).append([entry["step"], value])
            elif key.startswith("rewards/") and "accuracy" in key and key.endswith("/mean") and value is not None:
                reward.append([entry["step"], value])
        if entry.get("heldout/train_seconds") is not None:
            compute.append([entry["step"], entry["heldout/train_seconds"], entry.get("heldout/num_tokens")])
    problems: dict[str, dict[int, str]] = {}
    problems_file = run.directory / "heldout_problems.jsonl"
    if problems_file.is_file():
        for line in problems_file.read_text().splitlines():
            record = json.loads(line)
            for split, text in record["correct"].items():
                problems.setdefault(split, {})[record["step"]] = text  # a resumed run measured again: the last wins
    summary = json.loads((run.directory / "run_summary.json").read_text())
    return {
        "arm": run.arm,
        "setting": run.setting,
        "seed": run.seed,
        "curves": curves,
        "train_reward": reward,
        "final": {split: points[-1][1] if points else None for split, points in curves.items()},
        "best": {split: max(v for _, v in points) if points else None for split, points in curves.items()},
        "start": {split: points[0][1] if points else None for split, points in curves.items()},
        "seconds": summary.get("timings", {}).get("total_seconds"),
        "compute": compute,
        "problems": {split: [[step, text] for step, text in sorted(texts.items())] for split, texts in problems.items()},
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0 if values else None


def mean_curve(records: list[dict], split: str) -> list[list[float]]:
    """[step, mean, std, min, max] over the records at every step all of them measured."""
    by_step: dict[int, list[float]] = {}
    for record in records:
        for step, value in record["curves"].get(split, []):
            by_step.setdefault(int(step), []).append(value)
    return [
        [step, _mean(v), _std(v), min(v), max(v)] for step, v in sorted(by_step.items()) if len(v) == len(records)
    ]


def sweep_scores(config: StudyConfig, records: list[dict]) -> list[dict]:
    """Each arm x sweep setting's mean `select_by` pass@1 on `select_split` over the selection seeds."""
    table = []
    for arm in config.arms:
        for setting in config.settings():
            cell = [
                r for r in records
                if r["arm"] == arm and r["setting"] == setting and r["seed"] in config.selection_seeds
            ]
            table.append({"arm": arm, "setting": setting,
                          "score": _mean([r[config.select_by].get(config.select_split) for r in cell])})
    return table


def select_settings(sweep_table: list[dict]) -> dict:
    """Each arm's setting with the best score in `sweep_table` (the first setting on ties or without scores)."""
    selection = {}
    for row in sweep_table:
        chosen = selection.get(row["arm"])
        better = row["score"] is not None and (chosen is None or chosen["score"] is None or row["score"] > chosen["score"])
        if chosen is None or better:
            selection[row["arm"]] = {"setting": row["setting"], "score": row["score"]}
    return selection


def summarize_study(config: StudyConfig, runs: list[Run]) -> dict:
    """Selection of each arm's setting on the validation split, and the per-arm summary on the reported splits."""
    records = [read_run(run) for run in runs]
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        by_cell.setdefault((record["arm"], setting_name(record["setting"])), []).append(record)
    sweep_table = sweep_scores(config, records)
    selection = select_settings(sweep_table)

    summary = {}
    for arm in config.arms:
        cell = by_cell[(arm, setting_name(selection[arm]["setting"]))]
        entry = {"setting": selection[arm]["setting"], "seeds": [r["seed"] for r in cell], "splits": {}}
        for split in [config.select_split, *config.report_splits]:
            finals = [r["final"].get(split) for r in cell]
            bests = [r["best"].get(split) for r in cell]
            starts = [r["start"].get(split) for r in cell]
            entry["splits"][split] = {
                "start_mean": _mean(starts),
                # one seed has no spread: None, so the table shows the value without a misleading "± 0.0"
                "final_mean": _mean(finals), "final_std": _std(finals) if len(cell) > 1 else None,
                "final_per_seed": finals,
                "best_mean": _mean(bests), "best_std": _std(bests) if len(cell) > 1 else None, "best_per_seed": bests,
                "gain_per_seed": [None if f is None or s is None else f - s for f, s in zip(finals, starts)],
                "curve": mean_curve(cell, split),
            }
        entry["train_reward"] = mean_reward_curve(cell)
        summary[arm] = entry
    reference = config.reference_arm
    if reference is not None:
        for split in config.report_splits:
            # The target is the reference's best *trained* accuracy: the start (step 0) is everyone's, not a result.
            ref_stats = summary[reference]["splits"][split]
            trained = [p for p in ref_stats["curve"] if p[0] > 0]
            target = max((p[1] for p in trained), default=None)
            target_step = next((p[0] for p in trained if p[1] >= target), None) if target is not None else None
            improved = target is not None and ref_stats["start_mean"] is not None and target > ref_stats["start_mean"]
            for arm, entry in summary.items():
                reached = None
                if improved:
                    reached = next((p[0] for p in entry["splits"][split]["curve"] if p[0] > 0 and p[1] >= target), None)
                entry["splits"][split]["reference_best"] = target
                entry["splits"][split]["reference_improved"] = improved
                entry["splits"][split]["steps_to_reference_best"] = reached
                entry["splits"][split]["steps_ratio"] = reached / target_step if reached is not None else None
    results = {
        "config": dict(vars(config)),
        "runs": records,
        "sweep": sweep_table,
        "selection": selection,
        "summary": summary,
    }
    if config.primary is not None:
        cells = {arm: by_cell[(arm, setting_name(selection[arm]["setting"]))] for arm in config.arms}
        results["primary"] = compare_arms(config.primary, cells, config.reference_arm, eval_steps=config.eval_steps)
    return results


def mean_reward_curve(records: list[dict]) -> list[list[float]]:
    by_step: dict[int, list[float]] = {}
    for record in records:
        for step, value in record["train_reward"]:
            by_step.setdefault(int(step), []).append(value)
    return [[step, _mean(v), _std(v)] for step, v in sorted(by_step.items()) if len(v) == len(records)]
