"""Pure credit math: watermark gains, reward normalisation, per-token advantages and the gated SFT loss.

Nothing here touches a model; the trainer feeds these functions tensors, so each piece is tested on its own.
Data flows one way: step likelihoods -> gains -> normalised advantages -> per-token advantages -> loss.

Missing-value convention: a non-finite step likelihood (NaN, +-inf) marks a missing or unusable prefix: it earns no
gain and does not move the watermark. Shorter completions in a padded batch use NaN for their missing steps.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd

NOT_COT = -1  # step id of a completion token outside the chain of thought (answer part, tags, padding)


def hwm_gains(loglik: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Monotonic historical watermark and rectified gains.

        h_0 = l_0,   h_k = max(h_{k-1}, l_k),   g_k = max(0, l_k - h_{k-1})   (k = 1..K)

    Non-finite entries are missing: they earn nothing and leave the watermark as it was; before the first finite entry
    the watermark is undefined (NaN) and the first finite entry earns nothing. Hence
    `gains.sum(-1) == max(finite l) - first finite l >= 0`.

    Args:
        loglik (`torch.Tensor` of shape `(..., K+1)`): step-conditioned answer log-likelihoods l_0..l_K.

    Returns:
        gains (`torch.Tensor` of shape `(..., K)`): g_1..g_K, all >= 0, 0 where missing.
        watermark (`torch.Tensor` of shape `(..., K+1)`): h_0..h_K, NaN before the first finite l.
    """
    if loglik.shape[-1] < 1:
        raise ValueError(f"hwm_gains needs at least l_0 on the last axis, got shape {tuple(loglik.shape)}.")
    if not loglik.is_floating_point():
        loglik = loglik.float()
    finite = torch.isfinite(loglik)
    neg_inf = torch.full_like(loglik, float("-inf"))
    watermark = torch.cummax(torch.where(finite, loglik, neg_inf), dim=-1).values
    previous = watermark[..., :-1]
    earns = finite[..., 1:] & torch.isfinite(previous)
    gains = torch.where(earns, (loglik[..., 1:] - previous).clamp(min=0.0), torch.zeros_like(previous))
    watermark = torch.where(torch.isfinite(watermark), watermark, torch.full_like(watermark, float("nan")))
    return gains, watermark


def normalize_rewards(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Group-relative advantages, as GRPO computes them for its outcome reward.

    Args:
        rewards (`torch.Tensor` of shape `(N,)`): one reward per completion, the `group_size` completions of a prompt
            adjacent. NaN rewards are left out of the statistics and get advantage 0.
        group_size (`int`): completions per prompt (G).
        scale (`str`): `"group"` (mean and std per group), `"batch"` (mean per group, std over the batch) or
            `"none"` (mean per group, no scaling).
        eps (`float`): added to the std. A zero-std group gets advantage exactly 0.

    Returns:
        advantages (`torch.Tensor` of shape `(N,)`): `(r - mean) / (std + eps)`.
        baseline (`torch.Tensor` of shape `(N,)`): the mean each advantage is taken from.
        divisor (`torch.Tensor` of shape `(N,)`): the `std + eps` it is divided by (1 for `"none"`).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"normalize_rewards needs a 1-D tensor whose length ({rewards.numel()}) is a multiple of group_size "
            f"({group_size})."
        )
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    rewards = rewards.masked_fill(~torch.isfinite(rewards), torch.nan)
    grouped = rewards.view(-1, group_size)
    baseline = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    if scale == "group":
        std = nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    elif scale == "none":
        std = None
    else:
        raise ValueError(f"Unknown MIG reward scaling {scale!r}; expected 'group', 'batch' or 'none'.")
    # a group with fewer than two valid rewards has no spread: its advantages are 0, never NaN
    divisor = torch.ones_like(rewards) if std is None else torch.nan_to_num(std, nan=0.0) + eps
    baseline = torch.nan_to_num(baseline, nan=0.0)
    advantages = torch.nan_to_num((rewards - baseline) / divisor, nan=0.0)
    return advantages, baseline, divisor


def step_advantages(
    gains: torch.Tensor, num_steps: torch.Tensor, baseline: torch.Tensor, divisor: torch.Tensor
) -> torch.Tensor:
    r"""
    Per-step credit (`mig_credit="step"`), the trajectory advantage spread over steps by their gains:

        A_{i,k} = (K_i * g_{i,k} - baseline_i) / divisor_i

    so the mean of A_{i,1..K_i} equals the trajectory advantage `(sum_k g_{i,k} - baseline_i) / divisor_i`, and a step
    that does not lift the watermark (g = 0) never gets positive credit (baselines of gains are >= 0).

    Args:
        gains (`torch.Tensor` of shape `(N, K)`): rectified gains, 0 past each completion's own step count.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i.
        baseline, divisor (`torch.Tensor` of shape `(N,)`): from [`normalize_rewards`] on the trajectory gains.

    Returns:
        `torch.Tensor` of shape `(N, K)`: credit per step, 0 past K_i.
    """
    steps = num_steps.to(gains.dtype).unsqueeze(1)
    credit = (steps * gains - baseline.unsqueeze(1)) / divisor.unsqueeze(1)
    in_range = torch.arange(gains.shape[1], device=gains.device).unsqueeze(0) < num_steps.unsqueeze(1)
    return torch.where(in_range, credit, torch.zeros_like(credit))


def per_token_advantages(
    outcome_advantages: torch.Tensor,
    mig_advantages: torch.Tensor,
    step_ids: torch.Tensor,
    mig_weight: float = 1.0,
    outcome_weight: float = 1.0,
) -> torch.Tensor:
    r"""
    Decoupled masking: `A[i,t] = beta * A_out_i + alpha * A_mig[i, step(t)] * M_cot[i,t]`.

    Outcome credit reaches every completion token; MIG credit reaches chain-of-thought tokens only, never the answer.

    Args:
        outcome_advantages (`torch.Tensor` of shape `(B,)`): GRPO's outcome advantage per completion.
        mig_advantages (`torch.Tensor` of shape `(B,)` or `(B, K)`): trajectory MIG advantage, or per-step credit.
        step_ids (`torch.Tensor` of shape `(B, T)`): index of the step each completion token belongs to, or
            `NOT_COT` (-1) outside the chain of thought. With a `(B,)` MIG advantage only `step_ids >= 0` matters.
        mig_weight (`float`): alpha. outcome_weight (`float`): beta.

    Returns:
        `torch.Tensor` of shape `(B, T)`.
    """
    cot_mask = step_ids >= 0
    if mig_advantages.dim() == 1:
        mig_per_token = mig_advantages.unsqueeze(1).expand_as(step_ids)
    else:
        if mig_advantages.shape[1] == 0:
            mig_advantages = mig_advantages.new_zeros(mig_advantages.shape[0], 1)
        index = step_ids.clamp(min=0, max=mig_advantages.shape[1] - 1)
        mig_per_token = torch.gather(mig_advantages, 1, index)
    mig_per_token = torch.where(cot_mask, mig_per_token, torch.zeros_like(mig_per_token))
    return outcome_weight * outcome_advantages.unsqueeze(1) + mig_weight * mig_per_token


def gated_sft_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """
    Mean token negative log-likelihood over the completions that pass the gate.

    Args:
        per_token_logps (`torch.Tensor` of shape `(B, T)`): the policy's log-probs of the completion tokens.
        mask (`torch.Tensor` of shape `(B, T)`): 1 for real completion tokens.
        gate (`torch.Tensor` of shape `(B,)`): 1 for completions that pass both gates.

    Returns:
        Scalar tensor; 0 (still attached to the graph) when no completion passes.
    """
    weights = mask.to(per_token_logps.dtype) * gate.to(per_token_logps.dtype).unsqueeze(1)
    return -(per_token_logps * weights).sum() / weights.sum().clamp(min=1.0)
