"""Do MIG's step gains single out the right steps? A check on the built-in arithmetic task, where every step can be
graded against the gold solution.

For held-out problems it samples a group of completions per prompt (as training does), computes each completion's
MIG credit with `trl_mig.inspect_completion` (the trainer's own segmentation, scoring and gains), and grades every
step up to each completion's first wrong one (a wrong operand, operator or result; later steps build on a wrong value
and are not graded). It prints:

- per kind of step (right, first wrong): how many, the share that lift the watermark (breakthroughs) and the mean
  gain g_k;
- the AUC of the MIG reward (sum of gains) for telling a completion with every step right from one with a wrong step,
  within each prompt's group (1.0: always ranked above, 0.5: chance), and the same for the outcome reward;
- the same AUC among a group's failed completions for telling more leading right steps from fewer ("partial"): the
  partial credit that an oracle of step correctness gives (benchmarks/oracle_step_credit.py), and outcome credit
  cannot;
- where a policy gradient can act at all: per kind of step, its mean "surprise" sum_t (1 - p_t) over its tokens (p_t:
  the policy's probability of the sampled token at temperature 1). The gradient of log p_t with respect to the logits
  has norm about sqrt(2) (1 - p_t), so a step the model writes with certainty barely moves whatever credit it gets.
  The right steps of failed completions are the ones outcome credit pushes down and step credit would spare.

About a minute on 2 CPU cores:

    python benchmarks/step_credit_check.py --config recipes/demo/mig.yaml [--model PATH] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/demo/mig.yaml", help="a recipe with a builtin: model and dataset")
    parser.add_argument("--model", default=None, help="a trained model folder (default: the recipe's warm start)")
    parser.add_argument("--split", default="validation", help="held-out split the problems come from")
    parser.add_argument("--prompts", type=int, default=64, help="problems (each one group)")
    parser.add_argument("--generations", type=int, default=None, help="completions per problem (recipe's default)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (recipe's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from _common import every_step_right, grade_steps, recipe_and_model
    from trl_mig import inspect_completion
    from trl_mig.cli.data import load_dataset_dict
    from trl_mig.evaluation import generate_completions

    torch.manual_seed(args.seed)
    script, builtin, config, tokenizer, model = recipe_and_model(args.config, args.model)
    rows = load_dataset_dict(script.dataset_name, None, builtin)[args.split].select(range(args.prompts))
    group = args.generations or config.num_generations
    temperature = args.temperature if args.temperature is not None else config.temperature
    texts = generate_completions(
        model, tokenizer, rows["prompt"], batch_size=64, max_new_tokens=config.max_completion_length,
        num_samples=group, temperature=temperature, show_progress=False,
    )

    kinds = {"right": [], "first_wrong": []}  # (gain, breakthrough) per graded step
    surprise = {"right_in_correct": [], "right_in_failed": [], "first_wrong": []}  # sum_t (1 - p_t) per step
    auc_mig, auc_outcome = [], []
    partial_mig, partial_outcome = [], []  # among failed completions: ranked by their count of leading right steps?
    for index, row in enumerate(rows):
        credits = inspect_completion(
            model, tokenizer, row["prompt"], texts[index * group : (index + 1) * group], row["solution"], config
        )
        all_right, leading_right = [], []
        for credit in credits:
            step_texts = [step.text for step in credit.steps]
            grades = grade_steps(row["expression"], step_texts)
            all_right.append(every_step_right(row["expression"], step_texts))
            leading_right.append(sum(grades))
            token_surprise = sampled_token_surprise(model, tokenizer, row["prompt"], credit.completion)
            for step, right in zip(credit.steps, grades):
                if step.gain is not None:
                    kinds["right" if right else "first_wrong"].append((step.gain, step.breakthrough))
                start, end = step.token_span
                kind = "first_wrong" if not right else "right_in_correct" if credit.correct else "right_in_failed"
                surprise[kind].append(float(token_surprise[start:end].sum()))
        for scores, out, partial in (
            ([c.reward for c in credits], auc_mig, partial_mig),
            ([c.outcome_reward for c in credits], auc_outcome, partial_outcome),
        ):
            if any(score is None for score in scores):
                continue
            out.extend(concordance(scores, [all_right[i] for i in range(group)], range(group)))
            failed = [i for i in range(group) if not all_right[i]]
            partial.extend(concordance(scores, leading_right, failed))

    result = {
        "model": model.name_or_path, "split": args.split, "prompts": args.prompts, "generations": group,
        "temperature": temperature,
        "steps": {
            kind: {
                "count": len(values),
                "breakthrough_rate": round(sum(b for _, b in values) / max(1, len(values)), 3),
                "mean_gain": round(sum(g for g, _ in values) / max(1, len(values)), 3),
            }
            for kind, values in kinds.items()
        },
        "step_surprise": {
            kind: {"count": len(values), "mean": round(sum(values) / max(1, len(values)), 4)}
            for kind, values in surprise.items()
        },
        "groups_with_both": len(auc_mig),
        "auc_mig_reward": round(sum(auc_mig) / max(1, len(auc_mig)), 3),
        "auc_outcome_reward": round(sum(auc_outcome) / max(1, len(auc_outcome)), 3),
        "groups_with_failed_pairs": len(partial_mig),
        "partial_auc_mig_reward": round(sum(partial_mig) / max(1, len(partial_mig)), 3),
        "partial_auc_outcome_reward": round(sum(partial_outcome) / max(1, len(partial_outcome)), 3),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def concordance(scores, truth, members) -> list[float]:
    """
    How often `scores` order the pairs of `members` (indices into a group) as `truth` does, counting ties as half:
    `[]` when no two members differ in `truth`, else one value in [0, 1] (1: every pair ordered right, 0.5: chance).
    """
    pairs = [(scores[i], scores[j]) for i in members for j in members if truth[i] > truth[j]]
    if not pairs:
        return []
    return [sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)]


def sampled_token_surprise(model, tokenizer, prompt, completion: str):
    """`(C,)` tensor: 1 - p(token) for each of the completion's C tokens, teacher-forced after the prompt, at T=1."""
    import torch

    from trl_mig.inspection import prompt_token_ids

    prompt_ids = prompt_token_ids(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    chosen = logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]
    return 1.0 - chosen.exp()


if __name__ == "__main__":
    main()
