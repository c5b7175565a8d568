"""`trl-mig study`: arms x sweep settings x seeds of `trl-mig train` runs, resumable, summarised and plotted
(`runner`: the plan and the runs; `report`: study.json, study.md and the plots; `statistics`: the primary metric's
paired differences and intervals)."""

from .report import plot_study, study_markdown, write_outputs
from .runner import (
    StudyConfig,
    default_train_command,
    parse_run_recipe,
    plan_runs,
    read_run,
    run_study,
    summarize_study,
)

__all__ = [
    "StudyConfig",
    "default_train_command",
    "parse_run_recipe",
    "plan_runs",
    "plot_study",
    "read_run",
    "run_study",
    "study_markdown",
    "summarize_study",
    "write_outputs",
]
