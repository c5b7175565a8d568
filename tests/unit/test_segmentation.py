"""Finding the chain of thought and its steps, in characters and in the completion's own tokens."""

import random

import pytest
import torch

from trl_mig import segmentation
from trl_mig.builtin.tokenizers import TOKENIZER_KINDS, tiny_tokenizer
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


# ------------------------------------------------------------------ token offsets: exact for every tokenizer kind
DECODE = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
# characters the tiny tokenizers learned whole, and ones they split into bytes (byte_bpe) or do not know (unigram)
MULTIBYTE = "×÷−√≤≥πé中文" + "∫∂λ你好€🙂"
WORDS = ["### Step 1\n", "### Step 2\n", "12+7=19", " the", " answer", "  two spaces", "\n\n", "x", " ", "42"]


def reference_end_offsets(tokenizer, ids):
    """The definition: the text of every prefix, without an unfinished character (trailing U+FFFD), cut where it
    stops being a prefix of the whole text; a token ends where the longest of these so far ends."""
    text = tokenizer.decode(ids, **DECODE)
    ends, best = [], 0
    for j in range(len(ids)):
        prefix = tokenizer.decode(ids[: j + 1], **DECODE).rstrip("\ufffd")
        while not text.startswith(prefix):
            prefix = prefix[:-1]
        best = max(best, len(prefix))
        ends.append(best)
    return text, ends


def id_sequences(tokenizer, seed=0):
    """Random token ids (any id: special tokens, tags, lone bytes), and tokenised text with multi-byte characters,
    leading spaces and special tokens, cut at random tokens (so sometimes inside a character)."""
    rng = random.Random(seed)
    tags = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    specials = [tokenizer.eos_token_id, tokenizer.pad_token_id, *tags]
    sequences = [[], [specials[0]], [specials[2], specials[0]]]
    for length in [1, 1, 2, 2, 3, 3, 4, 5, 8, 13, 21, 34] * 4:
        sequences.append([rng.randrange(len(tokenizer)) for _ in range(length)])
    for _ in range(40):
        pieces = [rng.choice(WORDS + list(MULTIBYTE) * 2) for _ in range(rng.randint(1, 20))]
        text = "".join(pieces)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        sequences.append(ids)
        sequences.append(ids[: rng.randint(1, max(1, len(ids)))])
    return sequences


@pytest.mark.parametrize("run_chunk", [2, 16])  # 2: long runs of split characters move their window on often
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_token_offsets_equal_the_prefix_decoding_definition(kind, run_chunk, monkeypatch):
    tokenizer = tiny_tokenizer(kind)
    monkeypatch.setattr(segmentation, "_RUN_CHUNK", run_chunk)

    def quadratic(*args):
        raise AssertionError(f"{kind}: token_end_offsets decoded every prefix")

    monkeypatch.setattr(segmentation, "_prefix_end_offsets", quadratic)
    split = 0
    for ids in id_sequences(tokenizer):
        assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids), ids
        split += any("\ufffd" in tokenizer.decode([t], **DECODE) for t in ids)
    if kind == "byte_bpe":
        assert split > 20, "the sequences split multi-byte characters across tokens"
    assert token_end_offsets(tokenizer, torch.tensor(ids)) == token_end_offsets(tokenizer, ids)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_leading_space_and_split_characters_by_hand(kind):
    tokenizer = tiny_tokenizer(kind)
    for text in [" the answer", "  x", "√ 2", " ∫λ 你好", "<think> ∂ the</think>"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids)


def build_byte_fallback_tokenizer():
    """Llama 2 / Mistral style: Metaspace BPE whose unknown characters fall back to byte tokens `<0xXX>`, decoded by
    Replace, ByteFallback (one U+FFFD per byte token of an invalid group), Fuse and Strip (the first space)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trl_mig.builtin.tokenizers import DEFAULT_CORPUS

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False)
    trained.train_from_iterator([text for text in DEFAULT_CORPUS if text.isascii()], trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {**model["vocab"]}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    return build_byte_fallback_tokenizer()


@pytest.mark.parametrize("run_chunk", [2, 16])
def test_token_offsets_of_a_byte_fallback_tokenizer(byte_fallback_tokenizer, run_chunk, monkeypatch):
    """Byte tokens of an invalid group decode to one U+FFFD each, so a prefix can read longer than the text: the
    definition keeps the longest end so far and cuts where the prefix leaves the text."""
    tokenizer = byte_fallback_tokenizer
    monkeypatch.setattr(segmentation, "_RUN_CHUNK", run_chunk)
    monkeypatch.setattr(segmentation, "_prefix_end_offsets", lambda *args: pytest.fail("decoded every prefix"))
    sequences = id_sequences(tokenizer, seed=2)
    assert sum("<0x" in "".join(tokenizer.convert_ids_to_tokens(ids)) for ids in sequences) > 20
    for ids in sequences:
        assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids), ids


class BytesTokenizer:
    """A tokenizer-like object: each id is a byte string (some empty, some parts of characters), decoded as UTF-8
    with U+FFFD for what is not a character."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **kwargs):
        return b"".join(self.pieces[t] for t in ids).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, **kwargs):
        return [self.decode(ids) for ids in sequences]

    def encode(self, text, **kwargs):
        return [self.pieces.index(text.encode())]


@pytest.mark.parametrize("run_chunk", [2, 16])
def test_token_offsets_of_any_object_that_decodes_bytes(run_chunk, monkeypatch):
    pieces = [b"a", b"b", b" ", b"", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xe2", b"\x88", b"\x9a", b"\x88\x9a", b"\x9a\xe2"]
    pieces.append(b"x\xe2")
    tokenizer = BytesTokenizer(pieces)
    monkeypatch.setattr(segmentation, "_prefix_end_offsets", lambda *args: pytest.fail("decoded every prefix"))
    monkeypatch.setattr(segmentation, "_RUN_CHUNK", run_chunk)
    rng = random.Random(3)
    # an empty token after an invalid byte: the definition leaves the U+FFFD to the next token with text
    assert token_end_offsets(tokenizer, [0, 4, 3, 1]) == ("a\ufffdb", [1, 1, 1, 3])
    for _ in range(300):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(0, 12))]
        assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids), ids


class CountingTokenizer:
    """A tokenizer that counts its decode calls and the tokens they decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.tokens = tokenizer, 0, 0

    def decode(self, ids, **kwargs):
        self.calls, self.tokens = self.calls + 1, self.tokens + len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, sequences, **kwargs):
        self.calls, self.tokens = self.calls + 1, self.tokens + sum(map(len, sequences))
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_token_offsets_decode_a_constant_number_of_times_and_linear_tokens(kind):
    tokenizer = tiny_tokenizer(kind)
    rng = random.Random(1)
    text = "<think>" + " ".join(rng.choice(WORDS + list(MULTIBYTE)) for _ in range(600)) + "</think>"
    costs = decode_costs(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    assert costs[0][0] == costs[1][0] <= 2, "the text, then one batch of windows around split characters"
    assert costs[1][1] < 4, f"{costs[1][1]:.1f} tokens decoded per token"


def decode_costs(tokenizer, ids):
    """`(decode calls, tokens decoded per token)` of the offsets of a quarter of `ids` and of all of them."""
    counting = CountingTokenizer(tokenizer)
    token_end_offsets(counting, ids)  # fills the per-tokenizer piece table
    costs = []
    for length in (len(ids) // 4, len(ids)):
        counting.calls = counting.tokens = 0
        token_end_offsets(counting, ids[:length])
        costs.append((counting.calls, counting.tokens / length))
    return costs


@pytest.mark.parametrize("kind", ["byte_bpe", "byte_fallback"])
def test_a_long_run_of_split_characters_costs_linear_time(kind, byte_fallback_tokenizer):
    """Characters the vocabulary only has as bytes, back to back, make one long run of partial tokens."""
    tokenizer = byte_fallback_tokenizer if kind == "byte_fallback" else tiny_tokenizer(kind)
    rng = random.Random(2)
    ids = tokenizer("".join(rng.choice("∫∂λ你好€🙂") for _ in range(200)), add_special_tokens=False)["input_ids"]
    assert all("\ufffd" in tokenizer.decode([t], **DECODE) for t in ids[1:-1])
    assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids)
    (short_calls, short_tokens), (long_calls, long_tokens) = decode_costs(tokenizer, ids)
    chunk = segmentation._RUN_CHUNK
    assert long_tokens < 2 * chunk and long_calls <= 2 + len(ids) // chunk, (long_calls, long_tokens)
    assert long_tokens < 1.5 * short_tokens, "the cost per token does not grow with the run"


def test_an_unknown_decoder_gets_the_exact_prefix_decoding(char_tokenizer, monkeypatch):
    """A decoder whose tokens' texts depend on their neighbours in other ways (CTC merges repeats) fails the pieces'
    check, and the offsets come from decoding every prefix."""
    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(char_tokenizer.backend_tokenizer.to_str())
    backend.decoder = decoders.CTC(pad_token="<pad>", word_delimiter_token="|", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    fallbacks = []
    quadratic = segmentation._prefix_end_offsets
    monkeypatch.setattr(segmentation, "_prefix_end_offsets", lambda *args: fallbacks.append(1) or quadratic(*args))
    ids = encode(tokenizer, "abbcc aa|d")
    assert token_end_offsets(tokenizer, ids) == reference_end_offsets(tokenizer, ids)
    assert fallbacks == [1]


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
