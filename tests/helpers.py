"""Builders shared by the tests: tokenizers trained locally (no hub), CPU-sized configs, scripted rollouts and a tool.
The fixtures that wrap them live in conftest.py."""

from __future__ import annotations

from trl_mig import MIGConfig

BPE_CORPUS = [
    "<think>### Step 1\n12+7=19\n### Step 2\n19*3=57\n</think>\n<answer>57</answer>",
    "<think>### Step 1\n5-2=3\n</think>\n<answer>3</answer>",
    "Compute (12+7)*3. Think step by step.",
    "<answer>19</answer> <answer>3</answer> <answer>57</answer> >57 >19 >3",
    "The answer is 42. Then 42 + 8 = 50, and 50 / 5 = 10.",
    "héllo wörld ünïcode ✓ → ∑",
]


def build_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained locally on a tiny corpus: multi-character tokens, merges across tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build_metaspace_tokenizer(vocab_size: int = 200):
    """A SentencePiece-style (metaspace) BPE: single tokens decode without their leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"])
    backend.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def cpu_config(output_dir, config_class=None, **overrides):
    """A MIGConfig (or `config_class`) sized for a CPU test: tiny batches, short completions, no saving, no
    reporting."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=24,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    defaults.update(overrides)
    return (config_class or MIGConfig)(**defaults)


def scripted_rollout(script: dict, end_with_eos=lambda text: text.rstrip().endswith("</answer>")):
    """
    A TRL `rollout_func` that returns fixed completions: `script[prompt][i % num_generations]` for the i-th prompt
    of the global batch (GRPO repeats each prompt `num_generations` times in a row, ranks in order). Completions that `end_with_eos` get the
    EOS token; the others look truncated.
    """

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        # this process's rows come after those of the lower ranks in the global batch
        first = trainer.accelerator.process_index * len(prompts)
        group = trainer.num_generations
        texts = [script[_prompt_key(prompt)][(first + i) % group] for i, prompt in enumerate(prompts)]
        if isinstance(prompts[0], list):
            prompt_ids = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                for p in prompts
            ]
        else:
            prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids = [
            tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end_with_eos(t) else [])
            for t in texts
        ]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def _prompt_key(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# a tool for TRL's multi-turn tool loop: its docstring is the schema TRL reads
def multiply_tool(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b
