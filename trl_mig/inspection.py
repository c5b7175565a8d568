"""See the credit: the MIG view of one completion, or of a group of completions of one prompt, step by step.

[`inspect_completion`] segments, scores and credits completions with the trainer's own pieces (`content_token_ids`,
`segment_completion`, `StepLikelihoodScorer`, `step_gains` / `hwm_gains`, `compose_credit`), so the numbers it shows
are the numbers training uses. [`record_completion_credit`] and
[`CreditPageCallback`] put the same view into training: per-step columns in the completions table and, with
`MIGConfig.mig_inspect_html`, an HTML page of the latest completions at every log.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from trl import GRPOConfig

from .config import MIG_SCALINGS, MIGSettings, field_like
from .credit import (
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS_ALIASES,
    compose_credit,
    correctness_reward_index,
    hwm_gains,
    step_gains,
)
from .rewards import answer_variants, default_reward_funcs
from .scoring import ScoringItem, StepLikelihoodScorer, encode_answer
from .segmentation import (
    FormatSpec,
    content_token_ids,
    segment_completion,
    segment_turns,
    step_ids_tensor,
    token_end_offsets,
)
from .trl_surface import log_completion_column

logger = logging.getLogger(__name__)


@dataclass
class StepCredit:
    """One step of a completion and its credit. Likelihoods are mean log-probs (nats per answer token)."""

    index: int  # k, from 1
    text: str
    char_span: tuple[int, int]  # [start, end) in the completion's text
    token_span: tuple[int, int]  # [b_{k-1}, b_k) in the completion's tokens
    loglik: float | None  # l_k: answer likelihood after steps 1..k (None without a ground truth)
    watermark: float | None  # h_k = max(l_0..l_k)
    gain: float | None  # g_k, the step's MIG reward (`mig_gain`: watermark gain, or raw difference)
    breakthrough: bool  # the step lifts the watermark (h_k > h_{k-1}): the method's breakthrough
    mig_advantage: float | None = None  # MIG advantage of the step's tokens (group only), before `mig_weight`
    advantage: float | None = None  # per-token advantage the trainer gives the step's tokens (group only)
    after_response: bool = False  # an agent's tool turn: the step (and l_k's prefix) ends after a tool's response


@dataclass
class CompletionCredit:
    """
    The MIG view of one completion, as training computes it.

    `loglik` is l_0..l_K (l_0: the prompt and what precedes the thought only), `watermark` h_0..h_K, `gains` g_1..g_K
    (the per-step rewards of `mig_gain`) and `reward` their sum, the completion's MIG reward; all None without a
    ground truth. The advantages are set when a group of completions was inspected together (the trainer normalises
    within the group): `outcome_advantage` (GRPO's), `mig_advantage` (trajectory credit, or None for per-step credit,
    `mig_credit="step"` or `"return_to_go"`), and per step the advantage the trainer gives the step's tokens;
    `outside_advantage` is the one of the tokens outside the thought (tags, answer). `messages` explain what is special
    about the completion (no steps, truncated, no ground truth, fallback segmentation, merged steps).
    """

    prompt: str  # the prompt as the model sees it (chat template applied)
    completion: str  # the completion's text, decoded from its tokens
    solution: list[str]  # accepted answers (empty: none)
    steps: list[StepCredit]
    thought_span: tuple[int, int]  # [start, end) of the chain of thought in `completion`
    loglik: list[float] | None
    watermark: list[float] | None
    gains: list[float] | None
    reward: float | None
    think_closed: bool
    has_step_headers: bool
    merged_steps: int
    answer: str | None
    well_formed: bool
    correct: float | None = None  # answer accuracy (1.0 / 0.0), None without a ground truth
    outcome_reward: float | None = None  # weighted sum of the outcome rewards (group only)
    outcome_advantage: float | None = None
    mig_advantage: float | None = None
    outside_advantage: float | None = None
    sft_gate: bool | None = None  # well formed, correct and a breakthrough: gets the gated SFT loss (group only)
    messages: list[str] = field(default_factory=list)
    # [start, end) in `completion` of the text the model did not write (tool results, environment feedback)
    external_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def breakthroughs(self) -> list[int]:
        """Indices k (from 1) of the steps that lift the watermark."""
        return [step.index for step in self.steps if step.breakthrough]

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, width: int = 28) -> str:
        """A plain-text table: step, the step's first characters, l_k, h_k, g_k, breakthrough (and advantage)."""
        with_advantage = any(step.advantage is not None for step in self.steps)
        header = ["step", "text", "l_k", "h_k", "g_k", "breakthrough"] + (["advantage"] if with_advantage else [])
        rows = [["0", "(prompt only)", _num(self.loglik[0] if self.loglik else None),
                 _num(self.watermark[0] if self.watermark else None), "", ""] + ([""] if with_advantage else [])]
        for step in self.steps:
            snippet = " ".join(step.text.split())
            snippet = snippet if len(snippet) <= width else snippet[: width - 1] + "…"
            rows.append([str(step.index), snippet, _num(step.loglik), _num(step.watermark), _num(step.gain),
                         "yes" if step.breakthrough else ""] + ([_num(step.advantage)] if with_advantage else []))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: correctness, steps, MIG reward, breakthroughs and advantages."""
        parts = [
            f"correct: {'n/a' if self.correct is None else ('yes' if self.correct >= 1 else 'no')}",
            f"answer: {self.answer!r}",
            f"steps: {self.num_steps}",
            f"MIG reward sum(g): {_num(self.reward)}",
            f"breakthroughs: {self.breakthroughs or 'none'}",
        ]
        if self.outcome_advantage is not None:
            parts.append(f"outcome advantage: {_num(self.outcome_advantage)}")
        if self.mig_advantage is not None:
            parts.append(f"MIG advantage: {_num(self.mig_advantage)}")
        return ", ".join(parts)


def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.3f}"


# ------------------------------------------------------------------------------------------------------- settings
@dataclass
class CreditSettings(MIGSettings):
    """
    What `inspect_completion` reads: every [`MIGSettings`] field plus the `GRPOConfig` fields that change the
    advantages (`scale_rewards`, `reward_weights`, `multi_objective_aggregation`, with GRPOConfig's defaults).
    `spec` is the [`FormatSpec`] of the format fields. Validated like a `MIGConfig`.
    """

    scale_rewards: str = field_like(GRPOConfig, "scale_rewards")
    reward_weights: tuple[float, ...] | None = field_like(GRPOConfig, "reward_weights")
    multi_objective_aggregation: str = field_like(GRPOConfig, "multi_objective_aggregation")

    def __post_init__(self):
        # as GRPOConfig reads them: True / False mean "group" / "none", weights are floats
        self.scale_rewards = SCALE_REWARDS_ALIASES.get(self.scale_rewards, self.scale_rewards)
        if self.reward_weights is not None:
            self.reward_weights = tuple(float(w) for w in self.reward_weights)
        super().__post_init__()
        owner = type(self).__name__
        if self.scale_rewards not in MIG_SCALINGS:  # MIG's reward scalings are GRPO's
            raise ValueError(f"{owner}.scale_rewards={self.scale_rewards!r} is not one of {list(MIG_SCALINGS)}.")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(
                f"{owner}.multi_objective_aggregation={self.multi_objective_aggregation!r} is not one of "
                f"{list(MULTI_OBJECTIVE_AGGREGATIONS)}."
            )

    @property
    def spec(self) -> FormatSpec:
        return FormatSpec.from_config(self)

    @classmethod
    def from_config(cls, config=None, **overrides) -> CreditSettings:
        """From a `MIGConfig`, a `FormatSpec` (the other settings at their defaults), a `CreditSettings`, None (all
        defaults), or any object with some of `MIGConfig`'s attribute names (the others at their defaults);
        `overrides` win, a `spec=` override standing for its format fields."""
        if isinstance(config, FormatSpec):
            config, overrides = None, {"spec": config, **overrides}
        spec = overrides.pop("spec", None)
        if spec is not None:
            overrides = {**spec.to_settings(), **overrides}
        return super().from_config(config, **overrides)


# ------------------------------------------------------------------------------------------------------- inspection
def inspect_completion(
    model,
    tokenizer,
    prompt,
    completion,
    solution,
    config=None,
    *,
    reward_funcs=None,
    model_mask=None,
):
    """
    The MIG credit of a completion, step by step, as the trainer computes it.

    Args:
        model: the causal LM that scores l_k (the policy, or the reference model when training scores with it); put
            in eval mode for the call and restored afterwards.
        tokenizer: its tokenizer.
        prompt (`str` or chat messages): the prompt, as in the dataset's `prompt` column; chat messages go through the
            tokenizer's chat template like `GRPOTrainer` does.
        completion: one completion (`str`, or its token ids as a list of `int`), or a group of them (a list): the
            completions of one prompt, which get the advantages the trainer would give them as one group.
        solution: the ground truth: a string, a number, or a list of accepted variants; None or "" for none (then
            the steps are shown without likelihoods, and a message says so).
        config: a `MIGConfig` (all MIG settings as in training), a `FormatSpec` (the other settings at their
            defaults), a [`CreditSettings`], or None (defaults).
        reward_funcs: outcome reward functions for a group (TRL's signature), weighted by `config.reward_weights`.
            Default: the trainer's default rewards, answer accuracy and step format.
        model_mask: for an agent trajectory given as token ids, one 0/1 per id (1: written by the model, 0: a tool
            result or environment text, TRL's `tool_mask`); for a group, one mask (or None) per completion. Steps
            then follow the agent's turns as in training (docs/agents.md), unless `mig_turn_steps="never"`.

    Returns:
        A [`CompletionCredit`] for one completion, or a list of them (in order) for a group.
    """
    if getattr(getattr(model, "config", None), "vision_config", None) is not None:
        raise ValueError(
            f"inspect_completion scores text prompts only, and {type(model).__name__} is a vision-language model: l_k "
            "of an image prompt needs its images, which this call does not pass. Training scores image prompts with "
            "their images (docs/vision.md)."
        )
    settings = CreditSettings.from_config(config)
    spec = settings.spec
    single = isinstance(completion, str) or (
        isinstance(completion, Sequence) and len(completion) > 0 and all(isinstance(t, int) for t in completion)
    )
    completions = [completion] if single else list(completion)
    if not completions:
        raise ValueError("inspect_completion needs at least one completion.")

    prompt_ids = prompt_token_ids(tokenizer, prompt)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    stop = _stop_ids(model, tokenizer)
    masks = _model_masks(model_mask, completions, single)
    # like the trainer: the EOS / padding that ends generation is not content
    encoded = [tokenizer(item, add_special_tokens=False)["input_ids"] if isinstance(item, str) else item
               for item in completions]
    contents = [content_token_ids(ids, stop) for ids in encoded]
    segments = [
        segment_completion(tokenizer, ids, spec)
        if mask is None or settings.mig_turn_steps == "never"
        else segment_turns(tokenizer, ids, list(mask)[: len(ids)], spec)
        for ids, mask in zip(contents, masks)
    ]

    variants = answer_variants(solution, settings.solution_column)
    blocks = [encode_answer(tokenizer, settings.mig_scaffold, answer) for answer in variants]
    width = max(seg.num_steps for seg in segments) + 1
    loglik = torch.full((len(contents), width), float("nan"))
    if blocks:
        if not prompt_ids and any(seg.boundaries[0] == 0 for seg in segments):
            raise ValueError("inspect_completion needs a prompt (or text before the thought) to score l_0 after.")
        scorer = StepLikelihoodScorer(
            method=settings.mig_scoring_method,
            batch_size=settings.mig_scoring_batch_size,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        )
        items = [ScoringItem(prompt_ids, ids, seg.boundaries, blocks) for ids, seg in zip(contents, segments)]
        was_training = model.training
        model.eval()
        try:
            scores = scorer.score(model, items)
        finally:
            model.train(was_training)
        for row, score in enumerate(scores):
            loglik[row, : score.numel()] = score

    gains = step_gains(loglik, settings.mig_gain)  # (N, K_max)
    lifts, watermark = hwm_gains(loglik)
    scorable = torch.isfinite(loglik).any(1) & bool(blocks)
    results = []
    for row, (ids, seg) in enumerate(zip(contents, segments)):
        results.append(_completion_credit(tokenizer, prompt_text, ids, seg, variants, loglik[row], gains[row],
                                          watermark[row], lifts[row], bool(scorable[row]), settings))
    for given, credit in zip(completions, results):
        if isinstance(given, str) and not given.startswith(credit.completion):
            credit.messages.append(
                "The tokenizer does not reproduce the given text (characters outside its vocabulary?): the text shown "
                "and scored is the decoding of its tokens."
            )
    _set_correct(settings, results, [solution] * len(results))
    if not single:
        _group_advantages(settings, reward_funcs, prompt, solution, results, segments, loglik, gains, scorable)
    return results[0] if single else results


def _model_masks(model_mask, completions: list, single: bool) -> list:
    """One model-token mask (or None) per completion, checked against the completion's token ids."""
    if model_mask is None:
        return [None] * len(completions)
    masks = [model_mask] if single else list(model_mask)
    if len(masks) != len(completions):
        raise ValueError(f"model_mask has {len(masks)} masks for {len(completions)} completions.")
    for index, (mask, item) in enumerate(zip(masks, completions)):
        if mask is None:
            continue
        if isinstance(item, str):
            raise ValueError(
                f"Completion {index} is text, but a model_mask marks tokens: pass the completion's token ids."
            )
        if len(mask) != len(item):
            raise ValueError(f"model_mask {index} has {len(mask)} entries for {len(item)} completion tokens.")
    return masks


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """Prompt tokens as `GRPOTrainer` makes them: chat messages through the chat template, text as is."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        encoded = tokenizer.apply_chat_template(
            conversation=[prompt], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"][0])
    raise TypeError(f"The prompt must be text or a list of chat messages, got {type(prompt).__name__}: {prompt!r}.")


def _stop_ids(model, tokenizer) -> set:
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return stop - {None}


def _completion_credit(
    tokenizer, prompt_text, ids, seg, variants, loglik, gains, watermark, lifts, scorable, settings
) -> CompletionCredit:
    """One completion's [`CompletionCredit`] from its tokens, segments and `(K_max + 1,)` / `(K_max,)` rows of l_k,
    g_k, h_k and watermark gains (group fields left unset)."""
    text, ends = token_end_offsets(tokenizer, ids)
    char_at = lambda token: ends[token - 1] if token > 0 else 0  # noqa: E731
    layout = seg.layout
    values = lambda tensor, n: [float(v) for v in tensor[:n]] if scorable else None  # noqa: E731
    num_steps = seg.num_steps
    l_values, h_values = values(loglik, num_steps + 1), values(watermark, num_steps + 1)
    g_values = values(gains, num_steps)
    steps = []
    for k in range(num_steps):
        lo, hi = seg.boundaries[k], seg.boundaries[k + 1]
        span = (char_at(lo), char_at(hi))
        steps.append(StepCredit(
            index=k + 1,
            text=text[span[0] : span[1]],
            char_span=span,
            token_span=(lo, hi),
            loglik=l_values[k + 1] if scorable else None,
            watermark=h_values[k + 1] if scorable else None,
            gain=g_values[k] if scorable else None,
            breakthrough=bool(scorable and lifts[k] > 0),
            after_response=k in seg.tool_steps,
        ))
    messages = []
    if not variants:
        messages.append(
            f"No ground truth (column {settings.solution_column!r} is empty): l_k cannot be computed, so MIG gives "
            "this completion no credit (the trainer counts it in mig/unscorable_frac)."
        )
    if num_steps == 0:
        messages.append(
            "No steps: the thought is empty (or missing), so there is only l_0 and no gain; the completion's tokens "
            "get the outcome advantage only."
        )
    elif not layout.has_step_headers:
        messages.append(
            f"No step headers (step_pattern {settings.spec.step_pattern!r}): the thought was split by the "
            f"'{settings.spec.step_fallback}' fallback into {num_steps} step(s)."
        )
    if not layout.think_closed:
        messages.append(
            f"Truncated: the thought is not closed ({settings.spec.think_close_tag!r} missing), so it runs to "
            + ("the answer." if layout.answer is not None else "the last token; there is no answer.")
        )
    elif layout.answer is None:
        messages.append("No answer after the thought (answer_pattern does not match).")
    if seg.merged_steps:
        messages.append(f"{num_steps + seg.merged_steps} steps were merged into {num_steps} (mig_max_steps).")
    if seg.tool_steps:
        listed = ", ".join(str(k + 1) for k in seg.tool_steps)
        messages.append(
            f"Agent turns: step(s) {listed} end after a tool or environment response, so their l_k reads it; "
            "the response text is not the model's and gets no credit."
        )
    if scorable and any(not math.isfinite(v) for v in l_values):
        messages.append("Some l_k are not finite: they count as missing (no gain, watermark unchanged).")
    return CompletionCredit(
        prompt=prompt_text,
        completion=text,
        solution=list(variants),
        steps=steps,
        thought_span=(char_at(seg.boundaries[0]), char_at(seg.boundaries[-1])),
        loglik=l_values,
        watermark=h_values,
        gains=g_values,
        reward=sum(g_values) if scorable else None,
        think_closed=layout.think_closed,
        has_step_headers=layout.has_step_headers,
        merged_steps=seg.merged_steps,
        answer=layout.answer,
        well_formed=layout.well_formed,
        messages=messages,
        external_spans=[(char_at(lo), char_at(hi)) for lo, hi in seg.external_spans],
    )


def _set_correct(settings, results, solutions) -> None:
    """`correct` from the trainer's answer-accuracy reward (None without a ground truth)."""
    accuracy = default_reward_funcs(settings.spec, settings.solution_column)[0]
    values = accuracy(completions=[credit.completion for credit in results], **{settings.solution_column: solutions})
    for credit, value in zip(results, values):
        credit.correct = value


def _rewards(settings, funcs, prompt, results, solution) -> torch.Tensor:
    """(N, F) rewards of the completions' texts (NaN where a function returns None)."""
    texts = [credit.completion for credit in results]
    columns = {settings.solution_column: [solution] * len(texts)}
    out = torch.full((len(texts), len(funcs)), float("nan"))
    for j, func in enumerate(funcs):
        values = func(prompts=[prompt] * len(texts), completions=texts, **columns)
        out[:, j] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return out


def _reward_name(func) -> str:
    """A reward function's name as `GRPOTrainer.reward_func_names` gives it for a callable (a partial: the wrapped)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _group_advantages(settings, reward_funcs, prompt, solution, results, segments, loglik, gains, scorable):
    """Fill the advantages of a group with `compose_credit`, as `MIGGRPOTrainer._generate_and_score_completions`
    does for the whole batch (here the batch is this group)."""
    size = len(results)
    funcs = reward_funcs if reward_funcs is not None else default_reward_funcs(settings.spec, settings.solution_column)
    per_func = _rewards(settings, funcs, prompt, results, solution)
    aggregation = settings.multi_objective_aggregation
    width = settings.spec.max_steps  # the trainer's width, so both normalise the same numbers
    padded = torch.zeros(size, width)
    padded[:, : gains.shape[1]] = gains[:, :width]
    num_steps = torch.tensor([seg.num_steps for seg in segments])
    length = max(seg.boundaries[-1] for seg in segments) + 1  # the last column lies outside every thought
    correctness = None
    if settings.mig_failure_scaling > 0:  # the trainer's rule over these reward functions' names
        correctness = correctness_reward_index([_reward_name(f) for f in funcs], settings.sft_correctness_reward)
        if correctness is None:
            raise ValueError(
                f"mig_failure_scaling={settings.mig_failure_scaling} needs a reward that says a completion is "
                f"correct, and no reward function name contains 'accuracy' among "
                f"{[_reward_name(f) for f in funcs]}: set sft_correctness_reward, or mig_failure_scaling=0."
            )
    composed = compose_credit(
        per_func, padded, num_steps, scorable, step_ids_tensor(segments, length), size,
        reward_weights=settings.reward_weights,
        scale_rewards=settings.scale_rewards,
        multi_objective_aggregation=aggregation,
        mig_weight=settings.mig_weight,
        outcome_weight=settings.outcome_weight,
        mig_credit=settings.mig_credit,
        mig_scale_rewards=settings.mig_scale_rewards,
        mig_token_scope=settings.mig_token_scope,
        mig_failure_scaling=settings.mig_failure_scaling,
        correctness_index=correctness,
        correctness_threshold=settings.sft_correctness_threshold,
    )
    outcome, mig_adv, tokens = composed.outcome_rewards, composed.mig_advantages, composed.advantages
    batch_level = [
        name
        for name, used in (
            ("scale_rewards='batch'", settings.scale_rewards == "batch" and aggregation == "sum_then_normalize"),
            ("multi_objective_aggregation='normalize_then_sum'", aggregation == "normalize_then_sum"),
            ("mig_scale_rewards='batch'", settings.mig_scale_rewards == "batch"),
        )
        if used
    ]
    lifted = hwm_gains(loglik)[0].sum(1)
    for row, credit in enumerate(results):
        credit.outcome_reward = None if math.isnan(outcome[row]) else float(outcome[row])
        credit.outcome_advantage = float(composed.outcome_advantages[row])
        credit.mig_advantage = float(mig_adv[row]) if mig_adv.dim() == 1 else None
        credit.outside_advantage = float(tokens[row, -1])
        for k, step in enumerate(credit.steps):
            step.mig_advantage = float(mig_adv[row] if mig_adv.dim() == 1 else mig_adv[row, k])
            lo, hi = step.token_span
            step.advantage = float(tokens[row, lo]) if hi > lo else None
        if settings.sft_weight > 0 and credit.correct is not None:
            breakthrough = bool(scorable[row]) and float(lifted[row]) > 0
            correct = credit.correct >= settings.sft_correctness_threshold
            credit.sft_gate = credit.well_formed and correct and breakthrough
        if batch_level:
            credit.messages.append(
                f"{' and '.join(batch_level)} normalise over the whole training batch; here the batch is this group, "
                "so training gives these advantages only when its batch is this one group."
            )


# ----------------------------------------------------------------------------------------------------- training
def record_completion_credit(trainer, inputs, prompt_rows, contents, segments, loglik, gains, advantages) -> None:
    """
    Called by `MIGGRPOTrainer._generate_and_score_completions`: adds per-step columns to the completions table
    (`mig_loglik`: l_0..l_K, `mig_gains`: g_1..g_K, None without a ground truth; in the global order of the other
    columns) and, with `mig_inspect_html`, keeps the batch's [`CompletionCredit`]s for [`CreditPageCallback`].

    Args:
        inputs: this process's dataset rows; `prompt_rows` their prompt tokens (no padding).
        contents: this process's completion tokens (no EOS/padding); `segments` their `StepSegments`.
        loglik (`torch.Tensor` of shape `(B, K_max + 1)`): l_k, NaN-padded. gains (`(B, K_max)`): per-step rewards.
        advantages (`torch.Tensor` of shape `(B, T)`, or `(B,)` for a trainer whose loss takes one advantage per
            completion): the advantages the trainer uses.
    """
    from accelerate.utils import gather_object

    loglik, gains = loglik.float().cpu(), gains.float().cpu()
    scorable = torch.isfinite(loglik).any(1).tolist()
    column_l, column_g = [], []
    for row, seg in enumerate(segments):
        usable = scorable[row]
        column_l.append([_finite_or_none(v) for v in loglik[row, : seg.num_steps + 1].tolist()] if usable else None)
        column_g.append([_finite_or_none(v) for v in gains[row, : seg.num_steps].tolist()] if usable else None)
    log_completion_column(trainer, "mig_loglik", gather_object(column_l))
    log_completion_column(trainer, "mig_gains", gather_object(column_g))
    if not getattr(trainer.args, "mig_inspect_html", False) or not trainer.model.training:
        return  # the pages show training batches; evaluation batches are grouped by other sizes
    tokenizer = trainer._tokenizer
    settings = CreditSettings.from_config(trainer.args)
    lifts, watermark = hwm_gains(loglik)
    token_advantages = advantages.float().cpu()
    if token_advantages.dim() == 1:  # one advantage per completion (e.g. GMPO): the same for every token
        token_advantages = token_advantages.unsqueeze(1).expand(-1, max((len(ids) for ids in contents), default=1))
    credits, solutions = [], []
    for row, (ids, seg) in enumerate(zip(contents, segments)):
        solutions.append(inputs[row].get(settings.solution_column))
        variants = answer_variants(solutions[-1], settings.solution_column)
        prompt_text = tokenizer.decode(prompt_rows[row], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        credit = _completion_credit(tokenizer, prompt_text, ids, seg, variants, loglik[row], gains[row],
                                    watermark[row], lifts[row], bool(variants) and scorable[row], settings)
        for step in credit.steps:
            lo, hi = step.token_span
            step.advantage = float(token_advantages[row, lo]) if hi > lo else None
        outside = [t for t in (seg.boundaries[-1], seg.boundaries[0] - 1) if 0 <= t < len(ids)]  # after, or before
        credit.outside_advantage = float(token_advantages[row, outside[0]]) if outside else None
        credits.append(credit)
    _set_correct(settings, credits, solutions)
    trainer._mig_credit_log.extend(gather_object(credits))


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None
