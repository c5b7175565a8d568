"""The step-likelihood scorer against plain per-prefix teacher forcing.

The reference (`reference_scores`) is written here with nothing but `model(input_ids=...)` and a log-softmax: one
forward per (prefix, answer variant), mean log-prob of the answer's tokens, max over variants.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from trl_mig.scoring import (
    AnswerBlock,
    ScoringItem,
    StepLikelihoodScorer,
    block_mask_unsupported_reason,
    build_block_batch,
    build_block_batches,
    encode_answer,
    fill_chunks,
)
from trl_mig.builtin.tiny import build_tiny_model

from helpers import build_bpe_tokenizer, build_metaspace_tokenizer, ATOL, reference_scores, assert_scores_close, assert_every_path_matches, scorers

SCAFFOLD = "\n</think>\n<answer>"

PROMPTS = ["Compute (12+7)*3.", "5-2?", "Q"]
STEP_TEXTS = ["### Step 1\n12+7=19\n", "### Step 2\n19*3=57\n", "### Step 3\nso 57\n"]


@pytest.fixture(scope="module")
def tokenizers(char_tokenizer):
    return {"char": char_tokenizer, "bpe": build_bpe_tokenizer(), "metaspace": build_metaspace_tokenizer()}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_item(tokenizer, prompt: str, steps: list[str], answers: list[str], head="<think>", tail=SCAFFOLD + "57"):
    """Tokenise head, each step and tail apart and concatenate them, so the step boundaries are known exactly."""
    completion = encode(tokenizer, head) if head else []
    boundaries = [len(completion)]
    for step in steps:
        completion += encode(tokenizer, step)
        boundaries.append(len(completion))
    completion += encode(tokenizer, tail) if tail else []
    blocks = [encode_answer(tokenizer, SCAFFOLD, answer) for answer in answers]
    return ScoringItem(encode(tokenizer, prompt), completion, boundaries, blocks)


def sample_items(tokenizer) -> list[ScoringItem]:
    """Different prompt lengths (padding), K = 0..3, a truncated completion, one to three answer variants."""
    return [
        make_item(tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"]),
        make_item(tokenizer, PROMPTS[1], STEP_TEXTS[:1], ["3", "57", "3.0"]),
        make_item(tokenizer, PROMPTS[2], [], ["57"]),  # K = 0
        make_item(tokenizer, PROMPTS[0], STEP_TEXTS, ["57", "fifty-seven"], tail=""),  # truncated: no close tag
        make_item(tokenizer, PROMPTS[1], STEP_TEXTS[1:], ["57"], head="", tail="junk after the thought"),  # b_0 = 0
    ]


class ForwardCounter:
    """Counts the model's top-level forwards and records the shape of each `input_ids`."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    @property
    def count(self):
        return len(self.shapes)


# --------------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("tokenizer_name", ["char", "bpe", "metaspace"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_scores_equal_per_prefix_teacher_forcing(tokenizers, architecture, attention, tokenizer_name):
    tokenizer = tokenizers[tokenizer_name]
    model = build_tiny_model(tokenizer, architecture, attn_implementation=attention).float().eval()
    items = sample_items(tokenizer)
    expected = [reference_scores(model, item) for item in items]
    assert_every_path_matches(model, items, expected)
    assert model.config._attn_implementation == attention  # restored after the split forwards


@pytest.mark.parametrize("architecture, attention", [("qwen2", "sdpa"), ("llama", "eager")])
def test_k_at_the_step_cap(char_tokenizer, architecture, attention):
    model = build_tiny_model(char_tokenizer, architecture, attn_implementation=attention).float().eval()
    steps = [f"### Step {k}\n{k}+1={k + 1}\n" for k in range(1, 17)]  # K = 16, MIGConfig's default cap
    items = [
        make_item(char_tokenizer, PROMPTS[0], steps, ["17", "seventeen"]),
        make_item(char_tokenizer, "Q", [], ["1"]),
    ]
    assert items[0].num_prefixes == 17
    expected = [reference_scores(model, item) for item in items]
    assert_every_path_matches(model, items, expected)


def test_variants_take_the_max(char_tokenizer, tiny_model):
    model = tiny_model.eval()
    single = [make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS, [answer]) for answer in ("57", "3", "57.0")]
    both = make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS, ["57", "3", "57.0"])
    scorer = StepLikelihoodScorer("block")
    separate = torch.stack(scorer.score(model, single))
    (joint,) = scorer.score(model, [both])
    torch.testing.assert_close(joint, separate.max(dim=0).values, atol=ATOL, rtol=0)
    assert not torch.equal(separate[0], separate[1])  # the variants do differ, so the max is exercised


def test_tokens_after_the_last_boundary_are_ignored(char_tokenizer, tiny_model):
    model = tiny_model.eval()
    item = make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"])
    longer = list(item.completion_ids) + encode(char_tokenizer, "xyz" * 5)
    other = ScoringItem(item.prompt_ids, longer, item.boundaries, item.answers)
    scorer = StepLikelihoodScorer("block")
    torch.testing.assert_close(scorer.score(model, [item])[0], scorer.score(model, [other])[0], atol=0, rtol=0)


@pytest.mark.parametrize("tokenizer_name", ["char", "bpe"])
def test_left_padded_prompts(tokenizers, tokenizer_name):
    """The trainer strips left padding: the scores equal teacher forcing on the padded rows under their mask."""
    tokenizer = tokenizers[tokenizer_name]
    model = build_tiny_model(tokenizer, "qwen2").float().eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    tokenizer.padding_side = side
    assert (batch["attention_mask"] == 0).any()
    items = []
    for ids, mask, prompt in zip(batch["input_ids"], batch["attention_mask"], PROMPTS):
        item = make_item(tokenizer, prompt, STEP_TEXTS[:2], ["57", "3"])
        stripped = ids[mask.bool()].tolist()
        assert stripped == list(item.prompt_ids)
        items.append(item)
    expected = []
    with torch.no_grad():
        for item, ids, mask in zip(items, batch["input_ids"], batch["attention_mask"]):
            per_variant = []
            for block in item.answers:
                values = []
                for boundary in item.boundaries:
                    tail = list(item.completion_ids[:boundary]) + list(block.ids)
                    row = torch.tensor([ids.tolist() + tail])
                    row_mask = torch.tensor([mask.tolist() + [1] * len(tail)])
                    logps = model(input_ids=row, attention_mask=row_mask).logits[0].float().log_softmax(-1)
                    start = ids.numel() + boundary
                    scored = range(*block.scored)
                    values.append(sum(logps[start + m - 1, block.ids[m]].item() for m in scored) / len(scored))
                per_variant.append(values)
            expected.append(torch.tensor(per_variant).max(dim=0).values)
    assert_every_path_matches(model, items, expected)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_lora_adapters_are_active(char_tokenizer, architecture):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(char_tokenizer, architecture).float()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                        init_lora_weights=False)  # random, non-zero B: the adapters change the model
    model = get_peft_model(base, config).eval()
    items = sample_items(char_tokenizer)[:3]
    expected = [reference_scores(model, item) for item in items]
    with model.disable_adapter():
        without = [reference_scores(model, item) for item in items]
    assert max((a - b).abs().max().item() for a, b in zip(expected, without)) > 1e-3
    assert_every_path_matches(model, items, expected)


def test_encode_answer_scores_the_answer_tokens(tokenizers):
    for tokenizer in tokenizers.values():
        block = encode_answer(tokenizer, SCAFFOLD, "57")
        assert tokenizer.decode(list(block.ids)) == SCAFFOLD + "57"
        start, end = block.scored
        assert end == len(block.ids) and 0 < start < end
        assert tokenizer.decode(list(block.ids[start:])).endswith("57")
        assert "57" not in tokenizer.decode(list(block.ids[:start]))


# ------------------------------------------------------------------------------------------------------ fallback
def _register_mask_free_attention(name: str):
    """An attention implementation other than sdpa/eager (as flash-attention-2 is), runnable on the CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, sdpa_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def test_fallback_for_an_attention_implementation_without_4d_masks(char_tokenizer, caplog):
    model = build_tiny_model(char_tokenizer, "llama").float().eval()
    items = sample_items(char_tokenizer)
    expected = [reference_scores(model, item) for item in items]
    _register_mask_free_attention("varlen_only_test_attention")
    model.config._attn_implementation = "varlen_only_test_attention"
    scorer = StepLikelihoodScorer("auto", batch_size=4)
    with caplog.at_level(logging.WARNING, logger="trl_mig.scoring"):
        first = scorer.score(model, items)
        second = scorer.score(model, items)
    warnings = [record.getMessage() for record in caplog.records if record.name == "trl_mig.scoring"]
    assert len(warnings) == 1 and "varlen_only_test_attention" in warnings[0] and "prefix" in warnings[0]
    assert_scores_close(first, expected)
    assert_scores_close(second, expected)
    with pytest.raises(ValueError, match="varlen_only_test_attention"):
        StepLikelihoodScorer("block").score(model, items)


def test_flash_attention_and_hybrid_layers_cannot_take_the_block_mask(char_tokenizer):
    model = build_tiny_model(char_tokenizer, "qwen2")
    assert block_mask_unsupported_reason(model) is None
    model.config._attn_implementation_internal = "flash_attention_2"
    assert "flash_attention_2" in block_mask_unsupported_reason(model)
    with pytest.raises(ValueError, match="flash_attention_2"):
        StepLikelihoodScorer("block").resolve_method(model)
    model.config._attn_implementation_internal = "sdpa"
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "linear_attention" in block_mask_unsupported_reason(model)


def test_fallback_for_sliding_window_attention(char_tokenizer, caplog, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0,
        pad_token_id=char_tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    items = sample_items(char_tokenizer)
    expected = [reference_scores(model, item) for item in items]  # the window is real: prefixes exceed 8 tokens
    with caplog.at_level(logging.WARNING, logger="trl_mig.scoring"):
        got = StepLikelihoodScorer("auto").score(model, items)
    assert any("sliding-window" in record.getMessage() for record in caplog.records)
    assert_scores_close(got, expected)
    with pytest.raises(ValueError, match="sliding-window"):
        StepLikelihoodScorer("block").score(model, items)
    # the fallback matters: a block mask would bypass the window and give other numbers
    monkeypatch.setattr("trl_mig.scoring.block_mask_unsupported_reason", lambda model: None)
    wrong = StepLikelihoodScorer("block").score(model, items)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, expected)) > 1e-3


def test_split_attention_not_routed_falls_back_to_the_full_mask(char_tokenizer, monkeypatch, caplog):
    """A model whose attention ignores `config._attn_implementation` fails loudly on the split mask, then is exact."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.qwen2 import modeling_qwen2

    model = build_tiny_model(char_tokenizer, "qwen2").float().eval()
    items = sample_items(char_tokenizer)
    expected = [reference_scores(model, item) for item in items]
    monkeypatch.setattr(modeling_qwen2.ALL_ATTENTION_FUNCTIONS, "get_interface", lambda *_: sdpa_attention_forward)
    asked = []
    scorer = StepLikelihoodScorer("block", batch_size=8, sync_forward_count=lambda n: asked.append(n) or n)
    counter = ForwardCounter(model)
    with caplog.at_level(logging.WARNING, logger="trl_mig.scoring"):
        got = scorer.score(model, items)
    counter.handle.remove()
    assert any("cannot split attention" in record.getMessage() for record in caplog.records)
    assert_scores_close(got, expected)
    assert model.config._attn_implementation == "sdpa" and not scorer.split_attention
    # the failed forward counts: the other ranks are told about every forward this one started
    planned = scorer.plan(items, "block")
    assert counter.count == planned + 1 and asked == [planned + 1] and scorer.forward_count == planned + 1


def test_split_attention_given_another_mask_ends_the_forward_then_falls_back(char_tokenizer, caplog):
    """
    An attention layer handed a mask of another shape than the copies' fails only once the forward has run to its
    end (under ZeRO-3 or FSDP every layer's all-gather must happen, as on a rank with nothing to split), then the
    scorer redoes it with the full mask, within the forward count agreed beforehand, and is exact.
    """
    model = build_tiny_model(char_tokenizer, "qwen2").float().eval()
    items = sample_items(char_tokenizer)
    expected = [reference_scores(model, item) for item in items]

    def widen_split_mask(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if mask is not None and mask.shape[-2] != kwargs["hidden_states"].shape[1]:  # the copies-only split mask
            kwargs["attention_mask"] = torch.ones(mask.shape[0], 1, mask.shape[-1], mask.shape[-1], dtype=torch.bool)
        return args, kwargs

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_pre_hook(widen_split_mask, with_kwargs=True) for layer in layers]
    finished = []
    hooks.append(model.model.norm.register_forward_hook(lambda *_: finished.append(True)))
    asked = []
    scorer = StepLikelihoodScorer("block", batch_size=8, sync_forward_count=lambda n: asked.append(n) or n)
    with caplog.at_level(logging.WARNING, logger="trl_mig.scoring"):
        got = scorer.score(model, items)
    for hook in hooks:
        hook.remove()
    assert any("the split attention got the mask" in record.getMessage() for record in caplog.records)
    assert_scores_close(got, expected)
    assert not scorer.split_attention and model.config._attn_implementation == "sdpa"
    # the planned forwards and one in reserve: the failed split forward reached the last layer, then the full-mask
    # ones ran
    planned = scorer.plan(items, "block")
    assert asked == [planned + 1] and len(finished) == planned + 1 and scorer.forward_count == planned + 1


def test_split_attention_mask_covers_only_the_copies(char_tokenizer, tiny_model):
    model = tiny_model.eval()
    items = sample_items(char_tokenizer)
    seen = []
    layer = model.model.layers[0].self_attn
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (tuple(kwargs["attention_mask"].shape), kwargs["hidden_states"].shape[1])
        ),
        with_kwargs=True,
    )
    StepLikelihoodScorer("block", batch_size=8).score(model, items)
    StepLikelihoodScorer("block", batch_size=8, split_attention=False).score(model, items)
    handle.remove()
    first = build_block_batches(items, 8, min_copy_width=2)  # the forwards of each scorer
    assert len(seen) == 2 * len(first)
    (split_mask, width), (full_mask, full_width) = seen[0], seen[len(first)]
    assert width == full_width == first[0].input_ids.shape[1] and full_mask[-2:] == (width, width)
    # the split mask covers only the copy queries: all but the shared part (longest prompt + completion[:b_K])
    rows = first[0].input_ids.shape[0]
    shared = max(len(items[i].prompt_ids) + items[i].boundaries[-1] for i in first[0].item_index.tolist())
    assert split_mask == (rows, 1, width - shared, width)
    assert model.config._attn_implementation == "sdpa"


def test_attention_implementation_restored_after_an_error(tiny_model, char_tokenizer):
    model = tiny_model.eval()

    def boom(module, args):
        raise KeyboardInterrupt

    handle = model.model.norm.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        StepLikelihoodScorer("block").score(model, sample_items(char_tokenizer))
    handle.remove()
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------- forward count and memory
@pytest.mark.parametrize("method", ["block", "prefix"])
def test_forward_count_is_planned_and_synchronised(char_tokenizer, tiny_model, method):
    """
    Under ZeRO-3 and FSDP every rank must run the same number of forwards, agreed before any of them starts (a
    collective issued while another rank is inside a forward would be paired with its all-gathers): the scorer asks
    for the count first, then pads up to it.
    """
    model = tiny_model.eval()
    items = sample_items(char_tokenizer)
    rows = len(items) if method == "block" else sum(item.num_prefixes * len(item.answers) for item in items)
    counter = ForwardCounter(model)
    asked = []

    def sync(count):
        asked.append((count, counter.count))  # the count asked for, and the forwards run so far
        return count + 3  # another rank has more rows

    scorer = StepLikelihoodScorer(method, batch_size=2, sync_forward_count=sync)
    expected = scorer.plan(items, method)
    assert expected == -(-rows // 2) if method == "prefix" else -(-rows // 2) <= expected <= rows
    # until a split forward has worked, block scoring keeps one forward in reserve for redoing it with the full mask
    reserve = 1 if method == "block" else 0
    scores = scorer.score(model, items)
    assert asked == [(expected + reserve, 0)] and counter.count == scorer.forward_count == expected + reserve + 3
    # deterministic given the items: same plan whatever the order, and the same scores
    ran = counter.count
    reordered = scorer.score(model, items[::-1])
    assert asked[-1] == (expected, ran) and counter.count == ran + expected + 3
    assert_scores_close(reordered[::-1], scores)
    # a rank with nothing to score still runs the synchronised count
    ran = counter.count
    assert scorer.score(model, []) == [] and asked[-1] == (0, ran) and counter.count == ran + 3
    counter.handle.remove()


def test_fill_chunks_end_a_forward_where_rows_get_much_narrower():
    assert fill_chunks([100, 95, 91, 89, 60, 58, 57], max_rows=8) == [(0, 3), (3, 4), (4, 7)]
    assert fill_chunks([10, 10, 10, 10, 10], max_rows=2) == [(0, 2), (2, 4), (4, 5)]
    assert fill_chunks([], max_rows=4) == []
    assert fill_chunks([5, 1], max_rows=4, fill=0.0) == [(0, 2)]


def test_block_forwards_pad_rows_to_a_similar_width(char_tokenizer, tiny_model):
    """Rows longest first; a forward ends where a row is under 90 % of its first row's width, so that a few long
    rows do not make every row of a large batch pay their width; same l_k as one forward."""
    from trl_mig.scoring import MIN_CHUNK_FILL

    model = tiny_model.eval()
    long_items = [make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS, ["57"])] * 2
    short_items = [make_item(char_tokenizer, PROMPTS[2], [], ["57"])] * 3
    items = short_items[:1] + long_items + short_items[1:]
    counter = ForwardCounter(model)
    got = StepLikelihoodScorer("block", batch_size=16).score(model, items)
    counter.handle.remove()
    long_width, short_width = (build_block_batch(part[:1]).input_ids.shape[1] for part in (long_items, short_items))
    assert short_width < MIN_CHUNK_FILL * long_width
    assert [shape[0] for shape in counter.shapes] == [2, 3]  # the long rows, then the short ones
    assert counter.shapes[1][1] < counter.shapes[0][1]
    assert_scores_close(got, [reference_scores(model, item) for item in items])


def test_no_sync_runs_exactly_the_plan(char_tokenizer, tiny_model):
    model = tiny_model.eval()
    items = sample_items(char_tokenizer) * 3
    scorer = StepLikelihoodScorer("block", batch_size=4)
    counter = ForwardCounter(model)
    scorer.score(model, items)
    counter.handle.remove()
    assert counter.count == scorer.plan(items, "block") >= 4  # 15 rows, at most 4 per forward


def test_rows_per_forward_bounded_by_the_batch_size(char_tokenizer, tiny_model):
    """The largest input a forward sees does not grow with the number of completions scored in one call."""
    model = tiny_model.eval()
    item = make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS, ["57", "3"])
    largest = {}
    for n in (2, 12):
        for method in ("block", "prefix"):
            counter = ForwardCounter(model)
            StepLikelihoodScorer(method, batch_size=2).score(model, [item] * n)
            counter.handle.remove()
            assert all(rows <= 2 for rows, _ in counter.shapes)
            largest[n, method] = max(rows * width for rows, width in counter.shapes)
    assert largest[2, "block"] == largest[12, "block"] and largest[2, "prefix"] == largest[12, "prefix"]


# ---------------------------------------------------------------------------------------------------- validation
def test_invalid_inputs(char_tokenizer, tiny_model):
    block = AnswerBlock((5, 6), (1, 2))
    with pytest.raises(ValueError, match="answer variant"):
        StepLikelihoodScorer().score(tiny_model, [ScoringItem([3], [4], [0], [])])
    with pytest.raises(ValueError, match="empty prompt"):
        StepLikelihoodScorer().score(tiny_model, [ScoringItem([], [4], [0], [block])])
    with pytest.raises(ValueError, match="must lie in"):
        StepLikelihoodScorer().score(tiny_model, [ScoringItem([3], [4, 5], [0, 3], [block])])
    with pytest.raises(ValueError, match="scoring method"):
        StepLikelihoodScorer("fast")
    with pytest.raises(ValueError, match="batch size"):
        StepLikelihoodScorer(batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        encode_answer(char_tokenizer, SCAFFOLD, "  ")


def test_first_answer_token_predicted_from_the_prefix(char_tokenizer, tiny_model):
    """Empty scaffold: the first answer token is predicted by the last token of the prefix itself."""
    model = tiny_model.eval()
    block = encode_answer(char_tokenizer, "", "57")
    assert block.scored == (0, 2)
    item = ScoringItem(encode(char_tokenizer, "Q"), encode(char_tokenizer, "<think>ab"), [0, 1, 3], [block])
    assert_every_path_matches(model, [item], [reference_scores(model, item)])


# ----------------------------------------------------------------------- block rows for a forward of the caller's own
def _real_columns(batch):
    """(B, W) bool: the columns of a block batch that hold tokens (shared part, then copies), not padding."""
    shared = torch.arange(batch.shared_width) < (batch.prompt_lengths + batch.completion_lengths).unsqueeze(1)
    return torch.cat([shared, batch.copy_visible > 0], dim=1)  # a copy sees P + b_k >= 1 shared columns


def test_position_offset_shifts_every_position_and_keeps_the_scores(char_tokenizer, tiny_model):
    """Rotary attention is relative: positions shifted by the offset (shared part and copies alike) keep l_k."""
    model = tiny_model.eval()
    items = sample_items(char_tokenizer)
    offsets = [3 + 7 * i for i in range(len(items))]
    shifted = [dataclasses.replace(item, position_offset=o) for item, o in zip(items, offsets)]
    plain, moved = build_block_batch(items), build_block_batch(shifted)
    assert torch.equal(moved.input_ids, plain.input_ids)
    shift = _real_columns(plain) * torch.tensor(offsets).unsqueeze(1)  # padding columns keep position 0
    assert torch.equal(moved.position_ids - plain.position_ids, shift.unsqueeze(0))
    for method in ("block", "prefix"):
        scorer = StepLikelihoodScorer(method, batch_size=2)
        for got, ref in zip(scorer.score(model, shifted), scorer.score(model, items)):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="position_offset"):
        StepLikelihoodScorer().score(model, [dataclasses.replace(items[0], position_offset=-1)])


def test_keep_completion_puts_the_whole_completion_in_the_shared_part(char_tokenizer, tiny_model):
    model = tiny_model.eval()
    items = sample_items(char_tokenizer)
    assert sum(len(item.completion_ids) > item.boundaries[-1] for item in items) >= 3  # tokens after b_K
    kept = [dataclasses.replace(item, keep_completion=True) for item in items]
    batch = build_block_batch(kept)
    assert batch.completion_lengths.tolist() == [len(item.completion_ids) for item in items]
    rows, tokens, columns = batch.completion_columns()
    completions = torch.tensor([token for item in items for token in item.completion_ids])
    assert torch.equal(batch.input_ids[rows, columns], completions)
    assert torch.equal(tokens, torch.cat([torch.arange(len(item.completion_ids)) for item in items]))
    for scorer in scorers().values():  # block with split attention, with the full mask, prefix
        for got, ref in zip(scorer.score(model, kept), scorer.score(model, items)):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokenizer_name", ["char", "bpe", "metaspace"])
def test_kept_completion_leaves_what_it_continues_a_prefix_with_to_the_shared_part(tokenizers, tokenizer_name):
    """Where the completion continues step k with the block's first ids, the shared part already computed those
    tokens after the prefix: copy k runs only the rest (but the last scored token), nothing when the completion wrote
    the answer, and l_k stay the teacher-forced ones."""
    tokenizer = tokenizers[tokenizer_name]
    model = build_tiny_model(tokenizer).float().eval()
    items = [dataclasses.replace(item, keep_completion=True) for item in sample_items(tokenizer)]
    # the answer's first token right and its last wrong; the scaffold only, then a wrong answer; half the scaffold
    block = items[0].answers[0]
    scaffold_ids, answer_ids = list(block.ids[: block.scored[0]]), list(block.ids[block.scored[0] :])
    tails = {
        "first answer token right": scaffold_ids + answer_ids[:-1] + [answer_ids[0]],
        "scaffold then a wrong answer": scaffold_ids + [answer_ids[-1]] * len(answer_ids),
        "half the scaffold": scaffold_ids[: len(scaffold_ids) // 2] + [answer_ids[-1]],
    }
    first = items[0]  # ends its last step with the scaffold, then the answer "57"
    varied = [
        dataclasses.replace(first, completion_ids=list(first.completion_ids[: first.boundaries[-1]]) + tail)
        for tail in tails.values()
    ]
    expected = [reference_scores(model, item) for item in items + varied]
    for scorer in scorers().values():
        assert_scores_close(scorer.score(model, items + varied), expected)

    def copy_tokens(item):
        return int((build_block_batch([item]).copy_visible > 0).sum())

    runs = len(block.ids) - 1  # a copy that the completion does not continue: all but the last scored token
    # the copies of the steps before the last (their continuations are the next steps)
    earlier = copy_tokens(dataclasses.replace(first, boundaries=first.boundaries[:-1]))
    assert answer_ids and copy_tokens(first) == earlier  # the answer written: l_K needs no copy
    assert copy_tokens(varied[0]) == earlier  # its last scored token is a target only
    assert copy_tokens(varied[1]) == earlier + len(answer_ids) - 1
    assert copy_tokens(varied[2]) == earlier + runs - len(scaffold_ids) // 2
    # without keep_completion the shared part ends at b_K: every copy runs its scaffold
    assert copy_tokens(dataclasses.replace(first, keep_completion=False)) == runs * first.num_prefixes


@torch.no_grad()
def test_block_batch_reproduces_a_left_padded_policy_forward(char_tokenizer, tiny_model):
    """
    What a fused pass needs: with `keep_completion` and `position_offset` = the prompt's left padding, one forward over
    the block batch gives the completion log-probs of the policy forward over the left-padded batch (no position ids:
    positions count the padding, as in GRPOTrainer) and, from the same logits, l_k.
    """
    model = tiny_model.eval()
    items = sample_items(char_tokenizer)
    prompt_width = max(len(item.prompt_ids) for item in items)
    completion_width = max(len(item.completion_ids) for item in items)
    pad = char_tokenizer.pad_token_id
    ids, mask = [], []
    for item in items:
        left, right = prompt_width - len(item.prompt_ids), completion_width - len(item.completion_ids)
        ids.append([pad] * left + list(item.prompt_ids) + list(item.completion_ids) + [pad] * right)
        mask.append([0] * left + [1] * (len(item.prompt_ids) + len(item.completion_ids)) + [0] * right)
    policy = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().log_softmax(-1)

    fused = [
        dataclasses.replace(item, keep_completion=True, position_offset=prompt_width - len(item.prompt_ids))
        for item in items
    ]
    batch = build_block_batch(fused)
    logps = model(
        input_ids=batch.input_ids,
        position_ids=batch.model_position_ids,
        attention_mask=batch.full_attention().unsqueeze(1),
    ).logits.float().log_softmax(-1)
    rows, tokens, columns = batch.completion_columns()
    assert rows.numel() == sum(len(item.completion_ids) for item in items)  # every completion token, past b_K too
    targets = batch.input_ids[rows, columns]
    got = logps[rows, columns - 1].gather(1, targets.unsqueeze(1)).squeeze(1)
    expected = policy[rows, prompt_width + tokens - 1].gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    token_logps = logps[batch.rows, batch.cols].gather(1, batch.targets.unsqueeze(1)).squeeze(1)
    reference = StepLikelihoodScorer("block").score(model, items)
    for value, ref in zip(batch.step_likelihoods(token_logps), reference):
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=0)


def test_a_micro_batch_goes_to_the_device_in_one_copy(char_tokenizer):
    """Its index tensors travel as one flat copy, cut back into the same tensors on arrival."""
    from trl_mig.scoring import _copy_together

    batch = build_block_batch(sample_items(char_tokenizer))
    tensors = [batch.input_ids, batch.position_ids, batch.copy_start, batch.rows, batch.logit_columns]
    copied = _copy_together(tensors, torch.device("cpu"))
    assert len(copied) == len(tensors)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(copied, tensors))


def test_completion_log_probs_need_trls_fused_head_and_plain_logits(char_tokenizer):
    """The fused pass scores answer tokens through the bare LM head: it refuses models whose logits the model's own
    forward post-processes, and models without TRL's fused head; the prefix method cannot give completion log-probs."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_mig.scoring import fusion_unsupported_reason

    model = build_tiny_model(char_tokenizer).float().eval()
    assert "no TRL fused LM head" in fusion_unsupported_reason(model)
    add_fused_lm_head(model, temperature=0.7)
    assert fusion_unsupported_reason(model) is None
    item = make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"])
    item = ScoringItem(item.prompt_ids, item.completion_ids, item.boundaries, item.answers, keep_completion=True)
    with pytest.raises(ValueError, match="block method's pass only"):
        StepLikelihoodScorer("prefix").score(model, [item], completion_logps=True)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in fusion_unsupported_reason(model)
    with pytest.raises(ValueError, match="post-processed"):
        StepLikelihoodScorer("block").score(model, [item], completion_logps=True)


# ------------------------------------------------------------------------------------ from generation's key/value cache
def generate_forced(model, tokenizer, items):
    """`generate` over the items' left-padded prompts, each row forced to write its item's completion (then EOS or
    padding); returns the captured `GenerationCache`."""
    from trl_mig.cached_scoring import capture_generation_cache

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(item.prompt_ids) for item in items)
    input_ids = torch.tensor([[pad] * (width - len(item.prompt_ids)) + list(item.prompt_ids) for item in items])

    def forced(row, ids):
        completion = items[row].completion_ids
        t = ids.shape[0] - width
        return [completion[t]] if t < len(completion) else [eos]

    with capture_generation_cache(model.model) as captured:
        model.generate(
            input_ids=input_ids, attention_mask=(input_ids != pad).long(), do_sample=False, pad_token_id=pad,
            eos_token_id=eos, max_new_tokens=max(len(item.completion_ids) for item in items),
            prefix_allowed_tokens_fn=forced,
        )
    assert captured.result is not None, captured.reason
    return captured.result


@pytest.mark.parametrize("tokenizer_name", ["char", "bpe", "metaspace"])
@pytest.mark.parametrize("architecture, attention", [("qwen2", "sdpa"), ("llama", "eager")])
def test_scores_from_the_generation_cache_equal_teacher_forcing(tokenizers, tokenizer_name, architecture, attention):
    """Only the answer copies run, against generate's cache (padding, a truncated completion that needs the cache
    extended by its last token, b_0 = 0, several variants); the copy after the last step, which the completion
    continues with the scaffold, leaves the scaffold to the cache."""
    from trl_mig.cached_scoring import cache_unsupported_reason, score_from_cache

    tokenizer = tokenizers[tokenizer_name]
    model = build_tiny_model(tokenizer, architecture, attn_implementation=attention).float().eval()
    items = sample_items(tokenizer)
    generation = generate_forced(model, tokenizer, items)
    rows = list(range(len(items)))
    assert cache_unsupported_reason(model, generation, items, rows) is None
    expected = [reference_scores(model, item) for item in items]
    counter = ForwardCounter(model)
    scorer = StepLikelihoodScorer("block", batch_size=1)
    assert_scores_close(score_from_cache(scorer, model, generation, items, rows), expected)
    # a copy runs its block but the last token (a target only); the first item continues its last step with the
    # scaffold, so its last copy is the scaffold's last token and the answer's tokens but the last
    first = items[0]
    block = first.answers[0]
    scaffold = block.scored[0]
    assert first.completion_ids[first.boundaries[-1] :][:scaffold] == list(block.ids[:scaffold])
    assert (1, (len(block.ids) - 1) * first.num_prefixes - scaffold + 1) in counter.shapes
    # the truncated item (its last step ends the completion) leaves nothing to the cache
    truncated = items[3]
    assert (1, sum(len(b.ids) - 1 for b in truncated.answers) * truncated.num_prefixes) in counter.shapes
    # in micro-batches of several rows, ordered by copy tokens: the same numbers
    assert_scores_close(
        score_from_cache(StepLikelihoodScorer("block", batch_size=3), model, generation, items, rows), expected
    )


def test_cache_route_forwards_hold_rows_of_similar_copy_tokens():
    """A forward pads its rows to the longest: rows go by copy tokens, at most `max_rows` per forward, and a forward
    ends where a row would run fewer than MIN_CHUNK_FILL of its first row's copy tokens."""
    from trl_mig.cached_scoring import _chunks_by_copy_tokens, _CopyPlan
    from trl_mig.scoring import MIN_CHUNK_FILL

    assert MIN_CHUNK_FILL == 0.9
    tokens = [20, 40, 37, 5, 36, 19, 40]
    plans = [_CopyPlan(skips=[], tokens=t, columns=c) for t, c in zip(tokens, [9, 3, 9, 9, 9, 9, 8])]
    # 40 (8 cached columns before 3), 40, 37, 36 share a forward; 20 and 19; 5 alone
    assert _chunks_by_copy_tokens(plans, max_rows=8) == [[6, 1, 2, 4], [0, 5], [3]]
    assert _chunks_by_copy_tokens(plans, max_rows=2) == [[6, 1], [2, 4], [0, 5], [3]]
    assert _chunks_by_copy_tokens(plans, max_rows=1) == [[j] for j in (6, 1, 2, 4, 0, 5, 3)]
    assert _chunks_by_copy_tokens([], max_rows=4) == []


def test_cache_route_asks_for_its_forward_count_before_the_first_forward(char_tokenizer):
    """Under ZeRO-3 / FSDP the ranks agree on the forward count before any forward: the count asked is the forwards
    the route runs (the grouped copy forwards and the cache extension), and padding forwards fill up to the answer."""
    from trl_mig.cached_scoring import _chunks_by_copy_tokens, _CopyPlan, score_from_cache

    model = build_tiny_model(char_tokenizer).float().eval()
    items = sample_items(char_tokenizer)
    generation = generate_forced(model, char_tokenizer, items)
    rows = list(range(len(items)))
    expected = [reference_scores(model, item) for item in items]
    width = generation.prompt_mask.shape[1]
    for extra in (0, 3):
        extend = any(width + max(item.boundaries) > generation.length for item in items)  # then one more forward
        plans = [_CopyPlan.of(item, generation.length + extend - width) for item in items]
        own = len(_chunks_by_copy_tokens(plans, 2)) + extend
        assert own > math.ceil(len(items) / 2)  # rows of unlike copy tokens take forwards of their own
        asked = []
        scorer = StepLikelihoodScorer("block", batch_size=2, sync_forward_count=lambda n: asked.append(n) or n + extra)
        counter = ForwardCounter(model)
        assert_scores_close(score_from_cache(scorer, model, generation, items, rows), expected)
        counter.handle.remove()
        assert asked == [own]
        assert counter.count == scorer.forward_count == own + extra


# ------------------------------------------------------------------------------------ prefixes shared by completions
def test_a_prefix_several_completions_share_is_scored_once(char_tokenizer):
    """l_k depends on the prompt, completion[:b_k] and the answers only: a later item keeps only prefixes no earlier
    item had (an item left with none is not scored), and every item gets its l_k back, equal to scoring them all."""
    from trl_mig.scoring import distinct_prefixes

    wrong_first = ["### Step 1\n12+7=18\n", "### Step 2\n18*3=54\n"]
    items = [
        make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"]),
        make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS, ["57"]),  # its first three prefixes are item 0's
        make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"], tail=""),  # item 0's prefixes, another tail
        make_item(char_tokenizer, PROMPTS[0], wrong_first, ["57"]),  # shares l_0 only
        make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57", "fifty-seven"]),  # other answers: nothing shared
        make_item(char_tokenizer, PROMPTS[1], STEP_TEXTS[:2], ["57"]),  # another prompt: nothing shared
    ]
    distinct = distinct_prefixes(items)
    assert distinct.origins == [0, 1, 3, 4, 5]
    assert [list(item.boundaries) for item in distinct.items] == [
        list(items[0].boundaries), [items[1].boundaries[3]], list(items[3].boundaries[1:]),
        list(items[4].boundaries), list(items[5].boundaries)]
    assert distinct.sources[2] == [(0, 0), (0, 1), (0, 2)]
    assert distinct.sources[1] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert distinct.sources[3] == [(0, 0), (2, 0), (2, 1)]

    model = build_tiny_model(char_tokenizer).float().eval()
    counter = ForwardCounter(model)
    scorer = StepLikelihoodScorer("prefix", batch_size=1)  # one row per prefix and answer: rows counted by forwards
    spread = distinct.spread(scorer.score(model, distinct.items))
    counter.handle.remove()
    assert counter.count == sum(item.num_prefixes * len(item.answers) for item in distinct.items) == 15
    assert sum(item.num_prefixes * len(item.answers) for item in items) == 22
    assert_scores_close(spread, [reference_scores(model, item) for item in items])


def test_kept_completions_share_prefixes_and_keep_their_rows(char_tokenizer):
    """A fused pass's items (whole completions, positions offset by the prompt's left padding): a prefix is shared only
    at the same offset, and an item left without a prefix still gets its row (its completion's log-probs); items with
    images keep every prefix; no items give no scores."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_mig.scoring import distinct_prefixes

    item = make_item(char_tokenizer, PROMPTS[0], STEP_TEXTS[:2], ["57"])
    fused = [dataclasses.replace(item, keep_completion=True, position_offset=offset) for offset in (3, 3, 5)]
    distinct = distinct_prefixes(fused)
    assert distinct.origins == [0, 1, 2]
    assert [list(kept.boundaries) for kept in distinct.items] == [list(item.boundaries), [], list(item.boundaries)]
    assert distinct.sources[1] == [(0, m) for m in range(item.num_prefixes)]

    model = build_tiny_model(char_tokenizer).float().eval()
    add_fused_lm_head(model, temperature=1.0)
    scores, logps = StepLikelihoodScorer("block").score(model, distinct.items, completion_logps=True)
    assert_scores_close(distinct.spread(scores), [reference_scores(model, item)] * 3)
    assert [row.numel() for row in logps] == [len(item.completion_ids)] * 3
    torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=0)

    with_image = dataclasses.replace(item, multimodal={"pixel_values": torch.zeros(1, 3)})
    distinct = distinct_prefixes([item, with_image])
    assert distinct.origins == [0, 1]
    assert all(list(kept.boundaries) == list(item.boundaries) for kept in distinct.items)
    empty = distinct_prefixes([])
    assert empty.items == [] and empty.spread([]) == []
