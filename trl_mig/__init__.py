"""trl-mig: Step-wise Marginal Information Gain (MIG) process credit for TRL's GRPOTrainer."""

from .callbacks import HeldOutAccuracyCallback
from .config import MIGConfig, MIGSettings, mig_config_class
from .credit import (
    Credit,
    compose_credit,
    gated_sft_loss,
    group_failure_rates,
    hwm_gains,
    likelihood_differences,
    mig_advantages,
    normalize_rewards,
    outcome_advantages,
    per_token_advantages,
    return_to_go_advantages,
    step_advantages,
    step_gains,
)
from .inspection import CompletionCredit, StepCredit, inspect_completion
from .rewards import (
    AnswerAccuracyReward,
    DigitCreditReward,
    PartialCreditReward,
    StepFormatReward,
    answer_accuracy_reward,
    step_format_reward,
)
from .scoring import StepLikelihoodScorer
from .segmentation import FormatSpec, segment_completion, segment_turns
from .step_batch import StepBatch
from .trainer import MIGGRPOTrainer, MIGMixin, mig_trainer_class

__version__ = "0.1.0"

__all__ = [
    "AnswerAccuracyReward",
    "CompletionCredit",
    "Credit",
    "DigitCreditReward",
    "FormatSpec",
    "HeldOutAccuracyCallback",
    "MIGConfig",
    "MIGGRPOTrainer",
    "MIGMixin",
    "MIGSettings",
    "PartialCreditReward",
    "StepBatch",
    "StepCredit",
    "StepFormatReward",
    "StepLikelihoodScorer",
    "answer_accuracy_reward",
    "compose_credit",
    "gated_sft_loss",
    "group_failure_rates",
    "hwm_gains",
    "inspect_completion",
    "likelihood_differences",
    "mig_config_class",
    "mig_trainer_class",
    "normalize_rewards",
    "outcome_advantages",
    "per_token_advantages",
    "return_to_go_advantages",
    "segment_completion",
    "segment_turns",
    "mig_advantages",
    "step_advantages",
    "step_format_reward",
    "step_gains",
]
