"""Finding the chain of thought and its steps, in characters and in the completion's own tokens."""

import pytest
import torch

from trl_mig.credit import NOT_COT
from trl_mig.segmentation import FormatSpec, analyze_text, segment_completion, step_ids_tensor, token_end_offsets

TAGGED = "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>"


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def step_texts(tokenizer, ids, segments):
    bounds = segments.boundaries
    return [tokenizer.decode(ids[bounds[k] : bounds[k + 1]]) for k in range(segments.num_steps)]


def test_tagged_completion(char_tokenizer):
    ids = encode(char_tokenizer, TAGGED)
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert seg.num_steps == 2 and not seg.used_fallback and seg.merged_steps == 0
    assert step_texts(char_tokenizer, ids, seg) == ["### Step 1\n2+3=5\n", "### Step 2\n5*4=20\n"]
    assert char_tokenizer.decode(ids[: seg.boundaries[0]]) == "<think>"
    assert seg.layout.well_formed and seg.layout.answer == "20"


def test_preamble_joins_step_one(char_tokenizer):
    ids = encode(char_tokenizer, "<think>Let me see.\n### Step 1\na\n### Step 2\nb</think><answer>1</answer>")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert step_texts(char_tokenizer, ids, seg) == ["Let me see.\n### Step 1\na\n", "### Step 2\nb"]


def test_think_open_tag_in_prompt(char_tokenizer):
    # chat templates that pre-fill <think>: only </think> is in the completion
    ids = encode(char_tokenizer, "### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert seg.boundaries[0] == 0 and seg.num_steps == 2
    assert step_texts(char_tokenizer, ids, seg)[1] == "### Step 2\n5*4=20\n"
    assert seg.layout.well_formed


def test_truncated_completion_scores_the_steps_so_far(char_tokenizer):
    ids = encode(char_tokenizer, "<think>### Step 1\n2+3=5\n### Step 2\n5*4=")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert seg.num_steps == 2 and seg.boundaries[-1] == len(ids)
    assert not seg.layout.think_closed and seg.layout.answer is None and not seg.layout.well_formed


def test_answer_without_closed_thought_ends_the_thought(char_tokenizer):
    ids = encode(char_tokenizer, "<think>### Step 1\n2+3=5\n<answer>5</answer>")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert step_texts(char_tokenizer, ids, seg) == ["### Step 1\n2+3=5\n"]
    assert seg.layout.answer == "5" and not seg.layout.well_formed


@pytest.mark.parametrize(
    "fallback, expected",
    [
        ("paragraph", ["First idea.\nStill first.\n\n", "Second idea.\n\n\n", "Third."]),
        ("line", ["First idea.\n", "Still first.\n\n", "Second idea.\n\n\n", "Third."]),
        ("none", ["First idea.\nStill first.\n\nSecond idea.\n\n\nThird."]),
    ],
)
def test_untagged_fallback(char_tokenizer, fallback, expected):
    text = "<think>First idea.\nStill first.\n\nSecond idea.\n\n\nThird.</think><answer>3</answer>"
    ids = encode(char_tokenizer, text)
    seg = segment_completion(char_tokenizer, ids, FormatSpec(step_fallback=fallback))
    assert step_texts(char_tokenizer, ids, seg) == expected
    assert seg.used_fallback and not seg.layout.has_step_headers and not seg.layout.well_formed


def test_trailing_blank_lines_do_not_make_an_empty_step(char_tokenizer):
    ids = encode(char_tokenizer, "<think>One.\n\nTwo.\n\n\n</think><answer>3</answer>")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert step_texts(char_tokenizer, ids, seg) == ["One.\n\n", "Two.\n\n\n"]


@pytest.mark.parametrize("text", ["<think></think><answer>1</answer>", "<think>  \n</think><answer>1</answer>", ""])
def test_empty_thought_has_zero_steps(char_tokenizer, text):
    seg = segment_completion(char_tokenizer, encode(char_tokenizer, text), FormatSpec())
    assert seg.num_steps == 0 and len(seg.boundaries) == 1


def test_no_tags_at_all(char_tokenizer):
    # a completion that ignores the format: everything is thought, split by the fallback
    ids = encode(char_tokenizer, "just some words\n\nand more")
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    assert seg.boundaries == (0, 17, len(ids)) and seg.used_fallback


def test_step_cap_merges_evenly(char_tokenizer):
    steps = "".join(f"### Step {i}\nx{i}\n" for i in range(1, 21))
    ids = encode(char_tokenizer, f"<think>{steps}</think><answer>1</answer>")
    full = segment_completion(char_tokenizer, ids, FormatSpec(max_steps=32))
    capped = segment_completion(char_tokenizer, ids, FormatSpec(max_steps=16))
    assert full.num_steps == 20 and capped.num_steps == 16 and capped.merged_steps == 4
    assert set(capped.boundaries) <= set(full.boundaries)
    assert capped.boundaries[0] == full.boundaries[0] and capped.boundaries[-1] == full.boundaries[-1]
    positions = [full.boundaries.index(b) for b in capped.boundaries]
    group_sizes = [positions[k + 1] - positions[k] for k in range(16)]
    assert sorted(set(group_sizes)) == [1, 2] and group_sizes.count(2) == 4, "even groups of consecutive steps"
    at_cap = segment_completion(char_tokenizer, ids, FormatSpec(max_steps=20))
    assert at_cap.boundaries == full.boundaries and at_cap.merged_steps == 0


def test_custom_patterns(char_tokenizer):
    spec = FormatSpec(think_open_tag="<reason>", think_close_tag="</reason>", step_pattern=r"Step \d+:", answer_pattern=r"Answer: (\S+)")
    text = "<reason>Step 1: a\nStep 2: b\n</reason>Answer: 7"
    seg = segment_completion(char_tokenizer, encode(char_tokenizer, text), spec)
    assert seg.num_steps == 2 and seg.layout.answer == "7" and seg.layout.well_formed


@pytest.mark.parametrize("tokenizer_name", ["char_tokenizer", "bpe_tokenizer", "metaspace_tokenizer"])
def test_token_offsets_reproduce_the_decoded_prefixes(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    text = "<think>### Step 1\n12+7=19\n### Step 2\n19*3=57\n</think>\n<answer>57</answer> done"
    ids = encode(tokenizer, text)
    decoded, ends = token_end_offsets(tokenizer, ids)
    assert decoded == tokenizer.decode(ids)
    assert ends == sorted(ends) and ends[-1] == len(decoded) and len(ends) == len(ids)
    for j in range(len(ids)):
        assert decoded[: ends[j]] == tokenizer.decode(ids[: j + 1]), j


def test_token_offsets_of_several_tokenizers_stay_separate(char_tokenizer, bpe_tokenizer, metaspace_tokenizer):
    # each tokenizer's per-token pieces are cached; the same ids mean different text in another tokenizer
    texts = ["<think>### Step 1\n12+7=19\n</think>", "<answer>57</answer> done", "a b  c\n\nd"]
    for _ in range(2):
        for tokenizer in (char_tokenizer, bpe_tokenizer, metaspace_tokenizer):
            for text in texts:
                ids = encode(tokenizer, text)
                decoded, ends = token_end_offsets(tokenizer, ids)
                assert decoded == tokenizer.decode(ids)
                assert [decoded[:end] for end in ends] == [tokenizer.decode(ids[: j + 1]) for j in range(len(ids))]


@pytest.mark.parametrize("tokenizer_name", ["bpe_tokenizer", "metaspace_tokenizer"])
def test_multichar_tokenizers_cut_on_token_boundaries(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    ids = encode(tokenizer, TAGGED)
    seg = segment_completion(tokenizer, ids, FormatSpec())
    assert list(seg.boundaries) == sorted(set(seg.boundaries))
    assert 1 <= seg.num_steps <= 2
    # every step after the first begins with its header, or with the token that straddles into it
    for k in range(1, seg.num_steps):
        assert "Step" in tokenizer.decode(ids[seg.boundaries[k] : seg.boundaries[k + 1]])
    assert "</think>" not in tokenizer.decode(ids[seg.boundaries[0] : seg.boundaries[-1]])


def test_token_offsets_with_multibyte_characters(bpe_tokenizer):
    text = "<think>héllo wörld ✓ → ∑\n\nnext</think>"
    ids = encode(bpe_tokenizer, text)
    decoded, ends = token_end_offsets(bpe_tokenizer, ids)
    assert decoded == text and ends[-1] == len(text) and ends == sorted(ends)
    seg = segment_completion(bpe_tokenizer, ids, FormatSpec())
    assert seg.num_steps == 2 and bpe_tokenizer.decode(ids[seg.boundaries[1] : seg.boundaries[2]]).endswith("next")


def test_step_ids_tensor(char_tokenizer):
    ids = encode(char_tokenizer, TAGGED)
    seg = segment_completion(char_tokenizer, ids, FormatSpec())
    empty = segment_completion(char_tokenizer, encode(char_tokenizer, "<think></think>"), FormatSpec())
    step_ids = step_ids_tensor([seg, empty], length=len(ids) + 3)
    assert step_ids.shape == (2, len(ids) + 3) and step_ids.dtype == torch.long
    b = seg.boundaries
    assert (step_ids[0, : b[0]] == NOT_COT).all()
    assert (step_ids[0, b[0] : b[1]] == 0).all() and (step_ids[0, b[1] : b[2]] == 1).all()
    assert (step_ids[0, b[2] :] == NOT_COT).all(), "the answer part and padding are not CoT"
    assert (step_ids[1] == NOT_COT).all()


def test_analyze_text_without_tokenizer():
    layout = analyze_text(TAGGED, FormatSpec())
    assert TAGGED[layout.cot_start : layout.cot_end] == "### Step 1\n2+3=5\n### Step 2\n5*4=20\n"
    assert layout.num_steps == 2 and TAGGED[layout.step_starts[0] :].startswith("### Step 2")
