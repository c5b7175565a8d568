"""Run by tests/trainer/test_multiprocess.py under `accelerate launch --num_processes 2` with `fsdp` (FSDP2, selected
on CPU ranks as in mig_fsdp_worker.py); its `run` is also called in the test's own process, for the single-process
reference.

MIG's two cheap scoring routes on a sharded policy, where every forward all-gathers the parameters, so every rank
must run the same number of forwards:

- `fused`: `num_iterations: 2` makes TRL run its no-gradient forward for the old log-probs; MIG's block pass replaces
  it and gives the old log-probs and l_k at once. Four steps: two generations, each trained on twice.
- `cache`: the sharded policy generates the completions (`generate` with every token forced to the script's, so the
  two ranks' completions have different step counts), and only the answer copies run against generation's key/value
  cache, in forwards of rows with similar copy tokens: the ranks need different numbers of them. Two steps.

Each rank holds one prompt's group of 4 (see SCRIPT). Writes OUT/rank<k>.json with, per generation
batch: the forward counts this rank asked the others to agree on, the scoring forwards it ran, the routes taken
(`fused`, `trl forward`, `cache`, `own pass`), l_k, and the old log-probs' per-row sums.
"""

import contextlib
import importlib.util
import json
import os
import sys

import torch
from datasets import Dataset
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for helpers
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

import trl_mig.trainer as trainer_module  # noqa: E402
from helpers import cpu_config, scripted_rollout  # noqa: E402
from trl_mig import MIGGRPOTrainer  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402


def _fsdp_worker():
    spec = importlib.util.spec_from_file_location("mig_fsdp_worker", os.path.join(os.path.dirname(__file__),
                                                                                   "mig_fsdp_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FSDP_WORKER = _fsdp_worker()
PROMPTS = FSDP_WORKER.PROMPTS
# one group of completions with 2-3 steps, one of 4 equal completions, whose prefixes are scored once (on the cache
# route: one forward of copies for one group, two or more for the other, whichever rank holds which)
SCRIPT = {PROMPTS[0]: FSDP_WORKER.SCRIPT[PROMPTS[0]], PROMPTS[1]: FSDP_WORKER.SCRIPT[PROMPTS[1]][:1] * 4}


class RouteRecordingTrainer(MIGGRPOTrainer):
    """Records, per generation batch, the forward counts asked and run, the scoring routes, l_k and old log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []
        agree = self.mig_scorer.sync_forward_count
        if agree is not None:  # set on a sharded policy: count what this rank asks for

            def asked(count):
                self.records[-1]["asked"].append(int(count))
                return agree(count)

            self.mig_scorer.sync_forward_count = asked
        # (overriding step_log_likelihoods would switch both routes off: it is how a user plugs in another scorer)
        score = self.mig_scorer.score

        def own_or_fused_pass(model, items, **kwargs):
            if not kwargs.get("completion_logps"):  # the fused pass records itself
                self.records[-1]["routes"].append("own pass")
            return score(model, items, **kwargs)

        self.mig_scorer.score = own_or_fused_pass

    def _generate_and_score_completions(self, inputs):
        before = self.mig_scorer.forward_count
        self.records.append({"asked": [], "routes": [], "fsdp2": isinstance(self.model, FSDPModule)})
        output = super()._generate_and_score_completions(inputs)
        record = self.records[-1]
        record["forwards"] = self.mig_scorer.forward_count - before
        old = output.get("old_per_token_logps")
        record["old_logp_sums"] = None if old is None else old.sum(1).tolist()
        return output

    def _fused_scoring_pass(self, fusion, model, *args, **kwargs):
        result = super()._fused_scoring_pass(fusion, model, *args, **kwargs)
        self.records[-1]["routes"].append("fused" if result is not None else "trl forward")
        return result

    def _log_mig_metrics(self, mode, loglik, *args):
        self.records[-1]["loglik"] = FSDP_WORKER.as_list(loglik)
        return super()._log_mig_metrics(mode, loglik, *args)


@contextlib.contextmanager
def recording_cache_route(trainer_holder: list):
    """Inside the block, the trainer module's `score_from_cache` tells the recording trainer that the cache route ran
    (restored after it: the test's own process runs the reference)."""
    score_from_cache = trainer_module.score_from_cache

    def recorded(*args, **kwargs):
        trainer_holder[0].records[-1]["routes"].append("cache")
        return score_from_cache(*args, **kwargs)

    trainer_module.score_from_cache = recorded
    try:
        yield
    finally:
        trainer_module.score_from_cache = score_from_cache


def forced_generation_rollout():
    """A TRL `rollout_func` in which the policy generates (greedy, synchronised across ranks), every token forced to
    the script's completion for its row, then EOS: real generation, known completions."""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        first = trainer.accelerator.process_index * len(prompts)  # this rank's rows in the global batch
        texts = [SCRIPT[p][(first + i) % trainer.num_generations] for i, p in enumerate(prompts)]
        targets = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, prompt_ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])

        def forced(row, ids):
            t = ids.shape[0] - width
            return [targets[row][t]] if t < len(targets[row]) else [tokenizer.eos_token_id]

        with torch.no_grad():
            out = trainer.model.generate(
                input_ids=input_ids, attention_mask=(input_ids != pad).long(), do_sample=False,
                max_new_tokens=trainer.args.max_completion_length, prefix_allowed_tokens_fn=forced,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                synced_gpus=trainer.accelerator.num_processes > 1, disable_compile=True,
            )
        completions = []
        for row, target in enumerate(targets):
            generated = out[row, width:].tolist()
            if generated[: len(target)] != target:
                raise RuntimeError(f"row {row}: generation did not follow the forced completion")
            completions.append(target)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout


def run(out_dir: str, fsdp: bool, route: str) -> dict:
    """Train with `route`'s settings (FSDP2 when `fsdp`) and return what this rank saw."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp_args = {}
    if fsdp:
        FSDP_WORKER.force_accelerate_fsdp_on_cpu()
        fsdp_args = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    if route == "fused":
        route_args = dict(num_iterations=2, max_steps=4)
        rollout = scripted_rollout(SCRIPT)
    else:
        route_args = dict(max_steps=2)
        rollout = forced_generation_rollout()
    tokenizer = build_char_tokenizer()
    holder = []
    trainer = RouteRecordingTrainer(
        build_tiny_model(tokenizer, seed=3).float(),
        args=cpu_config(out_dir, per_device_train_batch_size=8 // world, num_generations=4, max_completion_length=96,
                        mig_scoring_batch_size=1, mig_scoring_method="block", **route_args, **fsdp_args),
        train_dataset=Dataset.from_list([{"prompt": p, "solution": s} for p, s in zip(PROMPTS, ["20", "6"])]),
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    holder.append(trainer)
    with recording_cache_route(holder):
        trainer.train()  # must not hang
    return {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "calls": trainer.records,
        "global_step": trainer.state.global_step,
    }


if __name__ == "__main__":
    result = run(sys.argv[1], fsdp=sys.argv[2] == "fsdp", route=sys.argv[3])
    with open(os.path.join(sys.argv[1], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # as in mig_gains_worker.py: skip the interpreter's teardown of gloo's threads
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
