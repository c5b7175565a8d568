"""Tiny tokenizers of the kinds real models use, trained locally in milliseconds (no hub): for the tests and the
benchmarks that must behave the same whichever tokenizer family a user's model has.

- `"char"`: the built-in task's character-level tokenizer ([`build_char_tokenizer`]): one token per character.
- `"byte_bpe"`: byte-level BPE (Qwen, Llama 3, GPT-2 style): ByteLevel pre-tokenizer and decoder, so a character
  outside the learned merges is spread over several byte tokens, and a token can end inside a multi-byte character.
- `"metaspace_unigram"`: SentencePiece style (Llama 2, Mistral, Gemma): Metaspace pre-tokenizer (`▁` marks a space,
  prepended to the first word only) and decoder, Unigram model; the decoder drops the first token's leading space.

Every kind has `<pad>` (padding), `<eos>` (end of sequence), `<unk>` and the think/answer tags and chat-role markers
as single tokens, and the char tokenizer's chat template. The trained kinds learn from `DEFAULT_CORPUS` unless given
another: completions in the built-in step format (`### Step i`), with math symbols (×, ÷, −, √, ≤), accented letters
and a CJK string, so that multi-byte characters occur both as learned tokens and split across tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

from .tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TAG_TOKENS, build_char_tokenizer

TOKENIZER_KINDS = ("char", "byte_bpe", "metaspace_unigram")
DEFAULT_VOCAB_SIZE = 384  # byte_bpe: the 256 byte symbols, the special tokens and ~125 merges


def _step_format_corpus(count: int = 24, seed: int = 0) -> tuple[str, ...]:
    """Worked solutions in the built-in step format, with the operators written as math symbols half of the time."""
    rng = random.Random(seed)
    symbols = {"+": ("+", "+"), "-": ("-", "−"), "*": ("*", "×"), "/": ("/", "÷")}
    texts = []
    for _ in range(count):
        value, steps, results = rng.randint(1, 99), [], []
        for k in range(1, rng.randint(2, 5)):
            op, operand = rng.choice("+-*/"), rng.randint(1, 12)
            result = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value // operand}[op]
            steps.append(f"### Step {k}\n{value}{symbols[op][rng.random() < 0.5]}{operand}={result}\n")
            value = result
            results.append(str(result))
        texts.append(f"<think>{''.join(steps)}</think>\n<answer>{' '.join(results)}</answer>")
    return tuple(texts)


DEFAULT_CORPUS = (
    *_step_format_corpus(),
    "Compute (12+7)*3-5. Think step by step, then give the answer.",
    "√49 = 7 and 7 ≤ 9, 9 ≥ 3, 3 ≠ 4, π ≈ 3.14, 12 ÷ 4 = 3, 6 × 7 = 42, 10 − 3 = 7, ±1, x², ∑ ∞",
    "Café, naïve, résumé, déjà vu, Ångström, señor, über, façade, Ærø.",
    "数学很有趣，二加二等于四。计算步骤：先加后乘。",
    "The answer is 42. Then 42 + 8 = 50, and 50 / 5 = 10; so x = 10 and y = 2.",
)


def tiny_tokenizer(kind: str, corpus: Sequence[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """
    A tiny `PreTrainedTokenizerFast` of one of `TOKENIZER_KINDS`, built offline and deterministically, cached in the
    process: the same arguments give the same object, so treat it as read-only (a changed `padding_side` would leak
    into every other user).

    Args:
        kind (`str`): `"char"`, `"byte_bpe"` or `"metaspace_unigram"`.
        corpus (sequence of `str`, *optional*): the text the trained kinds learn from (default `DEFAULT_CORPUS`);
            `"char"` has a fixed vocabulary and ignores it.
        vocab_size (`int`): the trained kinds' vocabulary size before the added tags (Unigram may stop below it
            on a small corpus); ignored by `"char"`.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}.")
    if kind == "char":
        return _char_tokenizer()
    return _trained_tokenizer(kind, tuple(DEFAULT_CORPUS if corpus is None else corpus), vocab_size)


@lru_cache(maxsize=None)
def _char_tokenizer():
    return build_char_tokenizer()


@lru_cache(maxsize=None)
def _trained_tokenizer(kind: str, corpus: tuple[str, ...], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte_bpe":
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is ever unknown
            show_progress=False,
        )
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
        )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_tokens(list(TAG_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
