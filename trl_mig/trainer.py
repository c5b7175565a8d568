"""`MIGGRPOTrainer`: GRPO with step-wise Marginal Information Gain credit, decoupled masking and gated SFT.

`MIGMixin` holds the MIG behaviour; `MIGGRPOTrainer` is the mixin on `GRPOTrainer`, and `mig_trainer_class` puts it on
any other `GRPOTrainer` subclass. The mixin overrides these private hooks (each listed and checked in
`trl_surface.py`) and calls `super()` in each:

- `_calculate_rewards`: keeps the gathered outcome rewards and the completion ids for the MIG pass;
- `_generate_and_score_completions`: after GRPO has generated and scored, segments each completion into steps, scores
  l_0..l_K (`step_log_likelihoods`, public: override it for another step scorer), turns them into watermark gains and
  replaces the `(B,)` outcome advantages with `(B, T)` per-token ones, composed by its own public hook `compose_credit`
  (outcome and MIG credit of the gathered batch, in one function);
- `_compute_loss`: adds the gated SFT term, reusing the policy log-probs the GRPO loss computed (captured from
  `_get_per_token_logps_and_entropies`, so there is no second forward);
- `_load_optimizer_and_scheduler`: on resume, warns about MIG settings changed since the checkpoint.

Agent trajectories (TRL `tools`, `environment_factory`, or a `rollout_func` with an `env_mask`) need no other hook:
the `tool_mask` GRPO puts in its output says which completion tokens the model wrote, and each model turn answered
by a tool or the environment becomes a step (`segment_turns`, `MIGConfig.mig_turn_steps`, docs/agents.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, is_dataclass

import torch
from accelerate.utils import gather, is_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.profiler import record_function
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .config import MIGConfig, mig_config_class, mig_field_names
from .cached_scoring import GenerationCache, cache_unsupported_reason, capture_generation_cache, score_from_cache
from .credit import NOT_COT, Credit, compose_credit, correctness_reward_index, gated_sft_loss, hwm_gains, step_gains
from .callbacks import attach_credit_page
from .inspection import record_completion_credit
from .multimodal import split_multimodal_inputs
from .rewards import answer_variants, default_reward_funcs
from .scoring import (
    AnswerBlock,
    ScoringItem,
    StepLikelihoodScorer,
    causal_lm_of,
    distinct_prefixes,
    encode_answer,
    fusion_unsupported_reason,
)
from .segmentation import FormatSpec, content_token_ids, segment_completion, segment_turns, step_ids_tensor
from .step_batch import StepBatch
from .trl_surface import (
    check_trainer_attributes,
    grpo_parameters_after,
    log_completion_column,
    sequence_level_trainer_classes,
)

logger = logging.getLogger(__name__)

_ANSWER_CACHE_SIZE = 65536


class MIGMixin:
    """
    MIG process credit for any [`~trl.GRPOTrainer`] subclass: put it before the trainer class in the bases
    (`class MyMIGTrainer(MIGMixin, MyGRPOTrainer)`), or let [`mig_trainer_class`] build that class.

    The per-token advantage is `A[i,t] = outcome_weight * A_out_i + mig_weight * A_mig_i * M_cot[i,t]`, where A_out is
    GRPO's group-normalised outcome advantage and A_mig the group-normalised sum of watermark gains of the answer
    likelihood over the completion's steps. With `sft_weight > 0` and a correctness reward (see
    `MIGConfig.sft_correctness_reward`), completions that are well formed, correct and raise the answer likelihood
    (sum of gains > 0) also get an NLL term; without an identifiable correctness reward the SFT term is off (one
    warning, `sft/enabled` = 0).

    Multi-turn completions (tools, environments) are segmented by turn: each model turn answered by a tool or the
    environment is a step whose l_k is measured after the response, and the response tokens get no credit
    (`MIGConfig.mig_turn_steps`, docs/agents.md).

    If `reward_funcs` is None, the rewards are [`AnswerAccuracyReward`] and [`StepFormatReward`] built from `args`
    (with an `environment_factory`, as in GRPOTrainer, the environment's reward alone). `args` must be a
    [`MIGConfig`] (or the `mig_config_class` of the trainer class); without one, a default `mig_config_class()` is
    used.
    """

    # the config class built when `args` is None; `mig_trainer_class` sets it to a MIG twin of the base's config
    mig_config_class: type[MIGConfig] = MIGConfig
    # False when the base trainer's loss takes one advantage per completion, `(B,)` (e.g. GMPO's geometric mean)
    mig_token_level_advantages: bool = True
    _warned_outcome_mismatch = False
    _fusion: _Fusion | None = None  # set while a generation batch whose TRL forward the scoring pass may replace
    _generation_cache: GenerationCache | None = None  # set while step_log_likelihoods may read generation's cache

    def __init__(self, model, reward_funcs=None, args: MIGConfig | None = None, train_dataset=None, *more, **kwargs):
        kwargs = _keyword_arguments(more, kwargs)
        config_class = self.mig_config_class
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = config_class(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-{self._name}")
        elif not isinstance(args, config_class):
            base_config = next(c for c in config_class.__mro__[1:] if c is not MIGConfig and is_dataclass(c))
            raise TypeError(
                f"{type(self).__name__} needs `args` to be a {config_class.__name__}, got {type(args).__name__}. "
                f"{config_class.__name__} accepts every {base_config.__name__} option, so build it with the same "
                "arguments."
            )
        environment_factory = kwargs.get("environment_factory")
        if train_dataset is None and environment_factory is not None:
            raise ValueError(
                f"{type(self).__name__} needs a ground-truth answer per prompt (column {args.solution_column!r}, "
                "MIGConfig.solution_column), but environment-owned data (an `environment_factory` and no "
                "`train_dataset`) has none. Pass a train_dataset with that column, or train with GRPOTrainer."
            )
        if not self.mig_token_level_advantages and (args.mig_credit != "trajectory" or args.mig_token_scope != "all"):
            raise ValueError(
                f"{type(self).__name__}'s loss takes one advantage per completion, so MIG credit cannot be limited to "
                f"the chain of thought or to steps: set MIGConfig.mig_token_scope='all' and mig_credit='trajectory' "
                f"(got {args.mig_token_scope!r} and {args.mig_credit!r})."
            )
        _check_solution_column(train_dataset, args.solution_column, "train_dataset")
        _check_solution_column(kwargs.get("eval_dataset"), args.solution_column, "eval_dataset")
        spec = FormatSpec.from_config(args)
        if reward_funcs is None and environment_factory is None:
            reward_funcs = default_reward_funcs(spec, args.solution_column)
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        check_trainer_attributes(self)  # the private attributes read below and in every step, named if missing

        self.format_spec = spec
        self.mig_scorer = StepLikelihoodScorer(
            method=args.mig_scoring_method,
            batch_size=args.mig_scoring_batch_size,
            pad_token_id=self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0,
            sync_forward_count=self._max_over_processes if self.accelerator.num_processes > 1 else None,
        )
        if args.mig_likelihood_model == "reference" and self.ref_model is None and not is_peft_model(self.model):
            raise ValueError(
                "MIGConfig.mig_likelihood_model='reference' needs a reference model: set `beta` > 0 (TRL then loads "
                "one) or train with a `peft_config` (the adapter-free base is the reference)."
            )
        self._sft_reward_index = self._resolve_correctness_reward() if args.sft_weight > 0 else None
        self._failure_reward_index = self._failure_scaling_reward() if args.mig_failure_scaling > 0 else None
        self._pending_mig = None
        self._capture_policy_logps = False
        self._captured_policy_logps = None
        self._prefix_counts = [0, 0]  # this batch's prefixes scored, and in all (mig/scored_prefix_frac)
        self._answer_blocks: dict[str, AnswerBlock] = {}
        self._warned_unscorable = False
        self.resumed_mig_changes: dict[str, tuple] = {}  # MIG settings changed since the checkpoint resumed from
        attach_credit_page(self)  # mig_inspect_html: an HTML page of the latest completions' credit at every log

    # ----------------------------------------------------------------------------------------------------- set-up
    def _resolve_correctness_reward(self) -> int | None:
        """Index of the reward that gates SFT; None (SFT off, one warning) when none is named and none is found."""
        names = self.reward_func_names
        index = correctness_reward_index(names, self.args.sft_correctness_reward)
        if index is not None:
            return index
        logger.warning(
            "Gated SFT is off: it needs a reward that says a completion is correct, and no reward function name "
            "contains 'accuracy' among %s. Training uses MIG and outcome credit only (logged as sft/enabled = 0). "
            "To enable it, set MIGConfig.sft_correctness_reward=<one of those names> (a completion is correct when "
            "that reward is >= sft_correctness_threshold); sft_weight=0 silences this warning.",
            names,
        )
        return None

    def _failure_scaling_reward(self) -> int:
        """Index of the reward whose failure rate scales MIG credit (`mig_failure_scaling`); none found is an error."""
        index = correctness_reward_index(self.reward_func_names, self.args.sft_correctness_reward)
        if index is None:
            raise ValueError(
                f"MIGConfig.mig_failure_scaling={self.args.mig_failure_scaling} scales MIG credit by the share of "
                "wrong answers in a group, which needs a reward that says a completion is correct, and no reward "
                f"function name contains 'accuracy' among {self.reward_func_names}. Set "
                "MIGConfig.sft_correctness_reward=<one of those names> (correct: that reward >= "
                "sft_correctness_threshold), or mig_failure_scaling=0."
            )
        return index

    def _max_over_processes(self, count: int) -> int:
        local = torch.tensor([count], device=self.accelerator.device)
        return int(self.accelerator.gather(local).max().item())

    # ------------------------------------------------------------------------------------------------------ hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pending_mig = (rewards_per_func, completion_ids_list)
        return rewards_per_func

    def _generate(self, prompts):
        fusion = self._fusion
        if fusion is None:
            return super()._generate(prompts)
        if fusion.target == "old":  # policy likelihoods: generation's key/value cache can serve the scoring pass
            # the backbone: every forward of the causal LM calls it (PEFT calls the causal LM's `forward` directly)
            with capture_generation_cache(causal_lm_of(self.model).base_model) as captured:
                generated = super()._generate(prompts)
            fusion.generation = captured.result
        else:
            generated = super()._generate(prompts)
        fusion.generated = generated
        return generated

    def _generate_and_score_completions(self, inputs):
        self._fusion = self._plan_fusion(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            fusion, self._fusion = self._fusion, None
        rewards_per_func, completion_ids_list = self._pending_mig
        self._pending_mig = None
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        local = len(completion_ids_list)
        process_slice = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)

        if fusion is not None and fusion.loglik is not None:  # scored in the pass that replaced TRL's forward
            step_batch, loglik = fusion.step_batch, fusion.loglik
        else:
            prompt_rows = _unpadded_rows(output["prompt_ids"], output["prompt_mask"])
            # a vision-language model's images, per completion, exactly as the policy forward indexes them
            multimodal = split_multimodal_inputs(output, output["prompt_mask"])
            step_batch = self._step_batch(inputs, prompt_rows, completion_ids_list, output.get("tool_mask"), multimodal)
            self._generation_cache = None if fusion is None else fusion.generation
            try:
                loglik = step_batch.check_log_likelihoods(self.step_log_likelihoods(step_batch), device)  # (B, K+1)
            finally:  # the cache holds generation's memory: let it go now
                self._generation_cache = None
                if fusion is not None:
                    fusion.generation = None
        contents, segments, answers = step_batch.completion_ids, step_batch.segments, step_batch.answers
        prompt_rows = step_batch.prompt_ids

        gains = step_gains(loglik, self.args.mig_gain)  # (B, K_max): the per-step MIG rewards
        num_steps = torch.tensor([seg.num_steps for seg in segments], device=device)
        # a row without a ground truth, or whose likelihoods are all non-finite, carries no MIG information
        has_answer = torch.tensor([bool(blocks) for blocks in answers], device=device)
        scorable = has_answer & torch.isfinite(loglik).any(1)
        no_value = torch.full_like(loglik[:, 0], float("nan"))
        gain_sum = torch.where(scorable, gains.sum(1), no_value)
        # the breakthrough gate of gated SFT is the method's (the watermark rose), whatever reward `mig_gain` picks
        lift = torch.where(scorable, hwm_gains(loglik)[0].sum(1), no_value)

        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # whole groups are needed for the baselines; a fixed width, so that every process gathers the same shape
        width = self.args.mig_max_steps
        padded = torch.zeros(len(segments), width, device=device)
        padded[:, : gains.shape[1]] = gains[:, :width]
        all_gains, all_steps = gather(padded), gather(num_steps)
        all_scorable = gather(scorable.long()).bool()
        step_ids = step_ids_tensor(segments, output["completion_ids"].shape[1], device=device)
        # processes pad their completions to different lengths: pad the step ids to the longest before gathering
        all_step_ids = gather(self.accelerator.pad_across_processes(step_ids, dim=1, pad_index=NOT_COT))
        # rewards_per_func is gathered already (GRPOTrainer._calculate_rewards): credit is composed on the global batch
        with record_function("mig/compose_credit"):
            credit = self.compose_credit(rewards_per_func, all_gains, all_steps, all_scorable, all_step_ids, group_size)
        local_credit = credit.rows(process_slice)
        self._check_outcome_advantages(output["advantages"], local_credit.outcome_advantages)
        all_gain_sums, trajectory_adv = credit.mig_rewards, credit.trajectory_mig_advantages
        # per-completion columns of the completions table (`log_completions`), in the global order
        log_completion_column(self, "mig_gain", all_gain_sums.tolist())
        log_completion_column(self, "mig_steps", all_steps.float().tolist())
        log_completion_column(self, "mig_advantage", trajectory_adv.tolist())
        if self.mig_token_level_advantages:
            output["advantages"] = local_credit.advantages[:, : step_ids.shape[1]]
        else:
            output["advantages"] = local_credit.advantages
        if self.mig_token_level_advantages and output.get("tool_mask") is not None:
            # tool results and environment feedback are read, not written: no credit of any kind (nor loss)
            output["advantages"] = output["advantages"] * output["tool_mask"]
        # per-step columns of the completions table (and the pages of `mig_inspect_html`)
        record_completion_credit(self, inputs, prompt_rows, contents, segments, loglik, gains, output["advantages"])

        breakthrough = torch.nan_to_num(lift) > 0
        if self._sft_reward_index is not None:
            correctness = rewards_per_func[process_slice, self._sft_reward_index]
            correct = torch.nan_to_num(correctness, nan=float("-inf")) >= self.args.sft_correctness_threshold
            well_formed = torch.tensor([seg.layout.well_formed for seg in segments], device=device)
            output["sft_gate"] = (correct & well_formed & breakthrough).float()

        self._log_mig_metrics(mode, loglik, gain_sum, lift, num_steps, segments, has_answer, output.get("sft_gate"))
        if output.get("tool_mask") is not None and self.args.mig_turn_steps != "never":
            self._log_turn_metrics(mode, loglik, gains, segments, scorable)
        self._metrics[mode]["sft/enabled"].append(float(self._sft_reward_index is not None))
        return output

    def compose_credit(
        self,
        rewards_per_func: torch.Tensor,
        gains: torch.Tensor,
        num_steps: torch.Tensor,
        scorable: torch.Tensor,
        step_ids: torch.Tensor,
        group_size: int,
    ) -> Credit:
        """
        Combine outcome and MIG credit for the batch gathered from every process: [`~trl_mig.credit.compose_credit`]
        with this trainer's settings (TRL's `reward_weights`, `scale_rewards` and `multi_objective_aggregation`;
        MIG's `mig_weight`, `outcome_weight`, `mig_credit`, `mig_scale_rewards`, `mig_token_scope`,
        `mig_failure_scaling` with the correctness reward; one advantage per completion when
        `mig_token_level_advantages` is False). `_generate_and_score_completions` calls it and
        keeps this process's rows; override it to compose credit differently, returning a `Credit` of the same
        shapes.

        Args:
            rewards_per_func (`torch.Tensor` of shape `(N, F)`): the gathered outcome rewards, NaN for None.
            gains (`torch.Tensor` of shape `(N, mig_max_steps)`): per-step MIG rewards, 0 past each completion's steps.
            num_steps (`torch.Tensor` of shape `(N,)`): steps per completion.
            scorable (`torch.Tensor` of shape `(N,)`, bool): completions with a ground truth and finite likelihoods.
            step_ids (`torch.Tensor` of shape `(N, T)`): step of each completion token, `NOT_COT` (-1) outside the
                thought; T is the longest completion of any process.
            group_size (`int`): completions per prompt (`num_generations`, or `num_generations_eval` in evaluation).

        Returns:
            A [`~trl_mig.credit.Credit`] with N rows.
        """
        return compose_credit(
            rewards_per_func, gains, num_steps, scorable, step_ids, group_size,
            reward_weights=self.reward_weights,  # GRPOTrainer's: with an environment's reward weight appended
            scale_rewards=self.scale_rewards,
            multi_objective_aggregation=self.multi_objective_aggregation,
            mig_weight=self.args.mig_weight,
            outcome_weight=self.args.outcome_weight,
            mig_credit=self.args.mig_credit,
            mig_scale_rewards=self.args.mig_scale_rewards,
            mig_token_scope=self.args.mig_token_scope,
            token_level=self.mig_token_level_advantages,
            mig_failure_scaling=self.args.mig_failure_scaling,
            correctness_index=self._failure_reward_index,
            correctness_threshold=self.args.sft_correctness_threshold,
        )

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if self._fusion is not None and self._fusion.replaces(self, args, kwargs):
            self._fusion.generation = None  # this pass scores l_k itself: free generation's cache first
            old_or_ref_logps = self._fused_scoring_pass(self._fusion, *args, **kwargs)
            if old_or_ref_logps is not None:
                return old_or_ref_logps, None, None
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture_policy_logps:
            self._captured_policy_logps = result[0]
            self._capture_policy_logps = False
        return result

    def _compute_loss(self, model, inputs):
        gate = inputs.get("sft_gate")
        if gate is None:
            return super()._compute_loss(model, inputs)
        self._capture_policy_logps = True
        loss = super()._compute_loss(model, inputs)
        per_token_logps, self._captured_policy_logps = self._captured_policy_logps, None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sft_loss = gated_sft_loss(per_token_logps, mask, gate)
        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._metrics[mode]["sft/loss"].append(self.accelerator.gather(sft_loss.detach()).mean().item())
        return loss + self.args.sft_weight * sft_loss / normalizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._warn_on_changed_mig_settings(checkpoint)

    # -------------------------------------------------------------------------------------------------- internals
    def _warn_on_changed_mig_settings(self, checkpoint: str) -> None:
        """A resumed run should keep its credit signal: name every MIG setting that differs from the checkpoint's."""
        path = os.path.join(checkpoint, "training_args.bin")
        if not os.path.exists(path):
            return
        saved = torch.load(path, weights_only=False)
        changed = {
            name: (getattr(saved, name, None), getattr(self.args, name))
            for name in mig_field_names()
            if getattr(saved, name, None) != getattr(self.args, name)
        }
        if changed:
            details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
            logger.warning("Resuming from %s with different MIG settings (%s).", checkpoint, details)
        self.resumed_mig_changes = changed

    def _content_ids(self, completion_ids: list[int]) -> list[int]:
        """Completion tokens without the trailing EOS / padding that end generation."""
        return content_token_ids(completion_ids, {*self.eos_token_ids, self._tokenizer.pad_token_id})

    def _check_outcome_advantages(self, base_advantages: torch.Tensor, composed: torch.Tensor) -> None:
        """
        MIG recomputes the outcome advantage from the rewards (so that `trl-mig inspect` shows what training uses);
        warn once when the base trainer's own `(B,)` advantages differ: a base class that changes them, or a TRL
        option `compose_credit` does not know. Training uses the composed ones either way.
        """
        if self._warned_outcome_mismatch:
            return
        same = base_advantages.shape == composed.shape and torch.allclose(
            base_advantages.float(), composed.to(base_advantages.device).float(), rtol=1e-4, atol=1e-5
        )
        if not same:
            logger.warning(
                "%s's outcome advantages differ from those MIG composes from the rewards (TRL's formula with "
                "reward_weights, scale_rewards and multi_objective_aggregation). Training uses MIG's; to compose them "
                "as the base trainer does, override MIGMixin.compose_credit. Further batches are not checked.",
                type(self).__name__,
            )
            self._warned_outcome_mismatch = True

    def _step_batch(self, inputs, prompt_rows, completion_ids_list, tool_mask, multimodal) -> StepBatch:
        """
        This process's completions as MIG scores them: content tokens, steps (by turn when `tool_mask` says so) and
        ground-truth answers. prompt_rows: B lists of prompt ids (no padding); completion_ids_list: B lists of
        completion ids as generated; tool_mask: `(B, T)` or None; multimodal: B dicts or None.
        """
        with record_function("mig/step_batch"):  # a named range in torch.profiler's tables (bench_step --profile)
            contents = [self._content_ids(ids) for ids in completion_ids_list]
            turn_masks = self._turn_masks(tool_mask, contents)
            segments = [
                segment_completion(self._tokenizer, ids, self.format_spec)
                if mask is None
                else segment_turns(self._tokenizer, ids, mask, self.format_spec)
                for ids, mask in zip(contents, turn_masks)
            ]
            answers = [self._answer_blocks_for(row) for row in inputs]
        return StepBatch(inputs, prompt_rows, contents, segments, answers, multimodal)

    def _turn_masks(self, tool_mask, contents: list[list[int]]) -> list[list[int] | None]:
        """
        Per completion, its model-token mask (1: the model's token, 0: a tool result or environment token) when its
        steps follow agent turns (`mig_turn_steps`), else None. The mask is TRL's `tool_mask` (a `rollout_func`'s
        `env_mask` becomes it), `(B, T)` right-padded with 1; each row is cut to the completion's content tokens.
        """
        mode = self.args.mig_turn_steps
        if tool_mask is None and mode == "always":
            raise ValueError(
                "MIGConfig.mig_turn_steps='always' needs TRL's tool_mask in the batch, and this batch has none: "
                "train with `tools` or an `environment_factory`, or return an `env_mask` (one 0/1 per completion "
                "token) from the rollout_func; or set mig_turn_steps='auto'."
            )
        if tool_mask is None or mode == "never":
            return [None] * len(contents)
        rows = tool_mask.tolist()  # one device-to-host copy for the batch
        return [row[: len(ids)] for row, ids in zip(rows, contents)]

    def _answer_blocks_for(self, row: dict) -> list:
        column = self.args.solution_column
        if column not in row:
            raise KeyError(
                f"MIG needs the ground-truth column {column!r} in every example, but this one has {sorted(row)}. "
                "Set MIGConfig.solution_column to the right column."
            )
        variants = answer_variants(row[column], column)
        if not variants and not self._warned_unscorable:
            logger.warning(
                "A row has no usable ground truth in column %r (%r): it gets no MIG credit. Counted in "
                "mig/unscorable_frac; further rows are not reported.",
                column,
                row[column],
            )
            self._warned_unscorable = True
        blocks = []
        for answer in variants:
            if answer not in self._answer_blocks:
                if len(self._answer_blocks) >= _ANSWER_CACHE_SIZE:
                    self._answer_blocks.clear()
                self._answer_blocks[answer] = encode_answer(self._tokenizer, self.args.mig_scaffold, answer)
            blocks.append(self._answer_blocks[answer])
        return blocks

    def _plan_fusion(self, inputs) -> _Fusion | None:
        """
        Whether the scoring pass of this generation batch may replace one of TRL's no-gradient forwards over the
        completions: the old log-probs' (policy likelihoods) or the reference log-probs' (`mig_likelihood_model=
        "reference"`). TRL decides whether it runs that forward; the pass replaces it only if it does. For policy
        likelihoods, generation's key/value cache is kept too, for when TRL runs none (`step_log_likelihoods`).
        """
        if not self.args.mig_fuse_scoring or self.mig_scorer.method == "prefix":
            return None
        if type(self).step_log_likelihoods is not MIGMixin.step_log_likelihoods:
            return None  # another step scorer: TRL's forward stays, the override scores
        target = "reference" if self.args.mig_likelihood_model == "reference" else "old"
        return _Fusion(inputs=inputs, target=target)

    def _is_reference_forward(self, model) -> bool:
        """Whether TRL's forward through `model` computes the reference log-probs (else the old ones)."""
        if self.ref_model is not None:
            return model is self.ref_model
        unwrapped = self.accelerator.unwrap_model(self.model)
        if model is not self.model or not is_peft_model(unwrapped):
            return False
        # TRL's reference with PEFT: the "ref" adapter, or the base model with every adapter disabled
        return unwrapped.active_adapter == "ref" or any(
            layer.disable_adapters for layer in unwrapped.modules() if isinstance(layer, BaseTunerLayer)
        )

    def _fused_scoring_pass(self, fusion, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """
        TRL's no-gradient forward over prompt + completion, replaced by the scoring pass: returns the completion
        tokens' log-probs `(B, T)` as TRL computes them (its fused LM head, temperature and positions; 0 where
        `attention_mask` is 0) and keeps the step batch and l_0..l_K `(B, K_max + 1)` in `fusion`. Returns None
        (TRL's forward runs, MIG scores afterwards) where the pass cannot produce them.

        input_ids, attention_mask: `(B, P + T)`, the prompt left-padded; logits_to_keep: T; kwargs: TRL's
        `batch_size`, `num_images`, `num_tiles` and multimodal inputs.
        """
        generated = fusion.generated
        if generated is None or fusion_unsupported_reason(model) is not None:
            fusion.give_up()
            return None
        prompt_rows, completion_ids_list, tool_mask_list = generated[0], generated[1], generated[2]
        width = input_ids.shape[1] - logits_to_keep
        device = input_ids.device
        tool_mask = None
        if tool_mask_list is not None:
            # as TRL pads it; its rows of truncated completions are zeroed when `mask_truncated_completions`
            tool_mask = torch.ones(len(tool_mask_list), logits_to_keep, dtype=torch.long)
            for row, mask in enumerate(tool_mask_list):
                tool_mask[row, : len(mask)] = torch.as_tensor(mask)
            tool_mask = tool_mask * attention_mask[:, width:].any(dim=1, keepdim=True).cpu()
        multimodal_inputs = {name: value for name, value in kwargs.items() if name != "batch_size"}
        multimodal = split_multimodal_inputs(multimodal_inputs, attention_mask[:, :width])
        step_batch = self._step_batch(fusion.inputs, prompt_rows, completion_ids_list, tool_mask, multimodal)
        items = [
            ScoringItem(
                prompt,
                completion,
                seg.boundaries,
                blocks,
                images,
                # TRL passes no position ids, so its positions count the left padding (1-D positions only)
                position_offset=width - len(prompt) if images is None else 0,
                keep_completion=True,
            )
            for prompt, completion, seg, blocks, images in zip(
                prompt_rows, completion_ids_list, step_batch.segments, step_batch.answers, step_batch.multimodal
            )
        ]
        if self.mig_scorer.resolve_method(model, items) != "block":
            fusion.give_up()
            return None
        distinct = self._distinct_prefixes(items)  # every row keeps its completion, whose log-probs TRL needs
        with (
            record_function("mig/fused_scoring_pass"),
            self.mig_scorer.rows_per_forward(kwargs.get("batch_size")),
            self.accelerator.autocast(),
        ):
            scores, completion_logps = self.mig_scorer.score(model, distinct.items, completion_logps=True)
        scores = distinct.spread(scores)
        loglik = step_batch.empty_log_likelihoods()
        logps = torch.zeros(len(items), logits_to_keep, device=device)
        for row, (score, row_logps) in enumerate(zip(scores, completion_logps)):
            loglik[row, : score.numel()] = score
            logps[row, : row_logps.numel()] = row_logps[:logits_to_keep].to(device)
        fusion.step_batch = step_batch
        fusion.loglik = step_batch.check_log_likelihoods(loglik.to(self.accelerator.device), self.accelerator.device)
        return logps * attention_mask[:, width:]

    def _scoring_model_context(self):
        if self.args.mig_likelihood_model == "policy":
            return self.model, contextlib.nullcontext()
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def step_log_likelihoods(self, batch: StepBatch) -> torch.Tensor:
        """
        l_0..l_K of every completion: the length-normalised log-likelihood of the ground-truth answer after the
        prompt, the completion's first k steps and the scaffold (`mig_scaffold`), at temperature 1, by the policy (or
        the reference model, `mig_likelihood_model`), the best over the answer's variants.

        Override it for another step scorer (a process reward model, an oracle, a partial-credit function): the
        watermark gains, MIG advantages, chain-of-thought masks, gated SFT, metrics and completions-table columns are
        all computed from what it returns. `batch.rows[i]` is completion i's dataset row, every column included.

        Args:
            batch ([`StepBatch`]): this process's completions of the generation batch, split into steps.

        Returns:
            `torch.Tensor` of shape `(B, K_max + 1)`, float32 on the accelerator device: row i holds l_0..l_{K_i},
            NaN after; a row without a finite value (and every row without a ground truth) gets no MIG credit.
        """
        device = self.accelerator.device
        loglik = batch.empty_log_likelihoods()
        items, rows = [], []
        for row, (prompt, content, seg, blocks, images) in enumerate(
            zip(batch.prompt_ids, batch.completion_ids, batch.segments, batch.answers, batch.multimodal)
        ):
            if blocks:
                items.append(ScoringItem(prompt, content, seg.boundaries, blocks, images))
                rows.append(row)
        model, context = self._scoring_model_context()
        generation = self._generation_cache
        if generation is not None and (
            len(batch) != generation.prompt_mask.shape[0] or cache_unsupported_reason(model, generation, items, rows)
        ):
            generation = None
        distinct = self._distinct_prefixes(items)
        with (
            record_function("mig/step_log_likelihoods"),
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            self.accelerator.autocast(),
        ):
            if generation is not None:  # only the answer copies run, against generation's key/value cache
                # a few copy tokens per row against a cache generate already held: up to as many rows as the loss
                # takes, rows of similar copy lengths together
                with self.mig_scorer.rows_per_forward(self.args.per_device_train_batch_size):
                    scores = score_from_cache(self.mig_scorer, model, generation, distinct.items,
                                              [rows[i] for i in distinct.origins])
            else:
                scores = self.mig_scorer.score(model, distinct.items)
        for row, score in zip(rows, distinct.spread(scores)):
            loglik[row, : score.numel()] = score
        return loglik.to(device)

    def _distinct_prefixes(self, items: list[ScoringItem]):
        """A prefix that several completions share is scored once ([`~trl_mig.scoring.distinct_prefixes`]); the
        counts go to `mig/scored_prefix_frac`."""
        distinct = distinct_prefixes(items)
        self._prefix_counts = [sum(item.num_prefixes for item in part) for part in (distinct.items, items)]
        return distinct

    def _log_mig_metrics(self, mode, loglik, gain_sum, lift, num_steps, segments, has_answer, sft_gate):
        device = loglik.device
        finite = torch.isfinite(loglik)
        in_range = torch.arange(loglik.shape[1], device=device).unsqueeze(0) <= num_steps.unsqueeze(1)
        first = loglik[:, 0]
        best = torch.where(finite, loglik, torch.full_like(loglik, float("-inf"))).max(1).values
        last = loglik.gather(1, num_steps.clamp(max=loglik.shape[1] - 1).unsqueeze(1)).squeeze(1)
        no_value = torch.full_like(first, float("nan"))
        flag = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731
        usable = lambda values: torch.where(has_answer & torch.isfinite(values), values, no_value)  # noqa: E731
        columns = {
            "mig/loglik_prompt_only": usable(first),
            "mig/loglik_best": usable(best),
            "mig/loglik_final": usable(last),
            "mig/gain_sum": gain_sum,
            "mig/breakthrough_frac": torch.where(has_answer, (torch.nan_to_num(lift) > 0).float(), no_value),
            "mig/steps": num_steps.float(),
            "mig/no_step_frac": flag([not seg.layout.has_step_headers for seg in segments]),
            "mig/merged_frac": flag([seg.merged_steps > 0 for seg in segments]),
            "mig/truncated_frac": flag([not seg.layout.think_closed for seg in segments]),
            "mig/nonfinite_frac": torch.where(has_answer, (~finite & in_range).any(1).float(), no_value),
            "mig/unscorable_frac": (~has_answer).float(),
        }
        if sft_gate is not None:
            columns["sft/gated_frac"] = sft_gate
        stacked = gather(torch.stack(list(columns.values()), dim=1).float())
        for name, value in zip(columns, torch.nanmean(stacked, dim=0).tolist()):
            self._metrics[mode][name].append(value)
        # every process logs, whichever route scored: each counts its prefixes (`distinct_prefixes`)
        scored, total = gather(torch.tensor([self._prefix_counts], dtype=torch.float32, device=device)).sum(0).tolist()
        self._prefix_counts = [0, 0]
        if total:
            self._metrics[mode]["mig/scored_prefix_frac"].append(scored / total)

    def _log_turn_metrics(self, mode, loglik, gains, segments, scorable):
        """
        Per tool call, logged next to TRL's `tools/call_frequency` and `tools/failure_frequency`: the mean gain of the
        steps that end after a tool or environment response (`tools/mig_gain_per_call`), the fraction of them that
        lift the watermark (`tools/mig_breakthrough_frac`), both over completions with usable likelihoods, and such
        steps per completion (`tools/mig_call_steps`). Parallel calls answered in one response count once.

        loglik `(B, K_max + 1)`, gains `(B, K_max)` (the `mig_gain` rewards), scorable `(B,)` bool.
        """
        lifts = hwm_gains(loglik)[0]
        per_row = torch.zeros(len(segments), 4, device=loglik.device)  # call steps, scored ones, gain sum, lifts
        for row, seg in enumerate(segments):
            per_row[row, 0] = len(seg.tool_steps)
            if seg.tool_steps and bool(scorable[row]):
                steps = torch.tensor(seg.tool_steps, device=loglik.device)
                per_row[row, 1] = len(seg.tool_steps)
                per_row[row, 2] = gains[row, steps].sum()
                per_row[row, 3] = (lifts[row, steps] > 0).sum()
        every_row = gather(per_row)
        calls, scored, gain, lifted = every_row.sum(0).tolist()
        self._metrics[mode]["tools/mig_call_steps"].append(calls / every_row.shape[0])
        if scored > 0:
            self._metrics[mode]["tools/mig_gain_per_call"].append(gain / scored)
            self._metrics[mode]["tools/mig_breakthrough_frac"].append(lifted / scored)


@dataclass
class _Fusion:
    """
    One generation batch's plan to compute TRL's old (`target="old"`) or reference (`"reference"`) log-probs in the
    scoring pass: the dataset rows, what `_generate` returned, then the step batch and l_k once scored.
    """

    inputs: list
    target: str
    generated: tuple | None = None
    generation: GenerationCache | None = None
    step_batch: StepBatch | None = None
    loglik: torch.Tensor | None = None
    done: bool = False

    def replaces(self, trainer, args: tuple, kwargs: dict) -> bool:
        """Whether this call of `_get_per_token_logps_and_entropies` is the forward the scoring pass replaces."""
        if self.done or torch.is_grad_enabled() or len(args) != 4 or kwargs.get("compute_entropy"):
            return False
        if kwargs.get("compute_aux_loss"):
            return False
        is_reference = trainer._is_reference_forward(args[0])
        if is_reference != (self.target == "reference"):
            return False
        self.done = True
        return True

    def give_up(self) -> None:
        self.done = True


def _unpadded_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's ids where `mask` is 1, as lists: (B, P) tensors read back in one copy each, then cut on the host."""
    ids, mask = ids.cpu(), mask.cpu().bool()
    values = ids[mask].tolist()  # row after row
    ends = mask.sum(1).cumsum(0).tolist()
    return [values[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def _keyword_arguments(positional: tuple, keywords: dict) -> dict:
    """GRPOTrainer's constructor arguments after `train_dataset`, given by position, as keywords."""
    if not positional:
        return keywords
    names = grpo_parameters_after("train_dataset")
    if len(positional) > len(names):
        raise TypeError(f"Too many positional arguments: GRPOTrainer takes {len(names) + 4} at most.")
    named = dict(zip(names, positional))
    for name in named.keys() & keywords.keys():
        raise TypeError(f"Got multiple values for argument {name!r}.")
    return {**named, **keywords}


def _check_solution_column(dataset, column: str, name: str) -> None:
    """Fail at construction when a dataset lacks the ground-truth column (streaming datasets are checked per row)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            _check_solution_column(split, column, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and column not in columns:
        raise ValueError(
            f"{name} has no ground-truth column {column!r} (MIGConfig.solution_column); its columns are "
            f"{list(columns)}. Rename the column or set solution_column."
        )


class MIGGRPOTrainer(MIGMixin, GRPOTrainer):
    """
    Drop-in replacement for [`~trl.GRPOTrainer`] (same constructor) that adds MIG process credit: [`MIGMixin`] on
    `GRPOTrainer`. `args` must be a [`MIGConfig`]; see [`MIGMixin`] for what differs from GRPOTrainer.
    """

    _tag_names = ["trl", "grpo", "trl-mig"]
    _name = "MIG-GRPO"


def _takes_sequence_advantages(trainer_class: type) -> bool:
    """Whether the trainer's loss takes one advantage per completion, `(B,)`, not a `(B, T)` tensor (GMPO's)."""
    return issubclass(trainer_class, sequence_level_trainer_classes())


@functools.lru_cache(maxsize=None)
def mig_trainer_class(
    base_trainer: type[GRPOTrainer],
    config_class: type[GRPOConfig] | None = None,
    token_level_advantages: bool | None = None,
) -> type[GRPOTrainer]:
    """
    A trainer class that adds MIG credit to `base_trainer`, a subclass of [`~trl.GRPOTrainer`] (one of TRL's
    experimental variants or your own): `class MIG<Base>(MIGMixin, base_trainer)`.

    Args:
        base_trainer (`type`): the GRPOTrainer subclass. Its hooks run inside MIG's, which call `super()`.
        config_class (`type`, *optional*): the base's config class (a GRPOConfig subclass). The new class then
            takes [`mig_config_class`]`(config_class)`, which has the base's fields and defaults plus MIG's;
            default: [`MIGConfig`].
        token_level_advantages (`bool`, *optional*): whether the base's loss takes `(B, T)` advantages, as
            GRPOTrainer's does. With False it gets one advantage per completion, `outcome_weight * A_out +
            mig_weight * A_mig`, which needs `mig_token_scope="all"` and `mig_credit="trajectory"`. Default: False
            for TRL's GMPOTrainer (geometric-mean loss), else True.

    Returns:
        The new trainer class (the same class for the same arguments); its `mig_config_class` attribute is the
        config class it takes.
    """
    if not (isinstance(base_trainer, type) and issubclass(base_trainer, GRPOTrainer)):
        raise TypeError(f"mig_trainer_class needs a subclass of trl.GRPOTrainer, got {base_trainer!r}.")
    if issubclass(base_trainer, MIGMixin):
        raise TypeError(f"{base_trainer.__name__} already has MIG credit (it subclasses MIGMixin).")
    if token_level_advantages is None:
        token_level_advantages = not _takes_sequence_advantages(base_trainer)
    base_name = getattr(base_trainer, "_name", base_trainer.__name__)
    return type(
        f"MIG{base_trainer.__name__}",
        (MIGMixin, base_trainer),
        {
            "__module__": __name__,
            "__doc__": f"[`{base_trainer.__name__}`] with MIG process credit (see [`MIGMixin`]).",
            "mig_config_class": mig_config_class(config_class) if config_class is not None else MIGConfig,
            "mig_token_level_advantages": token_level_advantages,
            "_tag_names": [*getattr(base_trainer, "_tag_names", []), "trl-mig"],
            "_name": f"MIG-{base_name}",
        },
    )
