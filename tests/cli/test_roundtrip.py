"""Saved built-in models load with plain transformers calls (AutoTokenizer, AutoModelForCausalLM, pipeline; for the
vision-language one AutoProcessor, AutoModelForImageTextToText and the image-text-to-text pipeline) and give the same
ids, text and greedy generations as the tokenizer (or processor) and model used in training."""

from __future__ import annotations

import pytest
import torch

from trl_mig.builtin import BUILTIN_MODELS, BuiltinArguments, load_builtin_dataset, resolve_builtin_model
from trl_mig.builtin.tiny import VLM_ARCHITECTURES
from trl_mig.cli.models import load_generic_tokenizer, load_processing_class

# a few warm-start steps: enough to exercise the warm-start path, fast on CPU
TINY = dict(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1, warmstart_max_steps=3,
            warmstart_batch_size=4, task_train_size=64, task_validation_size=4, task_test_size=8, task_ood_size=4,
            tools_warmstart_max_steps=3, tools_warmstart_batch_size=4)
TEXTS = [
    "Compute (3+4)*2. Format: <think>### Step 1 ...</think>\n<answer>...</answer>",
    "<think>### Step 1\n3+4=7\n### Step 2\n7*2=14\n</think>\n<answer>7 14</answer>",
    "  leading spaces,\ttabs\n\n\nand blank lines  ",
    "<|user|>hi\n<|assistant|>",
]


@pytest.fixture(scope="module")
def builtin_args(tmp_path_factory):
    return BuiltinArguments(builtin_cache_dir=str(tmp_path_factory.mktemp("builtin-cache")), **TINY)


@pytest.fixture(scope="module")
def prompts(builtin_args):
    return load_builtin_dataset("builtin:arithmetic", builtin_args)["test"]["prompt"][:2]


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


VLM_MODELS = sorted(name for name in BUILTIN_MODELS if any(name == f"tiny-{a}-scratch" for a in VLM_ARCHITECTURES))
TEXT_MODELS = sorted(set(BUILTIN_MODELS) - set(VLM_MODELS))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_saved_builtin_model_round_trips_through_plain_transformers(name, builtin_args, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = resolve_builtin_model(f"builtin:{name}", builtin_args, use_cpu=True)
    # what training uses (trl_mig.cli.train loads the tokenizer this way), then saved as the trainer saves an output
    train_tokenizer = load_generic_tokenizer(path)
    train_model = AutoModelForCausalLM.from_pretrained(path).eval()
    train_model.save_pretrained(tmp_path)
    train_tokenizer.save_pretrained(tmp_path)

    for folder in (path, str(tmp_path)):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for text in TEXTS + prompts:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert ids == train_tokenizer(text, add_special_tokens=False).input_ids, (type(tokenizer).__name__, text)
            assert tokenizer.decode(ids) == text
        assert tokenizer.eos_token_id == train_tokenizer.eos_token_id
        assert tokenizer.pad_token_id == train_tokenizer.pad_token_id

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    for prompt in prompts:
        expected = greedy(train_model, train_tokenizer, prompt)
        assert greedy(model, tokenizer, prompt) == expected
        result = generator(prompt, max_new_tokens=40, do_sample=False, return_full_text=False)
        assert result[0]["generated_text"] == expected


@pytest.mark.parametrize("name", VLM_MODELS)
def test_saved_builtin_vlm_round_trips_through_plain_transformers(name, builtin_args, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    assert VLM_MODELS, "the built-in vision-language model is covered"
    path = resolve_builtin_model(f"builtin:{name}", builtin_args, use_cpu=True)
    train_processor = load_processing_class(path)  # what training uses
    train_model = AutoModelForImageTextToText.from_pretrained(path).eval()
    train_model.save_pretrained(tmp_path)
    train_processor.save_pretrained(tmp_path)

    for folder in (path, str(tmp_path)):
        processor = AutoProcessor.from_pretrained(folder)
        for text in TEXTS:
            ids = processor.tokenizer(text, add_special_tokens=False).input_ids
            assert ids == train_processor.tokenizer(text, add_special_tokens=False).input_ids, text
            assert processor.tokenizer.decode(ids) == text

    row = load_builtin_dataset("builtin:visual", builtin_args)["test"][0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"][0]["content"]}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def greedy_with_image(model, processor) -> str:
        inputs = processor(text=[chat], images=[[row["image"]]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    expected = greedy_with_image(train_model, train_processor)
    assert expected.strip(), "the random tiny VLM writes something to compare"
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    assert greedy_with_image(model, processor) == expected
    generator = pipeline("image-text-to-text", model=str(tmp_path), device="cpu")
    result = generator(images=row["image"], text=chat, max_new_tokens=20, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected
