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
from bench_host import main as host_benchmark  # noqa: E402
from bench_host import make_batch  # noqa: E402
from oracle_step_credit import main as oracle_study  # noqa: E402
from oracle_step_credit import oracle_trainer_class  # noqa: E402

from trl_mig import StepBatch  # noqa: E402
from trl_mig.segmentation import FormatSpec, segment_completion  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer  # noqa: E402
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
