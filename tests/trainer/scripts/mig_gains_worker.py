"""Run by tests/test_multiprocess.py, alone or under `accelerate launch --num_processes 2`.

Scores one fixed global batch of 12 scripted completions (3 prompts x 4), then trains two steps, and writes what this
rank saw to OUT/rank<k>.json: world size, the global per-completion gains and MIG advantages, this rank's
advantages and the scoring forwards it ran. With 2 processes each rank holds 6 rows, so the middle prompt group is
split across the ranks.
"""

import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for helpers
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

from helpers import cpu_config, scripted_rollout  # noqa: E402
from trl_mig import MIGGRPOTrainer  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402

out_dir = sys.argv[1]
PROMPTS = ["Compute (2+3)*4.\n", "Compute 7-1.\n", "Compute 2*2.\n"]
SCRIPT = {
    PROMPTS[0]: [
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>",
        "<think>### Step 1\n2+3=6\n### Step 2\n6*4=24\n</think>\n<answer>24</answer>",
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=",
        "<think>2+3=5\n\n5*4=20\n\nso 20</think>\n<answer>20</answer>",
    ],
    PROMPTS[1]: [
        "<think>### Step 1\n7-1=6\n</think>\n<answer>6</answer>",
        "<think>### Step 1\n7-1=5\n</think>\n<answer>5</answer>",
        "<think>### Step 1\n7-1=6\n### Step 2\n6=6\n### Step 3\nok</think>\n<answer>6</answer>",
        "<think>7 minus 1</think>\n<answer>6</answer>",
    ],
    PROMPTS[2]: [
        "<think>### Step 1\n2*2=4\n</think>\n<answer>4</answer>",
        "<think>### Step 1\n2*2=4\n</think>\n<answer>4</answer>",
        "<think>### Step 1\n2*2=22\n</think>\n<answer>22</answer>",
        "<think>### Step 1\n2*2",
    ],
}
rows = [{"prompt": p, "solution": s} for p, s in zip(PROMPTS, ["20", "6", "4"]) for _ in range(4)]
per_device = len(rows) // int(os.environ.get("WORLD_SIZE", "1"))

tokenizer = build_char_tokenizer()
trainer = MIGGRPOTrainer(
    build_tiny_model(tokenizer, seed=3).float(),
    args=cpu_config(out_dir, per_device_train_batch_size=per_device, max_steps=2, mig_scoring_batch_size=1,
                    mig_scoring_method="prefix"),
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
    rollout_func=scripted_rollout(SCRIPT),
)
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
trainer.model.train()
output = trainer._generate_and_score_completions(rows[rank * per_device : (rank + 1) * per_device])
result = {
    "rank": rank,
    "world": world,
    "gains": list(trainer._logs["extra"]["mig_gain"]),
    "mig_advantages": list(trainer._logs["extra"]["mig_advantage"]),
    "local_advantages": output["advantages"].tolist(),
    "scoring_forwards": trainer.mig_scorer.forward_count,
}
trainer.train()  # two real steps: must not hang, must log the same metrics on every rank
result["gain_sum_logged"] = [entry["mig/gain_sum"] for entry in trainer.state.log_history if "mig/gain_sum" in entry]
result["global_step"] = trainer.state.global_step
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean gloo teardown; exiting without it can abort a rank
# Skip the interpreter's teardown: destroying gloo's threads there occasionally aborts a rank ("terminate called
# without an active exception") after its results are written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
