"""The built-in visual task (builtin:visual): scenes, questions and worked solutions, and MIG training on it."""

from __future__ import annotations

import re

import pytest

from trl_mig.builtin import BuiltinArguments, load_builtin_dataset
from trl_mig.builtin.visual import COLOURS, GRID, VisualTaskConfig, generate_visual_splits, sample_problem

SMALL = VisualTaskConfig(train_size=60, validation_size=20, test_size=20, ood_size=10, image_size=56)


def test_splits_are_deterministic_disjoint_and_ood_is_harder():
    first, again = generate_visual_splits(SMALL), generate_visual_splits(SMALL)
    assert [p.key for p in first["train"]] == [p.key for p in again["train"]]
    assert {name: len(rows) for name, rows in first.items()} == {"train": 60, "validation": 20, "test": 20, "ood": 10}
    keys = {name: {p.key for p in rows} for name, rows in first.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["test"] & keys["validation"]
    assert max(len(p.objects) for p in first["train"]) <= SMALL.max_objects
    assert min(len(p.objects) for p in first["ood"]) > SMALL.max_objects
    assert {p.question_type for p in first["train"]} == {"colour_count", "left_of", "not_colour"}
    # a split does not change when only it is asked for
    assert [p.key for p in generate_visual_splits(SMALL, ("test",))["test"]] == [p.key for p in first["test"]]


def independent_count(problem) -> int:
    """The answer, read from the question's words and the scene's objects (not from the solution's steps)."""
    question = problem.question()
    if match := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return sum(o.colour == match[1] for o in problem.objects)
    if match := re.fullmatch(r"How many (\w+) objects are left of the (\w+) (\w+)\?", question):
        anchors = [o for o in problem.objects if (o.colour, o.shape) == (match[2], match[3])]
        assert len(anchors) == 1, "the anchor object must be unique"
        return sum(o.colour == match[1] and o.column < anchors[0].column for o in problem.objects)
    match = re.fullmatch(r"How many (\w+)s are not (\w+)\?", question)
    return sum(o.shape == match[1] and o.colour != match[2] for o in problem.objects)


def test_worked_solutions_are_right_and_the_image_shows_the_scene():
    from trl_mig.rewards import AnswerAccuracyReward, StepFormatReward
    from trl_mig.segmentation import FormatSpec

    problems = generate_visual_splits(SMALL, ("train",))["train"]
    rows = [p.row(SMALL.image_size) for p in problems]
    spec = FormatSpec()
    accuracy, step_format = AnswerAccuracyReward(spec, "solution"), StepFormatReward(spec)
    completions = [row["gold_completion"] for row in rows]
    solutions = [row["solution"] for row in rows]
    assert accuracy(completions=completions, solution=solutions) == [1.0] * len(rows)
    assert step_format(completions=completions) == [1.0] * len(rows)
    for problem, row in zip(problems, rows):
        assert row["solution"] == str(independent_count(problem))
        steps = row["gold_completion"].count("### Step")
        assert steps == {"colour_count": 3, "left_of": 4, "not_colour": 3}[problem.question_type]
        # the pixel at each object's cell centre has the object's colour; empty cells show the background
        image, cell = row["image"], SMALL.image_size / GRID
        occupied = {(o.row, o.column): o for o in problem.objects}
        for r in range(1, GRID + 1):
            for c in range(1, GRID + 1):
                pixel = image.getpixel((int((c - 0.5) * cell), int((r - 0.5) * cell + cell * 0.1)))
                expected = COLOURS[occupied[(r, c)].colour] if (r, c) in occupied else (245, 245, 245)
                assert pixel == expected, (r, c)
    # counts are spread, not mostly zero
    answers = [int(s) for s in solutions]
    assert sum(a == 0 for a in answers) < len(answers) / 2 and max(answers) >= 2


def test_left_of_needs_a_unique_anchor():
    import random

    rng = random.Random(0)
    for _ in range(300):
        problem = sample_problem(rng, rng.randint(2, 8))
        if problem.question_type == "left_of":
            assert sum((o.colour, o.shape) == (problem.anchor_colour, problem.shape) for o in problem.objects) == 1


def test_builtin_visual_dataset_and_validation():
    args = BuiltinArguments(task_train_size=6, task_validation_size=2, task_test_size=3, task_ood_size=2,
                            visual_image_size=56)
    data = load_builtin_dataset("builtin:visual", args)
    assert {name: len(split) for name, split in data.items()} == {"train": 6, "validation": 2, "test": 3, "ood": 2}
    row = data["train"][0]
    assert row["image"].size == (56, 56) and row["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="min_objects"):
        VisualTaskConfig(min_objects=1)
    with pytest.raises(ValueError, match="at most 16 objects"):
        VisualTaskConfig(max_objects=14)


def test_mig_training_on_the_visual_task(tmp_path):
    """The smoke demo: a tiny Qwen2-VL-style model, LoRA, two MIG steps on builtin:visual images."""
    import torch
    from peft import LoraConfig

    from helpers import cpu_config
    from trl_mig import MIGGRPOTrainer
    from trl_mig.builtin import SCAFFOLD
    from trl_mig.builtin.tiny import build_tiny_vlm

    args = BuiltinArguments(task_train_size=8, task_validation_size=0, task_test_size=0, task_ood_size=0,
                            visual_image_size=56)
    train = load_builtin_dataset("builtin:visual", args)["train"]
    model, processor = build_tiny_vlm("qwen2_vl")
    trainer = MIGGRPOTrainer(
        model,
        args=cpu_config(tmp_path, max_completion_length=16, learning_rate=5e-2, mig_scaffold=SCAFFOLD),
        train_dataset=train,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters() if p.requires_grad)
    logged = [entry for entry in trainer.state.log_history if "mig/loglik_prompt_only" in entry]
    assert len(logged) == 2 and all(entry["mig/unscorable_frac"] == 0 for entry in logged)
