r"""l_0..l_K from the key/value cache that generation built: only the answer copies run through the model.

When transformers' `generate` samples the completions (GRPOTrainer without vLLM, tools or a `rollout_func`), its
cache holds every layer's keys and values for the left-padded prompts and the generated tokens. Copy k of an answer
needs exactly those of the prompt and of completion[:b_k], so one forward over the copies alone, with the cache as
past keys/values and a (B, 1, C, S + C) mask (copy k sees the real prompt columns, the completion's first b_k columns
and itself causally), gives the l_k of the block pass to floating-point kernel order, without running prompt +
completion through the model again. Positions continue the generation's own (the pads of the prompt not counted).

    with capture_generation_cache(causal_lm) as captured:
        ...generate...
    scores = score_from_cache(scorer, model, captured.result, items, rows)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .scoring import (
    ScoringItem,
    StepLikelihoodScorer,
    _as_model_mask,
    _model_config,
    _model_device,
    block_mask_unsupported_reason,
    fill_chunks,
    scaffold_continuations,
)


@dataclass
class GenerationCache:
    """
    What one `generate` call left: `cache` (a transformers `DynamicCache`: per layer, keys and values of shape
    (B, H_kv, S, D)), passed back to the model under the keyword `cache_keyword`; `prompt_mask` (B, P), 1 on the real
    prompt columns (the prompts are left-padded to P); `tokens` (B, S): the ids whose keys and values it holds, the
    prompt then every generated token but the last; row i of the cache is the generation batch's row i.
    """

    cache: object
    cache_keyword: str
    prompt_mask: torch.Tensor
    tokens: torch.Tensor

    @property
    def length(self) -> int:
        """S: the columns the cache covers (the prompt and every generated token but the last)."""
        return int(self.cache.get_seq_length())


@dataclass
class _Capture:
    caches: list = field(default_factory=list)
    keyword: str | None = None
    prompt_mask: torch.Tensor | None = None
    fed: list = field(default_factory=list)  # the input ids of every forward, in order
    result: GenerationCache | None = None
    reason: str | None = None


@contextlib.contextmanager
def capture_generation_cache(causal_lm):
    """
    Record the key/value cache of the `generate` call made inside the block; `.result` is a `GenerationCache` after
    it (None, with `.reason`, when there was not exactly one call with a dynamic cache: tool loops, static caches).
    """
    captured = _Capture()

    def record(module, args, kwargs):
        keyword = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(keyword)
        calls.append(cache)
        ids = kwargs.get("input_ids")
        captured.fed.append(ids.detach() if isinstance(ids, torch.Tensor) else None)
        if len(calls) == 1:  # the prompt's forward: its mask says which columns are padding
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                captured.prompt_mask = mask.detach()
            elif mask is None and isinstance(ids, torch.Tensor):  # no padding: generate passes no mask
                captured.prompt_mask = torch.ones_like(ids)
        if cache is not None and not any(cache is seen for seen in captured.caches):
            captured.caches.append(cache)
            captured.keyword = keyword

    calls = []
    hook = causal_lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield captured
    finally:
        hook.remove()
    captured.reason = _capture_problem(captured)
    if captured.reason is None:
        tokens = torch.cat(captured.fed, dim=1)  # (B, S): the prompt, then one generated token per decoding step
        captured.result = GenerationCache(captured.caches[0], captured.keyword, captured.prompt_mask, tokens)
    captured.caches, captured.fed = [], []


def _capture_problem(captured: _Capture) -> str | None:
    from transformers.cache_utils import DynamicCache

    if len(captured.caches) != 1:
        return f"{len(captured.caches)} generation caches (one generate call is needed)"
    cache = captured.caches[0]
    if type(cache) is not DynamicCache:
        return f"a {type(cache).__name__}, not a DynamicCache"
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        return "a sliding-window cache"
    if captured.prompt_mask is None:
        return "neither a 2-D attention mask nor input ids in the first generation forward"
    if any(ids is None or ids.dim() != 2 for ids in captured.fed):
        return "a generation forward without input ids (embeddings passed)"
    if len({ids.shape[0] for ids in captured.fed}) != 1 or any(ids.shape[1] != 1 for ids in captured.fed[1:]):
        return "generation forwards that are not one prompt pass then one token per step"
    if sum(ids.shape[1] for ids in captured.fed) != cache.get_seq_length():
        return "a cache that does not hold exactly the tokens fed to the model"
    return None


def cache_unsupported_reason(
    model, generation: GenerationCache, items: Sequence[ScoringItem], rows: Sequence[int]
) -> str | None:
    """
    Why `items` (completion `rows[j]` of the generation batch) cannot be scored from `generation`'s cache with
    `model`, or None when they can: among others, when the tokens the cache holds are not each item's prompt and
    completion (a `rollout_func` that generated from another prompt, or edited what it generated).
    """
    reason = block_mask_unsupported_reason(model)
    if reason is not None:
        return reason
    if any(item.multimodal for item in items):
        return "multimodal prompts"
    for item in items:
        if any(block.scored[0] == 0 for block in item.answers):
            # the first answer token would be predicted from the prefix's last hidden state, which a cache lacks
            return "an answer block without a scaffold before the answer"
    width = generation.prompt_mask.shape[1]
    tokens = generation.tokens.tolist()  # one device-to-host copy
    masks = generation.prompt_mask.sum(1).tolist()
    for item, row in zip(items, rows):
        prompt, completion = list(item.prompt_ids), list(item.completion_ids)
        if row >= len(tokens) or masks[row] != len(prompt):
            return "a generation batch whose prompts are not the scored ones"
        generated = tokens[row][width:]  # the completion, but its last token (and what follows an early EOS)
        shared = min(len(generated), len(completion))
        if tokens[row][width - len(prompt) : width] != prompt or generated[:shared] != completion[:shared]:
            return "cached tokens that are not the scored prompt and completion"
    return None


@torch.no_grad()
def score_from_cache(
    scorer: StepLikelihoodScorer, model, generation: GenerationCache, items: Sequence[ScoringItem], rows: Sequence[int]
) -> list[torch.Tensor]:
    """
    l_0..l_K of `items[j]`, completion `rows[j]` of the generation batch, from `generation`'s cache.

    The prompt of `items[j]` must be the real (unpadded) prompt of that row and its completion the tokens generated
    for it. Forwards of at most `scorer.batch_size` rows with similar numbers of copy tokens (`_chunks_by_copy_tokens`);
    they are counted by `scorer` (and synchronised across processes as its own are).

    Where the completion itself continues step k with the scaffold (typically after the last step: the model closed
    its thought and opened the answer), the cache already holds the scaffold's keys and values after that prefix, so
    copy k re-runs only the scaffold's last token (its logits predict the first answer token) and the answer.

    Returns:
        One float32 tensor of shape `(K_i + 1,)` per item, on the CPU (max over answer variants).
    """
    device = _model_device(model)
    width = generation.prompt_mask.shape[1]
    prompt_mask = generation.prompt_mask.to(device).bool()  # (B, P)
    extend = any(width + max(item.boundaries) > generation.length for item in items)
    cache_length = generation.length + int(extend)  # extending adds the last generated token's column
    if any(width + max(item.boundaries) > cache_length for item in items):
        raise ValueError("The generation cache does not cover the completions' steps (was it from this batch?).")
    plans = [_CopyPlan.of(item, cache_length - width) for item in items]
    chunks = _chunks_by_copy_tokens(plans, scorer.batch_size)
    first_forward = scorer.forward_count
    required = None
    if scorer.sync_forward_count is not None:  # agreed before the first forward (ZeRO-3, FSDP: see StepLikelihoodScorer)
        required = int(scorer.sync_forward_count(len(chunks) + int(extend)))
    if extend:
        _extend_by_last_token(scorer, model, generation, items, rows, device)
    out: list[torch.Tensor | None] = [None] * len(items)
    for chunk in chunks:
        sums = _score_chunk(scorer, model, generation, [items[j] for j in chunk], [plans[j] for j in chunk],
                            [rows[j] for j in chunk], prompt_mask, device)
        for j, values in zip(chunk, sums):
            out[j] = values
    if required is not None:
        scorer._pad_forwards(model, device, required - (scorer.forward_count - first_forward))
    return out


def _chunks_by_copy_tokens(plans: Sequence[_CopyPlan], max_rows: int) -> list[list[int]]:
    """
    The items' indices in forwards: most copy tokens first (a forward pads every row to its longest, and its cost
    grows with the padded width), then the most cached columns; a forward holds at most `max_rows` rows and ends
    where a row's copy tokens fall below `scoring.MIN_CHUNK_FILL` of its first row's, so that padding stays under a
    tenth of the tokens it runs. Depends only on the plans, so every process can count its forwards before the first.
    """
    order = sorted(range(len(plans)), key=lambda j: (-plans[j].tokens, -plans[j].columns))
    return [order[start:end] for start, end in fill_chunks([plans[j].tokens for j in order], max_rows)]


@dataclass
class _CopyPlan:
    """
    The answer copies of one item: per answer variant, `skips[v]` (K+1,) = how many of the block's first tokens
    copy k leaves to the cache (0, or all but the last scaffold token when the completion continues step k with the
    scaffold's ids); `tokens`: copy tokens in all; `columns`: completion columns the copies see (at most
    `cached_columns`, the completion tokens the cache holds).
    """

    skips: list[torch.Tensor]
    tokens: int
    columns: int

    @classmethod
    def of(cls, item: ScoringItem, cached_columns: int) -> _CopyPlan:
        bounds = item.boundaries
        skips, tokens, columns = [], 0, max(bounds)
        for block in item.answers:
            # the last scaffold token re-runs: its logits, which a cache lacks, predict the first answer token
            skip = [
                size - 1 if size > 1 and end + size - 1 <= cached_columns else 0
                for end, size in zip(bounds, scaffold_continuations(item, block))
            ]
            skips.append(torch.tensor(skip, dtype=torch.long))
            tokens += (block.scored[1] - 1) * len(bounds) - sum(skip)
            columns = max([columns] + [end + s for end, s in zip(bounds, skip) if s])
        return cls(skips, tokens, columns)


def _score_chunk(scorer, model, generation, items, plans, rows, prompt_mask, device) -> list[torch.Tensor]:
    """One forward over the answer copies of `items` against the cache's columns they see."""
    from transformers.cache_utils import DynamicCache

    width = prompt_mask.shape[1]
    columns = width + max(plan.columns for plan in plans)
    index = torch.as_tensor(rows, device=device)
    layers = [(layer.keys[index, :, :columns], layer.values[index, :, :columns]) for layer in generation.cache.layers]
    cache = DynamicCache(ddp_cache_data=layers, config=_model_config(model))
    # per item: the copies of every (variant, k), one after the other
    ids, positions, visible, copy_start, predict, targets, slots, slot_counts = [], [], [], [], [], [], [], []
    prompt_lengths = prompt_mask[index].sum(1).tolist()  # one device-to-host copy
    for item, plan, prompt_len in zip(items, plans, prompt_lengths):
        bounds = torch.as_tensor(list(item.boundaries), dtype=torch.long)
        num_k = bounds.numel()
        row_ids, row_pos, row_visible, row_start, row_predict, row_targets, row_slots = [], [], [], [], [], [], []
        offset = 0
        for variant, (block, skip) in enumerate(zip(item.answers, plan.skips)):
            block_ids = torch.as_tensor(block.ids, dtype=torch.long)
            size = block_ids.numel()
            # copy k runs the block's tokens [skip_k, last scored): the last scored token is a target, never a query
            within = torch.arange(size).unsqueeze(0)
            kept = (within >= skip.unsqueeze(1)) & (within < block.scored[1] - 1)  # (K+1, size)
            sizes = block.scored[1] - 1 - skip
            starts = offset + torch.cumsum(sizes, 0) - sizes  # (K+1,)
            row_ids.append(block_ids.expand(num_k, size)[kept])
            row_pos.append(((prompt_len + bounds).unsqueeze(1) + torch.arange(size))[kept])
            # the prompt, completion[:b_k] and the scaffold tokens the cache holds for this copy
            row_visible.append((width + bounds + skip).repeat_interleave(sizes))
            row_start.append(starts.repeat_interleave(sizes))
            scored = torch.arange(*block.scored)  # every scored token has a predecessor in its copy (scored[0] > 0)
            row_predict.append((starts.unsqueeze(1) - skip.unsqueeze(1) + scored - 1).flatten())
            row_targets.append(block_ids[scored].repeat(num_k))
            row_slots.append((variant * num_k + torch.arange(num_k)).repeat_interleave(scored.numel()))
            offset += int(sizes.sum())
        ids.append(torch.cat(row_ids))
        positions.append(torch.cat(row_pos))
        visible.append(torch.cat(row_visible))
        copy_start.append(torch.cat(row_start))
        predict.append(torch.cat(row_predict))
        targets.append(torch.cat(row_targets))
        slots.append(torch.cat(row_slots))
        slot_counts.append(len(item.answers) * num_k)
    copies = max(t.numel() for t in ids)
    n = len(items)
    input_ids = torch.full((n, copies), scorer.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, copies), dtype=torch.long)
    sees = torch.zeros((n, copies), dtype=torch.long)
    starts = torch.arange(copies).repeat(n, 1)  # padding queries see only themselves
    for r in range(n):
        length = ids[r].numel()
        input_ids[r, :length] = ids[r]
        position_ids[r, :length] = positions[r]
        sees[r, :length] = visible[r]
        starts[r, :length] = copy_start[r]
    key = torch.arange(columns, device=device)  # the cached columns
    copy_key = torch.arange(copies, device=device)  # the copy region's columns, counted from its start
    query = copy_key.view(1, -1, 1)
    sees, starts = sees.to(device).unsqueeze(-1), starts.to(device).unsqueeze(-1)
    real_prompt = torch.zeros((n, columns), dtype=torch.bool, device=device)
    real_prompt[:, :width] = prompt_mask[index]
    real_prompt[:, width:] = True
    cached = (key < sees) & real_prompt.unsqueeze(1)  # (B, C, columns): the prompt and completion[:b_k]
    own = (copy_key >= starts) & (copy_key <= query)  # (B, C, C): its own copy, causally
    attention_mask = _as_model_mask(model, torch.cat([cached, own], dim=-1).unsqueeze(1))
    rows_index = torch.cat([torch.full_like(p, r) for r, p in enumerate(predict)])
    cols = torch.cat(predict)
    keep, position = torch.unique(cols, return_inverse=True)
    inputs = {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "attention_mask": attention_mask,
        generation.cache_keyword: cache,
    }
    logits = scorer._call_with_cache(model, inputs, keep.to(device)).logits
    selected = logits[rows_index.to(device), position.to(device)].float()  # (N, vocab), temperature 1
    all_targets = torch.cat(targets).to(device)
    token_logps = (selected.gather(1, all_targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, -1)).cpu()
    out, at = [], 0
    for item, row_slots in zip(items, slots):
        count = row_slots.numel()
        sums = torch.zeros(slot_counts[len(out)], dtype=torch.float64).index_add_(
            0, row_slots, token_logps[at : at + count].double()
        )
        at += count
        lengths = torch.tensor([b.scored[1] - b.scored[0] for b in item.answers], dtype=torch.float64)
        out.append((sums.view(len(item.answers), -1) / lengths.unsqueeze(1)).max(dim=0).values.float())
    return out


def _extend_by_last_token(scorer, model, generation, items, rows, device) -> None:
    """
    Add the last generated token's keys and values to the cache (generation never feeds it back): one forward of one
    token per row, needed when a step ends at the completion's last token.
    """
    length = generation.length
    width = generation.prompt_mask.shape[1]
    batch = generation.prompt_mask.shape[0]
    last = torch.full((batch, 1), scorer.pad_token_id, dtype=torch.long)
    for item, row in zip(items, rows):
        if len(item.completion_ids) == length - width + 1:
            last[row, 0] = item.completion_ids[-1]
    prompt_lengths = generation.prompt_mask.sum(1).cpu()
    positions = (prompt_lengths + (length - width)).view(-1, 1)
    visible = torch.cat([generation.prompt_mask.bool().cpu(), torch.ones(batch, length - width + 1, dtype=torch.bool)],
                        dim=1)
    attention_mask = _as_model_mask(model, visible.view(batch, 1, 1, -1).to(device))
    inputs = {
        "input_ids": last.to(device),
        "position_ids": positions.to(device),
        "attention_mask": attention_mask,
        generation.cache_keyword: generation.cache,
    }
    scorer._call_with_cache(model, inputs, torch.tensor([0], device=device))
    if generation.length != length + 1:
        raise RuntimeError("Extending the generation cache by one token did not add one column.")


