"""An upper bound for step credit on the built-in arithmetic task: would perfect step-level credit make RL learn more?

MIG's pipeline (segmentation, gains, step or trajectory advantages, chain-of-thought masks, gated SFT) runs unchanged,
but the answer likelihoods l_k are replaced by an oracle that reads the gold solution: l_k is the number of steps,
from the first, that match the gold solution's steps up to step k. So g_k = 1 for every right step before the first
wrong one and 0 from the first wrong step on: the step credit MIG's likelihoods are meant to approximate, without
their noise. If even this credit does not beat outcome-only GRPO, credit assignment is not what limits RL on the task.

The oracle trainer uses trl-mig's extension points only: it overrides `MIGMixin.step_log_likelihoods` (the rows of the
batch carry each problem's `expression`), and its runs train through `trl_mig.cli.train.train_command(argv,
trainer_cls=...)`, the whole `trl-mig train` command with this trainer class.

The oracle arms are added to a study (`trl-mig study` YAML: the same recipe, overrides, seeds, sweep and evaluation)
and the whole study is run, the oracle arms through this script's trainer, the others through `trl-mig train`:

    python benchmarks/oracle_step_credit.py --study recipes/study/cpu_demo.yaml

writes study.json, study.md and the plots to `<the study's output_dir>_oracle` (finished runs are kept, as in
`trl-mig study`). Arms: the study's own, `oracle_step` (`mig_credit: step` from the oracle's gains) and
`oracle_trajectory` (`mig_credit: trajectory`: a dense "steps right" reward), both `algorithm: mig`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ORACLE_ARMS = {
    "oracle_step": {"algorithm": "mig", "mig_credit": "step"},
    "oracle_trajectory": {"algorithm": "mig", "mig_credit": "trajectory"},
}


def oracle_trainer_class():
    """`MIGGRPOTrainer` whose step likelihoods come from the gold solution of each row's `expression`."""
    import torch

    from _common import grade_steps
    from trl_mig import MIGGRPOTrainer, StepBatch

    class OracleStepCreditTrainer(MIGGRPOTrainer):
        def step_log_likelihoods(self, batch: StepBatch) -> torch.Tensor:
            """`(B, K_max + 1)`: l_k = right steps among 1..k counted up to the first wrong one; NaN past K_i."""
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's, or itself
            loglik = batch.empty_log_likelihoods()
            for row, (content, seg, example) in enumerate(zip(batch.completion_ids, batch.segments, batch.rows)):
                bounds = seg.boundaries
                texts = [tokenizer.decode(content[bounds[k - 1] : bounds[k]]) for k in range(1, len(bounds))]
                grades = grade_steps(example["expression"], texts)  # True for the leading right steps, then False
                loglik[row, : len(bounds)] = torch.tensor([float(sum(grades[:k])) for k in range(len(bounds))])
            return loglik.to(self.accelerator.device)

    return OracleStepCreditTrainer


def train_with_oracle(argv: list[str]) -> int:
    """`trl-mig train ARGV` with the oracle trainer in place of `MIGGRPOTrainer`; input errors as one line, exit 2."""
    import logging

    from trl_mig.cli.errors import CLIError
    from trl_mig.cli.train import train_command

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        return train_command(argv, trainer_cls=oracle_trainer_class())
    except (CLIError, ValueError) as err:  # as `trl-mig train` reports them
        print(f"oracle_step_credit.py --train: error: {err}", file=sys.stderr)
        return 2


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="recipes/study/cpu_demo.yaml", help="a study on the built-in task")
    parser.add_argument("--output_dir", default=None, help="default: the study's output_dir + '_oracle'")
    parser.add_argument("--arms", nargs="+", default=list(ORACLE_ARMS), choices=list(ORACLE_ARMS))
    args = parser.parse_args(argv)

    import dataclasses

    from trl_mig.study import StudyConfig, default_train_command, run_study

    study = StudyConfig.from_yaml(args.study)
    config = dataclasses.replace(
        study,
        output_dir=args.output_dir or f"{study.output_dir}_oracle",
        arms={**study.arms, **{arm: ORACLE_ARMS[arm] for arm in args.arms}},
        description=f"{study.description.strip()} With the oracle step-credit arm(s) {args.arms}: MIG's pipeline "
        "with l_k = the number of leading steps that match the gold solution (benchmarks/oracle_step_credit.py).",
        reproduce=f"python benchmarks/oracle_step_credit.py --study {args.study}"
        + (f" --arms {' '.join(args.arms)}" if args.arms != list(ORACLE_ARMS) else ""),
    )
    config.validate()
    here = str(Path(__file__).resolve())

    def train_command(run) -> list[str]:
        if run.arm in ORACLE_ARMS:
            return [sys.executable, here, "--train"]
        return default_train_command(run)

    return run_study(config, train_command=train_command)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train"]:  # a run of an oracle arm, launched by the study
        raise SystemExit(train_with_oracle(sys.argv[2:]))
    main()
