"""The credit diagnostics in benchmarks/: step grading against the gold solution and the oracle step-credit study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import every_step_right, grade_steps  # noqa: E402
from oracle_step_credit import main as oracle_study  # noqa: E402
from oracle_step_credit import oracle_trainer_class  # noqa: E402

from trl_mig import StepBatch  # noqa: E402
from trl_mig.segmentation import FormatSpec, segment_completion  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer  # noqa: E402

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
