"""The benchmarks/ scripts: the step benchmark's presets (smoke runs at tiny sizes, and what each preset makes TRL
run), the credit diagnostics' step grading against the gold solution and the oracle step-credit study."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_step  # noqa: E402
from _common import every_step_right, grade_steps  # noqa: E402
from bench_host import main as host_benchmark  # noqa: E402
from bench_host import make_batch  # noqa: E402
from oracle_step_credit import main as oracle_study  # noqa: E402
from oracle_step_credit import oracle_trainer_class  # noqa: E402
from run_costs import main as run_costs  # noqa: E402

from trl_mig import StepBatch  # noqa: E402
from trl_mig.segmentation import FormatSpec, segment_completion  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer  # noqa: E402
from trl_mig.builtin.tokenizers import tiny_tokenizer  # noqa: E402
from trl_mig.builtin.tokenizers import TOKENIZER_KINDS  # noqa: E402

EXPRESSION = "((3+4)*2)-5"  # gold steps 3+4=7, 7*2=14, 14-5=9
RIGHT = "<think>### Step 1\n3+4=7\n### Step 2\n7*2=14\n### Step 3\n14-5=9\n</think>\n<answer>7 14 9</answer>"
WRONG_SECOND = "<think>### Step 1\n3+4=7\n### Step 2\n7*3=21\n### Step 3\n21-5=16\n</think>\n<answer>7 21 16</answer>"
EXTRA_STEP = RIGHT.replace("</think>", "### Step 4\n9+1=10\n</think>")


def test_steps_are_graded_up_to_the_first_wrong_one():
    assert grade_steps(EXPRESSION, ["3+4=7", "7*2=14", "14-5=9"]) == [True, True, True]
    assert grade_steps(EXPRESSION, ["3+4=7", "7*3=21", "21-5=16"]) == [True, False]  # step 3 builds on a wrong value
    assert grade_steps(EXPRESSION, ["Step 1: 4+3=7", "7*2=14"]) == [False]  # operands in another order
    assert every_step_right(EXPRESSION, ["3+4=7", "7*2=14", "14-5=9"])
    assert not every_step_right(EXPRESSION, ["3+4=7", "7*2=14"])  # a step short
    assert not every_step_right(EXPRESSION, ["3+4=7", "7*2=14", "14-5=9", "9+1=10"])  # a step too many


def test_oracle_likelihoods_count_right_steps_until_the_first_wrong_one():
    tokenizer = build_char_tokenizer(step_token=True)
    contents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (RIGHT, WRONG_SECOND, EXTRA_STEP)]
    segments = [segment_completion(tokenizer, ids, FormatSpec()) for ids in contents]
    trainer = SimpleNamespace(processing_class=tokenizer, accelerator=SimpleNamespace(device="cpu"))
    batch = StepBatch(rows=[{"expression": EXPRESSION}] * 3, prompt_ids=[[]] * 3, completion_ids=contents,
                      segments=segments, answers=[[]] * 3)
    loglik = oracle_trainer_class().step_log_likelihoods(trainer, batch)
    expected = torch.tensor([[0.0, 1, 2, 3, float("nan")], [0, 1, 1, 1, float("nan")], [0, 1, 2, 3, 3]])
    assert torch.equal(loglik.isnan(), expected.isnan())
    assert torch.equal(loglik.nan_to_num(-1), expected.nan_to_num(-1))


def test_oracle_study_trains_its_arms_with_the_oracle(tmp_path, monkeypatch):
    """The benchmark adds its arm to a study; the study trains it through the oracle trainer (l_0 = 0, no model
    likelihood) and the study's own arm through `trl-mig train`, and summarises all of them."""
    from test_study import write_study

    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.chdir(tmp_path)  # the runs find `_common` beside the script, wherever they start
    path = write_study(tmp_path, arms={"mig": {"algorithm": "mig"}}, seeds=[0], jobs=1, reference_arm="mig")
    oracle_study(["--study", str(path), "--arms", "oracle_step"])
    out = Path(f"{tmp_path / 'study'}_oracle")
    results = json.loads((out / "study.json").read_text())
    assert set(results["summary"]) == {"mig", "oracle_step"}
    assert f"Reproduce: `python benchmarks/oracle_step_credit.py --study {path} --arms oracle_step`" in (
        out / "study.md"
    ).read_text()
    recipe = yaml.safe_load((out / "runs" / "oracle_step" / "learning_rate=0.001" / "seed0" / "recipe.yaml").read_text())
    assert recipe["mig_credit"] == "step" and recipe["algorithm"] == "mig"

    def prompt_only_likelihoods(arm):
        state = json.loads((out / "runs" / arm / "learning_rate=0.001" / "seed0" / "trainer_state.json").read_text())
        return [entry["mig/loglik_prompt_only"] for entry in state["log_history"] if "mig/loglik_prompt_only" in entry]

    assert prompt_only_likelihoods("oracle_step") and all(v == 0.0 for v in prompt_only_likelihoods("oracle_step"))
    assert prompt_only_likelihoods("mig") and all(v < 0.0 for v in prompt_only_likelihoods("mig"))


def test_reanalysis_pairs_seeds_and_gives_the_t_interval(tmp_path):
    """The paired re-analysis of a committed study: per-seed MIG - GRPO differences of the mean pass@1 over the
    evaluations after step 0, and the t-interval over the 3 seeds (t_{0.975,2} = 4.303)."""
    import shutil

    from reanalyse_studies import main as reanalyse

    shutil.copytree(ROOT / "docs" / "study" / "cpu_slip", tmp_path / "cpu_slip")
    shutil.copytree(ROOT / "docs" / "study" / "cpu_slip", tmp_path / "cpu_slip_oracle")  # left out: a repeat
    results = reanalyse(["--studies", str(tmp_path)])
    assert list(results) == ["cpu_slip"]
    study = json.loads((tmp_path / "cpu_slip" / "study.json").read_text())
    curves = {(r["arm"], r["seed"]): dict(r["curves"]["test"]) for r in study["runs"]
              if r["setting"] == study["selection"][r["arm"]]["setting"]}
    expected = []
    for seed in (0, 1, 2):
        steps = [s for s in curves[("grpo", seed)] if s > 0]
        expected.append(100 * sum(curves[("mig", seed)][s] - curves[("grpo", seed)][s] for s in steps) / len(steps))
    auc = results["cpu_slip"]["test"]["auc"]
    assert auc["per_seed"] == [round(v, 2) for v in expected]
    mean = sum(expected) / 3
    sd = (sum((v - mean) ** 2 for v in expected) / 2) ** 0.5
    assert auc["t95"] == [round(mean - 4.302653 * sd / 3**0.5, 2), round(mean + 4.302653 * sd / 3**0.5, 2)]
    assert (tmp_path / "reanalysis.md").read_text().count("| [cpu_slip]") == 1
def test_registered_comparisons_pair_every_comparator_and_match_the_committed_results(tmp_path):
    """The registered comparisons of the committed cpu_arms study: per-seed differences and t-intervals against each
    comparator at each level (deterministic: equal to the committed JSON), the registered verdict, the run-time ratios,
    and the compute-matched secondary (an arm is never compared with itself)."""
    from registered_comparisons import interpolate, main as registered, verdict

    assert verdict({"t_low": 0.1, "t_high": 2, "bootstrap_low": 0.2, "bootstrap_high": 3}, False) == "beats"
    assert verdict({"t_low": -0.1, "t_high": 2, "bootstrap_low": 0.2, "bootstrap_high": 3}, False) == "tie"
    assert verdict({"t_low": -3, "t_high": -1, "bootstrap_low": -2, "bootstrap_high": -0.5}, False) == "loses"
    assert verdict({"t_low": -3, "t_high": -1, "bootstrap_low": -2, "bootstrap_high": -0.5}, True) == "beats"
    assert interpolate([(0, 0.0), (10, 1.0), (20, 1.0)], 5) == 0.5 and interpolate([(0, 0.0), (10, 1.0)], 30) == 1.0

    study = ROOT / "docs" / "study" / "cpu_arms"
    result = registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "grpo", "--against", "grpo",
                         "grpo_partial_credit", "--confidence", "0.95", "0.9875", "--resamples", "200",
                         "--output", str(tmp_path / "out")])
    committed = {(r["arm"], r["comparator"], r["confidence"]): r
                 for r in json.loads((study / "registered_comparisons.json").read_text())["comparisons"]}
    rows = {(r["arm"], r["comparator"], r["confidence"]): r for r in result["comparisons"]}
    assert ("grpo", "grpo", 0.95) not in rows and len(rows) == 6  # an arm is not compared with itself
    for key in [("mig_failure_scaled", c, level) for c in ("grpo", "grpo_partial_credit") for level in (0.95, 0.9875)]:
        for field in ("per_seed", "mean", "t_low", "t_high"):
            assert rows[key][field] == committed[key][field], (key, field)
    assert rows[("mig_failure_scaled", "grpo", 0.95)]["t_low"] > 0  # the committed per-step result
    ratios = {(r["arm"], r["comparator"]): r for r in result["time_ratios"]}
    seconds = result["seconds"]
    assert ("grpo", "grpo") not in ratios and len(ratios) == 3
    seed = next(iter(seconds["grpo"]["per_seed"]))
    expected = seconds["mig_failure_scaled"]["per_seed"][seed] / seconds["grpo"]["per_seed"][seed]
    assert ratios[("mig_failure_scaled", "grpo")]["time_ratio_per_seed"][str(seed)] == round(expected, 3)
    matched = {(r["arm"], r["comparator"]): r for r in result["compute_matched"]}
    assert ("grpo", "grpo") not in matched and set(matched[("grpo", "grpo_partial_credit")]["per_seed"]) == {
        "0", "1", "2", "3", "4"}
    report = (tmp_path / "out.md").read_text()
    assert "| mig_failure_scaled - grpo | 95.00 % |" in report and "Secondary, defined after the study ran" in report
    registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "--against", "grpo", "--resamples", "20",
                "--output", str(tmp_path / "registered"), "--compute-matched-registered"])
    assert "Registered with the study: the primary at equal training" in (tmp_path / "registered.md").read_text()
    assert json.loads((tmp_path / "registered.json").read_text())["compute_matched_registered"] is True
    assert "Secondary, defined after the study ran: the primary at equal training time with the arm's cost" in (
        tmp_path / "registered.md").read_text()
    registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "--against", "grpo", "--resamples", "20",
                "--output", str(tmp_path / "pooled"), "--pooled-cost-registered"])
    report = (tmp_path / "pooled.md").read_text()
    assert "Registered with the study: the primary at equal training time with the arm's cost" in report
    assert "Secondary, registered as such: the primary at equal training wall-clock time" in report
    with pytest.raises(SystemExit):  # one reading decides
        registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "--against", "grpo", "--output",
                    str(tmp_path / "both"), "--pooled-cost-registered", "--compute-matched-registered"])
    # a cost measured elsewhere: a projection, labelled so; at R = 1 equal time is equal steps
    given = registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "--against", "grpo",
                        "--resamples", "20", "--output", str(tmp_path / "given"), "--cost-ratio", "1.0", "1.02"])
    (row,) = given["compute_matched_at_pooled_cost"]
    (per_step,) = [r for r in given["comparisons"] if r["confidence"] == 0.95]
    assert row["cost_given"] and row["cost_ratio"] == 1.0 and row["cost_ratio_t95_high"] == 1.02
    assert row["mean"] == pytest.approx(per_step["mean"], abs=0.05)
    assert "Projection, not a measurement" in (tmp_path / "given.md").read_text()
    with pytest.raises(SystemExit):  # no registration declared a projection
        registered([str(study / "study.json"), "--arms", "mig_failure_scaled", "--against", "grpo", "--output",
                    str(tmp_path / "p"), "--cost-ratio", "1.0", "1.02", "--pooled-cost-registered"])


# ------------------------------------------------------------------------------------------------ step benchmark
STEP_SUMMARY_KEYS = {
    "preset", "time_ratio", "memory_ratio", "grpo_s", "mig_s", "batch", "completion_length", "tokenizer",
    "trl_forwards", "per_cycle", "beta", "mig_likelihood_model", "mig_scores_with_reference_model",
}
# the no-grad forwards each preset makes TRL run at every generation (old-logp, reference)
EXPECTED_FORWARDS = {
    "default": (False, False),
    "old_logps": (True, False),
    "iterations2": (True, False),
    "reference": (False, True),
}


def positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize(
    "preset, tokenizer",
    [("default", "char"), ("old_logps", "byte_bpe"), ("iterations2", "metaspace_unigram"), ("reference", "char")],
)
def test_step_benchmark_preset_runs_the_forwards_it_names(preset, tokenizer, capsys):
    """Each preset's smoke run ends with one JSON line; TRL ran the no-grad forwards the preset is about (its buffered
    micro-batches carry `old_per_token_logps` / `ref_per_token_logps`), one generation per timed cycle."""
    bench_step.main(["--quick", "--preset", preset, "--tokenizer", tokenizer, "--no-memory", "--repeats", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert STEP_SUMMARY_KEYS <= set(summary)
    assert (summary["preset"], summary["tokenizer"]) == (preset, tokenizer)
    assert positive_finite(summary["grpo_s"]) and positive_finite(summary["mig_s"])
    assert positive_finite(summary["time_ratio"]) and summary["memory_ratio"] is None
    old_logps, reference = EXPECTED_FORWARDS[preset]
    no_grad = {}
    for variant in ("grpo", "mig"):
        assert summary["trl_forwards"][variant] == {"old_per_token_logps": old_logps, "ref_per_token_logps": reference}
        no_grad[variant] = summary["per_cycle"][variant].pop("no_grad_tokens")
        assert summary["per_cycle"][variant] == {
            "generations": 1.0, "training_steps": float(summary["batch"]["training_steps_per_cycle"])
        }
    # GRPO runs a no-grad forward outside generation only where TRL needs one; MIG always scores (fused or not)
    assert (no_grad["grpo"] > 0) == (old_logps or reference) and no_grad["mig"] > 0
    ratio = summary["no_grad_token_ratio"]
    assert ratio is None if preset == "default" else ratio == pytest.approx(no_grad["mig"] / no_grad["grpo"], 1e-2)
    assert summary["batch"]["training_steps_per_cycle"] == (4 if preset == "iterations2" else 2)
    assert summary["mig_scores_with_reference_model"] == (preset == "reference")


def test_step_benchmark_profile_names_mig_stages(tmp_path, capsys):
    """`--profile FILE` profiles one more cycle of each trainer: the MIG section lists trl-mig's named stages (step
    batch, scoring, credit), the GRPO section none, both an operator table; with `--preset all` one file per preset."""
    path = tmp_path / "profile.txt"
    bench_step.main(["--quick", "--preset", "default", "--no-memory", "--repeats", "1", "--profile", str(path)])
    grpo, mig = path.read_text().split("## mig: ")
    assert grpo.startswith("## grpo: one cycle") and "mig/" not in grpo and "self_cpu_time_total" in grpo
    stages = [line.split()[0] for line in mig.split("operators by")[0].splitlines() if line.startswith("  mig/")]
    assert sorted(stages) == ["mig/compose_credit", "mig/step_batch", "mig/step_log_likelihoods"]
    assert "Self CPU" in mig
    args = bench_step.parse_args(["--preset", "all", "--profile", "out/p.txt"])
    assert bench_step.profile_path(args, "old_logps") == "out/p_old_logps.txt"


def test_step_benchmark_all_runs_every_preset_then_a_table(monkeypatch, capsys):
    """`--preset all` runs the four presets in order, then one markdown row per preset."""
    def fake_run(name, args, raw_argv):
        forwards = dict(zip(("old_per_token_logps", "ref_per_token_logps"), EXPECTED_FORWARDS[name]))
        summary = {"preset": name, "trl_forwards": {"grpo": forwards}, "completion_length": args.completion_length,
                   "batch": bench_step.batch_plan(args, bench_step.PRESETS[name]), "tokenizer": args.tokenizer,
                   "grpo_s": 1.0, "mig_s": 1.1, "time_ratio": 1.1, "memory_ratio": None}
        print(json.dumps(summary))
        return summary

    monkeypatch.setattr(bench_step, "run_preset", fake_run)
    summaries = bench_step.main(["--quick", "--preset", "all"])
    assert [s["preset"] for s in summaries] == ["default", "old_logps", "iterations2", "reference"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| default", "none"], ["| old_logps", "old-logp"], ["| iterations2", "old-logp"], ["| reference", "reference"]
    ]
    assert all(row.endswith("| 1.100 | n/a |") for row in rows)


def test_step_benchmark_memory_worker_reports_its_peak(capsys):
    """The CPU memory worker (run here in the test's process; the benchmark starts one process per variant) builds
    the preset's trainer, reference model included, and reports its RSS before and its peak over the cycles."""
    bench_step.main(["--quick", "--preset", "reference", "--worker", "mig"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["variant"] == "mig" and isinstance(report["peak_is_steps_only"], bool)
    assert report["peak_rss_mb"] >= report["ready_rss_mb"] > 0 and report["import_rss_mb"] > 0


def test_step_benchmark_byte_bpe_completions_carry_multi_byte_symbols():
    """With byte-level BPE every step holds a math symbol (2-3 UTF-8 bytes), some spread over byte tokens; the
    template still gives each completion its K steps and exactly L tokens."""
    tokenizer = tiny_tokenizer("byte_bpe")
    symbols = bench_step.encodable_symbols(tokenizer)
    assert "→" in symbols and len(tokenizer("→", add_special_tokens=False)["input_ids"]) == 3  # not in the corpus
    generator = torch.Generator().manual_seed(0)
    plans = bench_step.template_plans(tokenizer, ["52", "17"], 64, 3, generator, symbols)
    free = torch.tensor(bench_step.free_token_ids(tokenizer))
    completions = torch.where(plans >= 0, plans, free[torch.randint(0, free.numel(), plans.shape)])
    assert completions.shape == (2, 64)
    for ids in completions.tolist():
        text = tokenizer.decode(ids)
        segments = segment_completion(tokenizer, ids, FormatSpec())
        steps = text.count("### Step")
        assert segments.num_steps == steps >= 1
        assert sum(text.count(symbol) for symbol in symbols) >= steps and "\ufffd" not in text
def test_host_benchmark_batches_have_the_asked_length_and_steps():
    for kind in TOKENIZER_KINDS:
        batch = make_batch(kind, size=3, length=96, steps=5, seed=0)
        assert [len(ids) for ids in batch.completion_ids] == [96] * 3
        segments = [segment_completion(batch.tokenizer, ids, batch.spec) for ids in batch.completion_ids]
        assert [s.num_steps for s in segments] == [5] * 3 and all(s.layout.well_formed for s in segments)


def test_host_benchmark_quick_prints_the_table_and_a_json_line(capsys):
    summary = host_benchmark(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == summary
    assert [case["tokenizer"] for case in summary["cases"]] == list(TOKENIZER_KINDS)
    assert all(case["segment_ms"] > 0 for case in summary["cases"])
    assert sum(line.startswith("| ") for line in lines) == 1 + len(TOKENIZER_KINDS)  # header and one row per case


def test_step_benchmark_scaffold_reaches_the_mig_config(monkeypatch, capsys):
    """`--scaffold` with a written \\n sets MIGConfig.mig_scaffold (a newline) and is recorded in the JSON line."""
    scaffolds = []
    build = bench_step.build_trainer

    def recording_build(variant, *args, **kwargs):
        trainer = build(variant, *args, **kwargs)
        scaffolds.append((variant, getattr(trainer.args, "mig_scaffold", None)))
        return trainer

    monkeypatch.setattr(bench_step, "build_trainer", recording_build)
    bench_step.main(["--quick", "--no-memory", "--repeats", "1", "--scaffold", "</think>\\n<answer>"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scaffold"] == "</think>\\n<answer>"
    assert ("mig", "</think>\n<answer>") in scaffolds and ("grpo", None) in scaffolds


def test_compute_matched_at_pooled_cost_reads_the_arm_at_the_comparators_time():
    """With the arm's cost R measured over all seeds, its curve is read at step s / R: an arm twice as slow (R = 2)
    is read at steps 5 and 10 for the comparator's 10 and 20; a run's own timing does not move its seed's value."""
    from registered_comparisons import compute_matched_at_pooled_cost, per_evaluation_differences

    def run(seed, seconds, mid):
        return {"seed": seed, "compute": [[0, 0.0, 0], [10, seconds / 2, 10], [20, seconds, 20]],
                "curves": {"test": [[0, 0.0], [10, mid], [20, 1.0]]}}

    cells = {"slow": [run(0, 150, 0.6), run(1, 250, 0.7), run(2, 200, 0.8)],  # 600 s against 300 s: R = 2
             "fast": [run(0, 100, 0.5), run(1, 100, 0.5), run(2, 100, 0.5)]}
    (row,) = compute_matched_at_pooled_cost(cells, ["slow"], ["fast"], {"split": "test", "steps": [10, 20]})
    assert row["cost_ratio"] == 2.0
    # seed 0: the slow arm at steps 5 and 10 is 0.3 and 0.6 (mean 0.45) against the fast arm's 0.5 and 1.0 (0.75)
    assert row["per_seed"] == {"0": -30.0, "1": -22.5, "2": -15.0}  # not moved by seeds 0 and 1's own 1.5x and 2.5x
    assert row["mean"] == -22.5 and row["t95"][0] < -22.5 < row["t95"][1]
    assert row["cost_ratio_t95_high"] > 2.0 and row["mean_at_high_cost"] < row["mean"]
    assert row["t_intervals"] == {}  # 0.95 only: t95
    (wider,) = compute_matched_at_pooled_cost(cells, ["slow"], ["fast"], {"split": "test", "steps": [10, 20]},
                                              levels=[0.95, 0.99])
    low, high = wider["t_intervals"]["0.99"]  # sd 7.5 over 3 seeds: half-width t(0.995, 2) x 7.5 / sqrt(3) = 42.98
    assert (round(low, 2), round(high, 2)) == (-65.48, 20.48) and wider["per_seed"] == row["per_seed"]
    (steps,) = per_evaluation_differences(cells, ["slow"], ["fast"], "test")  # per step, no cost: +10/+20/+30 at 10
    assert steps["steps"] == {"10": {"mean": 20.0, "t95": [-4.84, 44.84]}, "20": {"mean": 0.0, "t95": [0.0, 0.0]}}
    cells["slow"][1] = {**cells["slow"][1], "curves": {"test": [[0, 0.0], [20, 1.0]]}}  # seed 1 has no step 10
    (steps,) = per_evaluation_differences(cells, ["slow"], ["fast"], "test")
    assert steps["steps"] == {"20": {"mean": 0.0, "t95": [0.0, 0.0]}}  # step 10 left out, not paired with step 20
    (same,) = compute_matched_at_pooled_cost({"a": cells["fast"], "b": cells["fast"]}, ["a"], ["b"],
                                             {"split": "test", "steps": [10, 20]})
    assert same["cost_ratio"] == 1.0 and same["per_seed"] == {"0": 0.0, "1": 0.0, "2": 0.0}


def test_registered_comparisons_pool_studies_without_common_seeds(tmp_path):
    """Several study.json files pool into one analysis: each arm at each study's selected setting, the per-seed
    differences of both, one interval over all seeds; studies that share a seed are refused."""
    from registered_comparisons import main as registered

    original = ROOT / "docs" / "study" / "cpu_arms" / "study.json"
    study = json.loads(original.read_text())
    study["runs"] = [{**run, "seed": run["seed"] + 5} for run in study["runs"]]  # the same runs as seeds 5-9
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(study))
    arguments = ["--arms", "mig_failure_scaled", "--against", "grpo", "--resamples", "50"]
    alone = registered([str(original), *arguments, "--output", str(tmp_path / "alone")])
    both = registered([str(original), str(shifted), *arguments, "--output", str(tmp_path / "both")])
    (single,), (pooled,) = alone["comparisons"], both["comparisons"]
    assert sorted(pooled["per_seed"]) == sorted(str(s) for s in range(10))
    assert {s: pooled["per_seed"][str(int(s) + 5)] for s in single["per_seed"]} == single["per_seed"]
    assert pooled["mean"] == pytest.approx(single["mean"])
    assert pooled["t_high"] - pooled["t_low"] < single["t_high"] - single["t_low"]  # 10 seeds, not 5
    assert both["pooled_from"] == [str(original), str(shifted)]
    assert both["selection"]["grpo"].count("learning_rate") == 2
    with pytest.raises(SystemExit, match="share seeds"):
        registered([str(original), str(original), *arguments, "--output", str(tmp_path / "twice")])


def test_registered_comparisons_read_a_pilot_with_an_exploratory_metric(tmp_path):
    """A study that declared no primary (a pilot) is compared on a metric given after it ran, labelled exploratory;
    the same metric gives the same differences as the declared one; a study with a primary, or a metric on a split
    the runs lack, is refused."""
    from registered_comparisons import main as registered

    original = ROOT / "docs" / "study" / "cpu_arms" / "study.json"
    study = json.loads(original.read_text())
    declared = study["config"]["primary"]
    pilot = tmp_path / "pilot.json"
    pilot.write_text(json.dumps({**study, "config": {**study["config"], "primary": None}, "primary": {}}))
    arguments = ["--arms", "mig_failure_scaled", "--against", "grpo", "--resamples", "50"]
    with pytest.raises(SystemExit, match="no primary metric"):
        registered([str(pilot), *arguments, "--output", str(tmp_path / "none")])
    given = registered([str(pilot), *arguments, "--exploratory-primary", json.dumps(declared),
                        "--output", str(tmp_path / "pilot_comparisons")])
    reference = registered([str(original), *arguments, "--output", str(tmp_path / "declared")])
    assert given["exploratory"] and not reference["exploratory"]
    assert given["comparisons"][0]["per_seed"] == reference["comparisons"][0]["per_seed"]
    difference = given["arm_means"]["mig_failure_scaled"] - given["arm_means"]["grpo"]
    assert difference == pytest.approx(given["comparisons"][0]["mean"], abs=1e-3)
    assert (tmp_path / "pilot_comparisons.md").read_text().startswith("# Exploratory comparisons")
    with pytest.raises(SystemExit, match="declares a primary"):
        registered([str(original), *arguments, "--exploratory-primary", json.dumps(declared),
                    "--output", str(tmp_path / "both")])
    with pytest.raises(SystemExit, match="primary.split"):
        registered([str(pilot), *arguments, "--exploratory-primary", json.dumps({**declared, "split": "train"}),
                    "--output", str(tmp_path / "bad")])


def test_reward_spread_reads_every_logged_window_of_every_run(tmp_path):
    """Per run, the logged `frac_reward_zero_std` of each window in order; per arm, the window means over seeds and
    the mean over all windows; a folder without runs is refused with its path."""
    from reward_spread import main as reward_spread

    logs = {("grpo", 0): [0.8, 0.6], ("grpo", 1): [0.6, 0.4], ("mig", 0): [0.5, 0.5]}
    for (arm, seed), values in logs.items():
        folder = tmp_path / "runs" / arm / "default" / f"seed{seed}"
        folder.mkdir(parents=True)
        lines = ["Tokenizing train dataset: 100%", *(str({"loss": "0.1", "frac_reward_zero_std": str(v)}) for v in values),
                 str({"train_runtime": 12.0})]
        (folder / "train.log").write_text("\n".join(lines) + "\n")
    result = reward_spread([str(tmp_path), "--output", str(tmp_path / "spread.json")])
    assert {(r["arm"], r["seed"]): r["frac_reward_zero_std"] for r in result["runs"]} == logs
    assert result["arms"]["grpo"] == {"seeds": 2, "mean_per_window": [0.7, 0.5], "mean": 0.6}
    assert result["arms"]["mig"]["mean"] == 0.5
    assert json.loads((tmp_path / "spread.json").read_text())["arms"] == result["arms"]
    with pytest.raises(SystemExit, match="No runs"):
        reward_spread([str(tmp_path / "runs"), "--output", str(tmp_path / "none.json")])
    (tmp_path / "runs" / "mig" / "default" / "seed0" / "train.log").write_text("{'train_runtime': 1.0}\n")
    with pytest.raises(SystemExit, match="Arm 'mig' logged no"):
        reward_spread([str(tmp_path), "--output", str(tmp_path / "none.json")])


def test_run_costs_pairs_runs_by_seed(tmp_path, capsys):
    """Per seed, the arm's run and training seconds over the comparator's; with an earlier study, the same seeds'
    ratios there and the change; seeds one arm lacks are left out."""
    def run(arm, seed, seconds, train):
        return {"arm": arm, "seed": seed, "seconds": seconds, "compute": [[0, 0.0, 0], [20, train, 100]]}

    now = {"runs": [run("grpo", 0, 100, 80), run("mig", 0, 110, 90), run("grpo", 1, 100, 80),
                    run("mig", 1, 104, 84), run("grpo", 2, 100, 80)]}
    before = {"runs": [run("grpo", 0, 100, 80), run("mig", 0, 120, 100), run("grpo", 1, 50, 40),
                       run("mig", 1, 60, 50), run("mig", 9, 1, 1), run("grpo", 9, 1, 1)]}
    paths = []
    for name, study in (("now", now), ("before", before)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(study))
    result = run_costs([str(paths[0]), "--arm", "mig", "--against", "grpo", "--before", str(paths[1]),
                        "--output", str(tmp_path / "costs")])
    assert result["seeds"] == [0, 1] and result["per_seed"]["1"] == {"run": 1.04, "train": 1.05}
    assert result["run"]["mean"] == pytest.approx(1.07) and result["train"]["mean"] == pytest.approx(1.0875)
    assert result["before"]["seeds"] == [0, 1] and result["before"]["run"]["mean"] == pytest.approx(1.2)
    assert result["change"]["run"]["mean"] == pytest.approx(-0.13)
    assert json.loads((tmp_path / "costs.json").read_text()) == json.loads(capsys.readouterr().out.splitlines()[-1])
    with pytest.raises(SystemExit, match="no runs of"):
        run_costs([str(paths[0]), "--arm", "mig_rtg", "--against", "grpo"])
