"""Pure credit math: watermark gains, reward normalisation, per-token advantages and the gated SFT loss.

Nothing here touches a model; the trainer feeds these functions tensors, so each piece is tested on its own.
Data flows one way: step likelihoods -> gains -> normalised advantages -> per-token advantages -> loss.
[`compose_credit`] is the one place where outcome and MIG credit are combined: the trainer calls it on the gathered
batch, `trl-mig inspect` on one group.

Missing-value convention: a non-finite step likelihood (NaN, +-inf) marks a missing or unusable prefix: it earns no
gain and does not move the watermark. Shorter completions in a padded batch use NaN for their missing steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from trl.trainer.utils import nanstd

NOT_COT = -1  # step id of a completion token outside the chain of thought (answer part, tags, padding)
GRPO_EPS = 1e-4  # what GRPOTrainer adds to the std it divides rewards by
# GRPOConfig accepts booleans for scale_rewards (its __post_init__ maps them; a bare namespace may not)
SCALE_REWARDS_ALIASES = {True: "group", False: "none"}
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


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


def _masked_step_normalise(
    values: torch.Tensor, valid: torch.Tensor, group_size: int, scale: str, eps: float
) -> torch.Tensor:
    """
    Normalise per-step values within each group and step index, over the completions valid at that index (the masked
    step-index baseline of [`step_advantages`] and [`return_to_go_advantages`]).

    Args:
        values (`torch.Tensor` of shape `(N, K)`): one value per completion and step index, finite where `valid`.
        valid (`torch.Tensor` of shape `(N, K)`, bool): the completion reached step k and is usable.
        group_size (`int`), scale (`str`), eps (`float`): as in [`step_advantages`].

    Returns:
        `torch.Tensor` of shape `(N, K)`: `(v - mean) / (std + eps)` over the valid members of the index, 0 where not
        valid and at an index with fewer than two valid members of the group.
    """
    steps = values.shape[1]
    values = torch.where(valid, values, torch.zeros_like(values))
    grouped = values.view(-1, group_size, steps)
    mask = valid.view(-1, group_size, steps).to(values.dtype)
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
        batch_mean = (values * valid).sum() / total.clamp(min=1)
        batch_var = (((values - batch_mean) * valid) ** 2).sum() / (total - 1).clamp(min=1)
        divisor = torch.full_like(mean, batch_var.sqrt().item() + eps)
    credit = torch.where(count >= 2, centred / divisor, torch.zeros_like(centred))
    return credit.reshape(-1, steps) * valid


def _valid_steps(gains: torch.Tensor, num_steps: torch.Tensor, group_size: int, scale: str, caller: str):
    """Checked float gains `(N, K)` and the `(N, K)` mask of the steps each usable completion reached."""
    if gains.dim() != 2 or gains.shape[0] % group_size != 0:
        raise ValueError(
            f"{caller} needs gains of shape (N, K) with N ({gains.shape[0]}) a multiple of group_size ({group_size})."
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"Unknown MIG reward scaling {scale!r}; expected 'group', 'batch' or 'none'.")
    gains = gains if gains.is_floating_point() else gains.float()
    usable = torch.isfinite(gains).all(1)
    in_range = torch.arange(gains.shape[1], device=gains.device).unsqueeze(0) < num_steps.to(gains.device).unsqueeze(1)
    valid = in_range & usable.unsqueeze(1)
    return torch.where(valid, gains, torch.zeros_like(gains)), valid


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
    gains, valid = _valid_steps(gains, num_steps, group_size, scale, "step_advantages")
    return _masked_step_normalise(gains.cumsum(1), valid, group_size, scale, eps)


def return_to_go_advantages(
    gains: torch.Tensor, num_steps: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    r"""
    Return-to-go step credit (`mig_credit="return_to_go"`): the tokens of step k are credited with the gains of step
    k and of every later step of the completion, compared with the completions of its group that reached step k too
    (the masked step-index baseline of [`step_advantages`]):

        G_{i,k} = sum_{j=k..K_i} g_{i,j}                              (for watermark gains: h_{K_i} - h_{k-1})
        A_{i,k} = (G_{i,k} - mean_{i' in G, K_{i'} >= k} G_{i',k}) / (std_{i' in G, K_{i'} >= k} G_{i',k} + eps)

    This is the policy-gradient reading of step rewards (a step is credited with what follows from it, as in
    DeepSeekMath's process supervision), where [`step_advantages`] credits a step with the progress made up to it. A
    step that sets up a later breakthrough shares its gain; a wrong step after a right one is credited only with what
    follows it, so it gets negative credit when the group's other completions still gain from the same step index on.
    With watermark gains, G_{i,1} = h_{K_i} - h_0 is the trajectory MIG reward, so when every completion of a group has
    at least one step, step 1's credit equals the trajectory credit. Masking, missing values and the zero-credit cases
    are those of [`step_advantages`].

    Args:
        gains (`torch.Tensor` of shape `(N, K)`): per-step rewards, the `group_size` completions of a prompt adjacent;
            values past a completion's own step count are ignored. NaN marks a completion without usable likelihoods:
            it gets 0 and is left out of the statistics.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i, the steps of each completion.
        group_size (`int`): completions per prompt (G).
        scale (`str`): `"group"`, `"batch"` or `"none"`, as in [`step_advantages`].
        eps (`float`): added to the std.

    Returns:
        `torch.Tensor` of shape `(N, K)`: credit per step, 0 past K_i.
    """
    gains, valid = _valid_steps(gains, num_steps, group_size, scale, "return_to_go_advantages")
    # gains past K_i are zeroed, so the reversed cumulative sum from the end is the sum over steps k..K_i
    to_go = gains.flip(1).cumsum(1).flip(1)
    return _masked_step_normalise(to_go, valid, group_size, scale, eps)


STEP_CREDITS = {"step": step_advantages, "return_to_go": return_to_go_advantages}


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
    [`step_advantages`], or `credit="return_to_go"`, [`return_to_go_advantages`]). The trainer calls it on the groups
    gathered from every process, `trl-mig inspect` on one group, so both give the same credit.

    Args:
        gains (`torch.Tensor` of shape `(N, K)`): per-step MIG rewards, 0 past a completion's own steps, the
            `group_size` completions of a prompt adjacent.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i, the steps of each completion.
        scorable (`torch.Tensor` of shape `(N,)`, bool): completions with a ground truth and finite likelihoods; the
            others carry no MIG information: advantage 0, and left out of their group's statistics.
        group_size (`int`): completions per prompt (G).
        credit (`str`): `"trajectory"`, `"step"` or `"return_to_go"`, as `mig_credit`.
        scale (`str`): `"group"`, `"batch"` or `"none"`, as `mig_scale_rewards`.

    Returns:
        `torch.Tensor` of shape `(N,)` for trajectory credit, `(N, K)` for per-step credit.
    """
    scorable = scorable.to(device=gains.device, dtype=torch.bool)
    if credit in STEP_CREDITS:
        unusable = gains.masked_fill(~scorable.unsqueeze(1), float("nan"))
        return STEP_CREDITS[credit](unusable, num_steps, group_size, scale)
    if credit != "trajectory":
        raise ValueError(f"Unknown MIG credit {credit!r}; expected 'trajectory', 'step' or 'return_to_go'.")
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


def outcome_advantages(
    rewards_per_func: torch.Tensor,
    group_size: int,
    reward_weights=None,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    GRPO's outcome advantage, as `GRPOTrainer._generate_and_score_completions` (TRL 1.16) computes it, from the
    rewards of every reward function:

    - `"sum_then_normalize"`: `r_i = sum_f w_f r_{i,f}`, then `A_i = (r_i - mean_G r) / (std + 1e-4)` with the std of
      the group (`scale_rewards="group"`) or of the batch (`"batch"`), or `A_i = r_i - mean_G r` (`"none"`).
    - `"normalize_then_sum"`: each function's reward is normalised within the group first,
      `n_{i,f} = (r_{i,f} - mean_G r_f) / (std_G r_f + 1e-4)`, then `r_i = sum_f w_f n_{i,f}` and
      `A_i = (r_i - mean r) / (std r + 1e-4)` over the whole batch; `scale_rewards` plays no part.

    A reward function that returns None gives NaN: it is left out of the sums and statistics. A completion for which
    every function returned None has no reward (NaN) and advantage 0; so has any other NaN advantage (a group with a
    single valid reward).

    Args:
        rewards_per_func (`torch.Tensor` of shape `(N, F)`): the reward of each of the F functions for the N
            completions of the batch, gathered from every process (the `group_size` completions of a prompt adjacent),
            as `GRPOTrainer._calculate_rewards` returns them.
        group_size (`int`): completions per prompt (G).
        reward_weights (sequence of `float` or `torch.Tensor` of shape `(F,)`, *optional*): w_f; default all 1.
        scale_rewards (`str` or `bool`): `"group"` (or True), `"batch"` or `"none"` (or False).
        multi_objective_aggregation (`str`): `"sum_then_normalize"` or `"normalize_then_sum"`.

    Returns:
        rewards (`torch.Tensor` of shape `(N,)`): the weighted sum of the rewards (what TRL logs as `reward`), NaN for
            a completion without any reward.
        advantages (`torch.Tensor` of shape `(N,)`): the outcome advantage A_out.
    """
    if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards_per_func must have shape (N, F) with N a multiple of group_size ({group_size}), got "
            f"{tuple(rewards_per_func.shape)}."
        )
    scale = SCALE_REWARDS_ALIASES[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; expected 'group', 'batch' or 'none' (or a bool).")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"Unknown multi_objective_aggregation {multi_objective_aggregation!r}; expected one of "
            f"{MULTI_OBJECTIVE_AGGREGATIONS}."
        )
    rewards_per_func = rewards_per_func if rewards_per_func.is_floating_point() else rewards_per_func.float()
    num_funcs = rewards_per_func.shape[1]
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=torch.float32, device=rewards_per_func.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=torch.float32).to(rewards_per_func.device).reshape(-1)
    if weights.numel() != num_funcs:
        raise ValueError(f"reward_weights has {weights.numel()} weights for {num_funcs} reward functions.")

    # nansum would give a completion without any reward 0, a spurious reward that moves its group's baseline
    unrewarded = torch.isnan(rewards_per_func).all(dim=1)
    no_reward = torch.tensor(float("nan"), device=rewards_per_func.device)
    weighted = torch.where(unrewarded, no_reward, (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1))
    if multi_objective_aggregation == "sum_then_normalize":
        grouped = weighted.view(-1, group_size)
        baseline = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
        advantages = weighted - baseline
        if scale == "group":
            # one completion per group (evaluation with num_generations_eval=1) has no spread: std 0, as in TRL
            std = (
                nanstd(grouped, dim=1).repeat_interleave(group_size)
                if group_size > 1
                else torch.zeros_like(weighted)
            )
            advantages = advantages / (std + GRPO_EPS)
        elif scale == "batch":
            std = nanstd(weighted).expand_as(weighted) if weighted.numel() > 1 else torch.zeros_like(weighted)
            advantages = advantages / (std + GRPO_EPS)
    else:
        per_func = rewards_per_func.view(-1, group_size, num_funcs)
        func_mean = torch.nanmean(per_func, dim=1, keepdim=True)
        func_std = nanstd(per_func, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(func_mean)
        normalised = ((per_func - func_mean) / (func_std + GRPO_EPS)).view(-1, num_funcs)
        aggregated = torch.where(unrewarded, no_reward, (normalised * weights.unsqueeze(0)).nansum(dim=1))
        std = nanstd(aggregated).expand_as(aggregated) if aggregated.numel() > 1 else torch.zeros_like(aggregated)
        advantages = (aggregated - torch.nanmean(aggregated)) / (std + GRPO_EPS)
    return weighted, torch.nan_to_num(advantages, nan=0.0)


def correctness_reward_index(reward_names, wanted: str | None = None) -> int | None:
    """
    Which outcome reward says a completion is correct (gated SFT's factual gate, `mig_failure_scaling`): the one named
    `wanted` (`sft_correctness_reward`), or, when None, the first whose name contains `"accuracy"`.

    Args:
        reward_names (sequence of `str`): the reward functions' names, in the order of the columns of
            `rewards_per_func` (`GRPOTrainer.reward_func_names`).
        wanted (`str`, *optional*): the name asked for.

    Returns:
        The column index, or None when nothing is asked for and no name contains `"accuracy"` (the caller decides
        whether that is an error).

    Raises:
        ValueError: `wanted` is not among the names.
    """
    names = list(reward_names)
    if wanted is not None:
        if wanted not in names:
            raise ValueError(
                f"MIGConfig.sft_correctness_reward={wanted!r} is not one of the reward functions {names}."
            )
        return names.index(wanted)
    return next((index for index, name in enumerate(names) if "accuracy" in name), None)


def group_failure_rates(correctness: torch.Tensor, group_size: int, threshold: float = 1.0) -> torch.Tensor:
    r"""
    The failure rate of each completion's group: the fraction of the group's completions that are not correct,

        f_i = (1/G) sum_{i' in group(i)} [not (c_{i'} >= threshold)]

    A completion is correct when its correctness reward is at least `threshold`, as in gated SFT; a missing reward
    (NaN, a reward function that returned None) counts as not correct, as it does there.

    Args:
        correctness (`torch.Tensor` of shape `(N,)`): the correctness reward of every completion, the `group_size`
            completions of a prompt adjacent.
        group_size (`int`): completions per prompt (G).
        threshold (`float`): `sft_correctness_threshold`.

    Returns:
        `torch.Tensor` of shape `(N,)`: f_i in [0, 1], the same for every completion of a group.
    """
    if correctness.dim() != 1 or correctness.numel() % group_size != 0:
        raise ValueError(
            f"group_failure_rates needs a 1-D tensor whose length ({correctness.numel()}) is a multiple of group_size "
            f"({group_size})."
        )
    correctness = correctness if correctness.is_floating_point() else correctness.float()
    correct = torch.nan_to_num(correctness, nan=float("-inf")) >= threshold
    return (~correct).to(correctness.dtype).view(-1, group_size).mean(1).repeat_interleave(group_size)


@dataclass(frozen=True)
class Credit:
    """
    The credit of a batch, as [`compose_credit`] composes it. N completions, K steps, T completion tokens.

    Attributes:
        outcome_rewards (`torch.Tensor` of shape `(N,)`): weighted sum of the outcome rewards, NaN without any.
        outcome_advantages (`torch.Tensor` of shape `(N,)`): GRPO's outcome advantage A_out.
        mig_rewards (`torch.Tensor` of shape `(N,)`): sum of the per-step MIG rewards, NaN where not scorable.
        trajectory_mig_advantages (`torch.Tensor` of shape `(N,)`): A_mig, the normalised `mig_rewards` times
            `mig_scale` (the trainer logs it as `mig_advantage` whatever `mig_credit` is).
        mig_advantages (`torch.Tensor` of shape `(N,)` or `(N, K)`): the MIG credit used, times `mig_scale`:
            `trajectory_mig_advantages`, or per step (`mig_credit="step"` or `"return_to_go"`).
        mig_scale (`torch.Tensor` of shape `(N,)`): the factor the MIG advantages were multiplied by: the group's
            failure rate to the power `mig_failure_scaling`, 1 when that is 0 (off).
        advantages (`torch.Tensor` of shape `(N, T)`, or `(N,)` for a sequence-level loss): what the loss is given.
    """

    outcome_rewards: torch.Tensor
    outcome_advantages: torch.Tensor
    mig_rewards: torch.Tensor
    trajectory_mig_advantages: torch.Tensor
    mig_advantages: torch.Tensor
    mig_scale: torch.Tensor
    advantages: torch.Tensor

    def rows(self, index) -> Credit:
        """The same credit for some completions only (`index`: a slice, or indices along N), e.g. one process's."""
        return Credit(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def compose_credit(
    rewards_per_func: torch.Tensor,
    gains: torch.Tensor,
    num_steps: torch.Tensor,
    scorable: torch.Tensor,
    step_ids: torch.Tensor | None,
    group_size: int,
    *,
    reward_weights=None,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    mig_weight: float = 1.0,
    outcome_weight: float = 1.0,
    mig_credit: str = "trajectory",
    mig_scale_rewards: str = "group",
    mig_token_scope: str = "cot",
    token_level: bool = True,
    mig_failure_scaling: float = 0.0,
    correctness_index: int | None = None,
    correctness_threshold: float = 1.0,
) -> Credit:
    r"""
    Outcome and MIG credit of whole groups, combined into the advantages the GRPO loss is given:

        A[i,t] = outcome_weight * A_out_i + mig_weight * s_i * A_mig[i, step(t)] * M_cot[i,t],   s_i = f_i ** p

    A_out is GRPO's outcome advantage with every option of TRL's that changes it ([`outcome_advantages`]); A_mig the
    MIG advantage ([`mig_advantages`]); the masking is [`per_token_advantages`]. s_i scales the MIG advantage by the
    failure rate f_i of the completion's group ([`group_failure_rates`]) to the power p = `mig_failure_scaling`: MIG
    credit where most samples fail, less as the outcome reward starts to separate completions; p = 0 (the default)
    gives s = 1. The trainer calls it on the batch
    gathered from every process (as TRL normalises rewards) and keeps its own rows ([`Credit.rows`]);
    `trl-mig inspect` calls it on one group, so both show the same numbers.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(N, F)`): outcome rewards per reward function, NaN for None; the
            `group_size` completions of a prompt adjacent.
        gains (`torch.Tensor` of shape `(N, K)`): per-step MIG rewards (`step_gains`), 0 past a completion's steps.
        num_steps (`torch.Tensor` of shape `(N,)`): K_i, the steps of each completion.
        scorable (`torch.Tensor` of shape `(N,)`, bool): completions with a ground truth and finite likelihoods.
        step_ids (`torch.Tensor` of shape `(N, T)`, *optional*): step of each completion token, `NOT_COT` outside
            the thought (`step_ids_tensor`); unused (may be None) when `token_level=False`.
        group_size (`int`): completions per prompt (G).
        reward_weights, scale_rewards, multi_objective_aggregation: TRL's (`GRPOConfig`; the trainer passes its
            `reward_weights` tensor, which has a weight for an environment's reward too).
        mig_weight (`float`): alpha. outcome_weight (`float`): beta.
        mig_credit (`str`), mig_scale_rewards (`str`), mig_token_scope (`str`): as in `MIGConfig`.
        token_level (`bool`): False for a loss that takes one advantage per completion (e.g. GMPO's geometric mean):
            `advantages` is then `(N,)`, `outcome_weight * A_out + mig_weight * s * A_mig`, which is what
            `mig_token_scope="all"` gives every token; it needs `mig_credit="trajectory"` and
            `mig_token_scope="all"`.
        mig_failure_scaling (`float`): p, as in `MIGConfig`; 0 turns the scaling off.
        correctness_index (`int`, *optional*): the column of `rewards_per_func` that says a completion is
            correct ([`correctness_reward_index`]); needed when `mig_failure_scaling > 0`.
        correctness_threshold (`float`): correct when that reward is at least this (`sft_correctness_threshold`).

    Returns:
        A [`Credit`].
    """
    rows = rewards_per_func.shape[0]
    if gains.dim() != 2 or gains.shape[0] != rows or num_steps.shape != (rows,) or scorable.shape != (rows,):
        raise ValueError(
            f"compose_credit needs one row per completion: rewards_per_func has {rows} rows, gains shape "
            f"{tuple(gains.shape)}, num_steps {tuple(num_steps.shape)}, scorable {tuple(scorable.shape)}."
        )
    outcome_rewards, outcome_adv = outcome_advantages(
        rewards_per_func, group_size, reward_weights, scale_rewards, multi_objective_aggregation
    )
    scorable = scorable.to(device=gains.device, dtype=torch.bool)
    gains = gains if gains.is_floating_point() else gains.float()
    mig_rewards = torch.where(scorable, gains.sum(1), gains.new_full((rows,), float("nan")))
    trajectory_adv = mig_advantages(gains, num_steps, scorable, group_size, "trajectory", mig_scale_rewards)
    if mig_credit == "trajectory":
        mig_adv = trajectory_adv
    else:
        mig_adv = mig_advantages(gains, num_steps, scorable, group_size, mig_credit, mig_scale_rewards)
    mig_scale = _failure_scale(rewards_per_func, group_size, mig_failure_scaling, correctness_index,
                               correctness_threshold).to(gains.device)
    trajectory_adv = trajectory_adv * mig_scale
    mig_adv = mig_adv * (mig_scale if mig_adv.dim() == 1 else mig_scale.unsqueeze(1))
    outcome_adv = outcome_adv.to(gains.device)
    if token_level:
        if step_ids is None or step_ids.dim() != 2 or step_ids.shape[0] != rows:
            raise ValueError(
                f"compose_credit with token_level=True needs step_ids of shape (N={rows}, T), got "
                f"{None if step_ids is None else tuple(step_ids.shape)}."
            )
        advantages = per_token_advantages(
            outcome_adv, mig_adv, step_ids.to(gains.device), mig_weight, outcome_weight, scope=mig_token_scope
        )
    else:
        if mig_credit != "trajectory" or mig_token_scope != "all":
            raise ValueError(
                "One advantage per completion (token_level=False) cannot limit MIG credit to the chain of thought or "
                f"to steps: needs mig_token_scope='all' and mig_credit='trajectory' (got {mig_token_scope!r} and "
                f"{mig_credit!r})."
            )
        advantages = outcome_weight * outcome_adv + mig_weight * mig_adv
    return Credit(
        outcome_rewards=outcome_rewards,
        outcome_advantages=outcome_adv,
        mig_rewards=mig_rewards,
        trajectory_mig_advantages=trajectory_adv,
        mig_advantages=mig_adv,
        mig_scale=mig_scale,
        advantages=advantages,
    )


def _failure_scale(rewards_per_func, group_size, exponent, correctness_index, threshold) -> torch.Tensor:
    """`(N,)` factors of the MIG advantages: the group failure rate to the power `exponent`, all 1 when it is 0."""
    rows = rewards_per_func.shape[0]
    if not isinstance(exponent, (int, float)) or not math.isfinite(exponent) or exponent < 0:
        raise ValueError(f"mig_failure_scaling must be a finite number >= 0, got {exponent!r}.")
    if exponent == 0:
        return torch.ones(rows, dtype=torch.float32, device=rewards_per_func.device)
    if correctness_index is None:
        raise ValueError(
            f"mig_failure_scaling={exponent} scales MIG credit by the share of wrong answers, which needs the reward "
            "that says a completion is correct: pass correctness_index (the trainer takes it from "
            "MIGConfig.sft_correctness_reward, or the first reward whose name contains 'accuracy')."
        )
    if not -rewards_per_func.shape[1] <= correctness_index < rewards_per_func.shape[1]:
        raise ValueError(
            f"correctness_index={correctness_index} is not a column of rewards_per_func "
            f"({rewards_per_func.shape[1]} reward functions)."
        )
    rates = group_failure_rates(rewards_per_func[:, correctness_index].float(), group_size, threshold)
    return rates**exponent


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
