"""Image datasets through the CLI: column mapping (image column, question, answer), local files, and a VLM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from trl_mig.cli.main import main
from trl_mig.cli.data import DataArguments, extract_answer_tag, load_dataset_dict, prepare_dataset
from trl_mig.cli.errors import CLIError

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (235, 200, 30)]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MIG_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.chdir(tmp_path)


def clevr_like_jsonl(folder: Path, rows: int = 4, many: bool = False) -> Path:
    """A CLEVR-style JSONL (question, image path relative to the file, '<answer> N </answer>') with its images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        names = []
        for j in range(2 if many else 1):
            name = f"images/scene_{i}_{j}.png"
            Image.new("RGB", (40 + 8 * i, 32), COLOURS[(i + j) % 4]).save(folder / name)
            names.append(name)
        lines.append({"question": f"How many cubes? ({i})", "image_path": names if many else names[0],
                      "answer": f"<answer> {i + 1} </answer>"})
    path = folder / "clevr_like.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def mapped(path, **fields):
    args = DataArguments(prompt_column="question", answer_column="answer", answer_extraction="answer_tag", **fields)
    data = load_dataset_dict(str(path))
    return prepare_dataset(data["train"], args, "solution", "train", data_dir=str(Path(path).parent))


def test_answer_tag_extraction():
    assert extract_answer_tag("<answer> 3 </answer>") == "3"
    assert extract_answer_tag("think <answer>1</answer> then <answer>7</answer>") == "7"
    assert extract_answer_tag(" 5 ") == "5" and extract_answer_tag(None) is None


def test_image_paths_become_an_image_column_of_chat_prompts(tmp_path):
    dataset = mapped(clevr_like_jsonl(tmp_path), image_column="image_path")
    assert "image" in dataset.column_names and "image_path" not in dataset.column_names
    row = dataset[2]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (56, 32)
    assert row["image"].getpixel((0, 0)) == COLOURS[2]
    assert row["prompt"] == [{"role": "user", "content": "How many cubes? (2)"}]
    assert dataset["solution"] == ["1", "2", "3", "4"]


def test_lists_of_images_and_an_image_root(tmp_path):
    data_dir = tmp_path / "data"
    path = clevr_like_jsonl(data_dir, many=True)
    moved = tmp_path / "elsewhere" / "clevr.jsonl"  # relative paths no longer start at the file's folder
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    with pytest.raises(CLIError, match=r"'images/scene_0_0.png'.*`image_column`.*image_root"):
        mapped(moved, image_column="image_path")
    dataset = mapped(moved, image_column="image_path", image_root=str(data_dir))
    assert "images" in dataset.column_names and "image" not in dataset.column_names
    assert [image.getpixel((0, 0)) for image in dataset[1]["images"]] == [COLOURS[1], COLOURS[2]]


def test_a_dataset_saved_to_disk_with_an_image_feature(tmp_path):
    from datasets import Dataset

    rows = [{"q": f"Count ({i})", "picture": Image.new("RGB", (16, 16), COLOURS[i]), "a": str(i),
             "image": "a stale column GRPOTrainer must not read"} for i in range(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    data = load_dataset_dict(str(tmp_path / "saved"))
    args = DataArguments(prompt_column="q", answer_column="a", image_column="picture")
    dataset = prepare_dataset(data["train"], args, "solution", "saved")
    assert set(dataset.column_names) >= {"prompt", "solution", "image"} and "picture" not in dataset.column_names
    assert dataset[1]["image"].getpixel((3, 3)) == COLOURS[1]


def test_bad_image_columns_are_clear_errors(tmp_path):
    path = clevr_like_jsonl(tmp_path)
    with pytest.raises(CLIError, match=r"no column 'img' \(`image_column`\)"):
        mapped(path, image_column="img")
    with pytest.raises(CLIError, match=r"'question' \(`image_column`\).*is not a file"):
        mapped(path, image_column="question")
    with pytest.raises(CLIError, match=r"'answer' \(`image_column`\)"):
        # the answer column holds text that is no path either
        mapped(path, image_column="answer")


def test_train_a_local_vlm_on_a_local_clevr_like_jsonl(tmp_path, capsys):
    """The recipe's route on local files: a LLaVA-style VLM folder, images by path, LoRA, one MIG step."""
    from trl_mig.builtin.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm("llava")
    model_dir = tmp_path / "tiny-vlm"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = clevr_like_jsonl(tmp_path / "clevr")
    out = tmp_path / "out"
    args = [
        "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
        "--prompt_column", "question", "--image_column", "image_path", "--answer_column", "answer",
        "--answer_extraction", "answer_tag", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(out), "--use_cpu", "true",
        "--bf16", "false", "--gradient_checkpointing", "false", "--max_steps", "1", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "12",
        "--report_to", "none", "--save_strategy", "no", "--dtype", "float32",
    ]
    code = main(args)
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    assert (out / "adapter_config.json").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("mig/loglik_prompt_only" in entry for entry in history)

    # the text-only accuracy eval would ignore the images: refused, naming the split
    code = main([*args, "--accuracy_eval_splits", "train", "--output_dir", str(tmp_path / "o2")])
    assert code == 2 and "has images" in capsys.readouterr().err


def test_a_local_vlm_folder_loads_its_processor_with_the_saved_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast, ProcessorMixin

    from trl_mig.builtin.tiny import build_tiny_vlm
    from trl_mig.cli.models import load_processing_class

    _, processor = build_tiny_vlm("llava")
    processor.save_pretrained(tmp_path)
    loaded = load_processing_class(str(tmp_path))
    assert isinstance(loaded, ProcessorMixin) and isinstance(loaded.tokenizer, PreTrainedTokenizerFast)
    assert loaded.tokenizer.padding_side == "left"
    text = "<|user|><image>How many?\n<|assistant|><think>### Step 1\n"
    assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*-VL-*/**/*.yaml")),
                         ids=lambda p: p.name)
def test_vlm_recipe_column_mapping_on_local_rows(recipe):
    """The recipe's mapping (image column, question, '<answer> N </answer>') on local rows with its dataset's
    columns: no download."""
    import torch
    from datasets import Dataset

    from trl_mig.cli.recipes import make_train_parser, parse_recipe_args

    extra = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    (script_args, _, training_args, _, _), _ = parse_recipe_args(
        make_train_parser(), ["--config", str(recipe), *extra], "the train dataclasses"
    )
    rows = Dataset.from_list(
        [{"image": Image.new("RGB", (48, 32), COLOURS[i]), "problem": f"How many spheres are there? ({i})",
          "solution": f"<answer> {i + 2} </answer>"} for i in range(3)]
    )
    dataset = prepare_dataset(rows, script_args, training_args.solution_column, "local rows")
    assert dataset["solution"] == ["2", "3", "4"]
    row = dataset[1]
    assert row["image"].getpixel((0, 0)) == COLOURS[1]
    assert row["prompt"][0]["role"] == "system" and "### Step 1" in row["prompt"][0]["content"]
    assert row["prompt"][1] == {"role": "user", "content": "How many spheres are there? (1)"}


def test_eval_scores_visual_gold_solutions_and_refuses_text_only_generation(tmp_path, capsys):
    sizes = ["--task_train_size", "12", "--task_validation_size", "0", "--task_test_size", "12", "--task_ood_size", "6"]
    report = tmp_path / "visual.json"
    code = main(["eval", "--dataset", "builtin:visual", "--completions_column", "gold_completion", "--splits", "test",
                 "ood", *sizes, "--output_file", str(report)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(report.read_text())["results"]
    assert results["test"]["pass@1"] == 1.0 and results["ood"]["pass@1"] == 1.0
    assert results["test"]["format_rate"] == 1.0
    code = main(["eval", "--dataset", "builtin:visual", "--model", "builtin:tiny-qwen2-scratch", *sizes])
    assert code == 2 and "has images" in capsys.readouterr().err


def test_visual_demo_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    """recipes/demo/visual.yaml, shrunk: the built-in tiny VLM (built into the cache, then reused) on builtin:visual."""
    from transformers import ProcessorMixin

    from trl_mig.builtin import BuiltinArguments, resolve_builtin_model
    from trl_mig.cli.models import load_processing_class

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the recipe's env: restored after the test
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "visual.yaml")
    out = tmp_path / "visual"
    code = main(["train", "--config", recipe, "--output_dir", str(out), "--max_steps", "2", "--task_train_size", "16",
                 "--per_device_train_batch_size", "8", "--max_completion_length", "16", "--visual_image_size", "56",
                 "--builtin_cache_dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["model"] == "builtin:tiny-llava-scratch" and summary["global_steps"] == 2
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["mig/unscorable_frac"] for entry in history if "mig/unscorable_frac" in entry] == [0.0, 0.0]
    # the cached model folder holds the processor: the CLI trained with images, not with a bare tokenizer
    path = resolve_builtin_model("builtin:tiny-llava-scratch", BuiltinArguments(
        builtin_cache_dir=str(tmp_path / "cache"), tiny_hidden_size=64, tiny_num_layers=2))
    assert isinstance(load_processing_class(path), ProcessorMixin)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # built once, reused
