"""`trl-mig study`: the command line of the study runner (`trl_mig.study`)."""

from __future__ import annotations

import argparse

from ..study import StudyConfig, run_study


def study_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-mig study",
        description="Run a study (arms x sweep settings x seeds of `trl-mig train`), skipping finished runs, and write "
        "study.json, study.md and the plots.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="Study YAML (see recipes/study/).")
    parser.add_argument("--output_dir", help="Override the study's output folder.")
    parser.add_argument("--jobs", type=int, help="Runs at a time (override the study's `jobs`).")
    parser.add_argument("--threads_per_job", type=int, help="Torch threads per run (default: cores / jobs).")
    parser.add_argument("--dry_run", action="store_true", help="List the runs still to do, run nothing.")
    args = parser.parse_args(argv)
    config = StudyConfig.from_yaml(
        args.config, output_dir=args.output_dir, jobs=args.jobs, threads_per_job=args.threads_per_job
    )
    run_study(config, dry_run=args.dry_run)
    return 0

