"""Find the chain of thought and its steps in a completion, in characters and then in the completion's own tokens.

A completion looks like `[<think>] s_1 s_2 ... s_K </think> <answer>...</answer>`. The open tag may be in the prompt
(chat templates that pre-fill it), the close tag may be missing (truncated completion), and the steps may have no
headers (then `step_fallback` decides). Text before the first step header belongs to step 1, so the prefix for l_0
ends where the chain of thought starts.

Boundaries are found on the decoded text and mapped back to token indices through each token's character offsets,
never by re-tokenising text, so prefixes are exactly the tokens the policy sampled.

Agent trajectories ([`segment_turns`]) interleave model turns with tool or environment responses; a token mask
(TRL's `tool_mask`) says which tokens the model wrote, and each model turn answered by a response is a step whose
prefix ends after that response.
"""

from __future__ import annotations

import bisect
import itertools
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch

from .config import ANSWER_MATCHES, MIGSettings
from .credit import NOT_COT

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE_BREAK = re.compile(r"\n\s*")


# MIGSettings' declaration gives FormatSpec its defaults; `max_steps` is the one field under another name there
_DEFAULT = {f.name: f.default for f in fields(MIGSettings)}
_SETTING_NAME = {"max_steps": "mig_max_steps"}


@dataclass(frozen=True)
class FormatSpec:
    """The completion format MIG reads: tags, step headers, answer pattern, fallback and step cap.

    The fields are [`MIGSettings`]' format fields (`max_steps` is `mig_max_steps`), with their defaults.
    """

    think_open_tag: str = _DEFAULT["think_open_tag"]
    think_close_tag: str = _DEFAULT["think_close_tag"]
    step_pattern: str = _DEFAULT["step_pattern"]
    answer_pattern: str = _DEFAULT["answer_pattern"]
    step_fallback: str = _DEFAULT["step_fallback"]
    max_steps: int = _DEFAULT["mig_max_steps"]
    answer_match: str = _DEFAULT["answer_match"]  # how an answer is compared with the ground truth: "math", "exact", "last"

    @classmethod
    def from_config(cls, config, **overrides) -> FormatSpec:
        """The format of a `MIGConfig`, a [`MIGSettings`], the arguments of a command, or any object with some of
        MIGSettings' names (`mig_max_steps` for `max_steps`; the others keep their defaults). `overrides` (FormatSpec
        names) win."""
        values = {
            f.name: getattr(config, _SETTING_NAME.get(f.name, f.name))
            for f in fields(cls)
            if hasattr(config, _SETTING_NAME.get(f.name, f.name))
        }
        return cls(**{**values, **overrides})

    def to_settings(self) -> dict:
        """The spec's fields under their [`MIGSettings`] names (`max_steps` as `mig_max_steps`)."""
        return {_SETTING_NAME.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}

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


def token_end_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """
    Decode `token_ids` and give, for each token, the character offset where its text ends.

    Returns `(text, ends)` with `text == tokenizer.decode(token_ids)` (special tokens kept, no clean-up) and `ends[j]`
    the length of the text of `token_ids[: j + 1]`. A token that ends inside a multi-byte character (byte-level BPE,
    byte fallback) has no text of its own yet: it ends where the last complete character does, and the character
    goes to the token that completes it. So `ends` never decreases, and `ends[-1] == len(text)` unless the text ends
    in an unfinished character.

    Linear in the number of tokens: each token's text comes from a per-tokenizer table ([`_PieceTable`]: as the
    first token, and after another token, which covers SentencePiece's dropped leading space), and only the runs of
    tokens that do not decode to whole characters on their own (split multi-byte characters) are decoded again, as
    the prefixes of a window that starts at the whole token before them and moves on at character boundaries. The
    pieces must add up to `text`; a decoder for which they do not gets the exact quadratic computation (decoding
    every prefix).
    """
    token_ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)  # ints: the table's keys
    text = tokenizer.decode(token_ids, **_DECODE)
    if not token_ids:
        return text, []
    ends = _local_end_offsets(tokenizer, token_ids, text)
    if ends is None:
        ends = _prefix_end_offsets(tokenizer, token_ids, text)
    return text, ends


_DECODE = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback tokens (Llama, Mistral, Gemma)


class _PieceTable:
    """
    What each token id reads as, for one tokenizer; a token's text never changes, so each id is decoded once.

    - `first[id]`: its text as the first token (a Metaspace decoder drops the first token's leading space);
    - `after[id]`: the text it adds after another token (`decode([anchor, id])` less the anchor's text), None when
      that does not start with the anchor's text;
    - `partial`: the ids whose text after another token is not whole characters of their own: empty (an empty token
      can sit inside a character), with U+FFFD (part of a multi-byte character), a byte-fallback token (whose bytes
      the decoder joins with its neighbours'), or None;
    - `anchorable`: the other ids whose `first` is the end of their `after`, so that a window of decodes can start
      at them.
    """

    def __init__(self, tokenizer):
        self.anchor = _anchor_token(tokenizer)
        self.first: dict[int, str] = {}
        self.after: dict[int, str | None] = {}
        self.partial: set[int] = set()
        self.anchorable: set[int] = set()

    def add(self, tokenizer, token_ids: list[int]) -> None:
        missing = list(set(token_ids).difference(self.first))
        if not missing:
            return
        first = tokenizer.batch_decode([[t] for t in missing], **_DECODE)
        if self.anchor is None:
            after = first
        else:
            anchor_id, anchor_text = self.anchor
            pairs = tokenizer.batch_decode([[anchor_id, t] for t in missing], **_DECODE)
            after = [p[len(anchor_text) :] if p.startswith(anchor_text) else None for p in pairs]
        names = _token_names(tokenizer, missing)
        for t, alone, joined, name in zip(missing, first, after, names):
            self.first[t], self.after[t] = alone, joined
            if (
                not joined
                or _REPLACEMENT in joined
                or _REPLACEMENT in alone
                or (isinstance(name, str) and _BYTE_TOKEN.fullmatch(name))
            ):
                self.partial.add(t)
            elif joined.endswith(alone):
                self.anchorable.add(t)


# tokenizer -> its _PieceTable; decoding every token of every completion through the tokenizer again was most of
# segmentation's cost at hundreds of completions per step
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _piece_table(tokenizer, token_ids: list[int]) -> _PieceTable:
    try:
        table = _PIECES.get(tokenizer)
        if table is None:
            table = _PIECES[tokenizer] = _PieceTable(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        table = _PieceTable(tokenizer)
    table.add(tokenizer, token_ids)
    return table


def _anchor_token(tokenizer) -> tuple[int, str] | None:
    """A token that reads as a plain ASCII letter or digit, to decode other tokens after: `(id, text)`, or None."""
    for probe in ("a", "e", "x", "0"):
        try:
            ids = tokenizer.encode(probe, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - a processor or an exotic tokenizer: tokens are then read alone
            return None
        for token in reversed(ids):
            text = tokenizer.decode([token], **_DECODE)
            if text and text.isascii() and text.strip() and text == text.strip():
                return token, text
    return None


def _token_names(tokenizer, token_ids: list[int]) -> list:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        convert = getattr(getattr(tokenizer, "tokenizer", None), "convert_ids_to_tokens", None)
    return list(convert(token_ids)) if convert is not None else [None] * len(token_ids)


def _local_end_offsets(tokenizer, token_ids: list[int], text: str) -> list[int] | None:
    """
    `token_end_offsets`' ends from the piece table and a few batches of short window decodes, or None when the
    pieces do not add up to `text` (a decoder whose tokens' texts depend on more than the first-token rule and the
    bytes of their neighbours).

    A whole token ([`_PieceTable`]) adds its table piece. The tokens of a run of partial ones end where the prefix
    that ends with them does ([`_run_prefixes`]), without its trailing U+FFFD (an unfinished character) and cut where
    it leaves the text, as when decoding the whole prefix; a whole token's text is never empty and has no U+FFFD, so
    stripping never reaches back past the run.
    """
    table = _piece_table(tokenizer, token_ids)
    pieces = list(map(table.after.__getitem__, token_ids))
    pieces[0] = table.first[token_ids[0]]
    if table.partial.isdisjoint(token_ids):  # the common case: every token is whole characters
        if "".join(pieces) != text:
            return None
        return list(itertools.accumulate(map(len, pieces)))

    runs = _partial_runs(token_ids, table)
    for move_on in (True, False):  # without moving windows on when that changed the text (byte fallback, below)
        prefixes, moved = _run_prefixes(tokenizer, token_ids, table, runs, move_on)
        if prefixes is None:
            return None
        for (s, a, b), run in zip(runs, prefixes):
            done, tail = run[-1]
            pieces[a:b] = [""] * (b - a - 1) + [done + tail]  # the run's text, on its last token
        if "".join(pieces) == text:
            break
        if not moved:
            return None
    reach = list(itertools.accumulate(map(len, pieces)))
    for (s, a, b), run in zip(runs, prefixes):
        start = reach[a - 1] if a > 0 else 0
        for k, (done, tail) in zip(range(a, b), run):
            complete, at = tail.rstrip(_REPLACEMENT), start + len(done)
            if text.startswith(complete, at):
                reach[k] = at + len(complete)
            else:  # a prefix that reads otherwise (byte fallback: U+FFFD per byte) is cut where it leaves the text
                reach[k] = at + _common_prefix_length(complete, text[at : at + len(complete)])
    return list(itertools.accumulate(reach, max))


def _partial_runs(token_ids: list[int], table: _PieceTable) -> list[list[int]]:
    """
    The runs of partial tokens, as `[s, a, b]`: tokens `[a, b)` are read from window decodes that start at token s,
    the nearest anchorable whole token before them (whole tokens skipped on the way join the run), or from token 0
    (`s == a == 0`) when there is none. Runs whose windows would overlap are one run.
    """
    runs = []
    for k, token in enumerate(token_ids):
        if token not in table.partial:
            continue
        if runs and runs[-1][2] == k:  # the run goes on
            runs[-1][2] = k + 1
            continue
        s = k - 1
        while s > 0 and token_ids[s] not in table.anchorable:
            s -= 1
        a = s + 1
        if s < 0 or token_ids[s] in table.partial:  # no anchor (token 0 reads as itself: it is one when whole)
            s = a = 0
        while runs and runs[-1][2] > s:
            s, a, _ = runs.pop()
        runs.append([s, a, k + 1])
    return runs


_RUN_CHUNK = 16  # tokens of a run read per batch of window decodes; a longer run takes several batches


@dataclass
class _RunWindow:
    """Where the decodes of one run's prefixes stand: each is `head + token_ids[start : k + 1]`, which reads as
    `head_text`, then the text of tokens `start..k` in context; `done` is the run's text before `start`."""

    head: list[int]
    head_text: str
    start: int
    next: int  # the next token to read
    stop: int  # the end of the run
    done: str = ""
    prefixes: list[tuple[str, str]] = field(default_factory=list)


def _run_prefixes(tokenizer, token_ids: list[int], table: _PieceTable, runs, move_on: bool = True):
    """
    For each run `[s, a, b]` and each of its tokens k: `(done, tail)`, such that the text of `token_ids[: k + 1]`
    is the text before the run, then `done + tail`. Returns `(prefixes, moved)`, `moved` telling whether a window
    moved on; `prefixes` is None if a window changed the text of the token it starts at.

    Token k's prefix is read from the window `token_ids[s : k + 1]` (token s gives the run's first token its
    context, as in the whole text), less token s's own text. So that a long run (a stretch of characters the
    vocabulary splits into bytes) costs linear time, with `move_on` the window moves on after a token whose prefix
    reads as whole characters (no trailing U+FFFD): UTF-8 decoding starts afresh there, so the window restarts after
    the table's anchor token, the run's text so far going to `done`. (A byte-fallback decoder reads a group of byte
    tokens with one invalid byte as all U+FFFD, whole characters before it included: the run's text then differs
    from the whole text, and the caller reads the run again without moving on.) All runs advance together,
    `_RUN_CHUNK` tokens per batch of decodes: one batch unless a run is longer.
    """
    anchor = table.anchor if move_on else None
    moved = False
    windows = [
        _RunWindow([token_ids[s]], table.first[token_ids[s]], a, a, b) if s < a else _RunWindow([], "", a, a, b)
        for s, a, b in runs
    ]
    pending = windows
    while pending:
        chunks = [range(w.next, min(w.stop, w.next + _RUN_CHUNK)) for w in pending]
        decoded = iter(tokenizer.batch_decode(
            [w.head + token_ids[w.start : k + 1] for w, ks in zip(pending, chunks) for k in ks], **_DECODE
        ))
        for w, ks in zip(pending, chunks):
            tails = [next(decoded) for _ in ks]
            if not all(text.startswith(w.head_text) for text in tails):
                return None, moved  # the run changed the text of the token its window starts at: not local
            tails = [text[len(w.head_text) :] for text in tails]
            w.prefixes += [(w.done, tail) for tail in tails]
            w.next = ks.stop
            if w.next < w.stop and anchor is not None:
                cut = next((i for i in reversed(range(len(tails))) if tails[i][-1:] not in ("", _REPLACEMENT)), None)
                if cut is not None:
                    w.head, w.head_text, w.start, w.done = [anchor[0]], anchor[1], ks[cut] + 1, w.done + tails[cut]
                    moved = True
        pending = [w for w in pending if w.next < w.stop]
    return [w.prefixes for w in windows], moved


def _prefix_end_offsets(tokenizer, token_ids: list[int], text: str) -> list[int]:
    """The reference computation, exact for any decoder and quadratic: decode every prefix."""
    prefixes = tokenizer.batch_decode([token_ids[: j + 1] for j in range(len(token_ids))], **_DECODE)
    ends, best = [], 0
    for prefix in prefixes:
        prefix = prefix.rstrip(_REPLACEMENT)  # an unfinished multi-byte character is not text yet
        if not text.startswith(prefix):
            prefix = prefix[: _common_prefix_length(prefix, text)]
        best = max(best, len(prefix))
        ends.append(best)
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

    Agent trajectories ([`segment_turns`]): `external_spans` are the `[start, end)` token spans the model did not
    write (tool results, environment feedback); they lie inside steps, so inside the prefixes of later l_k, but get
    no credit. `tool_steps` are the indices k - 1 of the steps whose prefix ends right after such a response: the
    steps that made a call, whose gain g_k is the information the call brought back.
    """

    boundaries: tuple[int, ...]
    layout: TextLayout
    merged_steps: int  # steps beyond the cap merged into their neighbours (0 if none)
    external_spans: tuple[tuple[int, int], ...] = ()
    tool_steps: tuple[int, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.boundaries) - 1

    @property
    def used_fallback(self) -> bool:
        return self.num_steps > 0 and not self.layout.has_step_headers


def content_token_ids(completion_ids: Sequence[int], stop_ids) -> list[int]:
    """
    A completion's content tokens: its ids without the trailing EOS / padding that end generation (`stop_ids`: the
    EOS ids and the pad id). Only trailing ones go; a stop id inside the completion is content. The trainer and
    `inspect_completion` both segment and score these tokens.
    """
    stop = set(stop_ids)
    end = len(completion_ids)
    while end > 0 and completion_ids[end - 1] in stop:
        end -= 1
    return list(completion_ids[:end])


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
        (tokens before the thought, the answer part, external tokens of an agent trajectory, padding).
    """
    step_ids = torch.full((len(segments), length), NOT_COT, dtype=torch.long)
    for row, seg in enumerate(segments):
        for k in range(seg.num_steps):
            lo, hi = seg.boundaries[k], min(seg.boundaries[k + 1], length)
            if lo < hi:
                step_ids[row, lo:hi] = k
        for lo, hi in seg.external_spans:  # tool results are read, not written: no MIG credit
            step_ids[row, lo : min(hi, length)] = NOT_COT
    return step_ids.to(device) if device is not None else step_ids


# ------------------------------------------------------------------------------------------- agent trajectories
@dataclass(frozen=True)
class Turn:
    """One model turn of an agent trajectory, in completion tokens: the model wrote `[start, response_start)`; the
    external response that follows it (tool result, environment feedback) is `[response_start, end)`, empty when
    nothing follows."""

    start: int
    response_start: int
    end: int

    @property
    def has_response(self) -> bool:
        return self.end > self.response_start


def split_turns(model_mask: Sequence[int]) -> tuple[int, list[Turn]]:
    """
    The model turns of a trajectory, read from its token mask (TRL's `tool_mask`, or a `rollout_func`'s `env_mask`).

    Args:
        model_mask (sequence of `int` of length `C`): 1 for a token the model wrote, 0 for an external one.

    Returns:
        `(leading, turns)`: the number of external tokens before the first model token, and one [`Turn`] per maximal
        run of model tokens, with the run of external tokens after it. No model token: `(C, [])`.
    """
    mask = list(model_mask)
    unknown = sorted({repr(v) for v in mask if v not in (0, 1)})
    if unknown:
        raise ValueError(f"A model-token mask holds 1 (model token) or 0 (external token) only, got {unknown}.")
    size, t = len(mask), 0
    while t < size and not mask[t]:
        t += 1
    leading, turns = t, []
    while t < size:
        start = t
        while t < size and mask[t]:
            t += 1
        response_start = t
        while t < size and not mask[t]:
            t += 1
        turns.append(Turn(start, response_start, t))
    return leading, turns


def segment_turns(tokenizer, completion_ids: list[int], model_mask: Sequence[int], spec: FormatSpec) -> StepSegments:
    """
    Segment an agent trajectory (model turns interleaved with tool or environment responses) into steps.

    Each model turn that is followed by a response is a step (its reasoning and its call), and that step's prefix
    ends after the response: b_k is the end of turn k's response, so g_k is the information the call brought back.
    The last model turn, when no response follows it, is read as a plain completion ([`analyze_text`]): its chain of
    thought adds steps (step headers, else `step_fallback`) and its answer part is not chain of thought. b_0 is where
    the first turn's thought starts (after its open tag), so l_0 conditions on the prompt only (plus any external
    tokens the completion opens with).

    Step headers inside a tool turn split it further, but turn boundaries win: a header in an external span never
    splits (the model did not write it), and when the steps exceed `max_steps` header splits are merged away first,
    then consecutive turns are merged evenly. A turn is where information enters from outside, which is the thing MIG
    measures per call; the paragraph fallback does not split tool turns (a turn is already a step, and a tool call's
    arguments have no paragraphs to speak of).

    Everything is in the completion's own tokens: turns come from the mask, header positions from the decoded text
    mapped back through token offsets, as in [`segment_completion`]. A mask with no external token (a single turn)
    or no model token (TRL's `mask_truncated_completions` zeroes a truncated row's mask: the turns are lost) gives
    exactly [`segment_completion`].

    Args:
        completion_ids (`list[int]` of length `C`): the completion's content tokens (no trailing EOS or padding).
        model_mask (sequence of `int` of length `C`): 1 for a token the model wrote, 0 for an external one.

    Returns:
        [`StepSegments`] with `external_spans` (the responses) and `tool_steps` (the steps ending after one).
    """
    if len(model_mask) != len(completion_ids):
        raise ValueError(
            f"The model-token mask has {len(model_mask)} entries for {len(completion_ids)} completion tokens; it "
            "needs one per token (TRL's tool_mask, or the env_mask a rollout_func returns)."
        )
    leading, turns = split_turns(model_mask)
    if not turns or (leading == 0 and len(turns) == 1 and not turns[0].has_response):
        return segment_completion(tokenizer, completion_ids, spec)
    text, ends = token_end_offsets(tokenizer, completion_ids)

    def char_at(token: int) -> int:
        return ends[token - 1] if token > 0 else 0

    def to_token(char: int) -> int:
        return bisect.bisect_right(ends, char)

    final = turns[-1] if not turns[-1].has_response else None
    tool_turns = turns[:-1] if final is not None else turns
    first = turns[0]
    tag = spec.think_open_tag
    opened = text.find(tag, char_at(first.start), char_at(first.response_start)) if tag else -1
    bounds = [to_token(opened + len(tag)) if opened >= 0 else first.start]
    turn_ends = set()
    for turn in tool_turns:
        lo = char_at(turn.start)
        for match in spec.step_regex.finditer(text[lo : char_at(turn.response_start)]):
            token = to_token(lo + match.start())
            if bounds[-1] < token < turn.response_start:
                bounds.append(token)
        bounds.append(turn.end)
        turn_ends.add(turn.end)

    cot_end, think_closed, answer, final_headers = char_at(bounds[-1]), False, None, False
    if final is not None:
        lo = char_at(final.start)
        final_text = text[lo : char_at(final.response_start)]
        layout = analyze_text(final_text, spec)
        answer, final_headers = layout.answer, layout.has_step_headers
        # a last turn that only answers opens no thought, so it leaves none unclosed
        think_closed = layout.think_closed or (answer is not None and not final_text[: layout.cot_end].strip())
        end = to_token(lo + layout.cot_end)
        if layout.num_steps > 0 and end > bounds[-1]:
            # after a tool turn the last turn's first step starts with the turn (its open tag included)
            for char in layout.step_starts:
                token = to_token(lo + char)
                if bounds[-1] < token < end:
                    bounds.append(token)
            bounds.append(end)
            cot_end = lo + layout.cot_end

    steps = len(bounds) - 1
    if steps > spec.max_steps:
        bounds = _merge_keeping_turns(bounds, turn_ends, spec.max_steps)
    external = ((0, leading),) if leading else ()
    external += tuple((turn.response_start, turn.end) for turn in turns if turn.has_response)
    layout = TextLayout(
        cot_start=char_at(bounds[0]),
        cot_end=cot_end,
        think_closed=think_closed,
        answer=answer,
        step_starts=tuple(char_at(b) for b in bounds[1:-1]),
        has_step_headers=bool(tool_turns) or final_headers,  # a tool turn is an explicit step
        num_steps=len(bounds) - 1,
    )
    tool_steps = tuple(k - 1 for k in range(1, len(bounds)) if bounds[k] in turn_ends)
    return StepSegments(tuple(bounds), layout, steps - (len(bounds) - 1), external, tool_steps)


def _merge_keeping_turns(bounds: list[int], turn_ends: set[int], cap: int) -> list[int]:
    """Cut `bounds` (b_0..b_K, K > cap) down to `cap` steps: drop header splits first, evenly; if the turns alone
    exceed the cap, merge consecutive turns into evenly sized groups."""
    interior = bounds[1:-1]
    turn_cuts = [b for b in interior if b in turn_ends]
    header_cuts = [b for b in interior if b not in turn_ends]
    room = cap - 1 - len(turn_cuts)
    if room >= 0:
        kept = [header_cuts[(j * len(header_cuts)) // room] for j in range(room)]
        return [bounds[0], *sorted(turn_cuts + kept), bounds[-1]]
    coarse = [bounds[0], *turn_cuts, bounds[-1]]
    steps = len(coarse) - 1
    return [*(coarse[(j * steps) // cap] for j in range(cap)), coarse[-1]]
