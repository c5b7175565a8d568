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


def likelihood_differences(loglik: torch.Tensor) -> torch.Tensor:
    r"""
    Raw step differences `d_k = l_k - l_{k-1}` (`mig_gain="difference"`, an ablation of the watermark): a step that
    lowers the answer likelihood gets a negative value, and a recovery is paid again.

    Non-finite entries are missing, as in [`hwm_gains`]: a difference is taken from the last finite l before it, a
    missing l earns 0, and so does the first finite one. Hence `d.sum(-1) == last finite l - first finite l`.

    Args:
        loglik (`torch.Tensor` of shape `(..., K+1)`): step-conditioned answer log-likelihoods l_0..l_K.

    Returns:
        `torch.Tensor` of shape `(..., K)`: d_1..d_K, 0 where missing.
    """
    if loglik.shape[-1] < 1:
        raise ValueError(f"likelihood_differences needs at least l_0 on the last axis, got {tuple(loglik.shape)}.")
    if not loglik.is_floating_point():
        loglik = loglik.float()
    finite = torch.isfinite(loglik)
    # index of the last finite entry at or before each position (-1 when none): a forward fill
    positions = torch.arange(loglik.shape[-1], device=loglik.device).expand_as(loglik)
    last_finite = torch.cummax(torch.where(finite, positions, torch.full_like(positions, -1)), dim=-1).values
    previous_index = last_finite[..., :-1]
    previous = torch.gather(torch.nan_to_num(loglik, nan=0.0, posinf=0.0, neginf=0.0), -1, previous_index.clamp(min=0))
    earns = finite[..., 1:] & (previous_index >= 0)
    return torch.where(earns, loglik[..., 1:] - previous, torch.zeros_like(previous))


def step_gains(loglik: torch.Tensor, kind: str = "watermark") -> torch.Tensor:
    """
    Per-step MIG rewards from l_0..l_K: `"watermark"` ([`hwm_gains`], the method) or `"difference"`
    ([`likelihood_differences`], an ablation).

    Args:
        loglik (`torch.Tensor` of shape `(..., K+1)`).
        kind (`str`): `"watermark"` or `"difference"`.

    Returns:
        `torch.Tensor` of shape `(..., K)`.
    """
    if kind == "watermark":
        return hwm_gains(loglik)[0]
    if kind == "difference":
        return likelihood_differences(loglik)
    raise ValueError(f"Unknown MIG gain {kind!r}; expected 'watermark' or 'difference'.")


def step_advantages(
    gains: torch.Tensor, num_steps: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    r"""
    Per-step credit (`mig_credit="step"`): the progress a completion has made by step k, compared with the
    completions of its group that reached step k too (a masked step-index baseline, after SPRO's "masked step
    advantage", arXiv:2507.01551):

        C_{i,k} = sum_{j<=k} g_{i,j}                                  (for watermark gains: h_k - h_0)
        A_{i,k} = (C_{i,k} - mean_{i' in G, K_{i'} >= k} C_{i',k}) / (std_{i' in G, K_{i'} >= k} C_{i',k} + eps)

    A step that does not lift the watermark keeps the progress made before it, so it is not punished for itself; it
    gets negative credit only when the group's other completions are further ahead at the same step. Completions that
    ended before step k are left out of that step's statistics (masked), so length does not bias the baseline. A
    step index reached by fewer than two completions of a group gets 0, as does a step whose group has no spread.

    Args:
        gains (`torch.Tensor` of shape `(N, K)`): per-step rewards (watermark gains or differences), the
            `group_size` completions of a prompt adjacent; values past a completion's own step count are ignored.
            NaN marks a completion without usable likelihoods: it gets 0 and is left out of the statistics.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i, the steps of each completion.
        group_size (`int`): completions per prompt (G).
        scale (`str`): `"group"` (std per group and step index), `"batch"` (std over all valid entries of the batch)
            or `"none"` (centred only), as `mig_scale_rewards`.
        eps (`float`): added to the std.

    Returns:
        `torch.Tensor` of shape `(N, K)`: credit per step, 0 past K_i.
    """
    if gains.dim() != 2 or gains.shape[0] % group_size != 0:
        raise ValueError(
            f"step_advantages needs gains of shape (N, K) with N ({gains.shape[0]}) a multiple of group_size "
            f"({group_size})."
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"Unknown MIG reward scaling {scale!r}; expected 'group', 'batch' or 'none'.")
    gains = gains if gains.is_floating_point() else gains.float()
    steps = gains.shape[1]
    usable = torch.isfinite(gains).all(1)
    in_range = torch.arange(steps, device=gains.device).unsqueeze(0) < num_steps.to(gains.device).unsqueeze(1)
    valid = in_range & usable.unsqueeze(1)
    progress = torch.where(valid, gains, torch.zeros_like(gains)).cumsum(1)

    grouped = progress.view(-1, group_size, steps)
    mask = valid.view(-1, group_size, steps).to(gains.dtype)
    count = mask.sum(1, keepdim=True)
    mean = (grouped * mask).sum(1, keepdim=True) / count.clamp(min=1)
    centred = (grouped - mean) * mask
    if scale == "none":
        divisor = torch.ones_like(mean)
    elif scale == "group":
        variance = (centred**2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        divisor = variance.sqrt() + eps
    else:
        total = mask.sum()
        batch_mean = (progress * valid).sum() / total.clamp(min=1)
        batch_var = (((progress - batch_mean) * valid) ** 2).sum() / (total - 1).clamp(min=1)
        divisor = torch.full_like(mean, batch_var.sqrt().item() + eps)
    credit = torch.where(count >= 2, centred / divisor, torch.zeros_like(centred))
    return credit.reshape(-1, steps) * valid


def mig_advantages(
    gains: torch.Tensor,
    num_steps: torch.Tensor,
    scorable: torch.Tensor,
    group_size: int,
    credit: str = "trajectory",
    scale: str = "group",
) -> torch.Tensor:
    """
    The MIG advantages of whole groups, from their per-step MIG rewards: one per completion (`credit="trajectory"`,
    the paper's: the sum of gains, normalised within the group) or one per step (`credit="step"`,
    [`step_advantages`]). The trainer calls it on the groups gathered from every process, `trl-mig inspect` on one
    group, so both give the same credit.

    Args:
        gains (`torch.Tensor` of shape `(N, K)`): per-step MIG rewards, 0 past a completion's own steps, the
            `group_size` completions of a prompt adjacent.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i, the steps of each completion.
        scorable (`torch.Tensor` of shape `(N,)`, bool): completions with a ground truth and finite likelihoods; the
            others carry no MIG information: advantage 0, and left out of their group's statistics.
        group_size (`int`): completions per prompt (G).
        credit (`str`): `"trajectory"` or `"step"`, as `mig_credit`.
        scale (`str`): `"group"`, `"batch"` or `"none"`, as `mig_scale_rewards`.

    Returns:
        `torch.Tensor` of shape `(N,)` for trajectory credit, `(N, K)` for step credit.
    """
    scorable = scorable.to(device=gains.device, dtype=torch.bool)
    if credit == "step":
        return step_advantages(gains.masked_fill(~scorable.unsqueeze(1), float("nan")), num_steps, group_size, scale)
    if credit != "trajectory":
        raise ValueError(f"Unknown MIG credit {credit!r}; expected 'trajectory' or 'step'.")
    gain_sums = torch.where(scorable, gains.sum(1), torch.full_like(gains[:, 0], float("nan")))
    return normalize_rewards(gain_sums, group_size, scale)[0]


def per_token_advantages(
    outcome_advantages: torch.Tensor,
    mig_advantages: torch.Tensor,
    step_ids: torch.Tensor,
    mig_weight: float = 1.0,
    outcome_weight: float = 1.0,
    scope: str = "cot",
) -> torch.Tensor:
    r"""
    Decoupled masking: `A[i,t] = beta * A_out_i + alpha * A_mig[i, step(t)] * M_cot[i,t]`.

    Outcome credit reaches every completion token; MIG credit reaches chain-of-thought tokens only, never the answer
    (`scope="cot"`, the method). `scope="all"` (an ablation) gives MIG credit to every completion token: a token
    outside the thought takes the credit of the step before it (the answer that of the last step; tokens before the
    first step that of step 1).

    Args:
        outcome_advantages (`torch.Tensor` of shape `(B,)`): GRPO's outcome advantage per completion.
        mig_advantages (`torch.Tensor` of shape `(B,)` or `(B, K)`): trajectory MIG advantage, or per-step credit.
        step_ids (`torch.Tensor` of shape `(B, T)`): index of the step each completion token belongs to, or
            `NOT_COT` (-1) outside the chain of thought. With a `(B,)` MIG advantage only `step_ids >= 0` matters.
        mig_weight (`float`): alpha. outcome_weight (`float`): beta.
        scope (`str`): `"cot"` or `"all"`.

    Returns:
        `torch.Tensor` of shape `(B, T)`.
    """
    if scope == "all":
        # each token outside the thought inherits the step before it; leading ones belong to step 1
        step_ids = torch.cummax(step_ids, dim=1).values.clamp(min=0)
    elif scope != "cot":
        raise ValueError(f"Unknown MIG token scope {scope!r}; expected 'cot' or 'all'.")
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
