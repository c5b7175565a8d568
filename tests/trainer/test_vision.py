"""Vision-language models: the likelihood pass conditions on the prompt's images, exactly (tiny local VLMs)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from PIL import Image

from trl_mig.multimodal import split_multimodal_inputs
from trl_mig.scoring import (
    TOKEN_ALIGNED_FIELDS,
    ScoringItem,
    StepLikelihoodScorer,
    build_block_batch,
    encode_answer,
    multimodal_block_unsupported_reason,
)
from trl_mig.builtin.tiny import build_tiny_vlm

SCAFFOLD = "</think>\n<answer>"
ARCHITECTURES = ["qwen2_vl", "qwen2_5_vl", "llava", "gemma3"]
BLOCK_ARCHITECTURES = ["qwen2_vl", "qwen2_5_vl", "llava"]  # gemma3's image tokens attend both ways: prefix only


@pytest.fixture(scope="session")
def tiny_vlms():
    """One tiny model + processor per architecture, built once (tests only read them)."""
    return {name: build_tiny_vlm(name) for name in ARCHITECTURES}


def scene(color, size=(56, 56), dot=None):
    image = Image.new("RGB", size, color)
    if dot is not None:  # a second colour, so that images differ in more than their mean
        image.paste(dot, (4, 4, 20, 20))
    return image


def processed_batch(processor, prompts, images):
    """Left-padded processor output for chat prompts (lists of parts) with their images, as GRPOTrainer builds it."""
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False)
        for parts in prompts
    ]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def image_items(processor, completions, boundaries, answers=("3", "12")):
    """
    Items for prompts with one image, two images (other sizes) and one image again, from one left-padded processor
    batch cut per row by `split_multimodal_inputs`, plus one text-only prompt.
    """
    tokenizer = processor.tokenizer
    prompts = [
        [{"type": "image"}, {"type": "text", "text": "How many red?"}],
        [{"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "text", "text": "right:"}, {"type": "image"}],
        [{"type": "image"}, {"type": "text", "text": "Count the blue shapes, then add 2."}],
    ]
    images = [
        [scene((200, 30, 30), dot=(0, 0, 250))],
        [scene((20, 200, 40), (28, 28)), scene((240, 240, 0), (56, 28), dot=(250, 0, 0))],
        [scene((30, 30, 220), (28, 56), dot=(0, 250, 0))],
    ]
    batch = processed_batch(processor, prompts, images)
    multimodal = split_multimodal_inputs(
        {**batch, "num_images": [len(row) for row in images]}, batch["attention_mask"]
    )
    prompt_rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    text_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "No image: 1+2?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt_rows.append(list(text_prompt))
    multimodal.append(None)
    blocks = [encode_answer(tokenizer, SCAFFOLD, answer) for answer in answers]
    items = []
    for prompt, fields, text, bounds in zip(prompt_rows, multimodal, completions, boundaries):
        completion = tokenizer(text, add_special_tokens=False)["input_ids"]
        items.append(ScoringItem(prompt, completion, bounds, blocks, fields))
    return items


COMPLETIONS = [
    "<think>### Step 1\nred: 2\n### Step 2\n2+1=3\n",
    "<think>### Step 1\nleft 1\n",
    "<think>### Step 1\nblue: 10\n### Step 2\n10+2=12\n### Step 3\nok\n",
    "<think>### Step 1\n1+2=3\n",
]
BOUNDARIES = [(0, 7, 19, 27), (0, 7, 15), (0, 20, 30, 42, 47), (0, 7, 13)]


def reference_scores(model, item: ScoringItem) -> torch.Tensor:
    """Per-prefix teacher forcing: one unpadded forward per (prefix, answer variant), with the prompt's images and
    the model computing its own positions."""
    fields = dict(item.multimodal or {})
    scores = []
    for boundary in item.boundaries:
        best = -float("inf")
        for block in item.answers:
            ids = list(item.prompt_ids) + list(item.completion_ids[:boundary]) + list(block.ids)
            inputs = {name: value for name, value in fields.items() if name not in TOKEN_ALIGNED_FIELDS}
            for name in TOKEN_ALIGNED_FIELDS:  # the prompt's token types, then text (0) for the rest
                if name in fields:
                    token_types = torch.zeros(len(ids), dtype=torch.long)
                    token_types[: len(item.prompt_ids)] = fields[name]
                    inputs[name] = token_types.unsqueeze(0)
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **inputs).logits[0]
            logps = logits.float().log_softmax(-1)
            start = len(ids) - len(block.ids)
            scored = range(start + block.scored[0], start + block.scored[1])
            best = max(best, sum(logps[t - 1, ids[t]].item() for t in scored) / len(scored))
        scores.append(best)
    return torch.tensor(scores)


def assert_scores_close(got, expected, tolerance=1e-5):
    """fp32: the exact passes agree to ~5e-7 here, so 1e-5 (stricter than the 1e-4 asked for) still has margin."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=tolerance, rtol=0), (a, b)


@pytest.fixture(scope="session")
def references(tiny_vlms):
    out = {}
    for name, (model, processor) in tiny_vlms.items():
        items = image_items(processor, COMPLETIONS, BOUNDARIES)
        out[name] = (items, [reference_scores(model, item) for item in items])
    return out


@pytest.mark.parametrize("architecture", BLOCK_ARCHITECTURES)
@pytest.mark.parametrize("method", ["block", "prefix"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_with_images_equal_teacher_forcing(tiny_vlms, references, architecture, method, batch_size):
    """One and two images per prompt, image sizes differing, a text-only prompt among them; several items per
    forward (padding, images concatenated) or one."""
    model, _ = tiny_vlms[architecture]
    items, expected = references[architecture]
    got = StepLikelihoodScorer(method, batch_size=batch_size).score(model, items)
    assert_scores_close(got, expected)


def test_block_split_and_full_mask_agree_with_images(tiny_vlms, references):
    model, _ = tiny_vlms["qwen2_vl"]
    items, expected = references["qwen2_vl"]
    got = StepLikelihoodScorer("block", batch_size=4, split_attention=False).score(model, items)
    assert_scores_close(got, expected)


def test_multimodal_rotary_positions_matter(tiny_vlms, references, monkeypatch):
    """Qwen2-VL's text positions after an image are not the column index: plain positions give other numbers."""
    model, _ = tiny_vlms["qwen2_vl"]
    items, expected = references["qwen2_vl"]
    monkeypatch.setattr("trl_mig.scoring._rope_index_function", lambda model: None)
    wrong = StepLikelihoodScorer("block", batch_size=4).score(model, items)
    # a random tiny model barely depends on positions: ~2e-4 here, far above the ~5e-7 of the exact pass
    assert max((a - b).abs().max().item() for a, b in zip(wrong, expected)) > 5e-5


def test_position_offset_and_keep_completion_with_multimodal_rotary_positions(tiny_vlms, references):
    """The offset moves all three dims of Qwen2-VL's positions, in the shared part and the copies; l_k stays, and so it
    does with the whole completion (an answer after b_K) in the shared part."""
    model, processor = tiny_vlms["qwen2_vl"]
    items, expected = references["qwen2_vl"]
    plain = build_block_batch(items, model=model)
    moved = build_block_batch([dataclasses.replace(item, position_offset=5) for item in items], model=model)
    assert plain.position_ids.shape[0] == 3
    real = torch.cat(
        [
            torch.arange(plain.shared_width) < (plain.prompt_lengths + plain.completion_lengths).unsqueeze(1),
            plain.copy_visible > 0,
        ],
        dim=1,
    )
    assert torch.equal(moved.position_ids - plain.position_ids, 5 * real.long().expand(3, -1, -1))
    tail = processor.tokenizer("</think>\n<answer>3</answer>", add_special_tokens=False)["input_ids"]
    fused = [
        dataclasses.replace(item, completion_ids=list(item.completion_ids) + tail, keep_completion=True,
                            position_offset=2 + i)
        for i, item in enumerate(items)
    ]
    for method in ("block", "prefix"):
        assert_scores_close(StepLikelihoodScorer(method, batch_size=4).score(model, fused), expected)


@pytest.mark.parametrize("architecture", ["qwen2_vl", "llava"])
def test_scores_depend_on_the_images(tiny_vlms, references, architecture):
    """Another image with the same token layout changes l_k: the pass sees the pixels, not only the image tokens."""
    model, _ = tiny_vlms[architecture]
    items, expected = references[architecture]
    fields = dict(items[0].multimodal)
    fields["pixel_values"] = fields["pixel_values"].flip(-1)  # same size, other pixels
    swapped = ScoringItem(items[0].prompt_ids, items[0].completion_ids, items[0].boundaries, items[0].answers, fields)
    got = StepLikelihoodScorer("block").score(model, [swapped])[0]
    assert (got - expected[0]).abs().max().item() > 1e-4  # ~200x the exact pass's fp32 noise


def test_split_multimodal_inputs_per_row(tiny_vlms):
    """Each row gets its own patches, grids and unpadded token types; concatenated back they are the batch's."""
    _, processor = tiny_vlms["qwen2_vl"]
    items = image_items(processor, COMPLETIONS, BOUNDARIES)[:3]
    grids = [item.multimodal["image_grid_thw"] for item in items]
    assert [grid.shape[0] for grid in grids] == [1, 2, 1]
    for item, grid in zip(items, grids):
        assert item.multimodal["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        token_types = item.multimodal["mm_token_type_ids"]
        assert token_types.shape == (len(item.prompt_ids),)
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(token_types.bool(), torch.tensor(item.prompt_ids) == image_token)
        assert int(token_types.sum()) == int(grid.prod(-1).sum()) // 4  # 2x2 patches merge into one token


def test_split_multimodal_inputs_errors():
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_images"):
        split_multimodal_inputs({"pixel_values": torch.zeros(8, 4), "image_grid_thw": torch.ones(2, 3)}, mask)
    with pytest.raises(ValueError, match="image_grid_thw"):
        split_multimodal_inputs(
            {"pixel_values": torch.zeros(8, 4), "image_grid_thw": torch.ones(3, 3), "num_images": [1, 1]}, mask
        )
    with pytest.raises(ValueError, match="pixel_values"):
        split_multimodal_inputs({"pixel_values": torch.zeros(5, 4), "num_images": [1, 1]}, mask)
    assert split_multimodal_inputs({"prompt_ids": torch.zeros(2, 3)}, mask) == [None, None]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bidirectional_image_attention_falls_back_to_prefix(tiny_vlms, references, batch_size, caplog, monkeypatch):
    """Gemma 3: token_type_ids make image tokens attend to each other both ways. `auto` scores one row per prefix,
    exactly, with one warning that says why; `block` is refused; and a block mask would indeed be wrong."""
    model, _ = tiny_vlms["gemma3"]
    items, expected = references["gemma3"]
    assert all("token_type_ids" in item.multimodal for item in items[:3])
    assert "token_type_ids" in multimodal_block_unsupported_reason(items)
    assert multimodal_block_unsupported_reason(references["llava"][0]) is None
    with caplog.at_level(logging.WARNING, logger="trl_mig.scoring"):
        got = StepLikelihoodScorer("auto", batch_size=batch_size).score(model, items)
    assert_scores_close(got, expected)
    assert [r.getMessage() for r in caplog.records if "token_type_ids" in r.getMessage()][0].startswith(
        "MIG scoring falls back to one row per step prefix"
    )
    with pytest.raises(ValueError, match="token_type_ids"):
        StepLikelihoodScorer("block").score(model, items)
    monkeypatch.setattr("trl_mig.scoring.multimodal_block_unsupported_reason", lambda items: None)
    wrong = StepLikelihoodScorer("block", batch_size=batch_size).score(model, items)
    # causal image attention: ~2e-5 off in this random tiny model, 40x the exact pass's fp32 noise
    assert max((a - b).abs().max().item() for a, b in zip(wrong, expected)) > 1e-5


# ------------------------------------------------------------------------------------------------- training
def visual_dataset(n=8):
    """Chat prompts with one image each (two prompts with two images), a count as the ground truth."""
    from datasets import Dataset

    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20)]
    rows = []
    for i in range(n):
        images = [scene(colours[i % 4], (56, 56), dot=colours[(i + 1) % 4])]
        if i % 4 == 3:
            images.append(scene(colours[(i + 2) % 4], (28, 28)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"How many shapes? ({i})"}],
                "images": images,
                "solution": str(i % 3 + 1),
            }
        )
    return Dataset.from_list(rows)


def vlm_trainer(tmp_path, architecture, **overrides):
    from peft import LoraConfig

    from helpers import cpu_config
    from trl_mig import MIGGRPOTrainer

    model, processor = build_tiny_vlm(architecture)
    model.train()
    settings = dict(max_completion_length=16, learning_rate=5e-2, sft_weight=0.5, mig_scaffold=SCAFFOLD)
    trainer = MIGGRPOTrainer(
        model,
        args=cpu_config(tmp_path, **(settings | overrides)),
        train_dataset=visual_dataset(),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    return trainer, processor


@pytest.mark.parametrize("architecture", ["qwen2_vl", "llava", "gemma3"])
def test_lora_training_with_image_prompts(tmp_path, architecture, caplog, recwarn):
    """A few GRPO steps on image prompts with LoRA: MIG metrics logged, adapters changed, no image warning (but
    Gemma 3's announced fallback to prefix scoring), and every completion scored with its own prompt's images."""
    trainer, processor = vlm_trainer(tmp_path, architecture)
    scored = []
    score = trainer.mig_scorer.score
    trainer.mig_scorer.score = lambda model, items: scored.append(list(items)) or score(model, items)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()  # transformers' own warnings reach caplog too
    try:
        with caplog.at_level(logging.WARNING):
            trainer.train()
    finally:
        transformers_logging.disable_propagation()
    changed = [
        name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])
    ]
    assert changed and all("lora" in name for name in changed)
    logged = {key for entry in trainer.state.log_history for key in entry}
    for metric in ("mig/loglik_prompt_only", "mig/gain_sum", "mig/steps", "mig/nonfinite_frac", "sft/gated_frac"):
        assert metric in logged, metric
    messages = [record.getMessage() for record in caplog.records] + [str(w.message) for w in recwarn]
    fallback = [m for m in messages if m.startswith("MIG scoring falls back to one row per step prefix")]
    assert len(fallback) == (1 if architecture == "gemma3" else 0)
    image_warnings = [m for m in messages if any(word in m.lower() for word in ("image", "pixel", "vision", "rope"))]
    assert image_warnings == fallback

    # every completion's scoring item carries exactly its own prompt's images, as the processor gives them alone
    assert scored and all(item.multimodal is not None for batch in scored for item in batch)
    rows = visual_dataset()
    for item in scored[0]:
        prompt_text = processor.tokenizer.decode(item.prompt_ids)
        row = rows[int(prompt_text.split("(")[1].split(")")[0])]
        parts = [{"type": "image"}] * len(row["images"]) + [{"type": "text", "text": row["prompt"][0]["content"]}]
        alone = processed_batch(processor, [parts], [row["images"]])
        assert alone["input_ids"][0].tolist() == list(item.prompt_ids)
        assert torch.equal(alone["pixel_values"], item.multimodal["pixel_values"])
    # and its l_k are per-prefix teacher forcing with those images (the policy after training)
    trainer.model.eval()
    items = scored[-1][:3]
    got = trainer.mig_scorer.score(trainer.model, items)
    assert_scores_close(got, [reference_scores(trainer.model, item) for item in items])


@pytest.mark.parametrize("method", ["block", "prefix"])
def test_answer_right_after_an_image(tiny_vlms, method):
    """A raw prompt that ends with image tokens (no chat template, no vision-end token): the answer of l_0 follows
    the image directly, and its position is what Qwen2-VL gives text after an image."""
    model, processor = tiny_vlms["qwen2_vl"]
    batch = processor(images=[[scene((10, 200, 90), dot=(200, 0, 0))]], text=["Count:<|image_pad|>"],
                      return_tensors="pt")
    fields = split_multimodal_inputs({**batch, "num_images": [1]}, batch["attention_mask"])[0]
    prompt = batch["input_ids"][0].tolist()
    assert prompt[-1] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    completion = processor.tokenizer("<think>### Step 1\nthree\n", add_special_tokens=False)["input_ids"]
    blocks = [encode_answer(processor.tokenizer, SCAFFOLD, "3")]
    item = ScoringItem(prompt, completion, (0, 7, len(completion)), blocks, fields)
    got = StepLikelihoodScorer(method).score(model, [item])
    assert_scores_close(got, [reference_scores(model, item)])


def test_rotary_inputs_without_token_types_are_an_error(tiny_vlms, references):
    model, _ = tiny_vlms["qwen2_vl"]
    item = references["qwen2_vl"][0][0]
    fields = {name: value for name, value in item.multimodal.items() if name != "mm_token_type_ids"}
    broken = ScoringItem(item.prompt_ids, item.completion_ids, item.boundaries, item.answers, fields)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        StepLikelihoodScorer("block").score(model, [broken])
