"""`trl-mig study`: a tiny study (2 arms x 2 seeds x a few steps) writes its outputs and resumes without re-running."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from trl_mig.cli.main import main
from trl_mig.cli.errors import CLIError
from trl_mig.study import StudyConfig, plan_runs, study_markdown, summarize_study, write_outputs
from trl_mig.study.report import band_limits, compute_series, pass_at_1_series, zero_splits

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted((ROOT / "recipes" / "study").glob("*.yaml"))
# the demo recipe shrunk to seconds: tiny model, 3 warm-start steps, 2 training steps, a few eval prompts
TINY = {
    "tiny_hidden_size": 32, "tiny_num_layers": 1, "tiny_num_heads": 2, "tiny_num_kv_heads": 1,
    "warmstart_max_steps": 3, "warmstart_batch_size": 4, "task_train_size": 64, "task_validation_size": 6,
    "task_test_size": 6, "task_ood_size": 4, "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
    "max_completion_length": 16, "logging_steps": 1, "accuracy_eval_max_new_tokens": 16, "learning_rate": 1e-3,
    "accuracy_eval_before": False,
}


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))


def write_study(tmp_path, **changes):
    study = {
        "recipe": str(ROOT / "recipes" / "demo" / "mig.yaml"),
        "output_dir": str(tmp_path / "study"),
        "overrides": {**TINY, "builtin_cache_dir": str(tmp_path / "cache")},
        "arms": {"grpo": {"algorithm": "grpo"}, "mig": {"algorithm": "mig"}},
        "seeds": [0, 1],
        "sweep": {"learning_rate": [1e-3]},
        "select_split": "validation",
        "report_splits": ["test", "ood"],
        "eval_steps": 1,
        "reference_arm": "grpo",
        "jobs": 2,
        **changes,
    }
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_tiny_study_writes_outputs_and_resumes(tmp_path, capsys):
    path = write_study(tmp_path, primary={"metric": "auc", "split": "test", "steps": [1, 2]})
    assert main(["study", "--config", str(path)]) == 0
    out = tmp_path / "study"
    results = json.loads((out / "study.json").read_text())
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        for split, size in (("validation", 6), ("test", 6), ("ood", 4)):
            assert [step for step, _ in run["curves"][split]] == [0, 1, 2]
            # every evaluation's per-problem correctness, consistent with the logged pass@1
            assert [step for step, _ in run["problems"][split]] == [0, 1, 2]
            for (_, text), (_, value) in zip(run["problems"][split], run["curves"][split]):
                assert len(text) == size and set(text) <= {"0", "1"} and text.count("1") / size == pytest.approx(value)
        steps, seconds, tokens = zip(*run["compute"])
        assert steps == (0, 1, 2) and seconds[0] < seconds[1] <= seconds[2] and tokens[0] == 0 < tokens[1] < tokens[2]
    assert set(results["summary"]) == {"grpo", "mig"}
    markdown = (out / "study.md").read_text()
    assert markdown.startswith("# Study: tiny_study\n")  # named after its YAML file, not its output folder
    # the primary comes first, and its bootstrap resamples the problems the runs recorded
    assert [line for line in markdown.splitlines() if line.startswith("## ")][0].startswith("## Primary: mean test")
    assert results["primary"]["differences"]["mig"]["bootstrap_over"] == "seeds x problems"
    zero = zero_splits(results, ["validation", "test", "ood"])  # an untrained tiny model may solve nothing
    for split in ("test", "ood"):
        assert (f"## Secondary: {split} greedy pass@1" in markdown) == (split not in zero)
        assert (f"**{split}**: every one of the 4 runs scored 0 %" in markdown) == (split in zero)
        assert (out / f"pass_at_1_{split}_compute.png").exists() == (split not in zero)
    for split in ("validation", "test", "ood"):
        assert (out / f"pass_at_1_{split}.png").exists() == (split not in zero)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png.name
    assert (out / "train_reward.png").exists()
    # every run saved the recipe it ran with: seed, output folder and the held-out curve settings
    recipe = yaml.safe_load((out / "runs" / "mig" / "learning_rate=0.001" / "seed1" / "recipe.yaml").read_text())
    assert recipe["seed"] == 1 and recipe["accuracy_eval_steps"] == 1 and recipe["algorithm"] == "mig"
    assert recipe["accuracy_eval_splits"] == ["validation", "test", "ood"]

    finished = {p: p.stat().st_mtime_ns for p in out.rglob("run_summary.json")}
    capsys.readouterr()
    assert main(["study", "--config", str(path)]) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run_summary.json")} == finished

    # an interrupted study: one run lost its summary; only that run is run again
    lost = out / "runs" / "grpo" / "learning_rate=0.001" / "seed0" / "run_summary.json"
    lost.unlink()
    assert main(["study", "--config", str(path), "--jobs", "1"]) == 0
    assert "3 already finished, 1 to run" in capsys.readouterr().out
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run_summary.json") if p != lost} == {
        p: t for p, t in finished.items() if p != lost
    }


def test_selection_uses_the_validation_split_only(tmp_path):
    config = StudyConfig.from_yaml(str(write_study(tmp_path, sweep={"learning_rate": [1e-3, 1e-4]})))
    runs = plan_runs(config)
    assert len(runs) == 8

    def fake_curves(run):
        # validation prefers lr 1e-4 for both arms; test would prefer 1e-3 (it must not be looked at)
        good = run.setting["learning_rate"] == 1e-4
        validation = 0.6 if good else 0.2
        test = 0.1 if good else 0.9
        return {"validation": [[0, 0.1], [2, validation]], "test": [[0, 0.1], [2, test]], "ood": [[0, 0.0], [2, 0.0]]}

    for run in runs:
        run.directory.mkdir(parents=True)
        log = [{"step": s, f"heldout/{split}/pass@1": v} for split, pts in fake_curves(run).items() for s, v in pts]
        log += [{"step": 2, "rewards/answer_accuracy_reward/mean": 0.5}]
        (run.directory / "trainer_state.json").write_text(json.dumps({"log_history": log}))
        (run.directory / "run_summary.json").write_text("{}")
    results = summarize_study(config, runs)
    for arm in ("grpo", "mig"):
        assert results["selection"][arm]["setting"] == {"learning_rate": 1e-4}
        assert results["summary"][arm]["splits"]["test"]["final_mean"] == pytest.approx(0.1)
        assert results["summary"][arm]["splits"]["test"]["gain_per_seed"] == pytest.approx([0.0, 0.0])


def _fake_finished_runs(runs, curves_of, problems_of=None, compute_of=None):
    """
    Finished runs as `trl-mig train` leaves them: held-out pass@1 (`curves_of(run)`: split -> [[step, value]]) and, when
    given, compute (`compute_of(run)`: [[step, seconds, tokens]]) in trainer_state.json, and per-problem correctness
    (`problems_of(run)`: split -> [[step, '0110']]) in heldout_problems.jsonl.
    """
    for run in runs:
        run.directory.mkdir(parents=True)
        log = [{"step": s, f"heldout/{split}/pass@1": v} for split, pts in curves_of(run).items() for s, v in pts]
        for step, seconds, tokens in compute_of(run) if compute_of else []:
            log.append({"step": step, "heldout/train_seconds": seconds, "heldout/num_tokens": tokens})
        (run.directory / "trainer_state.json").write_text(json.dumps({"log_history": log}))
        if problems_of:
            by_step = {}
            for split, points in problems_of(run).items():
                for step, text in points:
                    by_step.setdefault(step, {})[split] = text
            lines = [json.dumps({"step": step, "correct": correct}) for step, correct in sorted(by_step.items())]
            (run.directory / "heldout_problems.jsonl").write_text("\n".join(lines) + "\n")
        (run.directory / "run_summary.json").write_text("{}")


def _counts_to_problems(counts, size=10):
    """Per-problem results with `count` of `size` problems solved at steps 0, 1, 2, ... (the first `count`)."""
    return [[step, "1" * count + "0" * (size - count)] for step, count in enumerate(counts)]


def test_study_md_leads_with_the_primary_metric_paired_by_seed(tmp_path):
    primary = {"metric": "auc", "split": "test", "steps": [1, 2]}
    config = StudyConfig.from_yaml(str(write_study(tmp_path, seeds=[0, 1, 2], primary=primary)))
    runs = plan_runs(config)
    # 10 test problems: grpo solves 1, 3, 4 at steps 0, 1, 2 with every seed; mig solves seed + 1 more at steps 1 and
    # 2, so mig - grpo in mean pass@1 over steps 1-2 is 0.1, 0.2, 0.3 for seeds 0, 1, 2. Nobody solves an ood problem.
    def counts(run):
        return [1, 3, 4] if run.arm == "grpo" else [1, 4 + run.seed, 5 + run.seed]

    def problems_of(run):
        return {"validation": _counts_to_problems([1, 2, 3]), "test": _counts_to_problems(counts(run)),
                "ood": _counts_to_problems([0, 0, 0], size=4)}

    def curves_of(run):
        return {split: [[step, text.count("1") / len(text)] for step, text in points]
                for split, points in problems_of(run).items()}

    def compute_of(run):  # mig takes 1.5x the time of grpo; seeds differ
        per_step = (10 + run.seed) * (1.5 if run.arm == "mig" else 1.0)
        return [[step, per_step * step, 1000 * step + run.seed] for step in range(3)]

    _fake_finished_runs(runs, curves_of, problems_of, compute_of)
    results = summarize_study(config, runs)
    difference = results["primary"]["differences"]["mig"]
    assert difference["values"] == pytest.approx([0.1, 0.2, 0.3])
    half = 4.302652729749464 * 0.1 / 3 ** 0.5  # t(0.975, df 2) * sd / sqrt(n)
    assert (difference["mean"], difference["t_low"], difference["t_high"]) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert difference["bootstrap_over"] == "seeds x problems"
    assert difference["bootstrap_low"] < 0.2 < difference["bootstrap_high"]

    markdown = study_markdown(config, results)
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Primary: mean test pass@1 over the evaluations at steps 1-2"
    assert sections[1] == "## Secondary: test greedy pass@1 (%), mean ± std over seeds"
    assert "| grpo (reference) | learning_rate=0.001 | 35.0 (seed 0) / 35.0 (seed 1) / 35.0 (seed 2) | 35.0 |" in markdown
    assert "| mig | +10.0 (seed 0) / +20.0 (seed 1) / +30.0 (seed 2) | +20.0 | [-4.8, +44.8] |" in markdown
    assert "over seeds x problems |" in markdown
    # ood: one sentence, no table, no plot
    assert "**ood**: every one of the 6 runs scored 0 % greedy pass@1 at every evaluation (steps 0-2)" in markdown
    assert "## Secondary: ood" not in markdown

    # the plots draw these series: per seed and the mean over seeds, against steps and against compute
    [grpo_steps, mig_steps] = pass_at_1_series(results, "test")
    assert mig_steps["steps"] == [0, 1, 2] and mig_steps["mean"] == pytest.approx([0.1, 0.5, 0.6])
    assert mig_steps["low"][1] == pytest.approx(0.5 - half) and grpo_steps["low"][1] == pytest.approx(0.3)
    assert [seed["values"][1] for seed in mig_steps["per_seed"]] == pytest.approx([0.4, 0.5, 0.6])
    [grpo, mig] = compute_series(results, "test")
    assert [seed["seconds"] for seed in mig["per_seed"]] == [[0.0, 15.0, 30.0], [0.0, 16.5, 33.0], [0.0, 18.0, 36.0]]
    assert mig["mean"]["seconds"] == pytest.approx([0.0, 16.5, 33.0])
    assert grpo["mean"]["tokens"] == pytest.approx([1.0, 1001.0, 2001.0])
    assert grpo["mean"]["values"] == pytest.approx([0.1, 0.3, 0.4])

    written = {path.name for path in write_outputs(config, results)}
    assert written == {"study.json", "study.md", "pass_at_1_validation.png", "pass_at_1_test.png",
                       "pass_at_1_test_compute.png", "train_reward.png"}
    out = Path(config.output_dir)
    assert (out / "pass_at_1_test_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "study.json").read_text())
    assert stored["primary"]["differences"]["mig"]["values"] == pytest.approx([0.1, 0.2, 0.3])
    assert stored["runs"][0]["problems"]["test"][1] == [1, "1110000000"]  # compact: one character per problem


def test_the_plotted_band_stays_within_0_and_100_percent_and_needs_3_seeds():
    """pass@1 cannot leave 0-100 %, so neither does its band; with 2 seeds (t = 12.7) no band, the per-seed lines."""
    series = {"low": [-0.2, 0.1], "high": [0.5, 1.3]}
    low, high = band_limits(series, seeds=3)
    assert (low, high) == (pytest.approx([0.0, 10.0]), pytest.approx([50.0, 100.0]))
    assert band_limits(series, seeds=2) is None
    assert band_limits({"low": [None], "high": [None]}, seeds=1) is None


def test_a_steps_to_primary_says_which_runs_never_reached_the_threshold(tmp_path):
    primary = {"metric": "steps_to", "split": "test", "threshold": 0.5}
    config = StudyConfig.from_yaml(str(write_study(tmp_path, seeds=[0], report_splits=["test"], primary=primary)))
    runs = plan_runs(config)
    test_curves = {"grpo": [[0, 0.1], [1, 0.3], [2, 0.4]], "mig": [[0, 0.1], [1, 0.5], [2, 0.6]]}
    _fake_finished_runs(runs, lambda run: {"validation": [[0, 0.1], [2, 0.2]], "test": test_curves[run.arm]})
    results = summarize_study(config, runs)
    assert results["primary"]["arms"]["grpo"]["values"] == [3.0]  # never reached: last step 2 + eval_steps 1
    assert results["primary"]["differences"]["mig"]["values"] == [-2.0]
    markdown = study_markdown(config, results)
    assert "## Primary: steps to reach 50 % test pass@1" in markdown and "lower is better" in markdown
    assert "(censored: 1 of these 2 runs;" in markdown and "| 3.0* (seed 0) |" in markdown
    assert results["primary"]["differences"]["mig"]["bootstrap_over"] == "seeds"  # these runs recorded no problems


def test_without_a_primary_every_table_is_secondary(tmp_path):
    config = StudyConfig.from_yaml(str(write_study(tmp_path, seeds=[0], report_splits=["test"])))
    runs = plan_runs(config)
    _fake_finished_runs(runs, lambda run: {"validation": [[0, 0.3], [2, 0.4]], "test": [[0, 0.2], [2, 0.5]]})
    results = summarize_study(config, runs)
    assert "primary" not in results
    markdown = study_markdown(config, results)
    assert "No primary metric was declared" in markdown and "## Primary" not in markdown
    assert compute_series(results, "test") == []  # runs without compute: no compute plot


def test_steps_to_the_reference_best_count_trained_checkpoints_only(tmp_path):
    config = StudyConfig.from_yaml(str(write_study(tmp_path, report_splits=["test"])))
    runs = plan_runs(config)
    # grpo rises to 0.5 at step 4 on test; mig gets there at step 2. On validation nobody beats the start.
    test_curves = {"grpo": [[0, 0.3], [2, 0.4], [4, 0.5]], "mig": [[0, 0.3], [2, 0.5], [4, 0.6]]}
    _fake_finished_runs(runs, lambda run: {"validation": [[0, 0.3], [2, 0.2], [4, 0.3]], "test": test_curves[run.arm]})
    results = summarize_study(config, runs)
    mig, grpo = results["summary"]["mig"]["splits"]["test"], results["summary"]["grpo"]["splits"]["test"]
    assert grpo["reference_improved"] and grpo["reference_best"] == pytest.approx(0.5)
    assert (grpo["steps_to_reference_best"], grpo["steps_ratio"]) == (4, 1.0)
    assert (mig["steps_to_reference_best"], mig["steps_ratio"]) == (2, 0.5)
    assert "| 2 (0.50x) |" in study_markdown(config, results)

    (tmp_path / "flat").mkdir()
    flat = StudyConfig.from_yaml(str(write_study(tmp_path / "flat", report_splits=["test"], seeds=[0])))
    flat_runs = plan_runs(flat)
    # grpo never beats its start: every arm "reaching" it at step 0 would be a meaningless 0x
    _fake_finished_runs(flat_runs, lambda run: {"validation": [[0, 0.3], [2, 0.3]], "test": [[0, 0.3], [2, 0.25]]})
    results = summarize_study(flat, flat_runs)
    assert not results["summary"]["mig"]["splits"]["test"]["reference_improved"]
    assert results["summary"]["mig"]["splits"]["test"]["steps_to_reference_best"] is None
    markdown = study_markdown(flat, results)
    assert "never above its start (30.0)" in markdown and "| n/a |" in markdown
    assert "| 25.0 |" in markdown and "25.0 ±" not in markdown  # one seed: no spread to show


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"select_split": "test"}, "never on the test split"),
        ({"arms": {}}, "at least one arm"),
        ({"seeds": []}, "non-empty list of integers"),
        ({"sweep": {"learning_rate": []}}, "non-empty lists"),
        ({"reference_arm": "ppo"}, "'ppo' is not one of the arms"),
        ({"overrides": {"seed": 3}}, "['seed']"),
        ({"lr": 1}, "Unknown key(s) ['lr']"),
        ({"recipe": "missing.yaml"}, "does not exist"),
        ({"primary": {"metric": "area", "split": "test"}}, "Study `primary.metric` must be one of"),
        ({"primary": {"metric": "final", "split": "validation"}}, "Study `primary.split` must be one of the reported"),
        ({"primary": {"metric": "auc", "split": "test", "steps": [1, 3]}}, "`primary.steps`: step 3 is after"),
        ({"eval_steps": 2, "overrides": {**TINY, "max_steps": 4}, "primary": {"metric": "auc", "split": "test",
                                                                              "steps": [1, 4]}},
         "`primary.steps`: step 1 is not an evaluated step"),
        ({"primary": {"metric": "steps_to", "split": "test", "threshold": 1.5}}, "`primary.threshold`"),
        ({"warmstart_per_seed": "yes"}, "`warmstart_per_seed` must be true or false"),
        ({"warmstart_per_seed": True, "arms": {"grpo": {}, "mig": {"model_name_or_path": "Qwen/Qwen2.5-0.5B"}}},
         "needs a built-in model (builtin:..., whose initialisation and warm start its seeds decide), but arm 'mig'"),
        ({"warmstart_per_seed": True, "arms": {"grpo": {}, "mig": {"warmstart_seed": 3}}},
         "arm 'mig' sets ['warmstart_seed'], which `warmstart_per_seed: true` sets to each run's seed"),
        ({"warmstart_per_seed": True, "sweep": {"tiny_seed": [0, 1]}}, "sweep sets ['tiny_seed']"),
        ({"seed_overrides": {7: {"warmstart_max_steps": 10}}}, "names seed 7, which is not one of `seeds` [0, 1]"),
        ({"seed_overrides": {1: {}}}, "`seed_overrides` of seed 1 must be a non-empty mapping"),
        ({"seed_overrides": {1: {"output_dir": "x"}}}, "of seed 1 sets ['output_dir'], which the study sets itself"),
        ({"seed_overrides": {1: {"learning_rate": 1e-4}}},
         "of seed 1 sets ['learning_rate'], which the study's sweep sets too"),
        ({"seed_overrides": {0: {"algorithm": "grpo"}}}, "which the study's arm 'grpo' sets too"),
        ({"seed_overrides": [1]}, "`seed_overrides` must map seeds to recipe overrides, got [1]"),
        ({"warmstart_per_seed": True, "seed_overrides": {1: {"tiny_seed": 3}}},
         "of seed 1 sets ['tiny_seed'], which the study sets itself"),
    ],
)
def test_bad_studies_name_the_problem(tmp_path, changes, message):
    with pytest.raises(CLIError) as error:
        StudyConfig.from_yaml(str(write_study(tmp_path, **changes)))
    assert message in str(error.value)


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_plan_runs_whose_recipes_parse(study):
    from trl_mig.study import parse_run_recipe

    config = StudyConfig.from_yaml(str(study))
    sweep = plan_runs(config)
    assert len(sweep) == len(config.arms) * len(config.settings()) * len(config.selection_seeds)
    chosen = {arm: config.settings()[-1] for arm in config.arms}
    assert len(plan_runs(config, chosen)) == len(sweep) + len(config.arms) * len(config.other_seeds)
    assert config.select_split not in config.report_splits
    if study.name == "full.yaml":  # the study the README reports: at least 3 seeds, every arm sweeps lr x temperature
        assert len(config.seeds) >= 3 and {"learning_rate", "temperature"} <= set(config.sweep)
    for run in sweep[: len(config.arms)]:
        script_args, _, training_args, _, _ = parse_run_recipe(run.recipe)
        assert training_args.seed == run.seed and script_args.accuracy_eval_steps == config.eval_steps


def test_other_seeds_run_only_at_the_chosen_setting(tmp_path):
    config = StudyConfig.from_yaml(str(write_study(tmp_path, seeds=[0, 1, 2], sweep_seeds=[0],
                                                   sweep={"learning_rate": [1e-3, 1e-4]})))
    runs = plan_runs(config, {"grpo": {"learning_rate": 1e-4}, "mig": {"learning_rate": 1e-3}})
    assert len(runs) == 2 * 2 * 1 + 2 * 2
    later = runs[4:]
    assert {(r.arm, r.seed, r.setting["learning_rate"]) for r in later} == {
        ("grpo", 1, 1e-4), ("grpo", 2, 1e-4), ("mig", 1, 1e-3), ("mig", 2, 1e-3)
    }
    with pytest.raises(CLIError, match="sweep_seeds"):
        StudyConfig.from_yaml(str(write_study(tmp_path, sweep_seeds=[7])))


def test_without_matplotlib_the_study_writes_json_and_markdown_and_skips_the_plots(tmp_path, monkeypatch, capsys):
    from trl_mig.study import plot_study, write_outputs

    config = StudyConfig.from_yaml(str(write_study(tmp_path, report_splits=["test"], seeds=[0])))
    runs = plan_runs(config)
    _fake_finished_runs(runs, lambda run: {"validation": [[0, 0.3], [2, 0.4]], "test": [[0, 0.2], [2, 0.5]]})
    results = summarize_study(config, runs)
    out = Path(config.output_dir)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when it is not installed
    with pytest.raises(ImportError, match=r"plot_study needs matplotlib: pip install 'trl-mig\[plots\]'"):
        plot_study(config, results, out)
    written = write_outputs(config, results)
    assert written == [out / "study.json", out / "study.md"]
    assert json.loads((out / "study.json").read_text())["summary"]["mig"]["splits"]["test"]["final_mean"] == 0.5
    assert (out / "study.md").read_text() == study_markdown(config, results)
    assert not list(out.glob("*.png"))
    captured = capsys.readouterr()
    [skipped] = [line for line in captured.err.splitlines() if "plots skipped" in line]
    assert "pip install 'trl-mig[plots]'" in skipped

    monkeypatch.delitem(sys.modules, "matplotlib")  # installed again: the plots are drawn
    written = write_outputs(config, results)
    assert {p.name for p in written} == {"study.json", "study.md", "pass_at_1_validation.png", "pass_at_1_test.png",
                                         "train_reward.png"}
    assert (out / "train_reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_recipe_parses_from_its_mapping_and_names_the_run_in_errors(tmp_path):
    from trl_mig.study import parse_run_recipe

    config = StudyConfig.from_yaml(str(write_study(tmp_path, overrides={**TINY, "mig_weight": 0.5})))
    run = plan_runs(config)[0]
    script_args, builtin_args, training_args, _, _ = parse_run_recipe(run.recipe)
    assert (training_args.seed, training_args.mig_weight, training_args.max_steps) == (run.seed, 0.5, TINY["max_steps"])
    assert builtin_args.tiny_hidden_size == TINY["tiny_hidden_size"] and script_args.algorithm == run.arm
    with pytest.raises(CLIError, match=r"Unknown key\(s\) in the recipe of run 'grpo': \['mig_wieght'\]"):
        parse_run_recipe({**run.recipe, "mig_wieght": 1.0}, "the recipe of run 'grpo'")
    with pytest.raises(CLIError, match="mig_scoring_batch_size"):
        parse_run_recipe({**run.recipe, "mig_scoring_batch_size": 0})


def test_seed_overrides_apply_to_every_run_of_their_seed(tmp_path):
    """Over the study-wide overrides (TINY's warmstart_max_steps: 3), alike for every arm of the seed."""
    config = StudyConfig.from_yaml(
        str(write_study(tmp_path, warmstart_per_seed=True, seed_overrides={1: {"warmstart_max_steps": 5}}))
    )
    steps = {(run.arm, run.seed): run.recipe["warmstart_max_steps"] for run in plan_runs(config)}
    assert steps == {("grpo", 0): 3, ("mig", 0): 3, ("grpo", 1): 5, ("mig", 1): 5}


def test_warmstart_per_seed_builds_one_cached_warm_start_per_seed_shared_by_its_arms(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import trl_mig.builtin.model as model_module
    from trl_mig.study.runner import prepare_builtin_models

    config = StudyConfig.from_yaml(str(write_study(tmp_path, warmstart_per_seed=True)))
    runs = plan_runs(config)
    assert {(run.arm, run.seed, run.recipe["tiny_seed"], run.recipe["warmstart_seed"]) for run in runs} == {
        (arm, seed, seed, seed) for arm in ("grpo", "mig") for seed in (0, 1)
    }
    built = []
    real_warm_start = model_module._warm_start

    def counting_warm_start(model, tokenizer, warm, *args, **kwargs):
        built.append(warm.seed)
        return real_warm_start(model, tokenizer, warm, *args, **kwargs)

    monkeypatch.setattr(model_module, "_warm_start", counting_warm_start)
    paths = prepare_builtin_models(runs)
    assert built == [0, 1] and len(paths) == 2 and paths[0] != paths[1]  # once per seed, not per arm
    weights = [load_file(str(Path(path) / "model.safetensors")) for path in paths]
    assert weights[0].keys() == weights[1].keys()
    assert all(not weights[0][name].equal(weights[1][name]) for name in weights[0])  # another init and SFT

    def fail(*args, **kwargs):
        raise AssertionError("a cached warm start was built again")

    monkeypatch.setattr(model_module, "_warm_start", fail)
    assert prepare_builtin_models(runs) == paths
    # seed 0's warm start is the one every seed shares without the option (the demo's)
    shared = StudyConfig.from_yaml(str(write_study(tmp_path, seeds=[0, 1])))
    assert prepare_builtin_models(plan_runs(shared)) == paths[:1]


def test_the_arms_study_parses_every_run_and_its_arms_differ_only_as_intended(tmp_path, capsys):
    import dataclasses

    from trl_mig.cli.train import build_reward_funcs
    from trl_mig.study import parse_run_recipe, run_study

    config = StudyConfig.from_yaml(str(ROOT / "recipes" / "study" / "cpu_arms.yaml"))
    assert set(config.arms) == {"grpo", "grpo_partial_credit", "mig", "mig_final_answer", "mig_no_sft", "mig_rtg",
                                "mig_failure_scaled"}
    assert config.primary == {"metric": "auc", "split": "test", "steps": [5, 20]}
    assert config.warmstart_per_seed and len(config.seeds) == 5 and config.report_splits == ["test"]
    config = dataclasses.replace(config, output_dir=str(tmp_path / "cpu_arms"))
    assert run_study(config, dry_run=True) == {}
    out = capsys.readouterr().out
    assert "49 runs: 7 arms x 2 settings x 2 seed(s)" in out and out.count("to run:") == 28
    runs = plan_runs(config, {arm: config.settings()[-1] for arm in config.arms})
    assert len(runs) == 49 and {run.seed for run in runs} == set(config.seeds)
    parsed = {}
    for run in runs:
        script_args, builtin_args, training_args, _, _ = parse_run_recipe(run.recipe, run.label)
        # the same held-out evaluation for every arm: the final value, greedy, on the same splits
        assert script_args.accuracy_eval_answer_match == "last"
        assert script_args.accuracy_eval_splits == ["validation", "test"]
        assert builtin_args.tiny_seed == builtin_args.warmstart_seed == run.seed
        parsed[run.arm] = (script_args, builtin_args, training_args)
    for arm, (script_args, builtin_args, training_args) in parsed.items():
        assert script_args.algorithm == ("grpo" if arm.startswith("grpo") else "mig")
        assert builtin_args.task_answer == ("final" if arm == "mig_final_answer" else "running")
        assert training_args.sft_weight == (0.0 if arm == "mig_no_sft" else 0.1)
        assert training_args.mig_credit == ("return_to_go" if arm == "mig_rtg" else "trajectory")
        assert training_args.mig_failure_scaling == (1.0 if arm == "mig_failure_scaled" else 0.0)
        names = [f.__name__ for f in build_reward_funcs(script_args.reward_funcs, training_args, "solution")]
        if arm == "grpo_partial_credit":  # partial credit in place of accuracy, which stays at weight 0 (logged only)
            assert names == ["answer_accuracy_reward", "partial_credit_reward", "step_format_reward"]
            assert training_args.reward_weights == [0.0, 1.0, 0.2]
        else:
            assert names == ["answer_accuracy_reward", "step_format_reward"] and training_args.reward_weights == [1.0, 0.2]
