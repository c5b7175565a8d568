"""`StepBatch`: what [`MIGMixin.step_log_likelihoods`] gets, the completions of a generation batch split into steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .scoring import AnswerBlock
from .segmentation import StepSegments


@dataclass(frozen=True)
class StepBatch:
    """
    This process's completions of one generation batch, as MIG scores them: B completions, entry i of every field
    belongs to completion i (GRPO repeats each prompt `num_generations` times in a row).

    Attributes:
        rows (`Sequence[Mapping]`): the dataset row of each completion, every column included: the ground truth
            (`MIGConfig.solution_column`) and anything else an overriding scorer needs (`rows[i]["expression"]`).
        prompt_ids (`Sequence[Sequence[int]]`): each completion's prompt tokens, without padding.
        completion_ids (`Sequence[Sequence[int]]`): each completion's tokens, without the EOS and padding that ended
            generation.
        segments (`Sequence[StepSegments]`): each completion's steps: `segments[i].boundaries` = (b_0, ..., b_K),
            the prefix of l_k is `completion_ids[i][:b_k]`, and K_i = `segments[i].num_steps`.
        answers (`Sequence[Sequence[AnswerBlock]]`): each row's ground-truth variants, scaffold + answer tokenised
            once; empty when the row has no usable ground truth.
        multimodal (`Sequence[Mapping | None]`, *optional*): each completion's multimodal model inputs (a
            vision-language model's images, from `split_multimodal_inputs`), None for text; default: None for all.
    """

    rows: Sequence[Mapping]
    prompt_ids: Sequence[Sequence[int]]
    completion_ids: Sequence[Sequence[int]]
    segments: Sequence[StepSegments]
    answers: Sequence[Sequence[AnswerBlock]]
    multimodal: Sequence[Mapping | None] | None = None

    def __post_init__(self):
        if self.multimodal is None:
            object.__setattr__(self, "multimodal", [None] * len(self.segments))
        sizes = {name: len(getattr(self, name)) for name in ("rows", "prompt_ids", "completion_ids", "answers",
                                                              "multimodal")}
        wrong = {name: size for name, size in sizes.items() if size != len(self.segments)}
        if wrong:
            raise ValueError(
                f"StepBatch needs one entry per completion in every field: segments has {len(self.segments)}, "
                f"but {', '.join(f'{name} has {size}' for name, size in wrong.items())}."
            )
        if not self.segments:
            raise ValueError("StepBatch needs at least one completion.")

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def num_steps(self) -> list[int]:
        """K_i of every completion."""
        return [seg.num_steps for seg in self.segments]

    @property
    def width(self) -> int:
        """K_max + 1: the columns of the log-likelihood tensor."""
        return max(self.num_steps) + 1

    def empty_log_likelihoods(self) -> torch.Tensor:
        """`(B, K_max + 1)` float32 of NaN on the CPU, to fill with l_0..l_{K_i} per row."""
        return torch.full((len(self), self.width), float("nan"))

    def check_log_likelihoods(self, loglik, device=None) -> torch.Tensor:
        """
        The l_k a step scorer returned, checked and in the form MIG computes with.

        Args:
            loglik (`torch.Tensor` of shape `(B, K_max + 1)`): row i's l_0..l_{K_i}; entries past K_i are ignored.
            device (*optional*): where to put the result (the accelerator device).

        Returns:
            `torch.Tensor` of shape `(B, K_max + 1)`, float32 on `device`, NaN past each K_i.

        Raises:
            TypeError: `loglik` is not a real-valued tensor.
            ValueError: its shape is not `(B, K_max + 1)`.
        """
        expected = (len(self), self.width)
        if not isinstance(loglik, torch.Tensor) or loglik.is_complex() or loglik.dtype == torch.bool:
            raise TypeError(
                f"step_log_likelihoods must return a real-valued torch.Tensor of shape (B, K_max + 1) = {expected}, "
                f"got {type(loglik).__name__}{'' if not isinstance(loglik, torch.Tensor) else f' of {loglik.dtype}'}."
            )
        if tuple(loglik.shape) != expected:
            raise ValueError(
                f"step_log_likelihoods must return shape (B, K_max + 1) = {expected} (B completions, steps "
                f"{self.num_steps}), got {tuple(loglik.shape)}."
            )
        loglik = loglik.detach().to(device=device, dtype=torch.float32)
        steps = torch.tensor(self.num_steps, device=loglik.device)
        past_last_step = torch.arange(expected[1], device=loglik.device).unsqueeze(0) > steps.unsqueeze(1)
        return loglik.masked_fill(past_last_step, float("nan"))
