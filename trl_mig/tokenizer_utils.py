"""Tokenizer loading that keeps the built-in char tokenizer exactly as it was saved."""

from __future__ import annotations

import json
from pathlib import Path

GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_generic_tokenizer(path: str, **kwargs):
    """
    The tokenizer saved in a local folder when it was saved as a generic `tokenizers` tokenizer (the built-in char
    tokenizer), else None (load as usual).

    transformers 5 maps some model types (e.g. qwen2) to their own tokenizer class whatever `tokenizer_class` the
    folder declares, and `Qwen2Tokenizer` rebuilt from the word-level `tokenizer.json` of folders saved by trl-mig
    before the byte-level char tokenizer (`trl_mig.tiny.build_char_tokenizer`) drops spaces and newlines. Loading the
    generic class keeps the tokenizer exactly as saved. Folders saved since then load the same through
    `AutoTokenizer` too.
    """
    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file() or not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if declared not in GENERIC_TOKENIZER_CLASSES:
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_processing_class(path: str):
    """
    What the trainer gets as `processing_class` for the model at `path`: for a local folder with a processor
    (a vision-language model), its processor, holding the generic tokenizer when the folder saved one; else the
    generic tokenizer, or None (GRPOTrainer then loads the model's own processor or tokenizer).
    """
    if not any((Path(path) / name).is_file() for name in PROCESSOR_FILES):
        return load_generic_tokenizer(path)
    from transformers import AutoProcessor

    sides = dict(padding_side="left", truncation_side="left")  # as GRPOTrainer loads a processor
    tokenizer = load_generic_tokenizer(path, **sides)
    return AutoProcessor.from_pretrained(path, **sides, **({"tokenizer": tokenizer} if tokenizer is not None else {}))
