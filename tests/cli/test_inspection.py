"""`inspect_completion`, its HTML page and PNG plot, the training-time columns and pages, and `trl-mig inspect`."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS, SCRIPT, SMALLEST_MODEL, SOLUTIONS, make_trainer, save_tiny_model, scripted_batch
from trl_mig import hwm_gains, inspect_completion
from trl_mig.cli.main import main
from trl_mig.render import render_html, render_png, write_html

PROMPT = "Compute (2+3)*4.\n"
GOOD = "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>"
WRONG = "<think>### Step 1\n2+3=6\n### Step 2\n6*4=24\n</think>\n<answer>24</answer>"
TRUNCATED = "<think>### Step 1\n2+3=5\n### Step 2\n5*4="
NO_STEPS = "<think></think>\n<answer>20</answer>"


@pytest.mark.parametrize("credit", ["trajectory", "step"])
def test_inspect_completion_equals_the_trainers_internal_values(tmp_path, char_tokenizer, credit):
    trainer = make_trainer(tmp_path, char_tokenizer, mig_weight=0.7, outcome_weight=1.3, mig_credit=credit)
    captured = []
    score = trainer.step_log_likelihoods

    def spy(batch):  # the trainer's own l_k, (B, K_max + 1)
        captured.append(score(batch))
        return captured[-1]

    trainer.step_log_likelihoods = spy
    output = trainer._generate_and_score_completions(scripted_batch())
    loglik = captured[0].cpu()
    gains = hwm_gains(loglik)[0]
    table = trainer._logs["extra"]
    for group, prompt in enumerate(PROMPTS):
        credits = inspect_completion(trainer.model, char_tokenizer, prompt, SCRIPT[prompt], SOLUTIONS[group],
                                     trainer.args)
        assert len(credits) == 4
        for j, item in enumerate(credits):
            row = group * 4 + j
            steps = item.num_steps
            assert steps == int(table["mig_steps"][row])
            assert item.loglik == pytest.approx(loglik[row, : steps + 1].tolist(), abs=1e-5)
            assert item.gains == pytest.approx(gains[row, :steps].tolist(), abs=1e-5)
            assert item.reward == pytest.approx(table["mig_gain"][row], abs=1e-5)
            # the completions table's per-step columns are the same numbers
            assert table["mig_loglik"][row] == pytest.approx(item.loglik, abs=1e-6)
            assert table["mig_gains"][row] == pytest.approx(item.gains, abs=1e-6)
            if credit == "trajectory":
                assert item.mig_advantage == pytest.approx(table["mig_advantage"][row], abs=1e-4)
            # every token of a step gets the advantage shown for the step, tokens outside the thought the other one
            length = int(output["completion_mask"][row].sum())
            advantages = output["advantages"][row, :length]
            for step in item.steps:
                lo, hi = step.token_span
                assert advantages[lo:hi].tolist() == pytest.approx([step.advantage] * (hi - lo), abs=1e-4), (row, step)
            first, last = item.steps[0].token_span[0], item.steps[-1].token_span[1]
            outside = torch.cat([advantages[:first], advantages[last:]])
            assert outside.tolist() == pytest.approx([item.outside_advantage] * outside.numel(), abs=1e-4)
            assert item.breakthroughs == [k + 1 for k in range(steps) if gains[row, k] > 0]
    assert [c.correct for c in inspect_completion(trainer.model, char_tokenizer, PROMPTS[0], SCRIPT[PROMPTS[0]],
                                                  SOLUTIONS[0], trainer.args)] == [1.0, 0.0, 0.0, 1.0]


def test_steps_text_and_spans_cover_the_thought(char_tokenizer, tiny_model):
    item = inspect_completion(tiny_model, char_tokenizer, PROMPT, GOOD, "20")
    assert [step.text for step in item.steps] == ["### Step 1\n2+3=5\n", "### Step 2\n5*4=20\n"]
    assert item.steps[0].char_span[0] == len("<think>") and item.thought_span == (7, GOOD.index("</think>"))
    assert [step.token_span for step in item.steps] == [(1, 18), (18, 36)]  # <think> is one token, then one a char
    assert item.watermark == [max(item.loglik[: k + 1]) for k in range(3)]
    assert item.outcome_advantage is None and all(step.advantage is None for step in item.steps)  # no group
    assert item.correct == 1.0 and item.answer == "20" and item.well_formed and not item.messages
    table = item.table()
    assert table.splitlines()[0].split() == ["step", "text", "l_k", "h_k", "g_k", "breakthrough"]
    assert "### Step 2 5*4=20" in table and f"{item.loglik[2]:+.3f}" in table


def test_no_steps_truncated_and_no_ground_truth_give_clear_messages(char_tokenizer, tiny_model):
    empty = inspect_completion(tiny_model, char_tokenizer, PROMPT, NO_STEPS, "20")
    assert empty.num_steps == 0 and empty.gains == [] and len(empty.loglik) == 1 and empty.reward == 0
    assert any(m.startswith("No steps") for m in empty.messages), empty.messages

    truncated = inspect_completion(tiny_model, char_tokenizer, PROMPT, TRUNCATED, "20")
    assert not truncated.think_closed and truncated.num_steps == 2 and truncated.answer is None
    assert any(m.startswith("Truncated") and "</think>" in m for m in truncated.messages), truncated.messages
    assert truncated.correct == 0.0

    for missing in (None, "", "  "):
        unscored = inspect_completion(tiny_model, char_tokenizer, PROMPT, GOOD, missing)
        assert unscored.loglik is None and unscored.reward is None and unscored.correct is None
        assert [step.loglik for step in unscored.steps] == [None, None] and unscored.breakthroughs == []
        assert any(m.startswith("No ground truth") for m in unscored.messages), unscored.messages
        assert "n/a" in unscored.table()

    # a group without a ground truth: outcome advantages only, no MIG advantage; the page and the plot still render
    group = inspect_completion(tiny_model, char_tokenizer, PROMPT, [GOOD, TRUNCATED, NO_STEPS], None)
    assert [c.mig_advantage for c in group] == [0.0, 0.0, 0.0]
    assert "No ground truth" in render_html([group])

    headerless = inspect_completion(tiny_model, char_tokenizer, PROMPT, "<think>2+3=5\n\n5*4=20</think>", "20")
    assert headerless.num_steps == 2 and any("fallback" in m for m in headerless.messages)
    accented = "<think>### Step 1\ncafé</think>"
    outside_vocabulary = inspect_completion(tiny_model, char_tokenizer, PROMPT, accented, "20")
    assert "<unk>" in outside_vocabulary.completion
    assert any("does not reproduce the given text" in m for m in outside_vocabulary.messages)
    with pytest.raises(TypeError, match="prompt must be text or a list of chat messages"):
        inspect_completion(tiny_model, char_tokenizer, 42, GOOD, "20")


def test_group_gives_the_trainers_advantages_for_chat_prompts(char_tokenizer, tiny_model):
    from trl_mig import MIGConfig

    config = MIGConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False, mig_weight=2.0,
                       reward_weights=[1.0, 0.5], num_generations=2, per_device_train_batch_size=2)
    messages = [{"role": "user", "content": PROMPT}]
    good, wrong = inspect_completion(tiny_model, char_tokenizer, messages, [GOOD, WRONG], ["20", "20.0"], config)
    assert good.prompt == char_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (good.outcome_reward, wrong.outcome_reward) == (1.5, 0.5)
    assert good.outcome_advantage == pytest.approx(0.7071, abs=1e-3)  # (1.5 - 1) / (std 0.7071 + 1e-4)
    assert good.solution == ["20", "20.0"]
    expected = good.outcome_advantage + 2.0 * good.mig_advantage
    assert [step.advantage for step in good.steps] == pytest.approx([expected] * 2, abs=1e-5)
    assert good.outside_advantage == pytest.approx(good.outcome_advantage, abs=1e-6)


class _Structure(HTMLParser):
    """Checks that every element is closed in order and collects the tooltips of the step spans."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "circle", "polyline"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.step_titles, self.text_of_steps = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "span" and "step" in attrs.get("class", "").split():
            self.step_titles.append(attrs.get("title", ""))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_page_is_well_formed_and_self_contained(char_tokenizer, tiny_model, tmp_path):
    group = inspect_completion(tiny_model, char_tokenizer, PROMPT, [GOOD, WRONG, GOOD, TRUNCATED], "20")
    other = inspect_completion(tiny_model, char_tokenizer, "Compute 1+1 <&>\n", ["<think>### Step 1\n1+1=2</think>"
                                                                                "<answer>2</answer>"], "2")
    path = write_html(tmp_path / "page" / "credit.html", [group, other], title="credit <of> & more")
    page = (tmp_path / "page" / "credit.html").read_text()
    assert path.endswith("credit.html") and page.startswith("<!DOCTYPE html>")
    checker = _Structure()
    checker.feed(page)
    checker.close()
    assert not checker.errors and checker.stack == [], (checker.errors, checker.stack)
    lowered = page.lower()
    for external in ("http://", "https://", "<script", "src=", "url(", "@import", "<link"):
        assert external not in lowered, external
    assert "credit &lt;of&gt; &amp; more" in page and "Compute 1+1 &lt;&amp;&gt;" in page
    # one tooltip per step of each distinct completion (the two GOOD completions share a card), with its numbers
    assert len(checker.step_titles) == 2 + 2 + 2 + 1
    first = checker.step_titles[0]
    step = group[0].steps[0]
    for expected in (f"l_1 = {step.loglik:+.3f}", f"h_1 = {step.watermark:+.3f}", f"g_1 = {step.gain:+.3f}",
                     f"advantage of its tokens = {step.advantage:+.3f}"):
        assert expected in first, (expected, first)
    assert "#1 = #3 (2 identical)" in page and "Truncated" in page
    # the shaded text is the completion itself, nothing added or lost
    card_text = page.split('<div class="text">', 1)[1].split("</div>", 1)[0]
    assert html.unescape(_strip_tags(card_text)) == GOOD


def _strip_tags(fragment: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", fragment)


def test_png_plot_is_a_valid_image(char_tokenizer, tiny_model, tmp_path):
    from PIL import Image

    group = inspect_completion(tiny_model, char_tokenizer, PROMPT, [GOOD, WRONG, TRUNCATED], "20")
    path = render_png(group, tmp_path / "plots" / "credit.png", title="credit")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
        assert len(set(image.convert("RGB").getdata())) > 20  # lines and text were drawn, not a blank canvas
    unscored = inspect_completion(tiny_model, char_tokenizer, PROMPT, GOOD, None)
    with Image.open(render_png([unscored], tmp_path / "empty.png")) as image:
        assert image.format == "PNG"


def test_training_logs_per_step_columns_and_writes_credit_pages(tmp_path, char_tokenizer):
    import pandas as pd

    trainer = make_trainer(tmp_path, char_tokenizer, log_completions=True, mig_inspect_html=True, max_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    table = pd.read_parquet(tmp_path / "completions" / "completions_00002.parquet")
    assert {"mig_loglik", "mig_gains", "mig_gain", "mig_steps"} <= set(table.columns)
    for _, row in table.iterrows():
        assert len(row["mig_loglik"]) == row["mig_steps"] + 1 and len(row["mig_gains"]) == row["mig_steps"]
        assert sum(row["mig_gains"]) == pytest.approx(row["mig_gain"], abs=1e-5)
    for step in (1, 2):
        page = (tmp_path / "mig_inspect" / f"step_{step:05d}.html").read_text()
        checker = _Structure()
        checker.feed(page)
        assert not checker.errors and checker.stack == []
        assert "Prompt 2" in page and "https://" not in page and "advantage of its tokens" in page
    credits = list(trainer._mig_credit_log)
    assert sorted(c.correct for c in credits) == [0.0, 0.0] + [1.0] * 6  # both groups of the last batch
    assert credits[0].outside_advantage is not None and credits[0].steps[0].advantage is not None
    trainer.model.eval()
    trainer._generate_and_score_completions(scripted_batch())  # an evaluation batch stays off the training pages
    assert list(trainer._mig_credit_log) == credits


def test_mig_inspect_html_is_off_by_default(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, max_steps=1)
    trainer.train()
    assert not (tmp_path / "mig_inspect").exists()
    assert len(trainer._logs["extra"]["mig_loglik"]) == 8  # the table's columns are there either way


# ------------------------------------------------------------------------------------------------------------ CLI
def test_inspect_command_with_given_completions(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", **SMALLEST_MODEL)
    page, plot, numbers = tmp_path / "out" / "page.html", tmp_path / "out" / "plot.png", tmp_path / "numbers.json"
    code = main(["inspect", "--model", str(folder), "--prompt", PROMPT, "--solution", "20", "--completion", GOOD,
                 WRONG, NO_STEPS, "--html", str(page), "--png", str(plot), "--json", str(numbers),
                 "--mig_credit", "step", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("step  text") == 3 and "breakthrough" in out and "No steps" in out
    assert page.read_text().startswith("<!DOCTYPE html>") and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(numbers.read_text())["completions"]
    assert [len(c["steps"]) for c in saved] == [2, 2, 0] and saved[0]["correct"] == 1.0
    assert saved[0]["mig_advantage"] is None and saved[0]["steps"][0]["mig_advantage"] is not None  # step credit


def test_inspect_command_samples_from_a_dataset_row(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", **SMALLEST_MODEL)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"Compute {a}+{a}.\n", "answer": str(2 * a)}) + "\n"
                            for a in (1, 2, 3)))
    common = ["inspect", "--model", str(folder), "--dataset", str(data), "--split", "train",
              "--prompt_column", "question", "--answer_column", "answer", "--device", "cpu",
              "--html", str(tmp_path / "p.html"), "--png", ""]
    code = main([*common, "--index", "1", "--num_samples", "3", "--max_new_tokens", "12", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Compute 2+2." in out and "ground truth: 4" in out and out.count("step  text") == 3
    assert not (tmp_path / "p.png").exists()

    code = main([*common, "--index", "7"])
    assert code == 2 and "--index 7 is out of range" in capsys.readouterr().err
    code = main(["inspect", "--model", str(folder)])
    assert code == 2 and "--dataset" in capsys.readouterr().err
    code = main([*common, "--temperature", "0", "--num_samples", "2"])
    assert code == 2 and "--temperature > 0" in capsys.readouterr().err
    code = main([*common, "--mig_weight", "-1"])
    assert code == 2 and "mig_weight must be a finite number >= 0" in capsys.readouterr().err


def test_inspect_command_reads_a_training_recipe(tmp_path, capsys):
    from trl_mig.cli.inspect import parse_inspect_args

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "mig.yaml")
    args, settings, builtin_args = parse_inspect_args(["--config", recipe, "--model", "m"])
    assert args.model == "m" and args.dataset == "builtin:arithmetic" and args.temperature == 0.7
    assert args.num_samples == 8 and args.max_new_tokens == 80
    assert settings.mig_scaffold == "</think>\n<answer>" and settings.reward_weights == [1.0, 0.2]
    assert settings.answer_match == "exact" and builtin_args.task_max_value == 10
    assert builtin_args.task_prompt == "expression" and builtin_args.tiny_step_token
    bad = tmp_path / "bad.yaml"
    bad.write_text("mig_wieght: 2.0\n")
    code = main(["inspect", "--config", str(bad), "--model", "m"])
    assert code == 2 and "mig_wieght" in capsys.readouterr().err


def test_image_prompts_and_vision_language_models_are_clear_errors(tmp_path, capsys, monkeypatch):
    """inspect scores text prompts only: an image row, a local VLM folder (also for `eval`) and a VLM passed to
    inspect_completion are refused with a message, not scored without their images."""
    from trl_mig.builtin.tiny import build_tiny_vlm

    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "cache"))
    folder = save_tiny_model(tmp_path / "model", **SMALLEST_MODEL)
    small = ["--task_train_size", "8", "--task_validation_size", "4", "--task_test_size", "4", "--task_ood_size", "4"]
    code = main(["inspect", "--model", str(folder), "--dataset", "builtin:visual", "--split", "test", "--index", "0",
                 "--device", "cpu", "--html", str(tmp_path / "p.html"), *small])
    err = capsys.readouterr().err
    assert code == 2 and "has images (column 'image')" in err and "text prompts only" in err

    vlm, processor = build_tiny_vlm("llava")
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    for command in (["inspect", "--prompt", PROMPT, "--solution", "20", "--completion", GOOD],
                    ["eval", "--dataset", "builtin:arithmetic", *small]):
        code = main([*command, "--model", str(tmp_path / "vlm"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and "is a vision-language model (llava)" in err, err
    with pytest.raises(ValueError, match="vision-language model"):
        inspect_completion(vlm, processor.tokenizer, PROMPT, GOOD, "20")


def test_without_matplotlib_render_png_is_a_clear_error_and_inspect_writes_the_page(tmp_path, capsys, monkeypatch):
    folder = save_tiny_model(tmp_path / "model", **SMALLEST_MODEL)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when it is not installed
    with pytest.raises(ImportError, match=r"render_png needs matplotlib: pip install 'trl-mig\[plots\]'") as error:
        render_png([], tmp_path / "plot.png")
    assert error.value.name == "matplotlib" and not (tmp_path / "plot.png").exists()

    page, plot = tmp_path / "page.html", tmp_path / "plot.png"
    code = main(["inspect", "--model", str(folder), "--prompt", PROMPT, "--solution", "20", "--completion", GOOD,
                 "--html", str(page), "--png", str(plot), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert page.read_text().startswith("<!DOCTYPE html>") and not plot.exists()
    [skipped] = [line for line in err.splitlines() if "plot skipped" in line]
    assert "pip install 'trl-mig[plots]'" in skipped and "[trl-mig] HTML page" in out


def test_importing_trl_mig_leaves_matplotlib_alone():
    """Importing the library (or the CLI) does not import matplotlib; drawing a plot uses no pyplot and keeps the
    backend the user chose."""
    script = (
        "import sys, trl_mig, trl_mig.cli.main, trl_mig.study\n"
        "print('matplotlib' in sys.modules)\n"
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "from trl_mig.render import render_png\n"
        "render_png([], sys.argv[1])\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        plot = Path(folder) / "plot.png"
        result = subprocess.run([sys.executable, "-c", script, str(plot)], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False", "svg", "False"]
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
