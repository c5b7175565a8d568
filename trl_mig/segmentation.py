"""Find the chain of thought and its steps in a completion, in characters and then in the completion's own tokens.

A completion looks like `[<think>] s_1 s_2 ... s_K </think> <answer>...</answer>`. The open tag may be in the prompt
(chat templates that pre-fill it), the close tag may be missing (truncated completion), and the steps may have no
headers (then `step_fallback` decides). Text before the first step header belongs to step 1, so the prefix for l_0
ends where the chain of thought starts.

Boundaries are found on the decoded text and mapped back to token indices through each token's character offsets,
never by re-tokenising text, so prefixes are exactly the tokens the policy sampled.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import ANSWER_MATCHES
from .credit import NOT_COT

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE_BREAK = re.compile(r"\n\s*")


@dataclass(frozen=True)
class FormatSpec:
    """The completion format MIG reads: tags, step headers, answer pattern, fallback and step cap."""

    think_open_tag: str = "<think>"
    think_close_tag: str = "</think>"
    step_pattern: str = r"#+[ \t]*Step[ \t]*\d+"
    answer_pattern: str = r"<answer>(.*?)</answer>"
    step_fallback: str = "paragraph"
    max_steps: int = 16
    answer_match: str = "math"  # how an answer is compared with the ground truth: "math" (math-verify) or "exact"

    @classmethod
    def from_config(cls, args) -> FormatSpec:
        return cls(
            think_open_tag=args.think_open_tag,
            think_close_tag=args.think_close_tag,
            step_pattern=args.step_pattern,
            answer_pattern=args.answer_pattern,
            step_fallback=args.step_fallback,
            max_steps=args.mig_max_steps,
            answer_match=getattr(args, "answer_match", "math"),
        )

    def __post_init__(self):
        if self.answer_match not in ANSWER_MATCHES:
            raise ValueError(f"answer_match={self.answer_match!r} is not one of {list(ANSWER_MATCHES)}.")

    @cached_property
    def step_regex(self) -> re.Pattern:
        return re.compile(self.step_pattern)

    @cached_property
    def answer_regex(self) -> re.Pattern:
        return re.compile(self.answer_pattern, re.DOTALL)


@dataclass(frozen=True)
class TextLayout:
    """Character-level layout of one completion.

    `cot_start`/`cot_end` delimit the chain of thought; `step_starts` are the characters where steps 2..K begin;
    `answer` is the first group of `answer_pattern` after the thought, or None.
    """

    cot_start: int
    cot_end: int
    think_closed: bool
    answer: str | None
    step_starts: tuple[int, ...]
    has_step_headers: bool
    num_steps: int

    @property
    def well_formed(self) -> bool:
        """Structural gate: think block closed, answer present, at least one step header."""
        return self.think_closed and self.answer is not None and self.has_step_headers


def analyze_text(text: str, spec: FormatSpec) -> TextLayout:
    """Locate the chain of thought, its steps and the answer in a completion's text."""
    cot_start = 0
    if spec.think_open_tag:
        open_at = text.find(spec.think_open_tag)
        if open_at >= 0:
            cot_start = open_at + len(spec.think_open_tag)
    close_at = text.find(spec.think_close_tag, cot_start)
    think_closed = close_at >= 0
    answer_search_from = close_at + len(spec.think_close_tag) if think_closed else cot_start
    answer_match = spec.answer_regex.search(text, answer_search_from)
    if think_closed:
        cot_end = close_at
    elif answer_match is not None:  # answer without a closed thought: the thought ends where the answer starts
        cot_end = answer_match.start()
    else:  # truncated: everything after the open tag is thought
        cot_end = len(text)
    answer = answer_match.group(1) if answer_match is not None else None

    cot = text[cot_start:cot_end]
    if not cot.strip():
        return TextLayout(cot_start, cot_end, think_closed, answer, (), False, 0)
    headers = [cot_start + m.start() for m in spec.step_regex.finditer(cot)]
    if headers:
        starts = headers[1:]  # text before the first header joins step 1
    elif spec.step_fallback == "paragraph":
        starts = [cot_start + m.end() for m in _BLANK_LINE.finditer(cot)]
    elif spec.step_fallback == "line":
        starts = [cot_start + m.end() for m in _LINE_BREAK.finditer(cot)]
    else:
        starts = []
    starts = [s for s in starts if cot_start < s < cot_end and text[s:cot_end].strip()]
    return TextLayout(cot_start, cot_end, think_closed, answer, tuple(starts), bool(headers), len(starts) + 1)


def token_end_offsets(tokenizer, token_ids: list[int]) -> tuple[str, list[int]]:
    """
    Decode `token_ids` and give, for each token, the character offset where its text ends.

    Returns `(text, ends)` with `text == tokenizer.decode(token_ids)` and `ends[j]` = length of the text of
    `token_ids[: j + 1]`. Tries, cheapest first: per-token pieces, a sliding window of incremental decodes (handles
    SentencePiece's leading spaces), and decoding every prefix (exact, quadratic) as the last resort.
    """
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(token_ids, **kwargs)
    if not token_ids:
        return text, []
    pieces = tokenizer.batch_decode([[t] for t in token_ids], **kwargs)
    if "".join(pieces) == text:
        return text, _cumulative(pieces)
    window = 8
    longer = tokenizer.batch_decode([token_ids[max(0, j - window) : j + 1] for j in range(len(token_ids))], **kwargs)
    shorter = tokenizer.batch_decode([token_ids[max(0, j - window) : j] for j in range(len(token_ids))], **kwargs)
    if all(a.startswith(b) for a, b in zip(longer, shorter)):
        pieces = [a[len(b) :] for a, b in zip(longer, shorter)]
        if "".join(pieces) == text:
            return text, _cumulative(pieces)
    prefixes = tokenizer.batch_decode([token_ids[: j + 1] for j in range(len(token_ids))], **kwargs)
    ends, best = [], 0
    for prefix in prefixes:
        prefix = prefix.rstrip("\ufffd")  # an unfinished multi-byte character is not text yet
        if not text.startswith(prefix):
            prefix = prefix[: _common_prefix_length(prefix, text)]
        best = max(best, len(prefix))
        ends.append(best)
    return text, ends


def _cumulative(pieces: list[str]) -> list[int]:
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class StepSegments:
    """Token-level steps of one completion.

    `boundaries` = (b_0, b_1, ..., b_K): the prefix for l_k is `completion_ids[:b_k]`; step k spans tokens
    `[b_{k-1}, b_k)`. b_0 is where the chain of thought starts, b_K where it ends.
    """

    boundaries: tuple[int, ...]
    layout: TextLayout
    merged_steps: int  # steps beyond the cap merged into their neighbours (0 if none)

    @property
    def num_steps(self) -> int:
        return len(self.boundaries) - 1

    @property
    def used_fallback(self) -> bool:
        return self.num_steps > 0 and not self.layout.has_step_headers


def segment_completion(tokenizer, completion_ids: list[int], spec: FormatSpec) -> StepSegments:
    """
    Segment one completion (its content tokens, without trailing EOS or padding) into steps.

    Each character boundary maps to the number of tokens that end at or before it, so a token that straddles a
    boundary goes to the later segment.
    """
    text, ends = token_end_offsets(tokenizer, completion_ids)
    layout = analyze_text(text, spec)

    def to_token(char: int) -> int:
        return bisect.bisect_right(ends, char)

    start, end = to_token(layout.cot_start), to_token(layout.cot_end)
    if layout.num_steps == 0 or end <= start:
        return StepSegments((start,), layout, 0)
    inner = []
    for char in layout.step_starts:
        token = to_token(char)
        if (inner[-1] if inner else start) < token < end:
            inner.append(token)
    bounds = [start, *inner, end]
    steps = len(bounds) - 1
    merged = 0
    if steps > spec.max_steps:
        # keep every (steps / max_steps)-th boundary: consecutive steps merge into evenly sized groups
        keep = [bounds[(j * steps) // spec.max_steps] for j in range(spec.max_steps)]
        merged = steps - spec.max_steps
        bounds = [*keep, end]
    return StepSegments(tuple(bounds), layout, merged)


def step_ids_tensor(segments: list[StepSegments], length: int, device=None) -> torch.Tensor:
    """
    Step membership of every completion token.

    Returns:
        `torch.Tensor` of shape `(B, length)`, dtype long: k-1 for tokens of step k, `NOT_COT` (-1) elsewhere
        (tokens before the thought, the answer part, padding).
    """
    step_ids = torch.full((len(segments), length), NOT_COT, dtype=torch.long)
    for row, seg in enumerate(segments):
        for k in range(seg.num_steps):
            lo, hi = seg.boundaries[k], min(seg.boundaries[k + 1], length)
            if lo < hi:
                step_ids[row, lo:hi] = k
    return step_ids.to(device) if device is not None else step_ids
