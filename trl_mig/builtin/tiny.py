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


STEP_HEADER_TOKEN = "### Step "  # the built-in task's step header, one token with `step_token=True`


def build_char_tokenizer(model_max_length: int = 4096, step_token: bool = False):
    """
    A character-level tokenizer (printable ASCII, newline and tab, one token each) with the think/answer tags and the
    chat-role markers as single added tokens, `<pad>` for padding and `<eos>` as end of sequence, and a chat template.
    With `step_token`, `"### Step "` is one added token too, so the header `### Step 3` costs 2 tokens instead of 10:
    the same text, shorter sequences.

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
    tokenizer.add_tokens([*TAG_TOKENS, *([STEP_HEADER_TOKEN] if step_token else [])])
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


# ------------------------------------------------------------------------------------------ vision-language models
VLM_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "llava", "gemma3")
# how the chat template marks one image in a prompt (the processor expands the image token to the image's features)
_IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
    "gemma3": "<start_of_image>",
}
_IMAGE_TOKENS = {
    "qwen2_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "llava": ("<image>",),
    "gemma3": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
}


def vlm_chat_template(image_markup: str) -> str:
    """The tiny chat template, for messages whose content is a string or a list of image / text parts."""
    return (
        "{% for message in messages %}<|{{ message['role'] }}|>"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image_markup}{{% elif part['type'] == 'text' %}}{{{{ part['text'] }}}}"
        "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def build_tiny_vlm(
    architecture: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_size: int = 32,
    max_image_pixels: int = 56 * 56,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """
    A randomly initialised vision-language model and its processor, sized for CPU tests (no hub, no torchvision):
    the char tokenizer with the architecture's image tokens and a chat template that places images, and a PIL image
    processor.

    - `"qwen2_vl"` / `"qwen2_5_vl"`: 14-pixel patches merged 2x2, so a 28x28 image is one token and 56x56 four;
      images are resized to at most `max_image_pixels` pixels. 3-D multimodal rotary positions.
    - `"llava"`: a CLIP vision tower on 28x28 images (every image is resized to that), 4 tokens per image, projected
      into the language model (Llama) in place of the `<image>` tokens. 1-D positions.
    - `"gemma3"`: a SigLIP vision tower on 28x28 images, 4 tokens per image; `token_type_ids` mark the image tokens,
      which attend to each other both ways. Full-attention layers only (no sliding window), so that the image
      attention is what rules out the block mask.

    Returns:
        `(model, processor)`, the model in float32 and eval mode.
    """
    from transformers import AutoModelForImageTextToText

    if architecture not in VLM_ARCHITECTURES:
        raise ValueError(f"Unknown tiny VLM architecture {architecture!r}; expected one of {VLM_ARCHITECTURES}.")
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(_IMAGE_TOKENS[architecture])})
    tokenizer.chat_template = vlm_chat_template(_IMAGE_MARKUP[architecture])
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if architecture == "llava":
        config, processor = _tiny_llava(tokenizer, text, vision_size)
    elif architecture == "gemma3":
        config, processor = _tiny_gemma3(tokenizer, text, hidden_size, vision_size)
    else:
        config, processor = _tiny_qwen_vl(architecture, tokenizer, text, hidden_size, vision_size, max_image_pixels)
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def _tiny_qwen_vl(architecture, tokenizer, text, hidden_size, vision_size, max_image_pixels):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    token = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // text["num_attention_heads"]
    # the rotary halves split over (temporal, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_sections(head_dim // 2)}
    vision = dict(depth=1, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if architecture == "qwen2_vl":
        config_class, processor_class = Qwen2VLConfig, Qwen2VLProcessor
        vision |= dict(embed_dim=vision_size, hidden_size=hidden_size, mlp_ratio=2)
    else:
        config_class, processor_class = Qwen2_5_VLConfig, Qwen2_5_VLProcessor
        vision |= dict(
            hidden_size=vision_size,
            intermediate_size=vision_size * 2,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[0],
        )
    config = config_class(
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        image_token_id=token("<|image_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_image_pixels)
    processor = _image_only(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return config, processor


def _vit_tower(vision_size: int, side: int) -> dict:
    """A one-layer ViT vision tower (CLIP for LLaVA, SigLIP for Gemma 3): 14-pixel patches on `side`-pixel images."""
    return dict(
        hidden_size=vision_size,
        intermediate_size=vision_size * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=side,
        patch_size=14,
    )


def _tiny_llava(tokenizer, text, vision_size):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    side = 28
    config = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(**_vit_tower(vision_size, side)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",  # drop the CLS feature: (28 / 14)^2 = 4 tokens per image
        vision_feature_layer=-1,
    )
    image_processor = LlavaImageProcessorPil(
        size={"height": side, "width": side}, crop_size={"height": side, "width": side}, do_center_crop=False
    )
    processor = _image_only(LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return config, processor


def _tiny_gemma3(tokenizer, text, hidden_size, vision_size):
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    side, tokens = 28, 4
    for role, token in (("boi", "<start_of_image>"), ("image", "<image_soft_token>"), ("eoi", "<end_of_image>")):
        setattr(tokenizer, f"{role}_token", token)  # the attributes Gemma3Processor reads
        setattr(tokenizer, f"{role}_token_id", tokenizer.convert_tokens_to_ids(token))
    config = Gemma3Config(
        text_config={
            **text,
            "head_dim": hidden_size // text["num_attention_heads"],
            "layer_types": ["full_attention"] * text["num_hidden_layers"],
        },
        vision_config=_vit_tower(vision_size, side),
        mm_tokens_per_image=tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    processor = _image_only(Gemma3Processor)(
        image_processor=Gemma3ImageProcessorPil(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=tokens,
    )
    return config, processor


def _mrope_sections(half_head_dim: int) -> list[int]:
    temporal = half_head_dim - 2 * (half_head_dim * 3 // 8)
    return [temporal, half_head_dim * 3 // 8, half_head_dim * 3 // 8]


def _image_only(processor_class):
    """`processor_class` that accepts no video processor (transformers' video processor base class needs
    torchvision, which trl-mig does not require)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    attributes = {"check_argument_for_proper_class": check_argument_for_proper_class}
    return type(processor_class.__name__, (processor_class,), attributes)


# ------------------------------------------------------------------------------------------------------- tool calling
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<|tool|>")
# The char tokenizer's chat template, made able to hold a tool-calling conversation as TRL's GRPOTrainer runs it:
# - `tools` render as one compact line (`Tools: name(param, ...) ...`) before the messages: every character is a
#   token here, so a JSON schema or the descriptions would multiply the prompt's length;
# - an assistant turn is its content, then each tool call as `<tool_call>NAME\nKEY=VALUE\n...</tool_call>`, then
#   `<eos>`: the turn ends with the token that stops generation, so a rollout (generate to EOS, append the tool
#   result, generate again) and the rendered conversation are the same ids;
# - a tool result is `<|tool|>CONTENT\n`. Earlier messages render the same whatever follows (prefix-preserving, as
#   TRL's tool loop requires).
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for tool in tools %}"
    "{% set fn = tool['function'] if 'function' in tool else tool %}"
    " {{ fn['name'] }}({{ (fn['parameters']['properties'] if fn.get('parameters') else {}) | join(', ') }})"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}{% set fn = call['function'] if 'function' in call else call %}"
    "<tool_call>{{ fn['name'] }}\n"
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}\n"
    "{% else %}{% for key, value in fn['arguments'].items() %}{{ key }}={{ value }}\n{% endfor %}{% endif %}"
    "</tool_call>{% endfor %}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# How transformers' `parse_response` (which TRL's tool loop calls on every generated turn) reads a turn of that
# template back into `{"role": "assistant", "content": ..., "tool_calls": [...]}`.
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {
            "open_pattern": r"<tool_call>(?P<name>[^\n<]+)\n",
            "close_pattern": r"</tool_call>",
            "repeats": True,
            "content": "kv-lines",
            "content_args": {"kv_sep": "="},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"<eos>", "content": "text"},
    },
}


def build_tool_char_tokenizer(model_max_length: int = 4096):
    """
    The char tokenizer (`build_char_tokenizer`) for tool calling: `<tool_call>`, `</tool_call>` and `<|tool|>` as
    single added tokens, `TOOL_CHAT_TEMPLATE` as chat template and `TOOL_RESPONSE_TEMPLATE` as the `response_template`
    that TRL's GRPOTrainer parses tool calls with. The token ids of the plain char tokenizer are unchanged (the new
    tokens come after them).
    """
    tokenizer = build_char_tokenizer(model_max_length=model_max_length)
    tokenizer.add_tokens(list(TOOL_TOKENS))
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer
