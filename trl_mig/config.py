"""`MIGConfig`: every `GRPOConfig` option, plus the MIG fields."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields

from trl import GRPOConfig

CREDIT_MODES = ("trajectory", "step")
GAIN_KINDS = ("watermark", "difference")
TOKEN_SCOPES = ("cot", "all")
MIG_SCALINGS = ("group", "batch", "none")
LIKELIHOOD_MODELS = ("policy", "reference")
STEP_FALLBACKS = ("paragraph", "line", "none")
SCORING_METHODS = ("auto", "block", "prefix")
ANSWER_MATCHES = ("math", "exact")
TURN_STEP_MODES = ("auto", "always", "never")


@dataclass
class MIGConfig(GRPOConfig):
    r"""
    Configuration of [`MIGGRPOTrainer`]. It accepts every [`~trl.GRPOConfig`] option and adds the fields below.

    Ground truth and format:
        solution_column (`str`, defaults to `"solution"`): dataset column holding the ground-truth answer `y*`,
            a string or a list of accepted variants.
        think_open_tag / think_close_tag (`str`, defaults to `"<think>"` / `"</think>"`): the chain-of-thought tags.
            The open tag may live in the prompt (chat templates that pre-fill it); only the close tag is then in the
            completion.
        step_pattern (`str`, defaults to `r"#+[ \t]*Step[ \t]*\d+"`): regex of a step header. Each match starts a step.
        step_fallback (`str`, defaults to `"paragraph"`): how a chain of thought without any step header is split:
            `"paragraph"` at blank lines, `"line"` at line breaks, `"none"` keeps it as one step.
        answer_pattern (`str`, defaults to `r"<answer>(.*?)</answer>"`): regex whose first group is the final answer,
            searched after the chain of thought. Used by the structural gate of gated SFT and by the built-in rewards.
        answer_match (`str`, defaults to `"math"`): how the built-in rewards, the gated SFT's default correctness
            check and the accuracy evaluation compare an answer with the ground truth: `"math"` (math-verify, falling
            back to exact text when either side does not parse) or `"exact"` (text equal up to whitespace; for answers
            math-verify would read as one number, e.g. a list of values).
        mig_scaffold (`str`, defaults to `"\n</think>\n<answer>"`): text teacher-forced between a step prefix and the
            answer: it closes the thought and opens the answer.
        mig_max_steps (`int`, defaults to `16`): cap on steps per completion; extra steps are merged into evenly sized
            groups of consecutive steps.

    Loss:
        mig_weight (`float`, defaults to `1.0`): α, weight of the MIG advantage (chain-of-thought tokens only).
        outcome_weight (`float`, defaults to `1.0`): β, weight of the GRPO outcome advantage (all completion tokens).
        sft_weight (`float`, defaults to `0.1`): γ, weight of the gated SFT loss (`0` disables it).
        mig_credit (`str`, defaults to `"trajectory"`): `"trajectory"` (paper) gives every CoT token the normalised
            trajectory gain; `"step"` gives the tokens of step k the progress made by step k (sum of gains up to k)
            compared with the group's completions at the same step index (see [`step_advantages`]).
        mig_gain (`str`, defaults to `"watermark"`): per-step reward: `"watermark"` (the method's rectified gains
            over the running maximum) or `"difference"` (raw l_k - l_{k-1}, an ablation).
        mig_token_scope (`str`, defaults to `"cot"`): tokens that receive the MIG advantage: `"cot"` (the method's
            decoupled mask, chain of thought only) or `"all"` (every completion token, an ablation).
        mig_scale_rewards (`str`, defaults to `"group"`): normalisation of the MIG reward, as GRPO's `scale_rewards`:
            `"group"`, `"batch"` or `"none"` (centred only).
        sft_correctness_reward (`str` or `None`, defaults to `None`): name of the reward function that says a
            completion is correct (the factual gate). `None` picks the first reward function whose name contains
            `"accuracy"`; when there is none, gated SFT is off (one warning, `sft/enabled` logged as 0). A name that
            is not among the reward functions is an error.
        sft_correctness_threshold (`float`, defaults to `1.0`): a completion is correct when that reward is at least
            this value.

    Scoring:
        mig_likelihood_model (`str`, defaults to `"policy"`): which model scores the step-conditioned likelihoods:
            `"policy"` (with LoRA: adapters on) or `"reference"` (the reference model, or the adapter-free base).
        mig_scoring_method (`str`, defaults to `"auto"`): `"block"` scores all K+1 prefixes of a completion in one
            forward with a block attention mask; `"prefix"` scores each prefix as its own batched row; `"auto"` uses
            `"block"` when the attention implementation takes custom 4-D masks (sdpa, eager), else `"prefix"`.
        mig_scoring_batch_size (`int`, defaults to `8`): rows per scoring forward; bounds the scoring pass's memory.

    Agent trajectories (docs/agents.md):
        mig_turn_steps (`str`, defaults to `"auto"`): how a multi-turn completion (TRL `tools`, `environment_factory`,
            or a `rollout_func` that returns an `env_mask`) is cut into steps. `"auto"`: when the batch carries TRL's
            `tool_mask`, every model turn followed by a tool or environment response is a step whose prefix ends after
            that response, and the response tokens get no credit (see [`segment_turns`]); without a mask, text steps.
            `"always"`: the same, but a batch without a `tool_mask` is an error (catches a `rollout_func` that forgot
            its `env_mask`). `"never"`: text steps only, tool results read as chain of thought (an ablation).

    Inspection:
        mig_inspect_html (`bool`, defaults to `False`): whenever the trainer logs (every `logging_steps`), write
            `OUTPUT_DIR/mig_inspect/step_<global step>.html`: the completions of the latest generation batch with
            their steps shaded by gain (see [`inspect_completion`]). With `log_completions=True` the completions
            table carries the per-step `mig_loglik` (l_0..l_K) and `mig_gains` (g_1..g_K) columns either way.
    """

    solution_column: str = field(
        default="solution",
        metadata={"help": "Dataset column with the ground-truth answer (a string or a list of accepted variants)."},
    )
    think_open_tag: str = field(
        default="<think>",
        metadata={"help": "Tag that opens the chain of thought. It may be in the prompt instead of the completion."},
    )
    think_close_tag: str = field(default="</think>", metadata={"help": "Tag that closes the chain of thought."})
    step_pattern: str = field(
        default=r"#+[ \t]*Step[ \t]*\d+",
        metadata={"help": "Regular expression of a step header; each match starts a new step."},
    )
    step_fallback: str = field(
        default="paragraph",
        metadata={
            "help": "Segmentation of a chain of thought that has no step header: 'paragraph' (split at blank lines), "
            "'line' (split at line breaks) or 'none' (one step).",
            "choices": list(STEP_FALLBACKS),
        },
    )
    answer_pattern: str = field(
        default=r"<answer>(.*?)</answer>",
        metadata={"help": "Regular expression whose first group is the final answer, searched after the thought."},
    )
    answer_match: str = field(
        default="math",
        metadata={
            "help": "How answers are compared with the ground truth by the built-in rewards and the accuracy eval: "
            "'math' (math-verify) or 'exact' (text equal up to whitespace).",
            "choices": list(ANSWER_MATCHES),
        },
    )
    mig_scaffold: str = field(
        default="\n</think>\n<answer>",
        metadata={"help": "Text teacher-forced between a step prefix and the answer (closes thought, opens answer)."},
    )
    mig_max_steps: int = field(
        default=16,
        metadata={"help": "Maximum steps per completion; more are merged into evenly sized groups of steps."},
    )
    mig_weight: float = field(
        default=1.0, metadata={"help": "Weight alpha of the MIG advantage, applied to chain-of-thought tokens only."}
    )
    outcome_weight: float = field(
        default=1.0, metadata={"help": "Weight beta of the GRPO outcome advantage, applied to all completion tokens."}
    )
    sft_weight: float = field(
        default=0.1, metadata={"help": "Weight gamma of the gated SFT loss on correct, breakthrough completions."}
    )
    mig_credit: str = field(
        default="trajectory",
        metadata={
            "help": "'trajectory': every CoT token gets the normalised trajectory gain (paper). 'step': the tokens of "
            "step k get the progress made by step k, compared with the group's completions at the same step.",
            "choices": list(CREDIT_MODES),
        },
    )
    mig_gain: str = field(
        default="watermark",
        metadata={
            "help": "Per-step MIG reward: 'watermark' (rectified gain over the running maximum, the method) or "
            "'difference' (raw l_k - l_{k-1}, an ablation).",
            "choices": list(GAIN_KINDS),
        },
    )
    mig_token_scope: str = field(
        default="cot",
        metadata={
            "help": "Tokens that get the MIG advantage: 'cot' (chain of thought only, the method) or 'all' (every "
            "completion token, an ablation).",
            "choices": list(TOKEN_SCOPES),
        },
    )
    mig_scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Normalisation of the MIG reward, like `scale_rewards`: 'group', 'batch' or 'none'.",
            "choices": list(MIG_SCALINGS),
        },
    )
    sft_correctness_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reward function that marks a completion correct for gated SFT. Default: the first "
            "reward function whose name contains 'accuracy'; without one, gated SFT is off (with a warning)."
        },
    )
    sft_correctness_threshold: float = field(
        default=1.0, metadata={"help": "A completion is correct when the correctness reward is at least this."}
    )
    mig_likelihood_model: str = field(
        default="policy",
        metadata={
            "help": "Model that scores the step-conditioned likelihoods: 'policy' or 'reference'.",
            "choices": list(LIKELIHOOD_MODELS),
        },
    )
    mig_scoring_method: str = field(
        default="auto",
        metadata={
            "help": "'block' (one forward per completion, block attention mask), 'prefix' (one row per prefix) or "
            "'auto' (block when the attention implementation takes a custom 4-D mask).",
            "choices": list(SCORING_METHODS),
        },
    )
    mig_scoring_batch_size: int = field(
        default=8, metadata={"help": "Rows per scoring forward pass; bounds the memory of the scoring pass."}
    )
    mig_inspect_html: bool = field(
        default=False,
        metadata={
            "help": "Write OUTPUT_DIR/mig_inspect/step_<N>.html whenever the trainer logs: the latest generation "
            "batch's completions, each prompt's group side by side, steps shaded by their MIG gain, with l_k, h_k and "
            "g_k on hover (the page `trl-mig inspect` writes)."
        },
    )
    mig_turn_steps: str = field(
        default="auto",
        metadata={
            "help": "Steps of multi-turn (tool / environment) completions: 'auto' (each model turn followed by a "
            "tool or environment response is a step, its prefix ends after the response, when the batch has a "
            "tool_mask), 'always' (the same, and a batch without a tool_mask is an error) or 'never' (text steps).",
            "choices": list(TURN_STEP_MODES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        validate_mig_fields(self)


def mig_field_names() -> tuple[str, ...]:
    """The fields MIGConfig adds to GRPOConfig."""
    inherited = {f.name for f in fields(GRPOConfig)}
    return tuple(f.name for f in fields(MIGConfig) if f.name not in inherited)


def _choice(config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"MIGConfig.{name}={value!r} is not one of {list(choices)}.")


def _compile(config, name: str) -> re.Pattern:
    pattern = getattr(config, name)
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"MIGConfig.{name} must be a non-empty regular expression, got {pattern!r}.")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"MIGConfig.{name}={pattern!r} is not a valid regular expression: {err}.") from None
    if compiled.fullmatch(""):
        raise ValueError(f"MIGConfig.{name}={pattern!r} matches the empty string, so it would match everywhere.")
    return compiled


def validate_mig_fields(config) -> None:
    """Raise a `ValueError` naming the field for every invalid MIG setting."""
    for name in ("mig_weight", "outcome_weight", "sft_weight"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"MIGConfig.{name} must be a finite number >= 0, got {value!r}.")
    if config.mig_weight == 0 and config.outcome_weight == 0:
        raise ValueError("MIGConfig.mig_weight and MIGConfig.outcome_weight are both 0: no token gets an advantage.")
    _choice(config, "mig_credit", CREDIT_MODES)
    _choice(config, "mig_gain", GAIN_KINDS)
    _choice(config, "mig_token_scope", TOKEN_SCOPES)
    _choice(config, "mig_scale_rewards", MIG_SCALINGS)
    _choice(config, "mig_likelihood_model", LIKELIHOOD_MODELS)
    _choice(config, "step_fallback", STEP_FALLBACKS)
    _choice(config, "mig_scoring_method", SCORING_METHODS)
    _choice(config, "answer_match", ANSWER_MATCHES)
    if hasattr(config, "mig_turn_steps"):  # the settings of `trl-mig inspect`, which reads text only, have none
        _choice(config, "mig_turn_steps", TURN_STEP_MODES)
    _compile(config, "step_pattern")
    if _compile(config, "answer_pattern").groups < 1:
        raise ValueError(
            f"MIGConfig.answer_pattern={config.answer_pattern!r} needs a capture group around the answer, "
            r"e.g. r'<answer>(.*?)</answer>'."
        )
    for name in ("think_close_tag", "solution_column"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ValueError(f"MIGConfig.{name} must be a non-empty string, got {getattr(config, name)!r}.")
    if not isinstance(config.think_open_tag, str):
        raise ValueError(f"MIGConfig.think_open_tag must be a string, got {config.think_open_tag!r}.")
    if not isinstance(config.mig_scaffold, str) or not config.mig_scaffold:
        raise ValueError(
            f"MIGConfig.mig_scaffold must be a non-empty string (it closes the thought and opens the answer), "
            f"got {config.mig_scaffold!r}."
        )
    if "{answer}" in config.mig_scaffold:
        raise ValueError(
            "MIGConfig.mig_scaffold is the text placed before the answer and has no answer slot: remove '{answer}' "
            f"from {config.mig_scaffold!r}."
        )
    for name in ("mig_max_steps", "mig_scoring_batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"MIGConfig.{name} must be an integer >= 1, got {value!r}.")
    if not isinstance(config.sft_correctness_threshold, (int, float)) or not math.isfinite(
        config.sft_correctness_threshold
    ):
        raise ValueError(
            f"MIGConfig.sft_correctness_threshold must be a finite number, got {config.sft_correctness_threshold!r}."
        )
    if config.remove_unused_columns:
        raise ValueError(
            "MIGConfig.remove_unused_columns=True would drop the ground-truth column "
            f"{config.solution_column!r} that MIG scores; set it to False."
        )


@functools.lru_cache(maxsize=None)
def mig_config_class(base_config: type[GRPOConfig]) -> type[MIGConfig]:
    """
    The MIG twin of a GRPOConfig subclass (e.g. a TRL experimental variant's config): a dataclass with the base's
    fields and defaults plus MIG's fields, validated like [`MIGConfig`]. [`MIGConfig`] itself for `GRPOConfig`; the
    same class every time for the same base.
    """
    if not (isinstance(base_config, type) and issubclass(base_config, GRPOConfig)):
        raise TypeError(f"mig_config_class needs a subclass of trl.GRPOConfig, got {base_config!r}.")
    if issubclass(base_config, MIGConfig):
        return base_config
    if base_config is GRPOConfig:
        return MIGConfig
    # the base comes first so that its defaults win over the GRPOConfig defaults MIGConfig carries
    twin = type(
        f"MIG{base_config.__name__}",
        (base_config, MIGConfig),
        {"__module__": __name__, "__doc__": f"[`{base_config.__name__}`] plus the MIGConfig fields."},
    )
    return dataclass(twin)
