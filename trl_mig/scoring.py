r"""Step-conditioned answer likelihoods l_0..l_K, teacher-forced, without gradient.

    l_k = (1/|y*|) sum_t log pi(y*_t | x, s_{1..k}, S, y*_{<t})      (temperature 1, whatever the sampling temperature)

Two exact methods:

- `block`: one row per completion, `prompt + completion[:b_K] + (K+1) copies of scaffold+answer` (per answer
  variant), with a block attention mask under which copy k sees the prompt, the completion up to b_k and itself
  (causally), and position ids that continue from b_k. O(L + K|y*|) tokens per completion, one forward per micro-batch.
- `prefix`: one row per prefix, `prompt + completion[:b_k] + scaffold+answer`, with an ordinary padding mask.
  O(K L) tokens, but works with every attention implementation (flash-attention, flex, sliding windows).

Row layout of a block micro-batch of B rows, width W = S + C:

    columns [0, S):  prompt + completion[:b_K] of each row, left-aligned (right-padded); plain causal attention
    columns [S, W):  the row's answer copies, one after the other (then padding); copy k sees the first P + b_k
                     columns and itself causally

With sdpa, the block mask only covers the C copy queries: the scoring forward temporarily routes attention through
`_split_sdpa_attention`, which runs the S shared queries with `is_causal=True` (the fast causal kernels, no W x W mask)
and the C copy queries with the (B, 1, C, W) block mask. Attention is separable over queries, so this is the same
computation as one W x W block mask, with about half the attention work when the completion dominates W.

Vision-language models: a `ScoringItem` carries its prompt's multimodal inputs (`multimodal`), which go into every
row built from it, so the image tokens get the same vision features as in the policy forward. Position ids are the
model's own: for multimodal rotary embeddings (Qwen2-VL style, 3-D positions that do not equal the column index after
an image) the shared part's positions come from the model's `get_rope_index`, and each answer copy continues from the
text position that follows its prefix, which is what one row per prefix would get.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BLOCK_MASK_ATTENTION = ("sdpa", "eager")
SPLIT_ATTENTION = "trl_mig_split_sdpa"

# Layer types whose token mixing a 4-D attention mask controls (MLP-only kinds are harmless).
_MASKABLE_LAYER_TYPES = {"full_attention", "dense", "sparse", "moe"}
# Architectures where the mask does not control all token mixing (recurrent/SSM layers, ALiBi biases built from a
# 2-D mask), for configs that do not declare `layer_types`.
_UNMASKABLE_MODEL_TYPES = {
    "bamba",
    "bloom",
    "falcon_h1",
    "falcon_mamba",
    "granitemoehybrid",
    "jamba",
    "lfm2",
    "mamba",
    "mamba2",
    "minimax",
    "mpt",
    "nemotron_h",
    "plamo2",
    "qwen3_next",
    "recurrent_gemma",
    "rwkv",
    "xlstm",
    "zamba",
    "zamba2",
}
# Multimodal inputs laid out along the token sequence (one value per prompt token); every other multimodal input is
# indexed by image, patch or row along dim 0 and concatenated over the rows of a forward.
TOKEN_ALIGNED_FIELDS = ("token_type_ids", "mm_token_type_ids")
# Inputs of a multimodal rotary model's `get_rope_index`, besides the ids and the token types.
_ROPE_INDEX_FIELDS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


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
    """
    One completion to score: its prompt tokens (no padding), completion tokens and step boundaries b_0..b_K.

    `multimodal` holds the prompt's other model inputs (a vision-language model's images), for this completion alone
    (see `trl_mig.multimodal.split_multimodal_inputs`): the fields of `TOKEN_ALIGNED_FIELDS` as (P,) tensors aligned
    with `prompt_ids` (zero over the completion and the answer copies), every other field (`pixel_values`,
    `image_grid_thw`, `image_sizes`, ...) indexed along dim 0 and concatenated with the other rows' of a forward.
    """

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    boundaries: Sequence[int]
    answers: Sequence[AnswerBlock]
    multimodal: Mapping[str, torch.Tensor] | None = None
    # added to every position id (the shared part and the answer copies): TRL's forward over a left-padded prompt
    # without position ids counts the pads, and a fused pass reproduces its positions
    position_offset: int = 0
    # the shared part holds the whole completion, not only up to b_K, so that its tokens can be scored too
    keep_completion: bool = False

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
    """Why `model` cannot take the block attention mask, or None when it can (a VLM: its language model)."""
    config = _text_config(model)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in BLOCK_MASK_ATTENTION:
        return (
            f"attention implementation {implementation!r} does not take a custom 4-D attention mask "
            f"(block scoring needs one of {list(BLOCK_MASK_ATTENTION)})"
        )
    if sliding_window_active(config):
        return "the model uses sliding-window attention, which a custom 4-D mask would bypass"
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({str(kind) for kind in layer_types} - _MASKABLE_LAYER_TYPES)
    if other:
        return f"the model has {other} layers, whose token mixing a custom 4-D attention mask does not control"
    model_type = getattr(config, "model_type", None)
    if model_type in _UNMASKABLE_MODEL_TYPES or getattr(config, "alibi", False):
        return f"model type {model_type!r} mixes tokens outside what a custom 4-D attention mask controls"
    return None


def multimodal_block_unsupported_reason(items: Sequence[ScoringItem]) -> str | None:
    """Why the multimodal inputs of `items` rule out the block mask, or None when they do not."""
    for item in items:
        token_types = (item.multimodal or {}).get("token_type_ids")
        if token_types is not None and bool(torch.as_tensor(token_types).ne(0).any()):
            return (
                "the prompts' token_type_ids make image tokens attend to each other both ways (Gemma 3 / PaliGemma "
                "style), which the block mask's causal prompt part does not reproduce"
            )
    return None


class StepLikelihoodScorer:
    """
    Computes l_0..l_K for a batch of completions, max over answer variants.

    Args:
        method (`str`): `"block"`, `"prefix"` or `"auto"` (block when the model can take the mask, else prefix with a
            one-time warning that names the reason).
        batch_size (`int`): rows per forward pass (completions for `block`, prefixes x variants for `prefix`).
        pad_token_id (`int`): id used to fill padding columns (never attended to by real tokens).
        sync_forward_count (`callable`, *optional*): maps this process's number of forwards to the number every
            process must run (the max over processes); called once per `score`, before the first forward. Under
            ZeRO-3 and FSDP every forward all-gathers the parameters, so all ranks must run the same count and agree
            on it before any of them starts: a collective issued while another rank is still inside a forward would
            be paired with that forward's all-gathers. This rank pads with dummy forwards.
        split_attention (`bool`, defaults to `True`): with sdpa, run the block method's prompt + completion queries
            with plain causal attention and only the answer copies under the block mask (same result, less attention
            work). `False` always passes the full (B, 1, W, W) block mask.
    """

    def __init__(
        self,
        method: str = "auto",
        batch_size: int = 8,
        pad_token_id: int = 0,
        sync_forward_count: Callable[[int], int] | None = None,
        split_attention: bool = True,
    ):
        if method not in ("auto", "block", "prefix"):
            raise ValueError(f"Unknown scoring method {method!r}; expected 'auto', 'block' or 'prefix'.")
        if batch_size < 1:
            raise ValueError(f"The scoring batch size must be >= 1, got {batch_size}.")
        self.method = method
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.sync_forward_count = sync_forward_count
        self.split_attention = split_attention
        self.forward_count = 0  # forwards run so far, dummy ones included
        self._warned: set[str] = set()
        self._split_verified = False

    def resolve_method(self, model, items: Sequence[ScoringItem] = ()) -> str:
        """The method for `model` and these items: `block` unless asked for `prefix` or something rules it out."""
        if self.method == "prefix":
            return "prefix"
        reason = block_mask_unsupported_reason(model) or multimodal_block_unsupported_reason(items)
        if reason is None:
            return "block"
        if self.method == "block":
            raise ValueError(f"mig_scoring_method='block' cannot be used: {reason}. Use 'prefix' or 'auto'.")
        if reason not in self._warned:
            logger.warning("MIG scoring falls back to one row per step prefix: %s.", reason)
            self._warned.add(reason)
        return "prefix"

    def plan(self, items: Sequence[ScoringItem], method: str) -> int:
        """Forward passes this process needs for `items` (before synchronisation); depends on nothing else."""
        rows = len(items) if method == "block" else sum(item.num_prefixes * len(item.answers) for item in items)
        return math.ceil(rows / self.batch_size)

    def _uses_split(self, model) -> bool:
        """Whether block forwards on `model` route attention through `_split_sdpa_attention`."""
        return self.split_attention and _config_attn(model) == "sdpa" and _split_available()

    def _forward_budget(self, model, items: Sequence[ScoringItem], method: str) -> int:
        """
        Forwards this process may run for `items`: the plan, plus one while the split attention is unverified (a
        first split forward that cannot split is redone with the full mask).
        """
        planned = self.plan(items, method)
        unverified = method == "block" and len(items) > 0 and self._uses_split(model) and not self._split_verified
        return planned + 1 if unverified else planned

    @torch.no_grad()
    def score(self, model, items: Sequence[ScoringItem], completion_logps: bool = False):
        """
        Args:
            model: the causal LM (a PEFT or DDP wrapper is fine).
            items (`Sequence[ScoringItem]`): the completions to score.
            completion_logps (`bool`, defaults to `False`): also return the log-prob of every completion token, in the
                same forwards, through TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, at the temperature
                it was added with), as `GRPOTrainer._get_per_token_logps_and_entropies` computes them. Needs the
                block method, `keep_completion` items and a model that has that head; an item may then have no
                answer variant (its l_k are NaN).

        Returns:
            One float32 tensor of shape `(K_i + 1,)` per item: l_0..l_K (max over variants), on the CPU. With
            `completion_logps`, a tuple of that list and one float32 tensor of shape `(C_i,)` per item (C_i =
            `len(completion_ids)`), on the model's device.
        """
        for item in items:
            if not item.answers and not completion_logps:
                raise ValueError("Every scoring item needs at least one answer variant.")
            if not item.boundaries:
                raise ValueError("Every scoring item needs at least one step boundary (b_0).")
            if len(item.prompt_ids) + min(item.boundaries) == 0:
                raise ValueError("Cannot score an answer after an empty prompt and an empty prefix.")
            if not all(0 <= b <= len(item.completion_ids) for b in item.boundaries):
                # a boundary past the completion would let a copy see columns that are not its prefix
                raise ValueError(
                    f"Step boundaries {list(item.boundaries)} must lie in [0, {len(item.completion_ids)}] "
                    "(the completion's length)."
                )
        method = self.resolve_method(model, items)
        if completion_logps:
            _check_fusable(model, items, method)
        device = _model_device(model)
        positions = [_item_positions(model, item) for item in items]
        rows = _block_rows(items, positions) if method == "block" else _prefix_rows(items, positions)
        # longest first, ties in input order: similar lengths share a micro-batch (less padding), deterministically
        order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
        slot_base, num_slots = [], 0
        for item in items:
            slot_base.append(num_slots)
            num_slots += item.num_prefixes * len(item.answers)
        sums = torch.zeros(num_slots, dtype=torch.float64)
        # agree on the forward count before any forward: afterwards another rank may be inside an all-gather
        required = None
        if self.sync_forward_count is not None:
            required = int(self.sync_forward_count(self._forward_budget(model, items, method)))
        first_forward = self.forward_count
        per_item_logps: list[torch.Tensor | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            batch = [rows[r] for r in order[start : start + self.batch_size]]
            if method == "block":
                token_logps, slots = self._forward_block(
                    model, batch, items, device, slot_base, per_item_logps if completion_logps else None
                )
            else:
                token_logps, slots = self._forward_prefix(model, batch, items, device, slot_base)
            sums.index_add_(0, slots, token_logps.double())
        if required is not None:
            self._pad_forwards(model, device, required - (self.forward_count - first_forward))
        out = []
        for item, base in zip(items, slot_base):
            if not item.answers:
                out.append(torch.full((item.num_prefixes,), float("nan")))
                continue
            counts = torch.tensor([block.scored[1] - block.scored[0] for block in item.answers], dtype=torch.float64)
            per_variant = sums[base : base + item.num_prefixes * len(item.answers)].view(len(item.answers), -1)
            out.append((per_variant / counts.unsqueeze(1)).max(dim=0).values.float())
        return (out, per_item_logps) if completion_logps else out

    def _pad_forwards(self, model, device, missing: int) -> None:
        """Run `missing` dummy forwards, so that this process runs the synchronised count (ZeRO-3, FSDP)."""
        if missing < 0:  # the budget covers every forward `score` can run
            raise RuntimeError(f"MIG scoring ran {-missing} forward(s) more than the count agreed across processes.")
        dummy = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=device)
        for _ in range(missing):
            self._call(model, input_ids=dummy, attention_mask=torch.ones_like(dummy), logits_to_keep=1)

    def _call(self, model, **kwargs):
        self.forward_count += 1
        return model(use_cache=False, **kwargs)

    def _call_with_cache(self, model, inputs: dict, logits_to_keep: torch.Tensor):
        """A counted forward that reads (and extends) the key/value cache in `inputs` (cached_scoring.py)."""
        self.forward_count += 1
        return model(use_cache=True, logits_to_keep=logits_to_keep, **inputs)

    # ---------------------------------------------------------------------------------------------------- block
    def _forward_block(
        self, model, batch: list[_Row], items, device, slot_base, completion_logps: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One forward over B block rows. Returns the log-prob of every scored token (N,) and its slot (N,). With a
        `completion_logps` list, also writes each row's completion-token log-probs (C_i,) (TRL's fused LM head) at
        `completion_logps[item index]`.
        """
        shared = max(row.shared_len for row in batch)
        copies = max(row.length - row.shared_len for row in batch)
        split = self._uses_split(model)
        if split and copies < 2:
            copies = 2  # a (B, 1, 1, W) mask would broadcast over every query: keep it unambiguous
        width = shared + copies
        n = len(batch)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        # padding columns keep position 0: any valid position does, real tokens never see them
        position_ids = torch.zeros((max(row.positions.shape[0] for row in batch), n, width), dtype=torch.long)
        # per copy-region column: where its copy starts and how many leading shared columns it sees
        copy_start = torch.arange(shared, width).repeat(n, 1)
        copy_visible = torch.zeros((n, copies), dtype=torch.long)
        for r, row in enumerate(batch):
            input_ids[r, : row.shared_len] = row.ids[: row.shared_len]
            tail = row.length - row.shared_len
            input_ids[r, shared : shared + tail] = row.ids[row.shared_len :]
            position_ids[:, r, : row.shared_len] = row.positions[:, : row.shared_len]
            position_ids[:, r, shared : shared + tail] = row.positions[:, row.shared_len :]
            copy_start[r, :tail] = row.copy_start + shared
            copy_visible[r, :tail] = row.copy_visible
        rows, cols, targets, slots = _scored_columns(batch, slot_base, lambda row: (0, shared))
        copy_start, copy_visible = copy_start.to(device), copy_visible.to(device)
        key = torch.arange(width, device=device)
        query = torch.arange(shared, width, device=device).view(1, -1, 1)
        # copy query q sees the shared columns [0, visible) and its own copy's columns [start, q]
        copy_rows = (key < copy_visible.unsqueeze(-1)) | ((key >= copy_start.unsqueeze(-1)) & (key <= query))
        inputs = dict(input_ids=input_ids.to(device), position_ids=_model_positions(position_ids).to(device))
        inputs |= _multimodal_inputs(batch, items, width, [0] * n, device)
        if completion_logps is not None:
            labels, spans = _completion_labels(batch, items, input_ids)
            inputs |= {"shift_labels": labels.to(device), "fused_lm_head": True}
            rows_and_spans = [(row.item, r, span) for r, (row, span) in enumerate(zip(batch, spans))]
            collect = functools.partial(_collect_completion_logps, completion_logps, rows_and_spans)
        else:
            collect = None
        if split:
            attention_mask = _as_model_mask(model, copy_rows.unsqueeze(1))  # (B, 1, C, W)
            try:
                logps = self._run_split(model, inputs, attention_mask, shared, rows, cols, targets, collect)
                self._split_verified = True
                return logps, slots
            except RuntimeError as err:
                # only a first split forward may fail for want of routing (e.g. attention hard-coded in the model)
                if self._split_verified or isinstance(err, torch.OutOfMemoryError):
                    raise
                logger.warning(
                    "MIG block scoring cannot split attention for this model (%s); passing the full block mask.", err
                )
                self.split_attention = False
        shared_rows = key <= torch.arange(shared, device=device).view(-1, 1)  # (S, W) causal
        full = torch.cat([shared_rows.unsqueeze(0).expand(n, -1, -1), copy_rows], dim=1)  # (B, W, W)
        attention_mask = _as_model_mask(model, full.unsqueeze(1))
        return self._logps(model, inputs | {"attention_mask": attention_mask}, rows, cols, targets, collect), slots

    def _run_split(self, model, inputs, attention_mask, shared, rows, cols, targets, collect=None) -> torch.Tensor:
        state = _SplitState(shared)
        token = _SPLIT_STATE.set(state)
        try:
            with _attention_implementation(_text_config(model), SPLIT_ATTENTION):
                logps = self._logps(model, inputs | {"attention_mask": attention_mask}, rows, cols, targets, collect)
        finally:
            _SPLIT_STATE.reset(token)
        if state.error is not None:
            raise RuntimeError(state.error)
        if state.calls == 0:
            raise RuntimeError("no attention layer called the split attention function")
        return logps

    # --------------------------------------------------------------------------------------------------- prefix
    def _forward_prefix(self, model, batch: list[_Row], items, device, slot_base) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(row.length for row in batch)
        n = len(batch)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        position_ids = torch.zeros((max(row.positions.shape[0] for row in batch), n, width), dtype=torch.long)
        starts = [width - row.length for row in batch]  # left padding: every row ends at the last column
        for r, (row, start) in enumerate(zip(batch, starts)):
            input_ids[r, start:] = row.ids
            attention_mask[r, start:] = 1
            position_ids[:, r, start:] = row.positions
        rows, cols, targets, slots = _scored_columns(batch, slot_base, lambda row: (width - row.length, None))
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=_model_positions(position_ids))
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        inputs |= _multimodal_inputs(batch, items, width, starts, device)
        return self._logps(model, inputs, rows, cols, targets), slots

    def _logps(self, model, inputs, rows, cols, targets, collect=None) -> torch.Tensor:
        """
        Run the forward, keeping logits only at the columns that predict scored tokens; (N,) float32 on the CPU.

        With `collect` (inputs then hold `shift_labels` and `fused_lm_head=True`), TRL's fused LM head scores the
        labelled completion tokens, `collect(log_probs)` receives its (B, W) output, and the answer tokens are scored
        from the backbone's last hidden states through the model's LM head at temperature 1.
        """
        device = inputs["input_ids"].device
        if collect is not None:
            causal_lm = fused_head_model(model)
            captured = []
            hook = causal_lm.base_model.register_forward_hook(
                lambda module, args, output: captured.append(output[0])  # last_hidden_state (B, W, H)
            )
            try:
                output = self._call(model, **inputs)
            finally:
                hook.remove()
            collect(output.log_probs)
            hidden = captured[-1][rows.to(device), cols.to(device)]  # (N, H)
            selected = causal_lm.get_output_embeddings()(hidden).float()  # (N, vocab), temperature 1
            token_logps = selected.gather(1, targets.to(device).unsqueeze(1)).squeeze(1)
            return (token_logps - torch.logsumexp(selected, -1)).cpu()
        keep, position = torch.unique(cols, return_inverse=True)  # sorted union of the predicting columns
        logits = self._call(model, **inputs, logits_to_keep=keep.to(device)).logits
        selected = logits[rows.to(device), position.to(device)].float()  # (N, vocab), temperature 1
        token_logps = selected.gather(1, targets.to(device).unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, -1)
        return token_logps.cpu()


@dataclass
class _Row:
    """
    One input row, before padding.

    `ids` (L,) long: the shared part (its first `shared_len` tokens) then the answer copies; `positions` (D, L) long
    their position ids (D = 1, or 3 for multimodal rotary positions). For block rows, `copy_start` and
    `copy_visible` (L - shared_len,) give, per copy token, the offset of its copy within the copy region and the
    number of shared tokens the copy sees. `predict` (N,) is the column (in the shared part for the first answer
    token, else relative to the copy region's start) that predicts each scored token, `from_shared` (N,) bool tells
    which, `targets` (N,) the scored ids, `slots` (N,) the item's (variant, k) slot index.
    """

    ids: torch.Tensor
    shared_len: int
    positions: torch.Tensor
    copy_start: torch.Tensor | None
    copy_visible: torch.Tensor | None
    predict: torch.Tensor
    from_shared: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    item: int

    @property
    def length(self) -> int:
        return self.ids.numel()


def _scored_columns(batch: list[_Row], slot_base, layout):
    """
    Flatten the scored tokens of a micro-batch into `(rows, cols, targets, slots)`, each (N,) long.

    `layout(row)` gives the column where the row's shared part starts and the column where its copy region starts
    (None for prefix rows, which have none).
    """
    rows, cols, targets, slots = [], [], [], []
    for r, row in enumerate(batch):
        shared_at, copies_at = layout(row)
        if copies_at is None:
            cols.append(row.predict + shared_at)
        else:
            cols.append(torch.where(row.from_shared, row.predict + shared_at, row.predict + copies_at))
        rows.append(torch.full_like(row.predict, r))
        targets.append(row.targets)
        slots.append(row.slots + slot_base[row.item])
    return torch.cat(rows), torch.cat(cols), torch.cat(targets), torch.cat(slots)


def _block_rows(items: Sequence[ScoringItem], item_positions: Sequence[torch.Tensor]) -> list[_Row]:
    rows = []
    for i, (item, shared_positions) in enumerate(zip(items, item_positions)):
        prompt_len = len(item.prompt_ids)
        prompt = torch.as_tensor(list(item.prompt_ids), dtype=torch.long)
        kept = len(item.completion_ids) if item.keep_completion else item.boundaries[-1]
        completion = torch.as_tensor(list(item.completion_ids[:kept]), dtype=torch.long)
        visible = prompt_len + torch.as_tensor(list(item.boundaries), dtype=torch.long)  # (K+1,)
        continue_at = _continuation_positions(shared_positions, visible)  # (K+1,)
        num_k = visible.numel()
        shared_len = prompt_len + completion.numel()
        ids, positions, starts, sees = [prompt, completion], [shared_positions[:, :shared_len]], [], []
        nothing = torch.zeros(0, dtype=torch.long)  # an item without answers (fused scoring) has no copies
        predict, from_shared, targets, slots = [nothing], [nothing.bool()], [nothing], [nothing]
        starts.append(nothing)
        sees.append(nothing)
        offset = 0
        for variant, block in enumerate(item.answers):
            block_ids = torch.as_tensor(block.ids, dtype=torch.long)
            size = block_ids.numel()
            within = torch.arange(size)
            copy_offsets = offset + size * torch.arange(num_k)  # (K+1,) start of each copy in the copy region
            ids.append(block_ids.repeat(num_k))
            copy_positions = (continue_at.unsqueeze(1) + within).flatten()
            positions.append(copy_positions.expand(shared_positions.shape[0], -1))
            starts.append(copy_offsets.repeat_interleave(size))
            sees.append(visible.repeat_interleave(size))
            # token m of copy k is predicted by the token before it: the copy's own, or the prefix's last (m = 0)
            scored = torch.arange(*block.scored)
            first = scored == 0
            from_copy = copy_offsets.unsqueeze(1) + scored - 1
            predict.append(torch.where(first, visible.unsqueeze(1) - 1, from_copy).ravel())
            from_shared.append(first.expand(num_k, -1).flatten())
            targets.append(block_ids[scored].repeat(num_k))
            slots.append((variant * num_k + torch.arange(num_k)).repeat_interleave(scored.numel()))
            offset += size * num_k
        rows.append(
            _Row(
                torch.cat(ids),
                shared_len,
                torch.cat(positions, dim=1),
                torch.cat(starts),
                torch.cat(sees),
                torch.cat(predict),
                torch.cat(from_shared),
                torch.cat(targets),
                torch.cat(slots),
                i,
            )
        )
    return rows


def _prefix_rows(items: Sequence[ScoringItem], item_positions: Sequence[torch.Tensor]) -> list[_Row]:
    rows = []
    for i, (item, shared_positions) in enumerate(zip(items, item_positions)):
        num_k = item.num_prefixes
        visible = len(item.prompt_ids) + torch.as_tensor(list(item.boundaries), dtype=torch.long)
        continue_at = _continuation_positions(shared_positions, visible)
        for variant, block in enumerate(item.answers):
            block_ids = torch.as_tensor(block.ids, dtype=torch.long)
            scored = torch.arange(*block.scored)
            for k, boundary in enumerate(item.boundaries):
                prefix = list(item.prompt_ids) + list(item.completion_ids[:boundary])
                ids = torch.cat([torch.as_tensor(prefix, dtype=torch.long), block_ids])
                answer_positions = continue_at[k] + torch.arange(block_ids.numel())
                positions = torch.cat(
                    [shared_positions[:, : len(prefix)], answer_positions.expand(shared_positions.shape[0], -1)], dim=1
                )
                rows.append(
                    _Row(
                        ids,
                        ids.numel(),
                        positions,
                        None,
                        None,
                        len(prefix) + scored - 1,
                        torch.ones_like(scored, dtype=torch.bool),
                        block_ids[scored],
                        torch.full_like(scored, variant * num_k + k),
                        i,
                    )
                )
    return rows


# ------------------------------------------------------------------------------------ completion log-probs
def fused_head_model(model):
    """
    The causal LM inside `model` (through DDP and PEFT wrappers) when TRL's fused LM head is on it
    (`trl.trainer.utils.add_fused_lm_head`, which GRPOTrainer adds to the policy and the reference model), else None.
    """
    causal_lm = _unwrapped(model)
    if hasattr(causal_lm, "get_base_model"):  # PEFT: TRL patches the base model's forward
        causal_lm = causal_lm.get_base_model()
    forward = getattr(causal_lm, "forward", None)
    try:  # TRL's patched forward keeps the model's signature for `generate` (functools.wraps): look past it
        parameters = inspect.signature(getattr(forward, "__func__", forward), follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return None
    return causal_lm if "fused_lm_head" in parameters and "shift_labels" in parameters else None


def fusion_unsupported_reason(model) -> str | None:
    """Why completion log-probs cannot be computed in the scoring pass of `model`, or None when they can."""
    causal_lm = fused_head_model(model)
    if causal_lm is None:
        return "the model has no TRL fused LM head (trl.trainer.utils.add_fused_lm_head)"
    if not hasattr(causal_lm, "base_model") or causal_lm.base_model is causal_lm:
        return "the model exposes no backbone (`base_model`) whose hidden states the answer tokens need"
    config = _text_config(model)
    # the answer tokens go through the LM head alone: models that rescale or cap their logits would need those too
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"the model's logits are post-processed ({name}={value})"
    return None


def _check_fusable(model, items: Sequence[ScoringItem], method: str) -> None:
    if method != "block":
        raise ValueError("Completion log-probs are computed in the block method's pass only (got 'prefix').")
    reason = fusion_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"Completion log-probs cannot be computed in the scoring pass: {reason}.")
    for item in items:
        if not item.keep_completion or not item.prompt_ids:
            raise ValueError("Completion log-probs need items with `keep_completion=True` and a non-empty prompt.")


def _completion_labels(batch: list[_Row], items, input_ids: torch.Tensor):
    """
    The fused head's `shift_labels` (B, W) long: at the column before each completion token, that token (-100
    elsewhere); and per row the span [start, end) of those columns.
    """
    labels = torch.full_like(input_ids, -100)
    spans = []
    for r, row in enumerate(batch):
        item = items[row.item]
        start = len(item.prompt_ids) - 1
        end = start + len(item.completion_ids)
        labels[r, start:end] = input_ids[r, start + 1 : end + 1]
        spans.append((start, end))
    return labels, spans


def _collect_completion_logps(out: list, rows_and_spans, log_probs: torch.Tensor) -> None:
    """Write row r's completion log-probs `log_probs[r, start:end]` (C_i,) at `out[item]`."""
    for item, r, (start, end) in rows_and_spans:
        out[item] = log_probs[r, start:end].float()


# ------------------------------------------------------------------------------------------- split attention
@dataclass
class _SplitState:
    shared_width: int
    calls: int = 0
    error: str | None = None  # why an attention layer could not split, raised once the forward is over


_SPLIT_STATE: contextvars.ContextVar[_SplitState | None] = contextvars.ContextVar("trl_mig_split", default=None)
_SPLIT_REGISTERED: bool | None = None


def _split_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """
    sdpa attention for a block row: queries `[0, S)` with `is_causal=True` over keys `[0, S)`, queries `[S, W)` with
    `attention_mask` of shape (B, 1, W - S, W) over all keys. query (B, H, W, D), key/value (B, H_kv, W, D).

    Returns (B, W, H, D), like transformers' sdpa function, which does the work for both parts. A mask of another
    shape is recorded in the state and answered with zeros: the forward runs to its end (under ZeRO-3 or FSDP every
    layer's all-gather must still happen, as on the other ranks) and `_run_split` raises after it.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    state = _SPLIT_STATE.get()
    if state is None:  # not inside a scoring forward: plain sdpa
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    width = state.shared_width
    if attention_mask is None or attention_mask.shape[-2] != query.shape[2] - width:
        shape = None if attention_mask is None else tuple(attention_mask.shape)
        state.error = state.error or f"the split attention got the mask {shape} for {query.shape[2]} queries"
        batch, heads, queries, head_dim = query.shape
        return query.new_zeros(batch, queries, heads, head_dim), None
    shared = slice(0, width)
    head, _ = sdpa(module, query[:, :, shared], key[:, :, shared], value[:, :, shared], None, is_causal=True, **kwargs)
    tail, _ = sdpa(module, query[:, :, width:], key, value, attention_mask, is_causal=False, **kwargs)
    state.calls += 1
    return torch.cat([head, tail], dim=1), None


def _split_available() -> bool:
    """Register the split attention function with transformers once; False if this transformers cannot take it."""
    global _SPLIT_REGISTERED
    if _SPLIT_REGISTERED is None:
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
            from transformers.modeling_utils import AttentionInterface

            AttentionInterface.register(SPLIT_ATTENTION, _split_sdpa_attention)
            # only reached by a 2-D mask, which scoring never passes under this name: behave as sdpa
            AttentionMaskInterface.register(SPLIT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
            _SPLIT_REGISTERED = True
        except (ImportError, AttributeError, KeyError):
            _SPLIT_REGISTERED = False
    return _SPLIT_REGISTERED


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """Route the model's attention through `name` for the duration of one forward, then restore every (sub)config."""
    saved = []

    def walk(cfg):
        if cfg is None or any(cfg is seen for seen, _ in saved):
            return
        saved.append((cfg, cfg.__dict__.get("_attn_implementation_internal")))
        for key in getattr(cfg, "sub_configs", {}) or {}:
            walk(getattr(cfg, key, None))

    walk(config)
    try:
        config._attn_implementation = name
        yield
    finally:
        for cfg, value in saved:
            cfg._attn_implementation_internal = value


# --------------------------------------------------------------------------------------------------- positions
def _continuation_positions(shared_positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """
    Position id of a text token placed after the first `visible[k]` tokens, per k: one past the largest position
    so far. That is the column index for 1-D positions, and what multimodal rotary models (Qwen2-VL style) give text
    after text or after an image. shared_positions (D, S), visible (K+1,) with 1 <= visible <= S; returns (K+1,).
    """
    running_max = shared_positions.max(dim=0).values.cummax(dim=0).values  # (S,)
    return running_max[visible - 1] + 1


def _item_positions(model, item: ScoringItem) -> torch.Tensor:
    """
    Position ids of `prompt + completion[:b_K]` (no padding), (D, P + b_K) long on the CPU: `arange` (D = 1), or the
    model's 3-D multimodal rotary positions (D = 3) when it has a `get_rope_index` and the prompt has images.
    """
    prompt_len = len(item.prompt_ids)
    length = prompt_len + (len(item.completion_ids) if item.keep_completion else max(item.boundaries))
    multimodal = item.multimodal or {}
    grids = {name: multimodal[name] for name in _ROPE_INDEX_FIELDS if multimodal.get(name) is not None}
    rope_index = _rope_index_function(model) if grids else None
    if rope_index is None:
        return item.position_offset + torch.arange(length).unsqueeze(0)
    if multimodal.get("mm_token_type_ids") is None:
        raise ValueError(
            f"The prompt has multimodal rotary inputs ({sorted(grids)}) but no 'mm_token_type_ids', which the "
            "model needs to place its image tokens."
        )
    ids = torch.as_tensor(list(item.prompt_ids) + list(item.completion_ids[: length - prompt_len]), dtype=torch.long)
    token_types = torch.zeros(length, dtype=torch.long)
    token_types[:prompt_len] = torch.as_tensor(multimodal["mm_token_type_ids"], dtype=torch.long).cpu()
    device = _model_device(model)
    grids = {name: torch.as_tensor(value).to(device) for name, value in grids.items()}
    positions, _ = rope_index(
        ids.unsqueeze(0).to(device), mm_token_type_ids=token_types.unsqueeze(0).to(device), **grids
    )  # (3, 1, length)
    return item.position_offset + positions[:, 0].long().cpu()


def _rope_index_function(model):
    """The `get_rope_index` of a multimodal rotary model (Qwen2-VL, Qwen2.5-VL, ...), or None for 1-D positions."""
    for module in _unwrapped(model).modules():
        function = getattr(module, "get_rope_index", None)
        if callable(function):
            return function
    return None


def _model_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """(D, B, W) position ids as the model takes them: (B, W) for D = 1, else unchanged."""
    return position_ids[0] if position_ids.shape[0] == 1 else position_ids


def _multimodal_inputs(batch: list[_Row], items: Sequence[ScoringItem], width: int, prompt_at, device) -> dict:
    """
    The multimodal inputs of a forward over `batch` (rows of width `width`, row r's prompt starting at column
    `prompt_at[r]`): token-aligned fields as (B, W) tensors, zero outside the prompt; every other field concatenated
    over the rows along dim 0, in row order (left out when no row has an entry, e.g. no image in the batch).
    """
    per_row = [items[row.item].multimodal or {} for row in batch]
    names = list(dict.fromkeys(name for fields in per_row for name in fields))
    inputs = {}
    for name in names:
        values = [fields.get(name) for fields in per_row]
        if name in TOKEN_ALIGNED_FIELDS:
            dtype = next(torch.as_tensor(value).dtype for value in values if value is not None)
            tensor = torch.zeros((len(batch), width), dtype=dtype)
            for r, (value, start) in enumerate(zip(values, prompt_at)):
                if value is not None:
                    value = torch.as_tensor(value).cpu()
                    tensor[r, start : start + value.numel()] = value
        else:
            tensor = torch.cat([torch.as_tensor(value) for value in values if value is not None])
            if tensor.numel() == 0:
                continue
        inputs[name] = tensor.to(device)
    return inputs


# ----------------------------------------------------------------------------------------------------- helpers
def _unwrapped(model):
    """`model` without DDP / DeepSpeed wrappers (`.module`)."""
    while hasattr(model, "module") and not hasattr(getattr(model, "config", None), "_attn_implementation"):
        model = model.module
    return model


def _model_config(model):
    """The transformers config of `model`, looking through wrappers (DDP, DeepSpeed engine) via `.module`."""
    return _unwrapped(model).config


def _text_config(model):
    """The config of the language model: the model's own, or a vision-language model's text config."""
    config = _model_config(model)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _config_attn(model) -> str | None:
    return getattr(_text_config(model), "_attn_implementation", None)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_model_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """sdpa takes a boolean mask (True = attend); eager adds the mask to the scores, so it needs a float one."""
    if _config_attn(model) == "sdpa":
        return allowed
    dtype = _compute_dtype(model)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _compute_dtype(model) -> torch.dtype:
    """The dtype of the activations: the input embeddings' (a LoRA adapter may be float32 on a bf16 base)."""
    try:
        dtype = model.get_input_embeddings().weight.dtype
    except (AttributeError, NotImplementedError):
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    return dtype if dtype.is_floating_point else torch.float32
