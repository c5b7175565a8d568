r"""Step-conditioned answer likelihoods l_0..l_K, teacher-forced, without gradient.

    l_k = (1/|y*|) sum_t log pi(y*_t | x, s_{1..k}, S, y*_{<t})      (temperature 1, whatever the sampling temperature)

Two exact methods:

- `block`: one row per completion, `prompt + completion[:b_K] + (K+1) copies of scaffold+answer`, with a block
  attention mask under which copy k sees the prompt, the completion up to b_k and itself (causally), and position ids
  that continue from b_k. O(L + K|y*|) tokens per completion.
- `prefix`: one row per prefix, `prompt + completion[:b_k] + scaffold+answer`, with an ordinary padding mask.
  O(K L) tokens, but works with every attention implementation (flash-attention, flex, sliding windows).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BLOCK_MASK_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class AnswerBlock:
    """Scaffold + answer, tokenised jointly once; `scored` = [start, end) of the tokens covering the answer's text."""

    ids: tuple[int, ...]
    scored: tuple[int, int]


def encode_answer(tokenizer, scaffold: str, answer: str) -> AnswerBlock:
    """Tokenise `scaffold + answer` jointly and find the tokens that cover the answer's characters.

    A token that merges the end of the scaffold with the start of the answer is scored: it carries answer text.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"The ground-truth answer must be a non-empty string, got {answer!r}.")
    text = scaffold + answer
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        first = next((j for j, (_, end) in enumerate(offsets) if end > len(scaffold)), len(ids))
    else:  # no offsets: tokenise the two parts apart, so the answer tokens are known exactly
        scaffold_ids = tokenizer(scaffold, add_special_tokens=False)["input_ids"]
        ids = scaffold_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
        first = len(scaffold_ids)
    if first >= len(ids):
        raise ValueError(f"The answer {answer!r} produced no tokens after the scaffold {scaffold!r}.")
    return AnswerBlock(tuple(ids), (first, len(ids)))


@dataclass(frozen=True)
class ScoringItem:
    """One completion to score: its prompt tokens (no padding), completion tokens and step boundaries b_0..b_K."""

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    boundaries: Sequence[int]
    answers: Sequence[AnswerBlock]

    @property
    def num_prefixes(self) -> int:
        return len(self.boundaries)


def sliding_window_active(config) -> bool:
    """Whether the model masks attention to a sliding window, which a custom 4-D mask would bypass."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in str(kind) for kind in layer_types)
    if hasattr(config, "use_sliding_window"):
        return bool(config.use_sliding_window) and getattr(config, "sliding_window", None) is not None
    return getattr(config, "sliding_window", None) is not None


def block_mask_unsupported_reason(model) -> str | None:
    """Why `model` cannot take the block attention mask, or None when it can."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in BLOCK_MASK_ATTENTION:
        return (
            f"attention implementation {implementation!r} does not take a custom 4-D attention mask "
            f"(block scoring needs one of {list(BLOCK_MASK_ATTENTION)})"
        )
    if sliding_window_active(config):
        return "the model uses sliding-window attention, which a custom 4-D mask would bypass"
    return None


class StepLikelihoodScorer:
    """
    Computes l_0..l_K for a batch of completions, max over answer variants.

    Args:
        method (`str`): `"block"`, `"prefix"` or `"auto"` (block when the model can take the mask, else prefix with a
            one-time warning that names the reason).
        batch_size (`int`): rows per forward pass.
        pad_token_id (`int`): id used to fill padding columns (never attended to).
        sync_forward_count (`callable`, *optional*): maps this process's number of forwards to the number every
            process must run (the max over processes). Under ZeRO-3 every forward all-gathers the parameters, so
            all ranks must run the same count; this rank pads with dummy forwards.
    """

    def __init__(
        self,
        method: str = "auto",
        batch_size: int = 8,
        pad_token_id: int = 0,
        sync_forward_count: Callable[[int], int] | None = None,
    ):
        if method not in ("auto", "block", "prefix"):
            raise ValueError(f"Unknown scoring method {method!r}; expected 'auto', 'block' or 'prefix'.")
        if batch_size < 1:
            raise ValueError(f"The scoring batch size must be >= 1, got {batch_size}.")
        self.method = method
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.sync_forward_count = sync_forward_count
        self.forward_count = 0  # forwards run so far, dummy ones included
        self._warned = False

    def resolve_method(self, model) -> str:
        if self.method == "prefix":
            return "prefix"
        reason = block_mask_unsupported_reason(model)
        if reason is None:
            return "block"
        if self.method == "block":
            raise ValueError(f"mig_scoring_method='block' cannot be used: {reason}. Use 'prefix' or 'auto'.")
        if not self._warned:
            logger.warning("MIG scoring falls back to one row per step prefix: %s.", reason)
            self._warned = True
        return "prefix"

    def plan(self, items: Sequence[ScoringItem], method: str) -> int:
        """Number of forward passes this process needs for `items` (before synchronisation)."""
        rows = len(items) if method == "block" else sum(item.num_prefixes * len(item.answers) for item in items)
        return math.ceil(rows / self.batch_size)

    @torch.no_grad()
    def score(self, model, items: Sequence[ScoringItem]) -> list[torch.Tensor]:
        """
        Returns:
            One float32 tensor of shape `(K_i + 1,)` per item: l_0..l_K (max over variants), on the CPU.
        """
        for item in items:
            if not item.answers:
                raise ValueError("Every scoring item needs at least one answer variant.")
            if len(item.prompt_ids) + item.boundaries[0] == 0:
                raise ValueError("Cannot score an answer after an empty prompt and an empty prefix.")
        method = self.resolve_method(model)
        device = _model_device(model)
        rows = _block_rows(items) if method == "block" else _prefix_rows(items)
        rows.sort(key=lambda row: len(row.ids), reverse=True)  # similar lengths share a batch: less padding
        totals = [torch.zeros(item.num_prefixes, len(item.answers)) for item in items]
        counts = [torch.zeros(item.num_prefixes, len(item.answers)) for item in items]
        forwards = 0
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            if method == "block":
                logps = self._forward_block(model, batch, device)
            else:
                logps = self._forward_prefix(model, batch, device)
            forwards += 1
            for row, row_logps in zip(batch, logps):
                for (item, k, variant), value in zip(row.slots, row_logps):
                    totals[item][k, variant] += value
                    counts[item][k, variant] += 1
        self._pad_forwards(model, device, forwards)
        return [(total / count).max(dim=1).values for total, count in zip(totals, counts)]

    def _pad_forwards(self, model, device, forwards: int) -> None:
        required = forwards if self.sync_forward_count is None else self.sync_forward_count(forwards)
        dummy = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=device)
        for _ in range(required - forwards):
            model(input_ids=dummy, attention_mask=torch.ones_like(dummy), use_cache=False, logits_to_keep=1)
        self.forward_count += max(required, forwards)

    def _forward_block(self, model, batch: list[_Row], device) -> list[list[float]]:
        shared_width = max(row.shared_len for row in batch)
        width = shared_width + max(len(row.ids) - row.shared_len for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        shared_index = torch.full((len(batch), width), -1, dtype=torch.long)
        copy_id = torch.full((len(batch), width), -1, dtype=torch.long)
        limit = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            # right-align the shared part so every row's copies start at column `shared_width`
            offset = shared_width - row.shared_len
            n = len(row.ids)
            cols = slice(offset, offset + n)
            input_ids[r, cols] = torch.tensor(row.ids)
            position_ids[r, cols] = torch.tensor(row.positions)
            shared_index[r, cols] = torch.tensor(row.shared_index)
            copy_id[r, cols] = torch.tensor(row.copy_id)
            limit[r, cols] = torch.tensor(row.limit)
        column = torch.arange(width)
        sees_shared = (shared_index.unsqueeze(1) >= 0) & (shared_index.unsqueeze(1) < limit.unsqueeze(2))
        same_copy = (copy_id.unsqueeze(1) == copy_id.unsqueeze(2)) & (copy_id.unsqueeze(1) >= 0)
        causal = column.view(1, 1, -1) <= column.view(1, -1, 1)
        allowed = sees_shared | (same_copy & causal) | torch.eye(width, dtype=torch.bool).unsqueeze(0)
        attention_mask = _as_model_mask(model, allowed.unsqueeze(1)).to(device)
        offsets = [shared_width - row.shared_len for row in batch]
        return self._gather(model, batch, offsets, input_ids.to(device), attention_mask, position_ids.to(device))

    def _forward_prefix(self, model, batch: list[_Row], device) -> list[list[float]]:
        width = max(len(row.ids) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):  # left padding: every row ends at the last column
            input_ids[r, width - len(row.ids) :] = torch.tensor(row.ids)
            attention_mask[r, width - len(row.ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        offsets = [width - len(row.ids) for row in batch]
        return self._gather(
            model, batch, offsets, input_ids.to(device), attention_mask.to(device), position_ids.to(device)
        )

    def _gather(self, model, batch, offsets, input_ids, attention_mask, position_ids) -> list[list[float]]:
        """Run the forward, keeping logits only at the columns that predict scored tokens."""
        predict_cols = [[offset + col for col in row.predict_cols] for row, offset in zip(batch, offsets)]
        keep = sorted({col for cols in predict_cols for col in cols})
        keep_index = {col: j for j, col in enumerate(keep)}
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.tensor(keep, device=input_ids.device),
        )
        logits = outputs.logits
        row_index = torch.tensor([r for r, cols in enumerate(predict_cols) for _ in cols], device=logits.device)
        col_index = torch.tensor([keep_index[c] for cols in predict_cols for c in cols], device=logits.device)
        targets = torch.tensor([t for row in batch for t in row.targets], device=logits.device)
        selected = logits[row_index, col_index].float()  # (n_scored, vocab), temperature 1
        token_logps = selected.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, dim=-1)
        token_logps = token_logps.cpu().tolist()
        out, cursor = [], 0
        for row in batch:
            out.append(token_logps[cursor : cursor + len(row.targets)])
            cursor += len(row.targets)
        return out


@dataclass
class _Row:
    """One input row and, per scored token, the column predicting it, its target id and its (item, k, variant)."""

    ids: list[int]
    shared_len: int
    positions: list[int]
    shared_index: list[int]
    copy_id: list[int]
    limit: list[int]
    predict_cols: list[int]
    targets: list[int]
    slots: list[tuple[int, int, int]]


def _block_rows(items: Sequence[ScoringItem]) -> list[_Row]:
    rows = []
    for i, item in enumerate(items):
        prompt_len = len(item.prompt_ids)
        shared = list(item.prompt_ids) + list(item.completion_ids[: item.boundaries[-1]])
        ids, positions = list(shared), list(range(len(shared)))
        shared_index, copy_id, limit = list(range(len(shared))), [-1] * len(shared), list(range(1, len(shared) + 1))
        predict_cols, targets, slots = [], [], []
        copy = 0
        for variant, block in enumerate(item.answers):
            for k, boundary in enumerate(item.boundaries):
                visible = prompt_len + boundary
                start = len(ids)
                ids += block.ids
                positions += range(visible, visible + len(block.ids))
                shared_index += [-1] * len(block.ids)
                copy_id += [copy] * len(block.ids)
                limit += [visible] * len(block.ids)
                for m in range(*block.scored):
                    # token m of the copy is predicted by the token before it: the copy's own, or the prefix's last
                    predict_cols.append(start + m - 1 if m > 0 else visible - 1)
                    targets.append(block.ids[m])
                    slots.append((i, k, variant))
                copy += 1
        rows.append(_Row(ids, len(shared), positions, shared_index, copy_id, limit, predict_cols, targets, slots))
    return rows


def _prefix_rows(items: Sequence[ScoringItem]) -> list[_Row]:
    rows = []
    for i, item in enumerate(items):
        for variant, block in enumerate(item.answers):
            for k, boundary in enumerate(item.boundaries):
                prefix = list(item.prompt_ids) + list(item.completion_ids[:boundary])
                ids = prefix + list(block.ids)
                predict_cols = [len(prefix) + m - 1 for m in range(*block.scored)]
                targets = [block.ids[m] for m in range(*block.scored)]
                slots = [(i, k, variant)] * len(targets)
                rows.append(_Row(ids, len(ids), [], [], [], [], predict_cols, targets, slots))
    return rows


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_model_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """sdpa takes a boolean mask (True = attend); eager adds the mask to the scores, so it needs a float one."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
