"""Run by tests/trainer/test_multiprocess.py under `accelerate launch --num_processes 2` with `fsdp`; its `run` is
also called in the test's own process, for the single-process reference.

Trains two steps on 2 prompts x 4 scripted completions whose step counts differ by prompt: one prompt's completions
have 2-3 steps, the other's 1. Each rank holds one prompt's group (GRPO repeats a prompt `num_generations` times in a
row), and scores one row per prefix, one row per forward, so the two ranks need different numbers of scoring forwards.
With `fsdp` the policy is sharded with FSDP2 (every forward all-gathers the parameters, so unequal forward counts hang
or abort with a collective mismatch). Writes what this rank saw to OUT/rank<k>.json, one record per scoring call: the
forwards its rows needed, the forwards it ran, its l_k, the gathered gains; for the first call also l_k by the block
method (split attention) on the same, sharded, model, and l_k of the first call's rows by the initial model wrapped
in torch's FSDP1.
"""

import json
import math
import os
import sys

import torch
from datasets import Dataset
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for helpers
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

from helpers import cpu_config, scripted_rollout  # noqa: E402
from trl_mig import MIGGRPOTrainer  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402
from trl_mig.scoring import ScoringItem, StepLikelihoodScorer, distinct_prefixes  # noqa: E402


def force_accelerate_fsdp_on_cpu():
    """
    Make accelerate take its FSDP path on CPU ranks.

    accelerate (1.16, `AcceleratorState.__init__`) switches to `DistributedType.FSDP` only on top of a GPU-like
    distributed type (MULTI_GPU, MULTI_XPU, ...); CPU ranks are MULTI_CPU, so an FSDP plugin is silently ignored and
    the model is wrapped in DDP. torch's FSDP2 itself runs on CPU with gloo: after the state is built, select FSDP
    exactly as accelerate does on a GPU (its own state and the PartialState it shares), so that `prepare` runs
    accelerate's FSDP2 preparation (`fully_shard` on a CPU device mesh).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def as_list(values: torch.Tensor) -> list:
    """A float tensor as nested lists, NaN (a step the completion does not have) as None: valid JSON."""
    return [[None if math.isnan(v) else v for v in row] for row in values.tolist()]


class RecordingTrainer(MIGGRPOTrainer):
    """Records, per scoring call, the forwards needed and run, l_k, and the gathered gains."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def step_log_likelihoods(self, batch):
        # one row per distinct prefix and variant (a prefix several completions share is scored once)
        distinct = distinct_prefixes([
            ScoringItem(prompt, content, seg.boundaries, blocks)
            for prompt, content, seg, blocks in zip(batch.prompt_ids, batch.completion_ids, batch.segments,
                                                    batch.answers)
        ])
        needed = sum(item.num_prefixes * len(item.answers) for item in distinct.items)
        before = self.mig_scorer.forward_count
        loglik = super().step_log_likelihoods(batch)
        layer_weight = self.model.model.layers[0].mlp.up_proj.weight
        record = {
            "needed": needed,  # one row per forward
            "forwards": self.mig_scorer.forward_count - before,
            "loglik": as_list(loglik),
            "fsdp2": isinstance(self.model, FSDPModule),
            # between forwards a decoder layer holds only this rank's shard of its weights
            "layer_weight": type(layer_weight).__name__,
        }
        if not self.records:
            # the block method, split attention included, on the same model: routed through a sharded module's config
            items = [
                ScoringItem(prompt, content, seg.boundaries, blocks)
                for prompt, content, seg, blocks in zip(batch.prompt_ids, batch.completion_ids, batch.segments,
                                                        batch.answers)
            ]
            self.first_items = items
            block = StepLikelihoodScorer("block", batch_size=2, sync_forward_count=self.mig_scorer.sync_forward_count)
            with torch.no_grad():
                scores = block.score(self.model, items)
            record["block_loglik"] = [score.tolist() for score in scores]
            record["block_split"] = block.split_attention and block._split_verified
            record["block_forwards"] = block.forward_count
        self.records.append(record)
        return loglik

    def compose_credit(self, rewards_per_func, gains, num_steps, scorable, step_ids, group_size):
        self.records[-1]["gains"] = gains.tolist()  # gathered from every rank, (8, mig_max_steps)
        return super().compose_credit(rewards_per_func, gains, num_steps, scorable, step_ids, group_size)


def score_with_fsdp1(tokenizer, items, sync) -> dict:
    """
    l_k of `items` by the initial model wrapped in torch's FSDP1 (accelerate cannot prepare FSDP1 on CPU: it passes
    `device_id=cpu:0`, which FSDP1 rejects against its compute device `cpu`), block (split) and prefix, one row per
    forward. FSDP1 is a wrapper that forwards attribute look-ups (`config`) to the wrapped model.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    model = FullyShardedDataParallel(
        build_tiny_model(tokenizer, seed=3).float().eval(),
        auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    result = {"wrapper": type(model).__name__}
    for method in ("block", "prefix"):
        scorer = StepLikelihoodScorer(method, batch_size=1, sync_forward_count=sync)
        result[method] = {
            "loglik": [score.tolist() for score in scorer.score(model, items)],
            "forwards": scorer.forward_count,
            "needed": scorer.plan(items, method),
            "split": scorer.split_attention and scorer._split_verified,
        }
    return result


PROMPTS = ["Compute (2+3)*4.\n", "Compute 7-1.\n"]
SCRIPT = {
    PROMPTS[0]: [
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>",
        "<think>### Step 1\n2+3=6\n### Step 2\n6*4=24\n### Step 3\nso 24\n</think>\n<answer>24</answer>",
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=",
        "<think>### Step 1\n2+3\n### Step 2\n=5\n### Step 3\n5*4=20</think>\n<answer>20</answer>",
    ],
    PROMPTS[1]: [
        "<think>### Step 1\n7-1=6\n</think>\n<answer>6</answer>",
        "<think>### Step 1\n7-1=5\n</think>\n<answer>5</answer>",
        "<think>7 minus 1</think>\n<answer>6</answer>",
        "<think>### Step 1\n7-1=6\n</think>\n<answer>6</answer>",
    ],
}


def run(out_dir: str, fsdp: bool) -> dict:
    """Train two steps (FSDP2 when `fsdp`) and return what this rank saw."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp_args = {}
    if fsdp:
        force_accelerate_fsdp_on_cpu()
        fsdp_args = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    tokenizer = build_char_tokenizer()
    trainer = RecordingTrainer(
        build_tiny_model(tokenizer, seed=3).float(),
        args=cpu_config(out_dir, per_device_train_batch_size=8 // world, num_generations=4, max_steps=2,
                        mig_scoring_batch_size=1, mig_scoring_method="prefix", **fsdp_args),
        train_dataset=Dataset.from_list([{"prompt": p, "solution": s} for p, s in zip(PROMPTS, ["20", "6"])]),
        processing_class=tokenizer,
        rollout_func=scripted_rollout(SCRIPT),
    )
    trainer.train()  # two real steps: must not hang
    result = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "calls": trainer.records,
        "global_step": trainer.state.global_step,
    }
    if fsdp:
        result["fsdp1"] = score_with_fsdp1(tokenizer, trainer.first_items, trainer.mig_scorer.sync_forward_count)
    return result


if __name__ == "__main__":
    result = run(sys.argv[1], fsdp=sys.argv[2:] == ["fsdp"])
    with open(os.path.join(sys.argv[1], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # a clean gloo teardown; exiting without it can abort a rank
    # as in mig_gains_worker.py: skip the interpreter's teardown of gloo's threads
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
