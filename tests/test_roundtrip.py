"""Saved built-in models load with plain transformers calls (AutoTokenizer, AutoModelForCausalLM, pipeline) and give
the same ids, text and greedy generations as the tokenizer and model used in training."""

from __future__ import annotations

import pytest
import torch

from trl_mig.builtin import BUILTIN_MODELS, BuiltinArguments, load_builtin_dataset, resolve_builtin_model
from trl_mig.tokenizer_utils import load_generic_tokenizer

# a few warm-start steps: enough to exercise the warm-start path, fast on CPU
TINY = dict(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1, warmstart_max_steps=3,
            warmstart_batch_size=4, task_train_size=64, task_validation_size=4, task_test_size=8, task_ood_size=4)
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


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_saved_builtin_model_round_trips_through_plain_transformers(name, builtin_args, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = resolve_builtin_model(f"builtin:{name}", builtin_args, use_cpu=True)
    # what training uses (trl_mig.train loads the tokenizer this way), then saved as the trainer saves an output
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
