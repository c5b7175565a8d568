"""`MIGSettings`: every MIG setting, declared and validated once; `MIGConfig`: every `GRPOConfig` option plus them."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import MISSING, Field, dataclass, field, fields

from trl import GRPOConfig

CREDIT_MODES = ("trajectory", "step", "return_to_go")
GAIN_KINDS = ("watermark", "difference")
TOKEN_SCOPES = ("cot", "all")
MIG_SCALINGS = ("group", "batch", "none")
LIKELIHOOD_MODELS = ("policy", "reference")
STEP_FALLBACKS = ("paragraph", "line", "none")
SCORING_METHODS = ("auto", "block", "prefix")
ANSWER_MATCHES = ("math", "exact", "last")
TURN_STEP_MODES = ("auto", "always", "never")
# a Markdown step header: "### Step 1", "## Step 2", "#Step3"
DEFAULT_STEP_PATTERN = r"#+[ \t]*Step[ \t]*\d+"


@dataclass
class MIGSettings:
    r"""
    Every MIG setting, declared once: [`MIGConfig`] adds these fields to [`~trl.GRPOConfig`], and [`FormatSpec`],
    [`CreditSettings`] and the `trl-mig eval` / `trl-mig inspect` arguments are derived from them. Construction
    validates every field (`ValueError` naming the field).

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
            back to exact text when either side does not parse), `"exact"` (text equal up to whitespace; for answers
            math-verify would read as one number, e.g. a list of values) or `"last"` (the last whitespace-separated
            values equal: a list of values scored on its final value).
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
            compared with the group's completions at the same step index (see [`step_advantages`]);
            `"return_to_go"` gives them the gains of step k and every later step (sum of gains from k on), compared
            the same way (see [`return_to_go_advantages`]).
        mig_failure_scaling (`float`, defaults to `0.0`): exponent p: the MIG advantage of a group's completions is
            multiplied by f ** p, f the fraction of the group's completions that are not correct (the correctness
            reward below `sft_correctness_threshold`, see [`group_failure_rates`]). `0` is off; `1` scales linearly.
            With p > 0 a correctness reward is required (`sft_correctness_reward`, or a reward whose name contains
            `"accuracy"`); without one, construction fails.
        mig_gain (`str`, defaults to `"watermark"`): per-step reward: `"watermark"` (the method's rectified gains
            over the running maximum) or `"difference"` (raw l_k - l_{k-1}, an ablation).
        mig_token_scope (`str`, defaults to `"cot"`): tokens that receive the MIG advantage: `"cot"` (the method's
            decoupled mask, chain of thought only) or `"all"` (every completion token, an ablation).
        mig_scale_rewards (`str`, defaults to `"group"`): normalisation of the MIG reward, as GRPO's `scale_rewards`:
            `"group"`, `"batch"` or `"none"` (centred only).
        sft_correctness_reward (`str` or `None`, defaults to `None`): name of the reward function that says a
            completion is correct (the factual gate of gated SFT, and the failure rate of `mig_failure_scaling`).
            `None` picks the first reward function whose name contains `"accuracy"`; when there is none, gated SFT is
            off (one warning, `sft/enabled` logged as 0) and `mig_failure_scaling > 0` is an error. A name that is
            not among the reward functions is an error.
        sft_correctness_threshold (`float`, defaults to `1.0`): a completion is correct when that reward is at least
            this value.

    Scoring:
        mig_likelihood_model (`str`, defaults to `"policy"`): which model scores the step-conditioned likelihoods:
            `"policy"` (with LoRA: adapters on) or `"reference"` (the reference model, or the adapter-free base).
        mig_scoring_method (`str`, defaults to `"auto"`): `"block"` scores all K+1 prefixes of a completion in one
            forward with a block attention mask; `"prefix"` scores each prefix as its own batched row; `"auto"` uses
            `"block"` when the attention implementation takes custom 4-D masks (sdpa, eager), else `"prefix"`.
        mig_scoring_batch_size (`int`, defaults to `8`): rows per scoring forward; bounds the scoring pass's memory.
        mig_fuse_scoring (`bool`, defaults to `True`): reuse work TRL does anyway instead of a forward over prompt +
            completion of MIG's own. When TRL runs its own no-gradient forward over the completions (old log-probs:
            vLLM importance-sampling correction, or generation not aligned with optimizer steps, e.g.
            `num_iterations` > 1; reference log-probs when `beta` > 0 and `mig_likelihood_model="reference"`), the
            scoring pass computes those log-probs too, with as many rows per forward as TRL's (at least
            `mig_scoring_batch_size`), and TRL's forward is skipped. Otherwise, when transformers' `generate` sampled
            the completions with the policy (no vLLM or tools; a `rollout_func` qualifies if it generated from the
            same prompts: the cached tokens are checked), only the answer copies run, against generation's
            key/value cache. Where neither applies (prefix scoring, no TRL fused LM head, post-processed logits,
            multimodal prompts for the cache, an overridden `step_log_likelihoods`) MIG runs its own pass.

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
        default=DEFAULT_STEP_PATTERN,
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
            "'math' (math-verify), 'exact' (text equal up to whitespace) or 'last' (the last whitespace-separated "
            "values equal: a list of values '3 7 9' scored on its final value).",
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
            "step k get the progress made by step k, compared with the group's completions at the same step. "
            "'return_to_go': the tokens of step k get the gains of step k and every later step, compared the same "
            "way.",
            "choices": list(CREDIT_MODES),
        },
    )
    mig_failure_scaling: float = field(
        default=0.0,
        metadata={
            "help": "Exponent p: the MIG advantage of a group is multiplied by (fraction of its completions that are "
            "not correct) ** p, correct meaning the correctness reward (sft_correctness_reward, default the first "
            "reward named *accuracy*) is >= sft_correctness_threshold. 0: off; 1: linear. p > 0 needs a "
            "correctness reward."
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
            "help": "Name of the reward function that marks a completion correct for gated SFT and "
            "mig_failure_scaling. Default: the first reward function whose name contains 'accuracy'; without one, "
            "gated SFT is off (with a warning) and mig_failure_scaling > 0 is an error."
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
    mig_fuse_scoring: bool = field(
        default=True,
        metadata={
            "help": "Reuse work TRL does anyway: when TRL runs its own no-gradient forward over the completions (old "
            "log-probs, or reference log-probs with mig_likelihood_model='reference'), compute them in MIG's scoring "
            "pass and skip TRL's; otherwise score only the answer copies against generation's key/value cache."
        },
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
        # cooperative: in MIGConfig the next class is GRPOConfig, whose own checks run before the MIG ones
        next_post_init = getattr(super(), "__post_init__", None)
        if next_post_init is not None:
            next_post_init()
        self.validate()

    @classmethod
    def from_config(cls, config=None, **overrides):
        """
        The settings of `config`: a `MIGConfig`, another settings object, the arguments of a command, or any object
        with some of the field names (the others keep their defaults); None gives the defaults. `overrides` win.
        Validated like a `MIGConfig`.
        """
        names = [f.name for f in fields(cls) if f.init]
        values = {name: getattr(config, name) for name in names if config is not None and hasattr(config, name)}
        return cls(**{**values, **overrides})

    def validate(self) -> None:
        """Raise a `ValueError` naming the field (`<class>.<field>`) for the first invalid setting."""
        owner = type(self).__name__
        for name in ("mig_weight", "outcome_weight", "sft_weight", "mig_failure_scaling"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}.")
        if self.mig_weight == 0 and self.outcome_weight == 0:
            raise ValueError(f"{owner}.mig_weight and {owner}.outcome_weight are both 0: no token gets an advantage.")
        for name, choices in (
            ("mig_credit", CREDIT_MODES),
            ("mig_gain", GAIN_KINDS),
            ("mig_token_scope", TOKEN_SCOPES),
            ("mig_scale_rewards", MIG_SCALINGS),
            ("mig_likelihood_model", LIKELIHOOD_MODELS),
            ("step_fallback", STEP_FALLBACKS),
            ("mig_scoring_method", SCORING_METHODS),
            ("answer_match", ANSWER_MATCHES),
            ("mig_turn_steps", TURN_STEP_MODES),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{owner}.{name}={value!r} is not one of {list(choices)}.")
        self._compiled_pattern("step_pattern")
        if self._compiled_pattern("answer_pattern").groups < 1:
            raise ValueError(
                f"{owner}.answer_pattern={self.answer_pattern!r} needs a capture group around the answer, "
                r"e.g. r'<answer>(.*?)</answer>'."
            )
        for name in ("think_close_tag", "solution_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name} must be a non-empty string, got {getattr(self, name)!r}.")
        if not isinstance(self.think_open_tag, str):
            raise ValueError(f"{owner}.think_open_tag must be a string, got {self.think_open_tag!r}.")
        if not isinstance(self.mig_scaffold, str) or not self.mig_scaffold:
            raise ValueError(
                f"{owner}.mig_scaffold must be a non-empty string (it closes the thought and opens the answer), "
                f"got {self.mig_scaffold!r}."
            )
        if "{answer}" in self.mig_scaffold:
            raise ValueError(
                f"{owner}.mig_scaffold is the text placed before the answer and has no answer slot: remove "
                f"'{{answer}}' from {self.mig_scaffold!r}."
            )
        for name in ("mig_max_steps", "mig_scoring_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}.")
        threshold = self.sft_correctness_threshold
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"{owner}.sft_correctness_threshold must be a finite number, got {threshold!r}.")

    def _compiled_pattern(self, name: str) -> re.Pattern:
        pattern = getattr(self, name)
        owner = type(self).__name__
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{owner}.{name} must be a non-empty regular expression, got {pattern!r}.")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{owner}.{name}={pattern!r} is not a valid regular expression: {err}.") from None
        if compiled.fullmatch(""):
            raise ValueError(f"{owner}.{name}={pattern!r} matches the empty string, so it would match everywhere.")
        return compiled


@dataclass
class MIGConfig(MIGSettings, GRPOConfig):
    """
    Configuration of [`MIGGRPOTrainer`]: every [`~trl.GRPOConfig`] option plus the MIG settings, whose fields,
    defaults and validation are those of [`MIGSettings`] (documented there). The GRPO fields come first, as in
    `--help`.
    """

    def __post_init__(self):
        super().__post_init__()  # GRPOConfig's checks, then MIGSettings.validate
        if self.remove_unused_columns:  # a GRPOConfig field, so checked here
            raise ValueError(
                f"{type(self).__name__}.remove_unused_columns=True would drop the ground-truth column "
                f"{self.solution_column!r} that MIG scores; set it to False."
            )


def mig_field_names() -> tuple[str, ...]:
    """The MIG settings: the fields [`MIGSettings`] declares and MIGConfig adds to GRPOConfig."""
    return tuple(f.name for f in fields(MIGSettings))


def field_like(owner: type, name: str, *, default=MISSING, help: str | None = None) -> Field:
    """
    A new dataclass field declared like the field `name` of the dataclass `owner` (e.g. [`MIGSettings`] or
    `GRPOConfig`): same default and the same `help` and `choices` metadata, so that the arguments of a command carry
    the declaration instead of a copy of it. `default` and `help` replace the owner's.
    """
    declared = {f.name: f for f in fields(owner)}
    if name not in declared:
        raise ValueError(f"{owner.__name__} has no field {name!r}.")
    source = declared[name]
    metadata = {key: value for key, value in source.metadata.items() if key in ("help", "choices")}
    if help is not None:
        metadata["help"] = help
    if default is not MISSING:
        return field(default=default, metadata=metadata)
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


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
