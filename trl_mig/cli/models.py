"""Loading models, tokenizers and processors for the commands: generic tokenizers are kept exactly as they were saved
(the built-in char tokenizer), and `--model` may be a hub id, a local folder (full model or PEFT adapter) or a
`builtin:` name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from ..builtin import is_builtin, resolve_builtin_model
from .errors import CLIError

GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_generic_tokenizer(path: str, **kwargs):
    """
    The tokenizer saved in a local folder when it was saved as a generic `tokenizers` tokenizer (the built-in char
    tokenizer), else None (load as usual).

    transformers 5 maps some model types (e.g. qwen2) to their own tokenizer class whatever `tokenizer_class` the
    folder declares, and `Qwen2Tokenizer` rebuilt from the word-level `tokenizer.json` of folders saved by trl-mig
    before the byte-level char tokenizer (`builtin.tiny.build_char_tokenizer`) drops spaces and newlines. Loading the
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

    sides = dict(padding_side="left", truncation_side="left")  # as GRPOTrainer loads a processor
    tokenizer = load_generic_tokenizer(path, **sides)
    return AutoProcessor.from_pretrained(path, **sides, **({"tokenizer": tokenizer} if tokenizer is not None else {}))


@dataclass
class ModelArguments:
    """The model a command loads to generate or score (`trl-mig eval`, `trl-mig inspect`)."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model: a hub id, a local folder (full model or PEFT adapter) or a builtin: name."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the model weights.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    device: str | None = field(default=None, metadata={"help": "Device ('cpu', 'cuda', ...). Default: cuda if any."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})


def load_model_for_eval(args: ModelArguments, builtin_args):
    """`(model on its device, tokenizer, path)` for `--model`: a hub id, a local folder (a full model or a PEFT
    adapter on its base) or a `builtin:` name."""
    path = args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_builtin(path):
        try:
            path = resolve_builtin_model(path, builtin_args, use_cpu=device == "cpu", field_name="--model")
        except ValueError as err:
            raise CLIError(str(err)) from None
    _refuse_vision_language_model(path, args.model)
    kwargs = dict(dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = load_generic_tokenizer(path) or AutoTokenizer.from_pretrained(
            path, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise CLIError(f"Could not load the model {args.model!r} (`--model`): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, path


def _refuse_vision_language_model(path: str, name: str) -> None:
    """A local vision-language model is a clear error here: eval and inspect generate and score from text only."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file) as f:
        config = json.load(f)
    if "vision_config" in config:
        raise CLIError(
            f"{name!r} is a vision-language model ({config.get('model_type')}): `trl-mig eval` and `trl-mig inspect` "
            "generate and score from text prompts only, without images. `trl-mig train` trains it on image prompts "
            "(docs/vision.md)."
        )
