"""Do MIG's step gains single out the right steps? A check on the built-in arithmetic task, where every step can be
graded against the gold solution.

For held-out problems it samples a group of completions per prompt (as training does), computes each completion's
MIG credit with `trl_mig.inspect_completion` (the trainer's own segmentation, scoring and gains), and grades every
step up to each completion's first wrong one (a wrong operand, operator or result; later steps build on a wrong value
and are not graded). It prints:

- per kind of step (right, first wrong): how many, the share that lift the watermark (breakthroughs) and the mean
  gain g_k;
- the AUC of the MIG reward (sum of gains) for telling a completion with every step right from one with a wrong step,
  within each prompt's group (1.0: always ranked above, 0.5: chance), and the same for the outcome reward.

About a minute on 2 CPU cores:

    python benchmarks/step_credit_check.py --config recipes/demo/mig.yaml [--model PATH] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import re


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

    from _common import recipe_and_model
    from trl_mig import inspect_completion
    from trl_mig.builtin.tools import parse_expression
    from trl_mig.data import load_dataset_dict
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
    auc_mig, auc_outcome = [], []
    for index, row in enumerate(rows):
        gold = [f"{a}{op}{b}={c}" for a, op, b, c in parse_expression(row["expression"]).steps()]
        credits = inspect_completion(
            model, tokenizer, row["prompt"], texts[index * group : (index + 1) * group], row["solution"], config
        )
        all_right = []
        for credit in credits:
            right_so_far = True
            for k, step in enumerate(credit.steps):
                found = re.search(r"\d+[-+*]\d+=\d+", step.text)
                right = found is not None and k < len(gold) and found.group() == gold[k]
                if step.gain is not None:
                    kinds["right" if right else "first_wrong"].append((step.gain, step.breakthrough))
                if not right:
                    right_so_far = False
                    break
            all_right.append(right_so_far and len(credit.steps) == len(gold))
        for scores, out in ((
            [c.reward for c in credits], auc_mig), ([c.outcome_reward for c in credits], auc_outcome
        )):
            pairs = [(scores[i], scores[j]) for i in range(group) if all_right[i] for j in range(group) if not all_right[j]]
            if pairs and all(s is not None for s in scores):
                out.append(sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs))

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
        "groups_with_both": len(auc_mig),
        "auc_mig_reward": round(sum(auc_mig) / max(1, len(auc_mig)), 3),
        "auc_outcome_reward": round(sum(auc_outcome) / max(1, len(auc_outcome)), 3),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
