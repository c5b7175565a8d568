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

(`ScoringItem.keep_completion`: the shared part holds the whole completion.) A copy never runs the answer's last
token (a target, never a query), and with `keep_completion` a copy leaves to the shared part the block's first
tokens that the completion continues its prefix with (typically the last step's: the model closed its thought, opened
the answer and, when right, wrote it): the shared part's last such token then predicts the next, and a completion
that wrote the whole answer needs no copy for l_K. A micro-batch is built on the CPU by tensor operations over the
flattened items (`BlockBatch`, `build_block_batches`), with no Python loop over tokens or copies, and goes to the
device in one copy.

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

import array
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BLOCK_MASK_ATTENTION = ("sdpa", "eager")
# a forward ends where its next row would be shorter than this share of its first (longest) row: every row is padded
# to the first, so padding stays under a tenth of what the forward runs
MIN_CHUNK_FILL = 0.9
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

    Two fields serve a caller that runs the block rows in a forward of its own (`build_block_batch`), e.g. one that
    also computes the completion's log-probs: `position_offset` is added to every position id of the item's row
    (shared part and answer copies; all three dims of multimodal rotary positions), so the row reproduces another
    position convention (a left-padded prompt whose positions count the padding); `keep_completion` puts the whole
    completion in the row's shared part, not only up to b_K (the answer copies still see the prompt and
    `completion_ids[:b_k]` only). Neither changes l_k: rotary attention is relative, and causal attention keeps the
    tokens after b_K out of every copy's view.
    """

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    boundaries: Sequence[int]
    answers: Sequence[AnswerBlock]
    multimodal: Mapping[str, torch.Tensor] | None = None
    position_offset: int = 0
    keep_completion: bool = False

    @property
    def num_prefixes(self) -> int:
        return len(self.boundaries)


@dataclass
class DistinctPrefixes:
    """
    Items with every prefix scored once (`distinct_prefixes`): `items` to score, `origins[j]` the input item that
    `items[j]` keeps prefixes of, and per input item, for each of its prefixes, `sources[i][k] = (j, m)`: the value is
    prefix m of `items[j]`.
    """

    items: list[ScoringItem]
    origins: list[int]
    sources: list[list[tuple[int, int]]]

    def spread(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per input item, its (K_i + 1,) l_k from `scores`, one (prefixes,) tensor per item of `self.items`."""
        if not self.sources:
            return []
        flat = torch.cat([*scores, torch.zeros(0)])
        starts = [0]
        for score in scores:
            starts.append(starts[-1] + score.numel())
        index = torch.tensor([starts[j] + m for where in self.sources for j, m in where], dtype=torch.long)
        return list(flat[index].split([len(where) for where in self.sources]))


def distinct_prefixes(items: Sequence[ScoringItem]) -> DistinctPrefixes:
    """
    l_k depends only on the prompt, its positions, `completion_ids[:b_k]` and the answer blocks, and the completions
    of one prompt share l_0 and often their first steps (all of them once the policy is sure): keep each distinct
    prefix in the first item that has it, and drop it from the others (an item left without one is not scored, unless
    it keeps its whole completion: its row still gives the completion's log-probs, `ScoringItem.keep_completion`).
    Items with images are kept whole. Linear in the tokens: a prefix is identified by its previous prefix and its last
    step's tokens.
    """
    node_of: dict = {}  # (previous prefix's node, step tokens) -> node; the root holds the prompt and the answers
    value_of: dict[int, tuple[int, int]] = {}  # node -> where its value is computed
    kept_items, origins, sources = [], [], []
    for i, item in enumerate(items):
        if item.multimodal is not None:
            sources.append([(len(kept_items), m) for m in range(item.num_prefixes)])
            kept_items.append(item)
            origins.append(i)
            continue
        answers = tuple((tuple(block.ids), tuple(block.scored)) for block in item.answers)
        root = (None, tuple(_as_list(item.prompt_ids)), item.position_offset, answers)
        node = node_of.setdefault(root, len(node_of))
        kept, where, start = [], [], 0
        for end in item.boundaries:
            node = node_of.setdefault((node, tuple(_as_list(item.completion_ids[start:end]))), len(node_of))
            start = end
            if node not in value_of:
                value_of[node] = (len(kept_items), len(kept))
                kept.append(end)
            where.append(value_of[node])
        if kept or item.keep_completion:
            kept_items.append(dataclasses.replace(item, boundaries=kept))
            origins.append(i)
        sources.append(where)
    return DistinctPrefixes(kept_items, origins, sources)


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

    @contextlib.contextmanager
    def rows_per_forward(self, rows: int):
        """Score at least `rows` rows per forward inside the block (the fused pass takes the batch size of TRL's
        forward it replaces, whose memory the user has already budgeted)."""
        saved, self.batch_size = self.batch_size, max(self.batch_size, int(rows or 0))
        try:
            yield
        finally:
            self.batch_size = saved

    def plan(self, items: Sequence[ScoringItem], method: str) -> int:
        """Forward passes this process needs for `items` (before synchronisation); depends on nothing else."""
        if method == "block":
            flat = _FlatItems(items, [None] * len(items), self.pad_token_id)
            return len(_BlockLayout(flat, flat.block_order()).chunks(self.batch_size))
        return math.ceil(sum(item.num_prefixes * len(item.answers) for item in items) / self.batch_size)

    def _forward_budget(self, model, items: Sequence[ScoringItem], method: str, planned: int) -> int:
        """
        Forwards this process may run for `items`: the `planned` ones, plus one while the split attention is
        unverified (a first split forward that cannot split is redone with the full mask).
        """
        unverified = method == "block" and len(items) > 0 and self._split_enabled(model) and not self._split_verified
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
        _check_items(items, allow_no_answers=completion_logps)
        method = self.resolve_method(model, items)
        if completion_logps:
            _check_fusable(model, items, method)
        device = _model_device(model)
        flat = _FlatItems(items, _item_positions(model, items), self.pad_token_id)
        if method == "block":
            layout = _BlockLayout(flat, flat.block_order())
            chunks = layout.chunks(self.batch_size)
        else:
            layout = _PrefixLayout(flat)
            size = self.batch_size
            chunks = [(start, min(start + size, layout.num_rows)) for start in range(0, layout.num_rows, size)]
        token_logps, slots = [], []  # per micro-batch, on the device: read back once, after the last forward
        per_item_logps: list[torch.Tensor | None] = [None] * len(items)
        # agree on the forward count before any forward: afterwards another rank may be inside an all-gather
        required = None
        if self.sync_forward_count is not None:
            required = int(self.sync_forward_count(self._forward_budget(model, items, method, len(chunks))))
        first_forward = self.forward_count
        for start, end in chunks:
            if method == "block":
                split = self._split_enabled(model)
                # a (B, 1, 1, W) copy mask would broadcast over every query: keep it unambiguous
                batch = layout.batch(start, end, min_copy_width=2 if split else 1)
                token_logps.append(
                    self._forward_block(model, batch, device, split, per_item_logps if completion_logps else None)
                )
                slots.append(flat.slot_base[batch.item_index][batch.rows] + batch.slots)
            else:
                batch = layout.batch(start, end)
                token_logps.append(self._forward_prefix(model, batch, device))
                slots.append(batch.slots)
        if required is not None:
            self._pad_forwards(model, device, required - (self.forward_count - first_forward))
        if not items:
            return ([], []) if completion_logps else []
        sums = torch.zeros(flat.num_slots, dtype=torch.float64)
        sums.index_add_(0, torch.cat(slots), torch.cat(token_logps).cpu().double())
        scores = _step_likelihoods(sums, flat.num_prefixes.tolist(), [_scored_lengths(item) for item in items])
        scores = [values if item.answers else torch.full_like(values, float("nan")) for values, item in zip(scores, items)]
        return (scores, per_item_logps) if completion_logps else scores

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

    def _split_enabled(self, model) -> bool:
        return self.split_attention and _config_attn(model) == "sdpa" and _split_available()

    # ---------------------------------------------------------------------------------------------------- block
    def _forward_block(self, model, batch: BlockBatch, device, split: bool, completion_logps=None) -> torch.Tensor:
        """
        One forward over a block micro-batch: the log-prob of every scored token, (N,) float32 on `device`. With a
        `completion_logps` list, also writes each row's completion-token log-probs (C_i,) (TRL's fused LM head) at
        `completion_logps[item index]`.
        """
        batch = batch.to(device)
        inputs = dict(input_ids=batch.input_ids, position_ids=batch.model_position_ids, **batch.multimodal)
        collect = None
        if completion_logps is not None:
            rows, _, columns = batch.completion_columns()
            labels = torch.full_like(batch.input_ids, -100)
            labels[rows, columns - 1] = batch.input_ids[rows, columns]  # the fused head scores column j's label
            inputs |= {"shift_labels": labels, "fused_lm_head": True}

            def collect(log_probs: torch.Tensor) -> None:  # (B, W) -> each row's (C_i,)
                values = log_probs[rows, columns - 1].float().split(batch.completion_lengths.tolist())
                for item, row_values in zip(batch.item_index.tolist(), values):
                    completion_logps[item] = row_values

        if split:
            attention_mask = _as_model_mask(model, batch.copy_attention().unsqueeze(1))  # (B, 1, C, W)
            try:
                logps = self._run_split(model, inputs | {"attention_mask": attention_mask}, batch, collect)
                self._split_verified = True
                return logps
            except RuntimeError as err:
                # only a first split forward may fail for want of routing (e.g. attention hard-coded in the model)
                if self._split_verified or isinstance(err, torch.OutOfMemoryError):
                    raise
                logger.warning(
                    "MIG block scoring cannot split attention for this model (%s); passing the full block mask.", err
                )
                self.split_attention = False
        attention_mask = _as_model_mask(model, batch.full_attention().unsqueeze(1))  # (B, 1, W, W)
        return self._logps(model, inputs | {"attention_mask": attention_mask}, batch, collect)

    def _run_split(self, model, inputs, batch: BlockBatch, collect=None) -> torch.Tensor:
        state = _SplitState(batch.shared_width)
        token = _SPLIT_STATE.set(state)
        try:
            with _attention_implementation(_text_config(model), SPLIT_ATTENTION):
                logps = self._logps(model, inputs, batch, collect)
        finally:
            _SPLIT_STATE.reset(token)
        if state.error is not None:
            raise RuntimeError(state.error)
        if state.calls == 0:
            raise RuntimeError("no attention layer called the split attention function")
        return logps

    # --------------------------------------------------------------------------------------------------- prefix
    def _forward_prefix(self, model, batch: _PrefixBatch, device) -> torch.Tensor:
        """One forward over a prefix micro-batch: the log-prob of every scored token, (N,) float32 on `device`."""
        batch = batch.to(device)
        inputs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=_model_positions(batch.position_ids),
            **batch.multimodal,
        )
        return self._logps(model, inputs, batch)

    def _logps(self, model, inputs, batch, collect=None) -> torch.Tensor:
        """
        Run the forward, keeping logits only at the columns that predict scored tokens; (N,) float32.

        With `collect` (inputs then hold `shift_labels` and `fused_lm_head=True`), TRL's fused LM head scores the
        labelled completion tokens, `collect(log_probs)` receives its (B, W) output, and the answer tokens are scored
        from the backbone's last hidden states through the model's LM head at temperature 1.
        """
        if collect is not None:
            causal_lm = fused_head_model(model)
            head = causal_lm.get_output_embeddings()
            captured = []

            def answer_logits(module, args, output):
                # inside the model's forward, where sharded (FSDP, ZeRO-3) weights are gathered: (N, vocab)
                captured.append(head(output[0][batch.rows, batch.cols]).float())

            hook = causal_lm.base_model.register_forward_hook(answer_logits)
            try:
                output = self._call(model, **inputs)
            finally:
                hook.remove()
            collect(output.log_probs)
            selected = captured[-1]  # (N, vocab), temperature 1
            return selected.gather(1, batch.targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, -1)
        logits = self._call(model, **inputs, logits_to_keep=batch.logit_columns).logits
        selected = logits[batch.rows, batch.logit_index].float()  # (N, vocab), temperature 1
        return selected.gather(1, batch.targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, -1)


def _check_items(items: Sequence[ScoringItem], allow_no_answers: bool = False) -> None:
    for item in items:
        if not item.answers and not allow_no_answers:
            raise ValueError("Every scoring item needs at least one answer variant.")
        if item.position_offset < 0:
            raise ValueError(f"ScoringItem.position_offset must be >= 0, got {item.position_offset}.")
        if not item.boundaries:
            if item.keep_completion:  # its row still gives the completion's log-probs (`distinct_prefixes`)
                continue
            raise ValueError("Every scoring item needs at least one step boundary (b_0).")
        if len(item.prompt_ids) + min(item.boundaries) == 0:
            raise ValueError("Cannot score an answer after an empty prompt and an empty prefix.")
        if not all(0 <= b <= len(item.completion_ids) for b in item.boundaries):
            # a boundary past the completion would let a copy see columns that are not its prefix
            raise ValueError(
                f"Step boundaries {list(item.boundaries)} must lie in [0, {len(item.completion_ids)}] "
                "(the completion's length)."
            )


def _scored_lengths(item: ScoringItem) -> tuple[int, ...]:
    """|y*| of each answer variant: the number of scored tokens."""
    return tuple(block.scored[1] - block.scored[0] for block in item.answers)


def _step_likelihoods(sums: torch.Tensor, num_prefixes: list[int], scored_lengths: list[tuple[int, ...]]):
    """
    l_0..l_K per item from `sums` (sum over items of V_i (K_i + 1),) float64: the summed log-probs of each item's
    scored tokens per slot, variant-major (slot v (K_i + 1) + k), item after item. Mean per variant, max over variants.

    Returns:
        One float32 tensor of shape `(K_i + 1,)` per item.
    """
    num_k = _long_tensor(num_prefixes)
    counts = torch.tensor([count for lengths in scored_lengths for count in lengths], dtype=torch.float64)  # (G,)
    variant_item = torch.repeat_interleave(_long_tensor([len(lengths) for lengths in scored_lengths]))
    slot_variant, slot_k = _segments(num_k[variant_item])  # slots in the same order as `sums`
    means = sums / counts[slot_variant]
    prefix = _starts(num_k)[variant_item[slot_variant]] + slot_k
    best = torch.full((int(num_k.sum()),), -math.inf, dtype=torch.float64)
    best.scatter_reduce_(0, prefix, means, "amax")
    return list(best.float().split(num_prefixes))


# ----------------------------------------------------------------------------------------------- micro-batches
@dataclass(frozen=True)
class BlockBatch:
    """
    One block micro-batch: B rows (one per completion), width W = S + C, built by tensor operations.

    Row r holds its item's shared part (`prompt_lengths[r]` prompt tokens then `completion_lengths[r]` completion
    tokens: up to b_K, or all of them with `keep_completion`) left-aligned in columns [0, S), then its answer copies
    (for each variant, copies k = 0..K) in columns [S, W); padding columns hold `pad_token_id` and position 0.

    Attributes:
        input_ids (`torch.Tensor` of shape `(B, W)`): the token ids.
        position_ids (`torch.Tensor` of shape `(D, B, W)`): position ids, D = 1, or 3 for multimodal rotary positions
            (`model_position_ids` gives them as the model takes them). Each row's `position_offset` is included.
        copy_start, copy_visible (`torch.Tensor` of shape `(B, C)`): per copy-region column, the column where its
            copy starts and how many leading shared columns the copy sees (P + b_k, plus the scaffold tokens the shared
            part holds after the prefix, see `_shared_continuation`); what the block mask is built from
            (`copy_attention`, `full_attention`).
        prompt_lengths, completion_lengths (`torch.Tensor` of shape `(B,)`): the two parts of each row's shared part.
        rows, cols, targets, slots (`torch.Tensor` of shape `(N,)`): each scored answer token's row, the column whose
            logits predict it, its id, and its slot in the row's item: `v * (K + 1) + k` for variant v, copy k.
        logit_columns (`torch.Tensor` of shape `(U,)`): the sorted union of `cols`, the logits a forward keeps;
            `logit_index` (`(N,)`) the index of each scored token's column in it.
        item_index (`torch.Tensor` of shape `(B,)`): the item of each row, as an index into the items it was built
            from.
        shared_width (`int`): S.
        num_prefixes (`tuple[int, ...]`): K + 1 of each row; `scored_lengths`: |y*| of each row's variants.
        multimodal (`dict`): the rows' multimodal inputs (token-aligned fields `(B, W)`, the others concatenated over
            the rows), not yet on the model's device.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    copy_start: torch.Tensor
    copy_visible: torch.Tensor
    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    logit_columns: torch.Tensor
    logit_index: torch.Tensor
    item_index: torch.Tensor
    shared_width: int
    num_prefixes: tuple[int, ...]
    scored_lengths: tuple[tuple[int, ...], ...]
    multimodal: dict

    @property
    def model_position_ids(self) -> torch.Tensor:
        return _model_positions(self.position_ids)

    def to(self, device) -> BlockBatch:
        """This batch on `device`: its index tensors in one host-to-device copy, its multimodal inputs moved."""
        return _moved(self, device)

    def copy_attention(self) -> torch.Tensor:
        """(B, C, W) bool, on this batch's device: copy query q sees the shared columns [0, P + b_k) and its own
        copy's columns [start, q]."""
        width = self.input_ids.shape[1]
        key = torch.arange(width, device=self.input_ids.device)
        query = torch.arange(self.shared_width, width, device=self.input_ids.device).view(1, -1, 1)
        return (key < self.copy_visible.unsqueeze(-1)) | ((key >= self.copy_start.unsqueeze(-1)) & (key <= query))

    def full_attention(self) -> torch.Tensor:
        """(B, W, W) bool: causal over the shared part, `copy_attention` for the copies."""
        width = self.input_ids.shape[1]
        key = torch.arange(width, device=self.input_ids.device)
        shared_rows = key <= torch.arange(self.shared_width, device=key.device).view(-1, 1)  # (S, W)
        copy_rows = self.copy_attention()
        return torch.cat([shared_rows.unsqueeze(0).expand(copy_rows.shape[0], -1, -1), copy_rows], dim=1)

    def completion_columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Where the completion tokens of the shared part sit: `(rows, tokens, columns)`, each (M,) long, row after row:
        token `tokens[j]` of row `rows[j]`'s completion is at column `columns[j]` (its logits are at column - 1).
        With `keep_completion` that is every completion token, else those before b_K.
        """
        rows, tokens = _segments(self.completion_lengths)
        return rows, tokens, self.prompt_lengths[rows] + tokens

    def step_likelihoods(self, token_logps: torch.Tensor) -> list[torch.Tensor]:
        """l_0..l_K of each row (float32 `(K + 1,)`, on the CPU) from the log-probs of the scored tokens, (N,)."""
        slots_per_row = [num_k * len(lengths) for num_k, lengths in zip(self.num_prefixes, self.scored_lengths)]
        row_base = _starts(_long_tensor(slots_per_row))
        sums = torch.zeros(sum(slots_per_row), dtype=torch.float64)
        sums.index_add_(0, row_base[self.rows.cpu()] + self.slots.cpu(), token_logps.detach().cpu().double())
        return _step_likelihoods(sums, list(self.num_prefixes), list(self.scored_lengths))


@dataclass(frozen=True)
class _PrefixBatch:
    """
    One prefix micro-batch: B rows `prompt + completion[:b_k] + scaffold+answer` (but the answer's last token, a
    target only), left-padded to width W.
    input_ids, attention_mask (B, W); position_ids (D, B, W); rows, cols, targets, slots (N,) as in `BlockBatch` but
    `slots` index the whole scoring call's slots; logit_columns (U,), logit_index (N,).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    logit_columns: torch.Tensor
    logit_index: torch.Tensor
    multimodal: dict

    def to(self, device) -> _PrefixBatch:
        return _moved(self, device)


def build_block_batches(
    items: Sequence[ScoringItem],
    batch_size: int,
    *,
    pad_token_id: int = 0,
    min_copy_width: int = 1,
    model=None,
    longest_first: bool = True,
) -> list[BlockBatch]:
    """
    The block micro-batches of `items` as `StepLikelihoodScorer.score` builds them, without running a forward.

    Args:
        batch_size (`int`): rows (completions) per micro-batch.
        pad_token_id (`int`): id of the padding columns.
        min_copy_width (`int`): the least copy-region width C; the split attention needs 2.
        model (*optional*): the model, for multimodal rotary positions (its `get_rope_index`); without it, position
            ids are the column index (plus `position_offset`).
        longest_first (`bool`): order rows longest first, as the scorer does (less padding); False keeps `items`' order.
    """
    _check_items(items)
    flat = _FlatItems(items, _item_positions(model, items), pad_token_id)
    if longest_first:  # and cut as the scorer cuts them
        layout = _BlockLayout(flat, flat.block_order())
        chunks = layout.chunks(batch_size)
    else:
        layout = _BlockLayout(flat, torch.arange(len(items)))
        chunks = [(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
    return [layout.batch(start, end, min_copy_width) for start, end in chunks]


def build_block_batch(items: Sequence[ScoringItem], **kwargs) -> BlockBatch:
    """All `items` as one block micro-batch, row r = `items[r]`; keywords as `build_block_batches`."""
    if not items:
        raise ValueError("build_block_batch needs at least one item.")
    return build_block_batches(items, len(items), longest_first=False, **kwargs)[0]


class _FlatItems:
    """
    The items of one scoring call as flat tensors, gathered in one pass over the items; every micro-batch is then
    built from them by tensor operations (no Python loop over tokens, copies or prefixes).

    `shared_tokens` (n, S_max): each item's shared part (prompt + completion tokens), right-padded with
    `pad_token_id`; `shared_mask` (n, S_max) bool: where it holds tokens; `shared_positions` (3, n, S_max) or None:
    their position ids (offsets included, padding 0) when some item has multimodal rotary positions (for text items
    the column index plus the offset).
    Per item (n,): `prompt_lengths`, `completion_lengths` (completion tokens in the shared part), `num_prefixes` and
    `prefix_base` (start in the per-prefix tensors), `num_variants` and `variant_base` (start in the per-variant
    tensors), `position_offsets`, `slot_base`, `copies_lengths` (tokens of its answer copies), `has_rope`.
    Per prefix (sum of K_i + 1,): `visible` (P + b_k) and `continue_at` (the position id of a text token after the
    prefix). Per variant (G,): `block_sizes`, `block_base` (start in `block_ids`), `scored_start`, `scored_end`,
    `variant_index` (v within its item), `copy_base` (start in the per-copy tensors). Per copy, i.e. per (variant,
    prefix) (sum over variants of K_i + 1,): `copy_skip`, the block's first tokens that the shared part already holds
    after the prefix (`_shared_continuation`: those a `keep_completion` item's completion continues step k with; else
    0), and `copy_lengths`, the tokens the copy runs: the block's [copy_skip, scored_end - 1) (the last
    scored token is a target, never a query).
    """

    def __init__(
        self, items: Sequence[ScoringItem], item_positions: Sequence[torch.Tensor | None], pad_token_id: int = 0
    ):
        self.items = items
        self.pad_token_id = pad_token_id
        tokens, boundaries, block_ids, block_sizes, scored, copy_skip = [], [], [], [], [], []
        prompt_lengths, completion_lengths, num_prefixes, num_variants, offsets = [], [], [], [], []
        for item in items:
            prompt = _as_list(item.prompt_ids)
            kept = len(item.completion_ids) if item.keep_completion else max(item.boundaries)
            tokens += prompt
            tokens += _as_list(item.completion_ids[:kept])
            boundaries += _as_list(item.boundaries)
            prompt_lengths.append(len(prompt))
            completion_lengths.append(kept)
            num_prefixes.append(len(item.boundaries))
            num_variants.append(len(item.answers))
            offsets.append(item.position_offset)
            for block in item.answers:
                block_ids += block.ids
                block_sizes.append(len(block.ids))
                scored += block.scored
                copy_skip += _shared_continuation(item, block)
        self.prompt_lengths = _long_tensor(prompt_lengths)
        self.completion_lengths = _long_tensor(completion_lengths)
        shared_lengths = self.prompt_lengths + self.completion_lengths
        width = int(shared_lengths.max()) if items else 0
        self.shared_mask = torch.arange(width) < shared_lengths.unsqueeze(1)  # (n, S_max)
        self.shared_tokens = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        self.shared_tokens.masked_scatter_(self.shared_mask, _long_tensor(tokens))
        self.num_prefixes = _long_tensor(num_prefixes)
        self.prefix_base = _starts(self.num_prefixes)
        self.position_offsets = _long_tensor(offsets)
        prefix_item = torch.repeat_interleave(self.num_prefixes)
        self.visible = self.prompt_lengths[prefix_item] + _long_tensor(boundaries)
        self.continue_at = self.visible + self.position_offsets[prefix_item]  # text: the column index
        self.has_rope = torch.tensor([positions is not None for positions in item_positions], dtype=torch.bool)
        self.shared_positions = None
        if bool(self.has_rope.any()):
            dims = max(positions.shape[0] for positions in item_positions if positions is not None)
            self.shared_positions = torch.zeros((dims, len(items), width), dtype=torch.long)
            for i, positions in enumerate(item_positions):  # multimodal batches only
                offset, length = offsets[i], int(shared_lengths[i])
                if positions is None:
                    positions = torch.arange(length).unsqueeze(0)
                else:
                    at = slice(int(self.prefix_base[i]), int(self.prefix_base[i]) + num_prefixes[i])
                    self.continue_at[at] = _continuation_positions(positions, self.visible[at]) + offset
                self.shared_positions[:, i, :length] = positions[:, :length] + offset
        self.num_variants = _long_tensor(num_variants)
        self.variant_base = _starts(self.num_variants)
        variant_item = torch.repeat_interleave(self.num_variants)
        self.variant_index = torch.arange(variant_item.numel()) - self.variant_base[variant_item]
        self.block_ids = _long_tensor(block_ids)
        self.block_sizes = _long_tensor(block_sizes)
        self.block_base = _starts(self.block_sizes)
        self.scored_start, self.scored_end = _long_tensor(scored).view(-1, 2).unbind(1)
        self.copy_base = _starts(self.num_prefixes[variant_item])
        self.copy_skip = _long_tensor(copy_skip)
        copy_variant = torch.repeat_interleave(self.num_prefixes[variant_item])
        self.copy_lengths = self.scored_end[copy_variant] - 1 - self.copy_skip
        self.copies_lengths = torch.zeros(len(items), dtype=torch.long).index_add_(
            0, variant_item[copy_variant], self.copy_lengths
        )
        slots_per_item = self.num_prefixes * self.num_variants
        self.slot_base = _starts(slots_per_item)
        self.num_slots = int(slots_per_item.sum())

    def block_order(self) -> torch.Tensor:
        """Items longest row first, ties in input order: similar lengths share a micro-batch (less padding)."""
        lengths = self.prompt_lengths + self.completion_lengths + self.copies_lengths
        return torch.sort(-lengths, stable=True).indices


class _BlockLayout:
    """
    The block rows of `flat`'s items in `order` (row r = item `order[r]`): every answer-copy token and scored token
    placed once, for all rows, relative to the copy region; `batch(start, end)` cuts rows [start, end) into a
    `BlockBatch` with a few slices and scatters.
    """

    def __init__(self, flat: _FlatItems, order: torch.Tensor):
        self.flat, self.order, self.num_rows = flat, order, order.numel()
        self.shared_lengths = flat.prompt_lengths[order] + flat.completion_lengths[order]
        self.copies_lengths = flat.copies_lengths[order]
        # copies, per row: for each variant, copy k = 0..K of its scaffold + answer, one after the other
        variant_row, variant = _segments(flat.num_variants[order])
        num_prefixes = flat.num_prefixes[order]
        copy_variant, copy_k = _segments(num_prefixes[variant_row])
        copy_row = variant_row[copy_variant]
        variant_id = (flat.variant_base[order][variant_row] + variant)[copy_variant]  # (Q,) index of the variant
        copy_id = flat.copy_base[variant_id] + copy_k
        copy_size, skip = flat.copy_lengths[copy_id], flat.copy_skip[copy_id]
        copy_at = _starts(copy_size) - _starts(self.copies_lengths)[copy_row]  # start within the row's copy region
        prefix = flat.prefix_base[order][copy_row] + copy_k
        visible, continue_at = flat.visible[prefix], flat.continue_at[prefix]
        token_copy, within = _segments(copy_size)  # every copy token, row after row
        block_index = skip[token_copy] + within  # the token's index in its block
        self.token_row, self.token_column = copy_row[token_copy], copy_at[token_copy] + within
        self.token_ids = flat.block_ids[flat.block_base[variant_id][token_copy] + block_index]
        self.token_positions = continue_at[token_copy] + block_index
        # a copy sees the prefix and the block's tokens the shared part holds, then itself
        self.token_copy_start, self.token_visible = copy_at[token_copy], (visible + skip)[token_copy]
        # scored tokens: block token m is predicted by token m - 1: the copy's own, or the shared part's (the
        # prefix's last token, or a scaffold token the completion holds)
        start, end = flat.scored_start[variant_id], flat.scored_end[variant_id]
        scored_copy, offset = _segments(end - start)
        m = start[scored_copy] + offset
        self.scored_row = copy_row[scored_copy]
        self.scored_from_shared = m <= skip[scored_copy]
        self.scored_shared_column = visible[scored_copy] + m - 1
        self.scored_copy_column = copy_at[scored_copy] + m - 1 - skip[scored_copy]
        self.scored_targets = flat.block_ids[flat.block_base[variant_id][scored_copy] + m]
        self.scored_slots = flat.variant_index[variant_id][scored_copy] * num_prefixes[self.scored_row]
        self.scored_slots += copy_k[scored_copy]
        scored_per_row = torch.zeros(self.num_rows, dtype=torch.long).index_add_(0, copy_row, end - start)
        self.token_bounds = [0, *torch.cumsum(self.copies_lengths, 0).tolist()]
        self.scored_bounds = [0, *torch.cumsum(scored_per_row, 0).tolist()]

    def chunks(self, max_rows: int) -> list[tuple[int, int]]:
        """The rows' forwards, [start, end) in this layout's order (longest first: `_FlatItems.block_order`), at most
        `max_rows` rows each, every row at least `MIN_CHUNK_FILL` of its forward's first ([`fill_chunks`])."""
        return fill_chunks((self.shared_lengths + self.copies_lengths).tolist(), max_rows)

    def batch(self, start: int, end: int, min_copy_width: int = 1) -> BlockBatch:
        """Rows [start, end) as one micro-batch."""
        flat, items, n = self.flat, self.order[start:end], end - start
        shared_lengths = self.shared_lengths[start:end]
        shared = int(shared_lengths.max())
        copies = max(int(self.copies_lengths[start:end].max()), min_copy_width)
        width = shared + copies
        rope = bool(flat.has_rope[items].any())
        input_ids = torch.full((n, width), flat.pad_token_id, dtype=torch.long)
        # padding columns keep position 0: any valid position does, real tokens never see them
        position_ids = torch.zeros((flat.shared_positions.shape[0] if rope else 1, n, width), dtype=torch.long)

        # shared part: prompt + completion, left-aligned, causal
        input_ids[:, :shared] = flat.shared_tokens[items, :shared]
        if rope:
            position_ids[:, :, :shared] = flat.shared_positions[:, items, :shared]
        else:
            column = torch.arange(shared) + flat.position_offsets[items].unsqueeze(1)
            position_ids[0, :, :shared] = column * flat.shared_mask[items, :shared]

        # the copy region
        tokens = slice(self.token_bounds[start], self.token_bounds[end])
        row, column = self.token_row[tokens] - start, self.token_column[tokens]
        input_ids[row, shared + column] = self.token_ids[tokens]
        position_ids[:, row, shared + column] = self.token_positions[tokens]
        copy_start = torch.arange(shared, width).repeat(n, 1)
        copy_visible = torch.zeros((n, copies), dtype=torch.long)
        copy_start[row, column] = shared + self.token_copy_start[tokens]
        copy_visible[row, column] = self.token_visible[tokens]

        scored = slice(self.scored_bounds[start], self.scored_bounds[end])
        cols = torch.where(
            self.scored_from_shared[scored], self.scored_shared_column[scored], shared + self.scored_copy_column[scored]
        )
        keep, index = torch.unique(cols, return_inverse=True)
        chosen = items.tolist()
        return BlockBatch(
            input_ids=input_ids,
            position_ids=position_ids,
            copy_start=copy_start,
            copy_visible=copy_visible,
            prompt_lengths=flat.prompt_lengths[items],
            completion_lengths=flat.completion_lengths[items],
            rows=self.scored_row[scored] - start,
            cols=cols,
            targets=self.scored_targets[scored],
            slots=self.scored_slots[scored],
            logit_columns=keep,
            logit_index=index,
            item_index=items,
            shared_width=shared,
            num_prefixes=tuple(flat.num_prefixes[items].tolist()),
            scored_lengths=tuple(_scored_lengths(flat.items[i]) for i in chosen),
            multimodal=_multimodal_inputs([flat.items[i].multimodal for i in chosen], width, [0] * n),
        )


class _PrefixLayout:
    """
    The prefix rows of `flat`'s items (one per item, variant and k), longest first (ties in that order), with every
    answer token and scored token placed once, relative to the row's end; `batch(start, end)` cuts rows [start, end)
    into a left-padded micro-batch.
    """

    def __init__(self, flat: _FlatItems):
        self.flat = flat
        variant_item = torch.repeat_interleave(flat.num_variants)
        row_variant, row_k = _segments(flat.num_prefixes[variant_item])
        row_item = variant_item[row_variant]
        row_prefix = flat.prefix_base[row_item] + row_k
        lengths = flat.visible[row_prefix] + flat.scored_end[row_variant] - 1  # the last scored token: a target only
        order = torch.sort(-lengths, stable=True).indices
        self.num_rows = order.numel()
        self.item, self.variant_id, self.prefix = row_item[order], row_variant[order], row_prefix[order]
        self.prefix_lengths, self.sizes = flat.visible[self.prefix], flat.scored_end[self.variant_id] - 1
        self.lengths = self.prefix_lengths + self.sizes
        # scaffold + answer after each prefix: column W - size + within
        answer_row, within = _segments(self.sizes)
        self.answer_row, self.answer_from_end = answer_row, within - self.sizes[answer_row]
        self.answer_ids = flat.block_ids[flat.block_base[self.variant_id][answer_row] + within]
        self.answer_positions = flat.continue_at[self.prefix][answer_row] + within
        first, last = flat.scored_start[self.variant_id], flat.scored_end[self.variant_id]
        scored_row, offset = _segments(last - first)
        m = first[scored_row] + offset
        self.scored_row, self.scored_from_end = scored_row, m - 1 - self.sizes[scored_row]  # predicted by token m - 1
        self.scored_targets = flat.block_ids[flat.block_base[self.variant_id][scored_row] + m]
        k = self.prefix - flat.prefix_base[self.item]
        slots = flat.slot_base[self.item] + flat.variant_index[self.variant_id] * flat.num_prefixes[self.item] + k
        self.scored_slots = slots[scored_row]
        self.answer_bounds = [0, *torch.cumsum(self.sizes, 0).tolist()]
        self.scored_bounds = [0, *torch.cumsum(last - first, 0).tolist()]

    def batch(self, start: int, end: int) -> _PrefixBatch:
        """Rows [start, end) as one micro-batch, left-padded: every row ends at column W."""
        flat, n = self.flat, end - start
        item, lengths = self.item[start:end], self.lengths[start:end]
        width = int(lengths.max())
        column = torch.arange(width) - (width - lengths).unsqueeze(1)  # (B, W): index in the row, < 0 on padding
        attention_mask = (column >= 0).long()
        # prompt + completion[:b_k], gathered from the items' shared parts
        in_prefix = (column >= 0) & (column < self.prefix_lengths[start:end].unsqueeze(1))
        source = column.clamp(0, flat.shared_tokens.shape[1] - 1)
        input_ids = torch.gather(flat.shared_tokens[item], 1, source).masked_fill_(~in_prefix, flat.pad_token_id)
        if bool(flat.has_rope[item].any()):
            shared_positions = flat.shared_positions[:, item]
            position_ids = torch.gather(shared_positions, 2, source.expand(shared_positions.shape[0], -1, -1))
            position_ids *= in_prefix
        else:  # text: the index in the row plus the offset, over the answer too (continue_at = P + b_k + offset)
            position_ids = ((column + flat.position_offsets[item].unsqueeze(1)) * attention_mask).unsqueeze(0)
        # then scaffold + answer
        answer = slice(self.answer_bounds[start], self.answer_bounds[end])
        row, column = self.answer_row[answer] - start, width + self.answer_from_end[answer]
        input_ids[row, column] = self.answer_ids[answer]
        position_ids[:, row, column] = self.answer_positions[answer]

        scored = slice(self.scored_bounds[start], self.scored_bounds[end])
        cols = width + self.scored_from_end[scored]
        keep, index = torch.unique(cols, return_inverse=True)
        return _PrefixBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            rows=self.scored_row[scored] - start,
            cols=cols,
            targets=self.scored_targets[scored],
            slots=self.scored_slots[scored],
            logit_columns=keep,
            logit_index=index,
            multimodal=_multimodal_inputs(
                [flat.items[i].multimodal for i in item.tolist()], width, (width - lengths).tolist()
            ),
        )


def scaffold_continuations(item: ScoringItem, block: AnswerBlock) -> list[int]:
    """
    Per prefix k of `item`: the scaffold's length (the tokens of `block` before the answer) where the completion
    continues step k with exactly the scaffold's ids (typically after the last step: the model closed its thought
    and opened the answer), else 0. Those copy tokens would repeat computation the completion already had.
    """
    scaffold = list(block.ids[: block.scored[0]])
    completion, size = item.completion_ids, len(scaffold)
    return [size if size and list(completion[end : end + size]) == scaffold else 0 for end in item.boundaries]


def _shared_continuation(item: ScoringItem, block: AnswerBlock) -> list[int]:
    """
    Per prefix k, how many of `block`'s first tokens the row's shared part holds right after the prefix: where the
    item keeps its whole completion, as many as the completion continues step k with (typically the scaffold after
    the last step, and all of the answer when the completion wrote it), at most all but the last scored token (a
    target only: the copy then runs nothing); 0 otherwise.
    """
    bounds = item.boundaries
    if not item.keep_completion:
        return [0] * len(bounds)
    wanted, completion = block.ids[: block.scored[1] - 1], _as_list(item.completion_ids)
    shared = []
    for end in bounds:
        run = 0
        for want, have in zip(wanted, completion[end : end + len(wanted)]):
            if want != have:
                break
            run += 1
        shared.append(run)
    return shared


def fill_chunks(widths: Sequence[int], max_rows: int, fill: float = MIN_CHUNK_FILL) -> list[tuple[int, int]]:
    """
    Consecutive rows, widest first (`widths`, non-increasing), cut into forwards of at most `max_rows` rows: a forward
    pads every row to its first, so one also ends where the next row is narrower than `fill` times its first.

    Returns:
        `[(start, end), ...]`, covering `range(len(widths))` in order.
    """
    chunks: list[tuple[int, int]] = []
    start = 0
    for row, width in enumerate(widths):
        if row > start and (row - start >= max_rows or width < fill * widths[start]):
            chunks.append((start, row))
            start = row
    if widths:
        chunks.append((start, len(widths)))
    return chunks


def _segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For consecutive segments of `lengths` (n,) elements: the segment of every element and its index within it."""
    segment = torch.repeat_interleave(lengths)
    return segment, torch.arange(segment.numel()) - _starts(lengths)[segment]


def _starts(lengths: torch.Tensor) -> torch.Tensor:
    """Where each of consecutive segments of `lengths` (n,) elements starts: the exclusive cumulative sum."""
    return torch.cumsum(lengths, 0) - lengths


def _long_tensor(values: list[int]) -> torch.Tensor:
    """(n,) long from a list of ints, through a typed array: ~10x faster than `torch.tensor` on a list."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def _as_list(values) -> Sequence[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else values


def _moved(batch, device):
    """`batch` (a micro-batch dataclass) on `device`: its (long) tensors in one copy, its multimodal inputs moved."""
    device = torch.device(device)
    names = [f.name for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    tensors = [getattr(batch, name) for name in names]
    if any(tensor.device != device for tensor in tensors):
        tensors = _copy_together(tensors, device)
    multimodal = {name: value.to(device) for name, value in batch.multimodal.items()}
    return dataclasses.replace(batch, **dict(zip(names, tensors)), multimodal=multimodal)


def _copy_together(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Same-dtype host tensors on `device`, through one flat copy (one transfer, not one per tensor)."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    if device.type == "cuda":  # pinned: the copy is queued without waiting for the forwards already queued
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(tensor.shape) for part, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]


# ------------------------------------------------------------------------------------ completion log-probs
def causal_lm_of(model):
    """The causal LM inside `model`, through DDP / DeepSpeed and PEFT wrappers (PEFT's base model)."""
    causal_lm = _unwrapped(model)
    return causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm


def fused_head_model(model):
    """
    The causal LM inside `model` ([`causal_lm_of`]) when TRL's fused LM head is on it
    (`trl.trainer.utils.add_fused_lm_head`, which GRPOTrainer adds to the policy and the reference model; with PEFT, to
    the base model), else None.
    """
    causal_lm = causal_lm_of(model)
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


def _item_positions(model, items: Sequence[ScoringItem]) -> list[torch.Tensor | None]:
    """
    Position ids of each item's shared part (prompt + the completion tokens a row holds: up to b_K, or all with
    `keep_completion`), without `position_offset`: None where they are the column index (text, or a model without
    `get_rope_index`), else the model's 3-D multimodal rotary positions, (3, length) long on the CPU.
    """
    if model is None or not any(item.multimodal for item in items):
        return [None] * len(items)
    rope_index = _rope_index_function(model)
    return [None if rope_index is None else _rope_positions(model, rope_index, item) for item in items]


def _rope_positions(model, rope_index, item: ScoringItem) -> torch.Tensor | None:
    multimodal = item.multimodal or {}
    grids = {name: multimodal[name] for name in _ROPE_INDEX_FIELDS if multimodal.get(name) is not None}
    if not grids:
        return None
    if multimodal.get("mm_token_type_ids") is None:
        raise ValueError(
            f"The prompt has multimodal rotary inputs ({sorted(grids)}) but no 'mm_token_type_ids', which the "
            "model needs to place its image tokens."
        )
    prompt_len = len(item.prompt_ids)
    kept = len(item.completion_ids) if item.keep_completion else max(item.boundaries)
    ids = torch.as_tensor(list(item.prompt_ids) + list(item.completion_ids[:kept]), dtype=torch.long)
    token_types = torch.zeros(prompt_len + kept, dtype=torch.long)
    token_types[:prompt_len] = torch.as_tensor(multimodal["mm_token_type_ids"], dtype=torch.long).cpu()
    device = _model_device(model)
    grids = {name: torch.as_tensor(value).to(device) for name, value in grids.items()}
    positions, _ = rope_index(
        ids.unsqueeze(0).to(device), mm_token_type_ids=token_types.unsqueeze(0).to(device), **grids
    )  # (3, 1, length)
    return positions[:, 0].long().cpu()


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


def _multimodal_inputs(fields_per_row: list[Mapping | None], width: int, prompt_at: list[int]) -> dict:
    """
    The multimodal inputs of a forward over rows of width `width` (row r's fields `fields_per_row[r]`, its prompt
    starting at column `prompt_at[r]`): token-aligned fields as (B, W) tensors on the CPU, zero outside the prompt;
    every other field concatenated over the rows along dim 0, in row order, where it is (left out when no row has an
    entry, e.g. no image in the batch).
    """
    per_row = [fields or {} for fields in fields_per_row]
    names = list(dict.fromkeys(name for fields in per_row for name in fields))
    inputs = {}
    for name in names:
        values = [fields.get(name) for fields in per_row]
        if name in TOKEN_ALIGNED_FIELDS:
            dtype = next(torch.as_tensor(value).dtype for value in values if value is not None)
            tensor = torch.zeros((len(per_row), width), dtype=dtype)
            for r, (value, start) in enumerate(zip(values, prompt_at)):
                if value is not None:
                    value = torch.as_tensor(value).cpu()
                    tensor[r, start : start + value.numel()] = value
        else:
            tensor = torch.cat([torch.as_tensor(value) for value in values if value is not None])
            if tensor.numel() == 0:
                continue
        inputs[name] = tensor
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
