"""Agent trajectories: model turns as steps, read token-exactly from the model-token mask, and their scoring.

A trajectory is built from pieces `(text, written_by_model)`, each tokenised on its own and concatenated, so every
expected boundary is a known token index (the end of a piece), found without the code under test.
"""

from __future__ import annotations

import pytest
import torch

from trl_mig.credit import NOT_COT
from trl_mig.scoring import ScoringItem, encode_answer
from trl_mig.segmentation import FormatSpec, Turn, segment_completion, segment_turns, split_turns, step_ids_tensor
from trl_mig.builtin.tiny import build_tiny_model

from helpers import SCAFFOLD, assert_every_path_matches, build_bpe_tokenizer, cpu_config, reference_scores

MODEL, TOOL = 1, 0

ONE_CALL = [
    ("<think>", MODEL),
    ("I need 2+3.\n</think><call>add(2,3)</call>", MODEL),
    ("<result>5</result>\n", TOOL),
    ("<think>5*4=20\n", MODEL),
    ("</think>\n<answer>20</answer>", MODEL),
]


@pytest.fixture(scope="module")
def tokenizers(char_tokenizer):
    return {"char": char_tokenizer, "bpe": build_bpe_tokenizer()}


def trajectory(tokenizer, pieces):
    """Token ids, model-token mask and the token index where each piece ends."""
    ids, mask, ends = [], [], []
    for text, by_model in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [by_model] * len(piece)
        ends.append(len(ids))
    return ids, mask, ends


def step_texts(tokenizer, ids, seg):
    return [tokenizer.decode(ids[a:b]) for a, b in zip(seg.boundaries, seg.boundaries[1:])]


# ------------------------------------------------------------------------------------------------------- turns
@pytest.mark.parametrize(
    "mask, leading, turns",
    [
        ([1, 1, 0, 0, 1, 1, 1], 0, [Turn(0, 2, 4), Turn(4, 7, 7)]),
        ([0, 0, 1, 0], 2, [Turn(2, 3, 4)]),
        ([1, 0, 1, 0], 0, [Turn(0, 1, 2), Turn(2, 3, 4)]),
        ([1, 1], 0, [Turn(0, 2, 2)]),
        ([0, 0], 2, []),
        ([], 0, []),
        ([True, False, 1.0], 0, [Turn(0, 1, 2), Turn(2, 3, 3)]),
    ],
)
def test_split_turns(mask, leading, turns):
    assert split_turns(mask) == (leading, turns)


def test_a_mask_of_other_values_is_an_error():
    with pytest.raises(ValueError, match="model-token mask holds 1 .* or 0"):
        split_turns([1, 2, 0])


def test_a_mask_of_the_wrong_length_is_an_error(char_tokenizer):
    ids, mask, _ = trajectory(char_tokenizer, ONE_CALL)
    with pytest.raises(ValueError, match=f"{len(ids) - 1} entries for {len(ids)} completion tokens"):
        segment_turns(char_tokenizer, ids, mask[:-1], FormatSpec())


# ------------------------------------------------------------------------------------------------ segmentation
@pytest.mark.parametrize("tokenizer_name", ["char", "bpe"])
def test_a_tool_turn_is_a_step_whose_prefix_ends_after_the_response(tokenizers, tokenizer_name):
    tokenizer = tokenizers[tokenizer_name]
    ids, mask, ends = trajectory(tokenizer, ONE_CALL)
    seg = segment_turns(tokenizer, ids, mask, FormatSpec())
    # b_0 after the first open tag, b_1 after the tool's result, b_2 where the last turn's thought closes
    assert seg.boundaries == (ends[0], ends[2], ends[3])
    assert seg.external_spans == ((ends[1], ends[2]),) and seg.tool_steps == (0,)
    assert seg.layout.answer == "20" and seg.layout.think_closed and seg.layout.well_formed
    assert seg.merged_steps == 0 and not seg.used_fallback

    step_ids = step_ids_tensor([seg], len(ids) + 2)[0].tolist()  # two padding columns
    expected = [NOT_COT] * ends[0] + [0] * (ends[1] - ends[0]) + [NOT_COT] * (ends[2] - ends[1])
    expected += [1] * (ends[3] - ends[2]) + [NOT_COT] * (len(ids) + 2 - ends[3])
    assert step_ids == expected, "the tool's result and the answer get no MIG credit"


def test_headers_split_a_tool_turn_but_not_a_response(char_tokenizer):
    pieces = [
        ("<think>", MODEL),
        ("### Step 1\nplan\n", MODEL),
        ("### Step 2\ncall</think><call>x</call>", MODEL),
        ("<result>### Step 9 is the tool's text</result>\n", TOOL),
        ("### Step 3\nuse it\n", MODEL),
        ("### Step 4\ndone\n", MODEL),
        ("</think><answer>1</answer>", MODEL),
    ]
    ids, mask, ends = trajectory(char_tokenizer, pieces)
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    assert seg.boundaries == (ends[0], ends[1], ends[3], ends[4], ends[5])
    assert seg.tool_steps == (1,)
    assert step_texts(char_tokenizer, ids, seg)[1] == pieces[2][0] + pieces[3][0]


def test_two_calls_then_an_answer_without_a_thought(char_tokenizer):
    pieces = [
        ("<think>look up a", MODEL),
        ("<obs>a=2</obs>", TOOL),
        ("<think>now b</think><call>b</call>", MODEL),
        ("<obs>b=3</obs>", TOOL),
        ("<answer>5</answer>", MODEL),  # the last turn only answers: no step of its own
    ]
    ids, mask, ends = trajectory(char_tokenizer, pieces)
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    assert seg.boundaries == (1, ends[1], ends[3]) and seg.tool_steps == (0, 1)
    assert seg.external_spans == ((ends[0], ends[1]), (ends[2], ends[3]))
    assert seg.layout.answer == "5" and seg.layout.think_closed and seg.layout.well_formed  # nothing left open
    ids, mask, _ = trajectory(char_tokenizer, [*pieces[:4], ("<think>hm\n<answer>5</answer>", MODEL)])
    assert not segment_turns(char_tokenizer, ids, mask, FormatSpec()).layout.think_closed
    assert step_ids_tensor([seg], len(ids))[0, ends[3] :].eq(NOT_COT).all()


def test_a_trajectory_that_ends_on_a_response_has_no_answer(char_tokenizer):
    ids, mask, ends = trajectory(char_tokenizer, ONE_CALL[:3])
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    assert seg.boundaries == (ends[0], ends[2]) and seg.tool_steps == (0,)
    assert seg.layout.answer is None and not seg.layout.think_closed and not seg.layout.well_formed


def test_leading_external_tokens_join_the_prompt_only_prefix(char_tokenizer):
    pieces = [("<obs>start</obs>\n", TOOL), *ONE_CALL]
    ids, mask, ends = trajectory(char_tokenizer, pieces)
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    assert seg.boundaries == (ends[1], ends[3], ends[4])
    assert seg.external_spans == ((0, ends[0]), (ends[2], ends[3]))


def test_leading_external_tokens_then_one_turn_read_that_turn_as_text(char_tokenizer):
    last_turn = "<think>### Step 1\na\n### Step 2\nb\n</think><answer>1</answer>"
    pieces = [("<obs>start</obs>\n", TOOL), (last_turn, MODEL)]
    ids, mask, ends = trajectory(char_tokenizer, pieces)
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    text = segment_completion(char_tokenizer, ids[ends[0] :], FormatSpec())
    assert seg.boundaries == tuple(ends[0] + b for b in text.boundaries)
    assert seg.tool_steps == () and seg.layout.answer == "1" and seg.layout.well_formed


@pytest.mark.parametrize("tokenizer_name", ["char", "bpe"])
@pytest.mark.parametrize(
    "text",
    [
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>",
        "<think>2+3=5\n\n5*4=20</think>\n<answer>20</answer>",
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=",
        "<answer>20</answer>",
    ],
)
def test_without_an_external_token_it_is_the_text_segmentation(tokenizers, tokenizer_name, text):
    tokenizer = tokenizers[tokenizer_name]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = segment_completion(tokenizer, ids, FormatSpec())
    assert segment_turns(tokenizer, ids, [1] * len(ids), FormatSpec()) == expected
    # TRL's mask_truncated_completions zeroes a truncated row's whole mask: the turns are lost, the text remains
    assert segment_turns(tokenizer, ids, [0] * len(ids), FormatSpec()) == expected


def tool_turns(count, headers_per_turn):
    pieces = [("<think>", MODEL)]
    for turn in range(count):
        for h in range(headers_per_turn):
            pieces.append((f"### Step {h + 1}\nt{turn}h{h}\n", MODEL))
        pieces += [("<call>c</call>", MODEL), (f"<r>{turn}</r>", TOOL)]
    pieces.append(("last\n</think><answer>1</answer>", MODEL))
    return pieces


def test_the_step_cap_drops_header_splits_before_turns(char_tokenizer):
    ids, mask, ends = trajectory(char_tokenizer, tool_turns(2, 3))
    uncapped = segment_turns(char_tokenizer, ids, mask, FormatSpec())
    assert uncapped.num_steps == 2 * 3 + 1 and uncapped.tool_steps == (2, 5)
    turn_ends = (ends[5], ends[10])
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec(max_steps=4))
    assert seg.num_steps == 4 and seg.merged_steps == 3
    assert set(turn_ends) <= set(seg.boundaries) and seg.boundaries[-1] == uncapped.boundaries[-1]
    assert [seg.boundaries[k + 1] for k in seg.tool_steps] == list(turn_ends)
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec(max_steps=3))  # room for the turns only
    assert seg.boundaries == (ends[0], *turn_ends, uncapped.boundaries[-1]) and seg.tool_steps == (0, 1)


def test_more_turns_than_the_cap_merge_turns_evenly(char_tokenizer):
    ids, mask, ends = trajectory(char_tokenizer, tool_turns(5, 1))
    turn_ends = {ends[3 * t + 3] for t in range(5)}
    seg = segment_turns(char_tokenizer, ids, mask, FormatSpec(max_steps=3))
    assert seg.num_steps == 3 and seg.merged_steps == 3
    assert set(seg.boundaries[1:-1]) <= turn_ends, "only whole turns are merged"
    assert seg.tool_steps == tuple(k - 1 for k in range(1, 4) if seg.boundaries[k] in turn_ends)


def test_turn_step_modes_are_validated(tmp_path):
    assert cpu_config(tmp_path).mig_turn_steps == "auto"
    with pytest.raises(ValueError, match="MIGConfig.mig_turn_steps"):
        cpu_config(tmp_path, mig_turn_steps="sometimes")


# ----------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_turn_prefixes_score_as_per_prefix_teacher_forcing(tokenizers, attention):
    """l_k after a tool's result, by the block and prefix methods, equals one plain forward per prefix."""
    tokenizer = tokenizers["char"]
    model = build_tiny_model(tokenizer, "qwen2", attn_implementation=attention).float().eval()
    prompt = tokenizer("Compute (2+3)*4.", add_special_tokens=False)["input_ids"]
    items = []
    for pieces, answers in [
        (ONE_CALL, ["20"]),
        (tool_turns(2, 2), ["1", "1.0"]),
        ([("<obs>start</obs>\n", TOOL), *ONE_CALL[:3]], ["20"]),  # opens with and ends on external tokens
    ]:
        ids, mask, _ = trajectory(tokenizer, pieces)
        seg = segment_turns(tokenizer, ids, mask, FormatSpec())
        assert seg.external_spans and all(lo < seg.boundaries[-1] for lo, _ in seg.external_spans)
        blocks = [encode_answer(tokenizer, SCAFFOLD, answer) for answer in answers]
        items.append(ScoringItem(prompt, ids, seg.boundaries, blocks))
    expected = [reference_scores(model, item) for item in items]
    assert_every_path_matches(model, items, expected)


def test_the_tool_result_is_in_the_prefix(char_tokenizer, tiny_model):
    """Two trajectories that differ only in the tool's result: the same l_0, a different l_1."""
    model = tiny_model.eval()
    prompt = char_tokenizer("Compute (2+3)*4.", add_special_tokens=False)["input_ids"]
    scores = []
    for result in ("<result>5</result>\n", "<result>9</result>\n"):
        pieces = [*ONE_CALL[:2], (result, TOOL), *ONE_CALL[3:]]
        ids, mask, _ = trajectory(char_tokenizer, pieces)
        seg = segment_turns(char_tokenizer, ids, mask, FormatSpec())
        item = ScoringItem(prompt, ids, seg.boundaries, [encode_answer(char_tokenizer, SCAFFOLD, "20")])
        scores.append(reference_scores(model, item))
    assert scores[0][0] == scores[1][0]
    assert not torch.isclose(scores[0][1], scores[1][1], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------- inspection
def test_inspect_completion_follows_the_turns_of_a_masked_trajectory(char_tokenizer, tiny_model):
    from trl_mig import inspect_completion

    ids, mask, ends = trajectory(char_tokenizer, ONE_CALL)
    ids, mask = ids + [char_tokenizer.eos_token_id], mask + [MODEL]
    plain = char_tokenizer.decode(ids[:-1])
    credits = inspect_completion(tiny_model, char_tokenizer, "Compute (2+3)*4.", [ids, plain], "20",
                                 model_mask=[mask, None])
    agent, text = credits
    assert [step.token_span for step in agent.steps] == [(ends[0], ends[2]), (ends[2], ends[3])]
    assert [step.after_response for step in agent.steps] == [True, False]
    assert [agent.completion[a:b] for a, b in agent.external_spans] == ["<result>5</result>\n"]
    assert any("Agent turns" in message for message in agent.messages)
    assert text.num_steps == 1 and not text.external_spans  # the same text without a mask: one text step
    assert agent.steps[0].loglik is not None and agent.steps[0].advantage is not None

    never = inspect_completion(tiny_model, char_tokenizer, "Compute (2+3)*4.", ids, "20", model_mask=mask,
                               config=cpu_config("unused", mig_turn_steps="never"))
    assert never.num_steps == 1 and not never.external_spans


def test_inspect_completion_rejects_a_mask_it_cannot_align(char_tokenizer, tiny_model):
    from trl_mig import inspect_completion

    ids, mask, _ = trajectory(char_tokenizer, ONE_CALL)
    with pytest.raises(ValueError, match="is text, but a model_mask marks tokens"):
        inspect_completion(tiny_model, char_tokenizer, "Q", char_tokenizer.decode(ids), "20", model_mask=mask)
    with pytest.raises(ValueError, match=f"has {len(mask) - 1} entries for {len(ids)} completion tokens"):
        inspect_completion(tiny_model, char_tokenizer, "Q", ids, "20", model_mask=mask[:-1])
