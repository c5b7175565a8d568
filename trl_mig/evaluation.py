"""Accuracy evaluation: greedy (or sampled) generation on dataset splits, scored for answer accuracy (pass@1) and
step format, sharded across processes.

It reads datasets already mapped by `trl_mig.cli.data.prepare_dataset` (a `prompt` and a solution column) and knows
nothing of the command line, so `trl-mig train`, `trl-mig eval` and callers outside the CLI share it.
"""

from __future__ import annotations

from .rewards import AnswerAccuracyReward, StepFormatReward


def score_completions(completions, solutions, spec, solution_column: str = "solution"):
    """Per completion: (correct, well_formed) as floats, correct None when the row has no ground truth."""
    correct = AnswerAccuracyReward(spec, solution_column)(completions, **{solution_column: solutions})
    formatted = StepFormatReward(spec)(completions)
    return correct, formatted


def summarize(correct, formatted, groups=None, num_samples: int = 1) -> dict:
    """
    Metrics of scored completions (from `score_completions`): pass@1 over the rows with a ground truth (NaN when
    none has one), format rate over all completions, and pass@1 per value of `groups` (one per completion) when given.
    With `num_samples` = k > 1 completions per row (a row's samples next to each other, as `generate_completions`
    returns them), also pass@k: the share of rows with a ground truth that at least one of their k samples gets right.
    """
    scored = [c for c in correct if c is not None]
    out = {
        "num_examples": len(correct) // max(1, num_samples),
        "num_completions": len(correct),
        "num_scorable": len(scored),
        "pass@1": sum(scored) / len(scored) if scored else float("nan"),
        "format_rate": sum(formatted) / len(formatted) if formatted else float("nan"),
    }
    if num_samples > 1:
        rows = [correct[start : start + num_samples] for start in range(0, len(correct), num_samples)]
        solved = [any(samples) for samples in rows if samples[0] is not None]
        out[f"pass@{num_samples}"] = sum(solved) / len(solved) if solved else float("nan")
    if groups is not None:
        by_group: dict[str, list[float]] = {}
        for group, value in zip(groups, correct):
            if value is not None:
                by_group.setdefault(str(group), []).append(value)
        out["pass@1_by_group"] = {
            key: sum(values) / len(values) for key, values in sorted(by_group.items(), key=lambda kv: _sort_key(kv[0]))
        }
    return out


# one character per problem in `encode_correctness`: compact enough to keep every evaluation of every run
CORRECT, WRONG, UNSCORED = "1", "0", "."


def encode_correctness(completions: list[dict]) -> str:
    """
    The correctness of one completion per problem (an `evaluate_splits` completions list, greedy) as a string, one
    character per problem in dataset order: '1' correct, '0' wrong, '.' no ground truth (left out of pass@1).
    """
    return "".join(UNSCORED if c["correct"] is None else CORRECT if c["correct"] else WRONG for c in completions)


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def prompt_texts(prompts, tokenizer) -> list[str]:
    """Prompts as the text the model sees: chat messages through the chat template, strings as they are."""
    from trl.data_utils import maybe_apply_chat_template

    return [maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"] for prompt in prompts]


def generate_completions(
    model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_p: float = 1.0, desc: str = "eval", show_progress: bool = True,
) -> list[str]:
    """
    Batched generation (greedy when temperature is 0), `num_samples` completions per prompt, in prompt order.

    Args:
        model: a causal LM (unwrapped: `generate` is called on it directly); put in eval mode for the call and
            restored to its training mode afterwards.
        tokenizer: its tokenizer; prompts are left-padded for the call (its `padding_side` is restored afterwards)
            and padded with `pad_token_id`, else `eos_token_id`.
        prompts: strings, or chat messages that go through the tokenizer's chat template (see `prompt_texts`).
        batch_size: prompts per `generate` call.
        max_new_tokens: the most tokens generated per completion.
        num_samples: completions per prompt; more than one needs `temperature > 0`.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling threshold (used only with `temperature > 0`).
        desc: label of the progress bar.
        show_progress: whether the progress bar is shown.

    Returns:
        The decoded completions without the prompt (special tokens skipped): `len(prompts) * num_samples` strings,
        the samples of one prompt next to each other.

    Raises:
        ValueError: when `batch_size`, `max_new_tokens` or `num_samples` is below 1, or `num_samples > 1` with greedy
            decoding.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1 or num_samples < 1:
        raise ValueError("batch_size, max_new_tokens and num_samples must be >= 1.")
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding gives the same completion).")
    texts = prompt_texts(prompts, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if temperature > 0:
        generation.update(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=num_samples)
    else:
        generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not show_progress, unit="batch"):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.no_grad():
                output = model.generate(**batch, **generation)
            completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def evaluate_splits(
    model, tokenizer, splits: dict, *, spec, batch_size: int, max_new_tokens: int, solution_column: str = "solution",
    num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, group_by: str | None = None,
    accelerator=None, label: str = "eval",
) -> tuple[dict, dict]:
    """
    pass@1 and format rate of `model` on each split. Under several processes (an `accelerate` launch) each rank
    generates the completions of a shard (rows `rank`, `rank + world_size`, ...) and every rank gets the gathered
    results.

    Args:
        model: the model to evaluate; with `accelerator`, the (possibly DDP/DeepSpeed/FSDP-wrapped) training model,
            unwrapped for generation through TRL's `unwrap_model_for_generation`.
        tokenizer: its tokenizer (a tokenizer, not a processor).
        splits: split name -> dataset with a `prompt` column and `solution_column` (see
            `trl_mig.cli.data.prepare_dataset`).
        spec: the `FormatSpec` that finds the answer and checks the step format of a completion.
        batch_size, max_new_tokens, num_samples, temperature, top_p: generation settings (see
            `generate_completions`).
        solution_column: the ground-truth column; rows whose solution is empty are left out of pass@1.
        group_by: a dataset column; when set, pass@1 is also reported per value of this column.
        accelerator: the trainer's `Accelerator` when `model` is a training model, else None (`model` is used as is).
        label: prefix of the progress bars (`"{label} {split}"`).

    Returns:
        `(results, completions)`: `results[split]` is the dict of `summarize` (`num_examples`, `num_completions`,
        `num_scorable`, `pass@1`, `format_rate`, and `pass@1_by_group` with `group_by`); `completions[split]` is a
        list of `{"index", "completion", "solution", "correct", "well_formed"}` dicts in dataset order.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    results, all_completions = {}, {}
    for name, dataset in splits.items():
        indices = list(range(state.process_index, len(dataset), state.num_processes))
        shard = dataset.select(indices)
        if accelerator is not None:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(model, accelerator) as unwrapped:
                completions = generate_completions(
                    unwrapped, tokenizer, shard["prompt"], batch_size=batch_size, max_new_tokens=max_new_tokens,
                    num_samples=num_samples, temperature=temperature, top_p=top_p, desc=f"{label} {name}",
                    show_progress=state.is_main_process,
                )
        else:
            completions = generate_completions(
                model, tokenizer, shard["prompt"], batch_size=batch_size, max_new_tokens=max_new_tokens,
                num_samples=num_samples, temperature=temperature, top_p=top_p, desc=f"{label} {name}",
                show_progress=state.is_main_process,
            )
        records = [
            (index, sample, completion)
            for position, index in enumerate(indices)
            for sample, completion in enumerate(completions[position * num_samples : (position + 1) * num_samples])
        ]
        if state.num_processes > 1:
            records = sorted(gather_object(records))
        completions = [completion for _, _, completion in records]
        rows = [index for index, _, _ in records]
        solutions = [dataset[i][solution_column] for i in rows]
        correct, formatted = score_completions(completions, solutions, spec, solution_column)
        groups = [dataset[i][group_by] for i in rows] if group_by else None
        results[name] = summarize(correct, formatted, groups, num_samples)
        all_completions[name] = [
            {"index": i, "completion": c, "solution": s, "correct": ok, "well_formed": bool(f)}
            for i, c, s, ok, f in zip(rows, completions, solutions, correct, formatted)
        ]
    return results, all_completions
