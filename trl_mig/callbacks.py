"""Trainer callbacks: `HeldOutAccuracyCallback` (learning curves of held-out accuracy, logged as ordinary Trainer
metrics) and `CreditPageCallback` (the HTML credit pages of `mig_inspect_html`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque

import torch
from transformers import Trainer, TrainerCallback

from .evaluation import encode_correctness, evaluate_splits
from .render import write_html
from .segmentation import FormatSpec

logger = logging.getLogger(__name__)


class HeldOutAccuracyCallback(TrainerCallback):
    """
    Measures accuracy on held-out splits while training and logs it as ordinary Trainer metrics, so
    `trainer_state.json`, TensorBoard, wandb and every other `report_to` integration get learning curves.

    At the start of training (`eval_on_start`), every `eval_steps` optimiser steps and after the last step, it
    generates one greedy completion per prompt of each split and logs, per split:

    - `heldout/{split}/pass@1`: greedy accuracy (answer found by `spec.answer_pattern`, checked with math-verify);
    - `heldout/{split}/format_rate`: fraction of well-formed completions (closed thought, answer, a step header);
    - with `num_samples > 0`, `heldout/{split}/sampled_accuracy`: mean accuracy of `num_samples` completions per
      prompt sampled at `temperature` (the random state of training is saved and restored around it, so the training
      run does not depend on whether this is measured);

    and, for learning curves against compute, `heldout/train_seconds` (wall-clock seconds of training so far, the
    held-out measurements left out; a resumed run counts from its resumption) and `heldout/num_tokens` (the trainer
    state's `num_input_tokens_seen`, which TRL's GRPO trainers count exactly and log as `num_tokens`: the prompt and
    completion tokens of every rollout so far, over all processes), and `heldout/seconds`, the time the measurement
    took. Under a multi-process launch every rank generates a shard.

    With `record_problems` (the default), every measurement is also appended to `OUTPUT_DIR/heldout_problems.jsonl`
    (main process): `{"step", "train_seconds", "num_tokens", "correct": {split: "0110..."}}`, the greedy correctness
    of every problem in dataset order (`trl_mig.evaluation.encode_correctness`), for statistics over problems.

    Like TRL's own callbacks it takes the trainer (it logs through it):

    ```python
    trainer = MIGGRPOTrainer(model, args=args, train_dataset=dataset["train"])
    trainer.add_callback(HeldOutAccuracyCallback(trainer, {"test": dataset["test"]}, eval_steps=25))
    trainer.train()
    ```

    Args:
        trainer: the trainer being trained (any `transformers.Trainer`; TRL's GRPO trainers included).
        splits (`dict[str, Dataset]`): split name -> dataset with a `prompt` column (text or chat messages) and the
            ground truth in `solution_column`.
        eval_steps (`int`): measure every this many optimiser steps.
        spec (`FormatSpec`, *optional*): how answers and steps are read; default: from the trainer's `args` when it
            is a `MIGConfig`, else the default format.
        solution_column (`str`, *optional*): default: `args.solution_column`, else `"solution"`.
        batch_size (`int`): prompts per generation call.
        max_new_tokens (`int`, *optional*): default: `args.max_completion_length`.
        num_samples (`int`): sampled completions per prompt for `sampled_accuracy` (0: greedy only).
        temperature (`float`): sampling temperature of `sampled_accuracy`; default: `args.temperature`.
        seed (`int`): seed of that sampling, the same at every measurement.
        eval_on_start (`bool`): also measure before the first step (logged at step 0).
        record_problems (`bool`): write the per-problem correctness of every measurement to
            `OUTPUT_DIR/heldout_problems.jsonl` (a fresh run starts the file anew).
    """

    PROBLEMS_FILE = "heldout_problems.jsonl"

    def __init__(
        self,
        trainer: Trainer,
        splits: dict,
        eval_steps: int,
        *,
        spec: FormatSpec | None = None,
        solution_column: str | None = None,
        batch_size: int = 64,
        max_new_tokens: int | None = None,
        num_samples: int = 0,
        temperature: float | None = None,
        seed: int = 0,
        eval_on_start: bool = True,
        record_problems: bool = True,
    ):
        if not splits:
            raise ValueError("HeldOutAccuracyCallback needs at least one held-out split.")
        if not isinstance(eval_steps, int) or isinstance(eval_steps, bool) or eval_steps < 1:
            raise ValueError(f"HeldOutAccuracyCallback eval_steps must be an integer >= 1, got {eval_steps!r}.")
        if num_samples < 0 or batch_size < 1:
            raise ValueError(f"num_samples must be >= 0 and batch_size >= 1, got {num_samples} and {batch_size}.")
        args = trainer.args
        self.trainer = trainer
        self.eval_steps = eval_steps
        self.spec = spec or (FormatSpec.from_config(args) if hasattr(args, "step_pattern") else FormatSpec())
        self.solution_column = solution_column or getattr(args, "solution_column", "solution")
        for name, dataset in splits.items():
            missing = [c for c in ("prompt", self.solution_column) if c not in dataset.column_names]
            if missing:
                raise ValueError(
                    f"Held-out split {name!r} has no column(s) {missing}; its columns are {dataset.column_names}."
                )
        self.splits = dict(splits)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or getattr(args, "max_completion_length", None) or 256
        self.num_samples = num_samples
        self.temperature = temperature if temperature is not None else getattr(args, "temperature", 1.0)
        if num_samples > 0 and not self.temperature > 0:
            raise ValueError(f"sampled accuracy needs a temperature > 0, got {self.temperature}.")
        self.seed = seed
        self.eval_on_start = eval_on_start
        self.record_problems = record_problems
        self.history: list[dict] = []  # every measurement, also kept here for callers without a logger
        self._last_step = None
        self._train_started = None  # perf_counter at the start of training
        self._measuring_seconds = 0.0  # held-out measurement time since then, left out of `train_seconds`

    # ------------------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self._train_started, self._measuring_seconds = time.perf_counter(), 0.0
        path = os.path.join(args.output_dir, self.PROBLEMS_FILE)
        if self.record_problems and state.global_step == 0 and state.is_world_process_zero and os.path.exists(path):
            os.remove(path)  # a fresh run (not a resumed one) in a folder an earlier run wrote to
        if self.eval_on_start and state.global_step == 0:
            self._measure_and_log(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps:
            self._measure_and_log(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        # a run that stops early (`control.should_training_stop`, an exhausted dataset) still gets a last point
        self._measure_and_log(state, control)

    # --------------------------------------------------------------------------------------------------- internals
    def measure(self) -> dict[str, float]:
        """The metrics of the current model (no logging)."""
        return self._measure()[0]

    def _measure(self) -> tuple[dict[str, float], dict[str, str]]:
        """The metrics of the current model, and each split's greedy per-problem correctness (`encode_correctness`)."""
        started = time.perf_counter()
        trainer = self.trainer
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        common = dict(
            spec=self.spec, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            solution_column=self.solution_column, accelerator=trainer.accelerator, label="held-out",
        )
        metrics = {}
        greedy, completions = evaluate_splits(trainer.model_wrapped, tokenizer, self.splits, **common)
        for name, result in greedy.items():
            metrics[f"heldout/{name}/pass@1"] = result["pass@1"]
            metrics[f"heldout/{name}/format_rate"] = result["format_rate"]
        if self.num_samples > 0:
            with torch.random.fork_rng(devices=_rng_devices()):
                torch.manual_seed(self.seed)
                sampled, _ = evaluate_splits(
                    trainer.model_wrapped, tokenizer, self.splits, num_samples=self.num_samples,
                    temperature=self.temperature, **common,
                )
            for name, result in sampled.items():
                metrics[f"heldout/{name}/sampled_accuracy"] = result["pass@1"]
        metrics["heldout/seconds"] = round(time.perf_counter() - started, 3)
        return metrics, {name: encode_correctness(rows) for name, rows in completions.items()}

    def _measure_and_log(self, state, control) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        started = time.perf_counter()
        compute = {
            "heldout/train_seconds": round(started - self._train_started - self._measuring_seconds, 3)
            if self._train_started is not None else None,
            "heldout/num_tokens": state.num_input_tokens_seen,
        }
        metrics, correct = self._measure()
        metrics.update(compute)
        self._measuring_seconds += time.perf_counter() - started
        self.history.append({"step": state.global_step, **metrics})
        if self.record_problems and state.is_world_process_zero:
            os.makedirs(self.trainer.args.output_dir, exist_ok=True)
            record = {"step": state.global_step, "train_seconds": compute["heldout/train_seconds"],
                      "num_tokens": compute["heldout/num_tokens"], "correct": correct}
            with open(os.path.join(self.trainer.args.output_dir, self.PROBLEMS_FILE), "a") as file:
                file.write(json.dumps(record) + "\n")
        # the base `Trainer.log`: an entry of its own at this step, leaving the metric buffers of TRL trainers (which
        # their `log` override averages and clears) to their own logging steps. Logging clears `should_log`, which
        # the trainer's own logging of this step may have set: keep it.
        should_log = control.should_log
        Trainer.log(self.trainer, dict(metrics))
        control.should_log = should_log


def _rng_devices() -> list:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class CreditPageCallback(TrainerCallback):
    """
    Writes `OUTPUT_DIR/mig_inspect/step_<global step>.html` whenever the trainer logs (main process): the completions
    of the latest generation batch, each prompt's group side by side, steps shaded by gain. Added by
    `MIGGRPOTrainer` when `MIGConfig.mig_inspect_html` is set.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        trainer._mig_credit_log = deque(maxlen=trainer.args.generation_batch_size)

    def on_log(self, args, state, control, **kwargs):
        credits = list(self.trainer._mig_credit_log)
        if not credits or not state.is_world_process_zero:
            return
        size = getattr(self.trainer, "num_generations", None) or len(credits)
        groups = [credits[i : i + size] for i in range(0, len(credits), size)]
        path = os.path.join(args.output_dir, "mig_inspect", f"step_{state.global_step:05d}.html")
        write_html(path, groups, title=f"MIG credit of the completions at step {state.global_step}")


def attach_credit_page(trainer) -> None:
    """Add a [`CreditPageCallback`] to `trainer` when `mig_inspect_html` is set (from `MIGGRPOTrainer.__init__`)."""
    if getattr(trainer.args, "mig_inspect_html", False):
        trainer.add_callback(CreditPageCallback(trainer))
