"""`MIGGRPOTrainer`: GRPO with step-wise Marginal Information Gain credit, decoupled masking and gated SFT.

It overrides three hooks of `GRPOTrainer` and calls `super()` in each:

- `_calculate_rewards`: keeps the gathered outcome rewards and the completion ids for the MIG pass;
- `_generate_and_score_completions`: after GRPO has generated and scored, segments each completion into steps, scores
  l_0..l_K, turns them into watermark gains and replaces the `(B,)` outcome advantages with `(B, T)` per-token ones;
- `_compute_loss`: adds the gated SFT term, reusing the policy log-probs the GRPO loss computed (captured from
  `_get_per_token_logps_and_entropies`, so there is no second forward).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from accelerate.utils import gather, is_peft_model
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .config import MIGConfig, mig_field_names
from .credit import gated_sft_loss, hwm_gains, normalize_rewards, per_token_advantages, step_advantages, step_gains
from .inspection import attach_credit_page, record_completion_credit
from .rewards import answer_variants, default_reward_funcs
from .scoring import AnswerBlock, ScoringItem, StepLikelihoodScorer, encode_answer
from .segmentation import FormatSpec, segment_completion, step_ids_tensor

logger = logging.getLogger(__name__)

_ANSWER_CACHE_SIZE = 65536


class MIGGRPOTrainer(GRPOTrainer):
    """
    Drop-in replacement for [`~trl.GRPOTrainer`] (same constructor) that adds MIG process credit.

    The per-token advantage is `A[i,t] = outcome_weight * A_out_i + mig_weight * A_mig_i * M_cot[i,t]`, where A_out is
    GRPO's group-normalised outcome advantage and A_mig the group-normalised sum of watermark gains of the answer
    likelihood over the completion's steps. With `sft_weight > 0`, completions that are well formed, correct and
    raise the answer likelihood (sum of gains > 0) also get an NLL term.

    If `reward_funcs` is None, the rewards are [`AnswerAccuracyReward`] and [`StepFormatReward`] built from `args`.
    `args` must be a [`MIGConfig`].
    """

    _tag_names = ["trl", "grpo", "trl-mig"]
    _name = "MIG-GRPO"

    def __init__(self, model, reward_funcs=None, args: MIGConfig | None = None, train_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = MIGConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-MIG-GRPO")
        elif not isinstance(args, MIGConfig):
            raise TypeError(
                f"MIGGRPOTrainer needs `args` to be a MIGConfig, got {type(args).__name__}. MIGConfig accepts every "
                "GRPOConfig option, so build it with the same arguments."
            )
        _check_solution_column(train_dataset, args.solution_column, "train_dataset")
        _check_solution_column(kwargs.get("eval_dataset"), args.solution_column, "eval_dataset")
        spec = FormatSpec.from_config(args)
        if reward_funcs is None:
            reward_funcs = default_reward_funcs(spec, args.solution_column)
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

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
        self._pending_mig = None
        self._capture_policy_logps = False
        self._captured_policy_logps = None
        self._answer_blocks: dict[str, AnswerBlock] = {}
        self._warned_unscorable = False
        self.resumed_mig_changes: dict[str, tuple] = {}  # MIG settings changed since the checkpoint resumed from
        attach_credit_page(self)  # mig_inspect_html: an HTML page of the latest completions' credit at every log

    # ----------------------------------------------------------------------------------------------------- set-up
    def _resolve_correctness_reward(self) -> int:
        names = self.reward_func_names
        wanted = self.args.sft_correctness_reward
        if wanted is not None:
            if wanted not in names:
                raise ValueError(
                    f"MIGConfig.sft_correctness_reward={wanted!r} is not one of the reward functions {names}."
                )
            return names.index(wanted)
        for index, name in enumerate(names):
            if "accuracy" in name:
                return index
        raise ValueError(
            f"Gated SFT (sft_weight={self.args.sft_weight}) needs a correctness reward, but no reward function name "
            f"contains 'accuracy' among {names}. Set MIGConfig.sft_correctness_reward, or sft_weight=0."
        )

    def _max_over_processes(self, count: int) -> int:
        local = torch.tensor([count], device=self.accelerator.device)
        return int(self.accelerator.gather(local).max().item())

    # ------------------------------------------------------------------------------------------------------ hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pending_mig = (rewards_per_func, completion_ids_list)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, completion_ids_list = self._pending_mig
        self._pending_mig = None
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        local = len(completion_ids_list)
        process_slice = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)

        prompt_rows = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"])]
        contents = [self._content_ids(ids) for ids in completion_ids_list]
        segments = [segment_completion(self._tokenizer, ids, self.format_spec) for ids in contents]
        answers = [self._answer_blocks_for(row) for row in inputs]
        loglik = self._score(prompt_rows, contents, segments, answers)  # (B, K_max + 1), NaN-padded

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
        all_gain_sums = gather(gain_sum)
        mig_adv, _, _ = normalize_rewards(all_gain_sums, group_size, self.args.mig_scale_rewards)
        # per-completion columns of the completions table (`log_completions`), in the global order
        self._logs["extra"]["mig_gain"].extend(all_gain_sums.tolist())
        self._logs["extra"]["mig_steps"].extend(gather(num_steps.float()).tolist())
        self._logs["extra"]["mig_advantage"].extend(mig_adv.tolist())
        mig_adv = mig_adv[process_slice]
        if self.args.mig_credit == "step":
            # fixed width, so that every process gathers the same shape; a whole group is needed for the baselines
            width = self.args.mig_max_steps
            padded = torch.zeros(len(segments), width, device=device)
            padded[:, : gains.shape[1]] = gains[:, :width]
            padded[~scorable] = float("nan")
            all_step_adv = step_advantages(gather(padded), gather(num_steps), group_size, self.args.mig_scale_rewards)
            mig_adv = all_step_adv[process_slice]

        step_ids = step_ids_tensor(segments, output["completion_ids"].shape[1], device=device)
        output["advantages"] = per_token_advantages(
            output["advantages"], mig_adv, step_ids, self.args.mig_weight, self.args.outcome_weight,
            scope=self.args.mig_token_scope,
        )
        # per-step columns of the completions table (and the pages of `mig_inspect_html`)
        record_completion_credit(self, inputs, prompt_rows, contents, segments, loglik, gains, output["advantages"])

        breakthrough = torch.nan_to_num(lift) > 0
        if self._sft_reward_index is not None:
            correctness = rewards_per_func[process_slice, self._sft_reward_index]
            correct = torch.nan_to_num(correctness, nan=float("-inf")) >= self.args.sft_correctness_threshold
            well_formed = torch.tensor([seg.layout.well_formed for seg in segments], device=device)
            output["sft_gate"] = (correct & well_formed & breakthrough).float()

        self._log_mig_metrics(mode, loglik, gain_sum, lift, num_steps, segments, has_answer, output.get("sft_gate"))
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
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
        stop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        end = len(completion_ids)
        while end > 0 and completion_ids[end - 1] in stop:
            end -= 1
        return list(completion_ids[:end])

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

    def _scoring_model_context(self):
        if self.args.mig_likelihood_model == "policy":
            return self.model, contextlib.nullcontext()
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _score(self, prompt_rows, contents, segments, answers) -> torch.Tensor:
        """l_k for every completion: `(B, K_max + 1)` float32 on the accelerator device, NaN past each K_i and for
        rows without a ground truth."""
        device = self.accelerator.device
        width = max(seg.num_steps for seg in segments) + 1
        loglik = torch.full((len(segments), width), float("nan"))
        items, rows = [], []
        for row, (prompt, content, seg, blocks) in enumerate(zip(prompt_rows, contents, segments, answers)):
            if blocks:
                items.append(ScoringItem(prompt, content, seg.boundaries, blocks))
                rows.append(row)
        model, context = self._scoring_model_context()
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            self.accelerator.autocast(),
        ):
            scores = self.mig_scorer.score(model, items)
        for row, score in zip(rows, scores):
            loglik[row, : score.numel()] = score
        return loglik.to(device)

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
