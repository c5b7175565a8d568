"""
The private TRL and transformers members trl-mig relies on, in one place.

trl-mig hooks into `GRPOTrainer` through private methods and attributes (TRL keeps no stable API for them), imports
helpers from TRL's internal modules, and routes attention through transformers' attention registry. `PRIVATE_MEMBERS`
lists each such member with where trl-mig uses it and why, and `check_members` verifies them against the installed
versions:

- the class members and functions of the library (`scope="library"`) when `trl_mig` is imported, those of the
  command line (`scope="application"`) when `trl_mig.cli` is imported;
- the trainer's instance attributes when a MIG trainer is built ([`check_trainer_attributes`], from
  `MIGMixin.__init__`).

A missing member, or a hook whose parameters changed, raises [`UnsupportedVersionError`] naming the member and the
installed version, instead of an AttributeError in the middle of a run. A member marked `optional` only narrows what
trl-mig can do (e.g. the split attention of block scoring falls back to a full mask): it is listed by
[`missing_members`], never raised.

The functions at the end are how the rest of trl-mig reads the members where one place makes that clearer:
[`grpo_parameters_after`], [`sequence_level_trainer_classes`], [`log_completion_column`].

docs/method.md ("The TRL surface") shows the same list as a table.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
import trl
from trl import GRPOTrainer

logger = logging.getLogger(__name__)

CHECK_TIMES = ("import", "construction", "training", "use")
SCOPES = ("library", "application")


class UnsupportedVersionError(ImportError):
    """The installed TRL or transformers lacks a member trl-mig relies on (or its parameters changed)."""


@dataclass(frozen=True)
class PrivateMember:
    """
    One private TRL or transformers member trl-mig relies on.

    Attributes:
        path (`str`): `"module:Attribute.path"`, e.g. `"trl:GRPOTrainer._calculate_rewards"`. For an instance
            attribute (`when="construction"`), the class before the attribute names the class that sets it.
        where (`str`): the trl-mig code that uses it.
        why (`str`): what trl-mig needs it for (one line).
        parameters (`tuple[str, ...]`): parameters trl-mig passes by position: they must come first, in this order
            (after `self`).
        keywords (`tuple[str, ...]`): parameters trl-mig passes or reads by name: they must exist, in any order.
        when (`str`): when it is checked: `"import"` (a class member or function: it exists, with those
            parameters), `"construction"` (an instance attribute of the trainer, once GRPOTrainer's constructor has
            run), `"training"` (an attribute transformers' training loop sets: checked at import that
            `transformers.Trainer`'s code names it) or `"use"` (not checked ahead; see `why`).
        scope (`str`): `"library"` (checked when `trl_mig` is imported) or `"application"` (when `trl_mig.cli` is).
        optional (`bool`): trl-mig works without it, with less (see `why`): reported by `missing_members`, never
            raised.
        expects (`str`): for an instance attribute, the form trl-mig relies on, as the error message states it.
        valid (`Callable[[Any], bool]`, *optional*): for an instance attribute, whether its value has that form.
        probe (`Callable[[], str | None]`, *optional*): for a member that only exists on instances of a class that is
            cheap to build (a config), checked at import: what is wrong, or None.
    """

    path: str
    where: str
    why: str
    parameters: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    when: str = "import"
    scope: str = "library"
    optional: bool = False
    expects: str = ""
    valid: Callable[[Any], bool] | None = None
    probe: Callable[[], str | None] | None = None

    def __post_init__(self):
        if ":" not in self.path:
            raise ValueError(f"PrivateMember.path must be 'module:Attribute.path', got {self.path!r}.")
        if self.when not in CHECK_TIMES:
            raise ValueError(f"PrivateMember.when must be one of {CHECK_TIMES}, got {self.when!r}.")
        if self.scope not in SCOPES:
            raise ValueError(f"PrivateMember.scope must be one of {SCOPES}, got {self.scope!r}.")

    @property
    def module(self) -> str:
        return self.path.split(":", 1)[0]

    @property
    def attributes(self) -> list[str]:
        return self.path.split(":", 1)[1].split(".")

    @property
    def package(self) -> str:
        return self.module.split(".", 1)[0]

    @property
    def name(self) -> str:
        """How messages and docs name it: `GRPOTrainer._calculate_rewards(inputs, prompts, ...)`."""
        qualified = self.path.split(":", 1)[1]
        if self.module != "trl":  # GRPOTrainer is named alone; anything else with its module
            qualified = f"{self.module}.{qualified}"
        shown = [*self.parameters, *(f"{keyword}=" for keyword in self.keywords)]
        return f"{qualified}({', '.join(shown)})" if shown else qualified

    def problem(self, trainer_class: type = GRPOTrainer, trainer: Any = None) -> str | None:
        """
        What the installed version lacks, or None when it has the member as trl-mig uses it.

        Args:
            trainer_class (`type`): where members of `GRPOTrainer` are looked up (a subclass checks what it
                inherits or overrides).
            trainer (*optional*): the built trainer, for instance attributes (`when="construction"`).
        """
        if self.when == "construction":
            return self._instance_problem(trainer) if trainer is not None else None
        if self.when == "training":
            return self._training_loop_problem()
        if self.when == "use":
            return None
        if self.probe is not None:
            return self.probe()
        try:
            target = self.resolve(trainer_class)
        except (ImportError, AttributeError) as err:
            return f"not found ({type(err).__name__}: {err})"
        if self.parameters or self.keywords:
            return _signature_problem(target, self.parameters, self.keywords)
        return None

    def resolve(self, trainer_class: type = GRPOTrainer):
        """The member itself (members of `GRPOTrainer` are looked up on `trainer_class`)."""
        target = importlib.import_module(self.module)
        for index, attribute in enumerate(self.attributes):
            if index == 0 and self.package == "trl" and attribute == "GRPOTrainer":
                target = trainer_class
            else:
                target = getattr(target, attribute)
        return target

    def _instance_problem(self, trainer) -> str | None:
        attribute = self.attributes[-1]
        if not hasattr(trainer, attribute):
            return f"{type(trainer).__name__} has no attribute {attribute!r} after GRPOTrainer.__init__"
        if self.valid is not None and not self.valid(getattr(trainer, attribute)):
            value = getattr(trainer, attribute)
            return f"it is a {type(value).__name__} without the form trl-mig relies on: {self.expects}"
        return None

    def _training_loop_problem(self) -> str | None:
        # set inside the training loop, so there is no instance to look at before training: make sure transformers'
        # Trainer still sets (or reads) an attribute of that name somewhere in its own code
        owner = self.resolve_owner()
        attribute = self.attributes[-1]
        for value in vars(owner).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and attribute in code.co_names:
                return None
        return f"no method of {owner.__name__} sets {attribute!r}"

    def resolve_owner(self):
        target = importlib.import_module(self.module)
        for attribute in self.attributes[:-1]:
            target = getattr(target, attribute)
        return target


def _signature_problem(function, parameters: Sequence[str], keywords: Sequence[str]) -> str | None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: nothing to compare
    names = [name for name in signature.parameters if name != "self"]
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    missing = [name for name in keywords if name not in names and not takes_any_keyword]
    if list(names[: len(parameters)]) != list(parameters) or missing:
        return f"its signature is ({', '.join(names)})"
    return None


# -------------------------------------------------------------------------------------------------------- the list
def _config_keeps_attention_internally() -> str | None:
    config = transformers.PretrainedConfig()
    return None if "_attn_implementation_internal" in vars(config) else "a new PretrainedConfig does not set it"


def _is_completions_log(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("extra"), defaultdict)


def _is_metrics_buffer(value) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(mode), defaultdict) for mode in ("train", "eval"))


def _is_tokenizer(value) -> bool:
    return hasattr(value, "pad_token_id") and callable(getattr(value, "decode", None))


def _is_id_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(token, int) for token in value)


_MULTIMODAL_FIELDS = (  # multimodal.py's MULTIMODAL_INPUT_FIELDS and counts, as the policy forward takes them
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)

PRIVATE_MEMBERS: tuple[PrivateMember, ...] = (
    # --- GRPOTrainer's constructor and the hooks MIGMixin overrides (each calls super())
    PrivateMember(
        "trl:GRPOTrainer.__init__", "trainer.py (MIGMixin.__init__, _keyword_arguments)",
        "MIGMixin takes GRPOTrainer's first four arguments by position, and maps the rest given by position to their "
        "names",
        parameters=("model", "reward_funcs", "args", "train_dataset"),
    ),
    PrivateMember(
        "trl:GRPOTrainer._calculate_rewards", "trainer.py (MIGMixin._calculate_rewards)",
        "hook: keeps the gathered outcome rewards (for the SFT gate) and the completion ids for the MIG pass",
        parameters=("inputs", "prompts", "completions", "completion_ids_list"),
    ),
    PrivateMember(
        "trl:GRPOTrainer._generate_and_score_completions", "trainer.py (MIGMixin._generate_and_score_completions)",
        "hook: after GRPO has generated and scored, MIG scores the steps and replaces `advantages` in its output "
        "(it reads prompt_ids, prompt_mask, completion_ids, tool_mask and the multimodal inputs)",
        parameters=("inputs",),
    ),
    PrivateMember(
        "trl:GRPOTrainer._compute_loss", "trainer.py (MIGMixin._compute_loss)",
        "hook: adds the gated SFT term to the GRPO loss (reads completion_mask, tool_mask)",
        parameters=("model", "inputs"),
    ),
    PrivateMember(
        "trl:GRPOTrainer._get_per_token_logps_and_entropies",
        "trainer.py (MIGMixin._get_per_token_logps_and_entropies)",
        "hook: captures the policy log-probs GRPO's loss computes, so gated SFT needs no second forward; and, with "
        "mig_fuse_scoring, replaces GRPO's no-gradient old/reference log-prob forward by MIG's scoring pass (same "
        "positional arguments, `compute_entropy` / `compute_aux_loss` keywords)",
        parameters=("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                    "compute_aux_loss"),
    ),
    PrivateMember(
        "trl:GRPOTrainer._generate", "trainer.py (MIGMixin._generate)",
        "hook (mig_fuse_scoring): keeps what generation returned, (prompt ids, completion ids, tool mask, ...) in "
        "that order, for the scoring pass that runs before GRPO has built its output",
        parameters=("prompts",),
    ),
    PrivateMember(
        "trl.trainer.utils:add_fused_lm_head", "scoring.py (fused_head_model, StepLikelihoodScorer._logps)",
        "GRPOTrainer patches the policy's and the reference's forward with TRL's fused LM head; the fused scoring "
        "pass calls that forward with `fused_lm_head=True` and `shift_labels` (its public API) and reads the "
        "backbone's hidden states through a forward hook on `base_model`",
        parameters=("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
    ),
    PrivateMember(
        "trl:GRPOTrainer._get_per_token_logps_and_entropies", "multimodal.py (split_multimodal_inputs)",
        "the multimodal batch keys the policy forward takes, which MIG cuts per completion the same way",
        keywords=_MULTIMODAL_FIELDS,
    ),
    PrivateMember(
        "transformers:Trainer._load_optimizer_and_scheduler", "trainer.py (MIGMixin._load_optimizer_and_scheduler)",
        "hook on resume: warns about MIG settings changed since the checkpoint",
        parameters=("checkpoint",),
    ),
    PrivateMember(
        "trl:GRPOTrainer._name", "trainer.py (MIGGRPOTrainer, mig_trainer_class, MIGMixin.__init__)",
        "TRL's trainer name, for the default output_dir and the model card: MIG classes set 'MIG-<base name>'",
    ),
    PrivateMember(
        "trl:GRPOTrainer._tag_names", "trainer.py (MIGGRPOTrainer, mig_trainer_class)",
        "the model tags TRL adds: MIG classes add 'trl-mig' to the base's",
    ),
    # --- instance attributes GRPOTrainer's constructor sets
    PrivateMember(
        "trl:GRPOTrainer._logs", "trl_surface.log_completion_column (trainer.py, inspection.py)",
        "the completions table (`log_completions`): MIG adds its per-completion columns to _logs['extra'] after "
        "GRPO's own columns are written (TRL's `log_extra` buffer is flushed before MIG's values exist)",
        when="construction", expects="a dict whose 'extra' entry is a defaultdict of columns",
        valid=_is_completions_log,
    ),
    PrivateMember(
        "trl:GRPOTrainer._metrics", "trainer.py (MIGMixin: the mig/*, tools/* and sft/* metrics)",
        "the metric buffers GRPOTrainer.log averages and logs: MIG appends mig/*, tools/mig_* and sft/* values",
        when="construction", expects="a dict of 'train' and 'eval' defaultdict(list)", valid=_is_metrics_buffer,
    ),
    PrivateMember(
        "trl:GRPOTrainer._tokenizer", "trainer.py (MIGMixin), inspection.py (record_completion_credit)",
        "the tokenizer inside the processing class (a processor's tokenizer): segmentation, answers, padding",
        when="construction", expects="a tokenizer (pad_token_id, decode)", valid=_is_tokenizer,
    ),
    PrivateMember(
        "trl:GRPOTrainer.eos_token_ids", "trainer.py (MIGMixin._content_ids)",
        "every id that ends a completion, stripped before segmentation",
        when="construction", expects="a list of token ids", valid=_is_id_list,
    ),
    PrivateMember(
        "trl:GRPOTrainer.num_generations_eval", "trainer.py (MIGMixin._generate_and_score_completions)",
        "the group size of evaluation batches, for MIG's group baselines",
        when="construction", expects="an int", valid=lambda value: isinstance(value, int),
    ),
    PrivateMember(
        "trl:GRPOTrainer.reward_weights", "trainer.py (MIGMixin.compose_credit)",
        "the reward functions' weights as GRPO applies them (with an environment's reward weight appended)",
        when="construction", expects="a 1-D tensor",
        valid=lambda value: isinstance(value, torch.Tensor) and value.dim() == 1,
    ),
    PrivateMember(
        "trl:GRPOTrainer.scale_rewards", "trainer.py (MIGMixin.compose_credit)",
        "how GRPO scales the outcome advantage, which compose_credit reproduces",
        when="construction", expects="a str or bool", valid=lambda value: isinstance(value, (str, bool)),
    ),
    PrivateMember(
        "trl:GRPOTrainer.multi_objective_aggregation", "trainer.py (MIGMixin.compose_credit)",
        "how GRPO combines several rewards into the outcome advantage, which compose_credit reproduces",
        when="construction", expects="a str", valid=lambda value: isinstance(value, str),
    ),
    PrivateMember(
        "transformers:Trainer.current_gradient_accumulation_steps", "trainer.py (MIGMixin._compute_loss)",
        "the SFT term is divided by it, as GRPO divides its own loss (set by transformers' training loop)",
        when="training",
    ),
    # --- helpers from TRL's internal modules
    PrivateMember(
        "trl.models.utils:disable_gradient_checkpointing", "trainer.py (MIGMixin.step_log_likelihoods)",
        "the no-grad likelihood pass runs without gradient checkpointing",
        parameters=("model", "gradient_checkpointing_kwargs"),
    ),
    PrivateMember(
        "trl.trainer.utils:use_adapter", "trainer.py (MIGMixin._scoring_model_context)",
        "with LoRA and mig_likelihood_model='reference', scores with the adapter-free (or 'ref' adapter) model",
        parameters=("model",), keywords=("adapter_name",),
    ),
    PrivateMember(
        "trl.trainer.utils:nanstd", "credit.py (normalize_rewards)",
        "the same std as GRPO's group normalisation of the outcome reward",
        parameters=("tensor",),
    ),
    PrivateMember(
        "trl.models.utils:unwrap_model_for_generation", "evaluation.py (evaluate_splits), cli/train.py",
        "greedy generation for the accuracy evals, with DeepSpeed ZeRO-3 parameters gathered",
        parameters=("model", "accelerator"),
    ),
    PrivateMember(
        "trl.experimental.gmpo:GMPOTrainer", "trl_surface.sequence_level_trainer_classes (mig_trainer_class)",
        "its loss takes one advantage per completion; detected by issubclass once its module is imported (never "
        "imported by trl-mig: TRL's experimental package warns on import)",
        when="use", optional=True,
    ),
    # --- transformers' attention dispatch (scoring.py)
    PrivateMember(
        "transformers:PretrainedConfig._attn_implementation", "scoring.py (block mask, split attention)",
        "which attention the model runs: decides whether the block mask applies and its form (bool or additive); "
        "the split attention sets it for one forward",
    ),
    PrivateMember(
        "transformers:PretrainedConfig._attn_implementation_internal", "scoring.py (_attention_implementation)",
        "saved and restored around the split-attention forward (the value behind _attn_implementation)",
        probe=_config_keeps_attention_internally,
    ),
    PrivateMember(
        "transformers.modeling_utils:AttentionInterface.register", "scoring.py (_split_available)",
        "registers the split attention (causal prefix + block-masked answer copies); without it block scoring "
        "uses one full 4-D mask",
        parameters=("key", "value"), optional=True,
    ),
    PrivateMember(
        "transformers.modeling_utils:ALL_ATTENTION_FUNCTIONS", "scoring.py (_split_sdpa_attention)",
        "the sdpa function the split attention calls for both of its parts",
        optional=True,
    ),
    PrivateMember(
        "transformers.masking_utils:AttentionMaskInterface.register", "scoring.py (_split_available)",
        "registers sdpa's mask function under the split attention's name",
        parameters=("key", "value"), optional=True,
    ),
    PrivateMember(
        "transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS", "scoring.py (_split_available)",
        "sdpa's mask function, reused for the split attention",
        optional=True,
    ),
    PrivateMember(
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLModel.get_rope_index", "scoring.py (_rope_positions)",
        "3-D rotary positions of multimodal rotary models (Qwen2-VL style), called with mm_token_type_ids",
        parameters=("input_ids",), keywords=("mm_token_type_ids", "image_grid_thw"), optional=True,
    ),
    PrivateMember(
        "transformers:Trainer.log", "callbacks.py (HeldOutAccuracyCallback)",
        "called on the base class to log held-out accuracy as its own entry, bypassing GRPOTrainer.log, which "
        "averages and clears _metrics",
        parameters=("logs",),
    ),
    # --- the command line (trl_mig.cli, trl_mig.builtin)
    PrivateMember(
        "trl.cli.accelerate_config:resolve_accelerate_config_argument", "cli/launch.py",
        "`--accelerate_config NAME` resolved to the accelerate configs TRL packages",
        parameters=("launch_args",), scope="application",
    ),
    PrivateMember(
        "trl.data_utils:get_dataset_column_names", "cli/data.py", "column names of map-style and streaming datasets",
        parameters=("dataset",), scope="application",
    ),
    PrivateMember(
        "trl.chat_template_utils:parse_response", "builtin/tools.py (evaluate_tool_task)",
        "parses the tool calls of a generated turn, as TRL's tool loop does",
        parameters=("tokenizer", "ids"), keywords=("prefix", "tools"), scope="application",
    ),
)


# ------------------------------------------------------------------------------------------------------- the checks
def installed_version(package: str) -> str:
    return str(getattr({"trl": trl, "transformers": transformers}.get(package), "__version__", "unknown"))


def failure_message(member: PrivateMember, problem: str) -> str:
    return (
        f"trl-mig needs {member.name}, which {member.package} {installed_version(member.package)} does not have "
        f"({problem}). trl-mig uses it in {member.where}: {member.why}. Install the {member.package} version "
        "trl-mig's pyproject.toml names."
    )


def missing_members(
    scope: str | None = None,
    *,
    trainer_class: type = GRPOTrainer,
    trainer: Any = None,
    members: Sequence[PrivateMember] = PRIVATE_MEMBERS,
) -> list[tuple[PrivateMember, str]]:
    """`(member, problem)` for every member of `scope` (None: all) the installed versions lack, optional ones too."""
    found = []
    for member in members:
        if scope is not None and member.scope != scope:
            continue
        problem = member.problem(trainer_class, trainer)
        if problem is not None:
            found.append((member, problem))
    return found


def check_members(
    scope: str | None = None,
    *,
    trainer_class: type = GRPOTrainer,
    members: Sequence[PrivateMember] = PRIVATE_MEMBERS,
) -> None:
    """
    Raise [`UnsupportedVersionError`] for the first required member of `scope` (`"library"`, `"application"`, None:
    both) that the installed TRL / transformers lacks; the members checked at import (and the training-loop
    attribute). Optional members missing are logged at debug level.
    """
    for member, problem in missing_members(scope, trainer_class=trainer_class, members=members):
        if not member.optional:
            raise UnsupportedVersionError(failure_message(member, problem))
        logger.debug("trl-mig works without %s, with less: %s", member.name, problem)


def check_trainer_attributes(trainer, members: Sequence[PrivateMember] = PRIVATE_MEMBERS) -> None:
    """Raise [`UnsupportedVersionError`] when `trainer` (after GRPOTrainer's constructor) lacks an instance attribute
    trl-mig reads, or has it in another form."""
    for member in members:
        if member.when != "construction":
            continue
        problem = member.problem(trainer=trainer)
        if problem is not None:
            raise UnsupportedVersionError(failure_message(member, problem))


# -------------------------------------------------------------------------------------------- reading the members
def grpo_parameters_after(name: str) -> list[str]:
    """The names of `GRPOTrainer.__init__`'s parameters after `name`, in order (what a caller gives by position)."""
    names = [parameter for parameter in inspect.signature(GRPOTrainer.__init__).parameters if parameter != "self"]
    if name not in names:
        raise UnsupportedVersionError(
            failure_message(PRIVATE_MEMBERS[0], f"no parameter {name!r}; its signature is ({', '.join(names)})")
        )
    return names[names.index(name) + 1 :]


def sequence_level_trainer_classes() -> tuple[type, ...]:
    """
    TRL's trainers whose loss takes one advantage per completion, `(B,)`: GMPOTrainer, once its module is imported.
    A class can only subclass it after that, so this never imports TRL's experimental package (which warns).
    """
    module = sys.modules.get("trl.experimental.gmpo")
    found = getattr(module, "GMPOTrainer", None)
    return (found,) if isinstance(found, type) else ()


def log_completion_column(trainer, column: str, values: Sequence) -> None:
    """
    Add `values` to column `column` of GRPO's completions table (`log_completions`; its wandb / trackio table).

    `values`: one per completion of the generation batch, already in the global order of the other columns (gathered
    from every process). TRL's own route, a reward function's `log_extra`, buffers this process's values until GRPO
    writes its columns, which happens before MIG's values exist, so MIG writes its columns after GRPO's, here.
    """
    trainer._logs["extra"][column].extend(values)


check_members("library")
