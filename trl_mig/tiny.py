"""Tiny models and tokenizers built locally, with no hub access: for the tests, the benchmarks and the offline demo."""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 4096):
    """
    A character-level tokenizer (printable ASCII, newline and tab, one token each) with the think/answer tags and the
    chat-role markers as single added tokens, `<pad>` for padding and `<eos>` as end of sequence, and a chat template.

    It is written in the byte-level form that `Qwen2Tokenizer` (and GPT-2-style tokenizers) use: a BPE model without
    merges whose vocabulary names each character by its byte-level symbol (space is `Ġ`, newline `Ċ`), with byte-level
    pre-tokenizer and decoder. So a saved folder reloads with the same ids and text through
    `AutoTokenizer.from_pretrained`, whichever class transformers picks for the model type (it rebuilds qwen2
    tokenizers as `Qwen2Tokenizer` from the vocabulary, whatever `tokenizer_config.json` declares). Characters outside
    the alphabet encode as `<unk>` here (one per UTF-8 byte); a reloaded `Qwen2Tokenizer` drops them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_level_symbols()
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *(symbols[ord(c)] for c in chars)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    tokenizer.add_tokens(list(TAG_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_level_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol map, the alphabet of byte-level BPE: printable bytes stand for themselves,
    the others (space, control bytes, ...) are shifted to U+0100 onwards in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def build_tiny_model(
    tokenizer,
    architecture: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    max_position_embeddings: int = 4096,
):
    """A randomly initialised causal LM (`"qwen2"` or `"llama"`) sized for CPU tests, matching `tokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(architecture)
    if config_class is None:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; expected 'qwen2' or 'llama'.")
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
