"""Step benchmark: a MIG-GRPO training step vs a plain GRPO step, same model, data, generation length and seeds.

Both trainers get an identical tiny Qwen2 model (same seed), the same two prompts x `--generations` completions, the
same reward functions and the same rollout. The rollout samples every completion token from the model with
`model.generate` (real generation cost), under a template that forces step headers, the think/answer tags and EOS at
fixed places, so completions have K in [1, --max-steps] steps and exactly `--completion-length` tokens (a random
tiny model would otherwise write no steps, and MIG would have nothing to score). `--rollout scripted` skips generation
(the completions are drawn from the template without the model): the step is then only rewards + MIG scoring + the
loss forward/backward, which bounds MIG's relative overhead from above.

Time: `trainer.training_step` (generation, rewards, MIG scoring, loss forward and backward; what TRL's `step_time`
covers), the two trainers alternating step by step in one process, after `--warmup` steps each, same seed per pair;
the median of `--repeats` pairs.

Memory: on CUDA, `torch.cuda.max_memory_allocated` per step, in the same interleaved run. On the CPU there is no
allocator statistic, so each variant runs in its own subprocess (`--worker`) for `--memory-steps` steps and reports
its peak resident set size over those steps (the kernel's VmHWM, reset after a warm-up step through
/proc/self/clear_refs: exact, not sampled), its RSS just after the imports and its RSS just before the steps. The
headline ratio is of the peaks above the import baseline (weights, gradients, activations, trainer state: what
`max_memory_allocated` counts on CUDA); the raw peak-RSS ratio and the ratio of the step's transient memory (peak
above the RSS before the steps) are printed too.

    python benchmarks/bench_step.py             # L = 256, K <= 8, batch 8, 4 layers hidden 256
    python benchmarks/bench_step.py --quick
    python benchmarks/bench_step.py --rollout scripted
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


IMPORT_RSS = None  # set after the heavy imports, in main()

PROMPTS = ["Compute (12+7)*3-5.\n", "Compute 81/9+4*2.\n"]
SOLUTIONS = ["52", "17"]
FREE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=().,"


# ------------------------------------------------------------------------------------------------------- rewards
def accuracy_reward(completions, solution, **kwargs):
    out = []
    for text, truth in zip(completions, solution):
        start, end = text.rfind("<answer>"), text.rfind("</answer>")
        out.append(float(0 <= start < end and text[start + len("<answer>") : end].strip() == truth))
    return out


def format_reward(completions, **kwargs):
    return [float("</think>" in text and "### Step 1" in text and "</answer>" in text) for text in completions]


# ------------------------------------------------------------------------------------------------------- rollout
def template_plans(tokenizer, solutions, length, max_steps, generator):
    """
    Per completion, a (length,) long tensor: the forced token id at each position, -1 where the model samples freely.
    `<think>`, K step headers with free text between them, `</think>\\n<answer>`, the answer (the solution for even
    rows, a wrong one for odd rows), `</answer>`, EOS at the last position.
    """
    import torch

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    plans = []
    for row, solution in enumerate(solutions):
        answer = solution if row % 2 == 0 else str(int(solution) + 1)
        steps = int(torch.randint(1, max_steps + 1, (1,), generator=generator))
        head, tail = ids("<think>"), ids("\n</think>\n<answer>" + answer + "</answer>") + [tokenizer.eos_token_id]
        headers = [ids(f"### Step {k}\n") for k in range(1, steps + 1)]
        free = length - len(head) - len(tail) - sum(map(len, headers))
        if free < steps:
            raise ValueError(f"--completion-length {length} is too short for {steps} steps")
        cuts = sorted(torch.randperm(free - 1, generator=generator)[: steps - 1].add(1).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, free])]
        plan = list(head)
        for header, size in zip(headers, sizes):
            plan += header + [-1] * size
        plan += tail
        plans.append(torch.tensor(plan))
    return torch.stack(plans)


def make_rollout(mode: str, length: int, max_steps: int):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Template(LogitsProcessor):
        """Forces the planned tokens; free positions sample from `FREE_CHARS` only (no tags, no EOS)."""

        def __init__(self, plans, prompt_width, allowed):
            self.plans, self.prompt_width, self.allowed = plans, prompt_width, allowed

        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - self.prompt_width
            forced = self.plans[:, t].to(scores.device)
            scores = scores.masked_fill(~self.allowed.to(scores.device), float("-inf"))
            rows = (forced >= 0).nonzero().squeeze(1)
            if rows.numel():
                scores[rows] = float("-inf")
                scores[rows, forced[rows]] = 0.0
            return scores

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        solutions = [SOLUTIONS[PROMPTS.index(p)] for p in prompts]
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))  # follows the step's seed
        plans = template_plans(tokenizer, solutions, length, max_steps, generator)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if mode == "scripted":
            free = torch.tensor(tokenizer(list(FREE_CHARS), add_special_tokens=False)["input_ids"]).flatten()
            fill = free[torch.randint(0, free.numel(), plans.shape, generator=generator)]
            completions = torch.where(plans >= 0, plans, fill)
        else:
            allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
            allowed[torch.tensor(tokenizer(list(FREE_CHARS), add_special_tokens=False)["input_ids"]).flatten()] = True
            tokenizer.padding_side = "left"
            batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            device = trainer.accelerator.device
            model = trainer.accelerator.unwrap_model(trainer.model)
            with torch.no_grad():
                out = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=length,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList([Template(plans, batch["input_ids"].shape[1], allowed)]),
                    disable_compile=True,
                )
            completions = out[:, batch["input_ids"].shape[1] :].cpu()
        return {"prompt_ids": prompt_ids, "completion_ids": completions.tolist(), "logprobs": None}

    return rollout


# ------------------------------------------------------------------------------------------------------ trainers
def build_trainer(variant, args, output_dir):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_mig import MIGConfig, MIGGRPOTrainer
    from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, "qwen2", args.hidden, args.layers, args.heads, args.kv_heads, seed=0).float()
    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=len(PROMPTS) * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not cuda,
        bf16=False,
        seed=0,
    )
    if variant == "mig":
        config = MIGConfig(**common, mig_scoring_batch_size=args.scoring_batch_size)
    else:
        config = GRPOConfig(**common)
    trainer_class = MIGGRPOTrainer if variant == "mig" else GRPOTrainer
    dataset = Dataset.from_list([{"prompt": p, "solution": s} for p, s in zip(PROMPTS, SOLUTIONS)])
    trainer = trainer_class(
        model,
        reward_funcs=[accuracy_reward, format_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=make_rollout(args.rollout, args.completion_length, args.max_steps),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def batch(args):
    return [{"prompt": p, "solution": s} for p, s in zip(PROMPTS, SOLUTIONS) for _ in range(args.generations)]


def run_step(trainer, args, seed):
    """One training step (what TRL's step_time covers); returns (seconds, peak CUDA bytes or None)."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch(args), None)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    trainer.model.zero_grad(set_to_none=False)  # keep the gradient buffers: every step then has the same footprint
    return seconds, peak


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args):
    """One variant alone in this process: its peak RSS over `--memory-steps` steps, after one warm-up step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.worker, args, tmp)
        run_step(trainer, args, seed=999)  # gradients allocated, caches warm: the steady state
        exact = reset_peak_rss()
        ready = rss_mb()
        for step in range(args.memory_steps):
            run_step(trainer, args, seed=1000 + step)
        peak = status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"variant": args.worker, "import_rss_mb": IMPORT_RSS, "ready_rss_mb": ready, "peak_rss_mb": peak,
             "peak_is_steps_only": exact}
        )
    )


def measure_memory_cpu(args):
    """Each variant in its own subprocess, run one after the other (never at the same time)."""
    results = {}
    for variant in ("grpo", "mig"):
        command = [sys.executable, os.path.abspath(__file__), "--worker", variant, *sys.argv[1:]]
        # a fixed mmap threshold: glibc then hands large freed blocks straight back, so RSS follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main(argv=None):
    global IMPORT_RSS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=8, help="K per completion is drawn from 1..max-steps")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (2 prompts)")
    parser.add_argument("--rollout", choices=["generate", "scripted"], default="generate")
    parser.add_argument("--scoring-batch-size", type=int, default=8, help="MIGConfig.mig_scoring_batch_size")
    parser.add_argument("--repeats", type=int, default=8, help="timed step pairs (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory worker (CPU)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--quick", action="store_true", help="4 timed pairs, L = 128")
    parser.add_argument("--worker", choices=["grpo", "mig"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.completion_length = 4, 128

    import logging

    import torch

    import trl  # noqa: F401  (heavy imports before the baseline RSS)
    import trl_mig  # noqa: F401

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    IMPORT_RSS = rss_mb()
    if args.worker:
        return worker(args)

    cuda = torch.cuda.is_available()
    print(f"machine: {machine()}")
    print(
        f"model: qwen2 {args.layers} layers, hidden {args.hidden}; batch {len(PROMPTS)} prompts x {args.generations}, "
        f"completions {args.completion_length} tokens, K in 1..{args.max_steps}, rollout: {args.rollout}, "
        f"MIG scoring micro-batch {args.scoring_batch_size}; "
        f"median of {args.repeats} interleaved step pairs after {args.warmup} warm-up step(s) each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {v: build_trainer(v, args, os.path.join(tmp, v)) for v in ("grpo", "mig")}
        times = {v: [] for v in trainers}
        peaks = {v: [] for v in trainers}
        for step in range(args.warmup + args.repeats):
            order = ["grpo", "mig"] if step % 2 == 0 else ["mig", "grpo"]
            for variant in order:
                seconds, peak = run_step(trainers[variant], args, seed=step)
                if step >= args.warmup:
                    times[variant].append(seconds)
                    peaks[variant].append(peak)
            if step >= args.warmup:
                pair = step - args.warmup + 1
                print(f"  pair {pair}: grpo {times['grpo'][-1]:.3f} s, mig {times['mig'][-1]:.3f} s", flush=True)
        mig_metrics = trainers["mig"]._metrics["train"]
        steps_logged = mig_metrics.get("mig/steps", [])
    grpo_s, mig_s = statistics.median(times["grpo"]), statistics.median(times["mig"])
    time_ratio = mig_s / grpo_s
    print(f"step time: grpo {grpo_s:.3f} s, mig {mig_s:.3f} s (median) -> ratio {time_ratio:.3f}")
    if steps_logged:
        print(f"mean steps per completion K (mig/steps): {statistics.mean(steps_logged):.2f}")

    memory = {}
    if cuda:
        grpo_peak, mig_peak = max(peaks["grpo"]), max(peaks["mig"])
        memory = {"grpo_peak_mb": grpo_peak / 2**20, "mig_peak_mb": mig_peak / 2**20, "ratio": mig_peak / grpo_peak}
        print(
            f"peak CUDA memory: grpo {memory['grpo_peak_mb']:.1f} MB, mig {memory['mig_peak_mb']:.1f} MB -> "
            f"ratio {memory['ratio']:.3f}"
        )
    elif not args.no_memory:
        workers = measure_memory_cpu(args)
        g, m = workers["grpo"], workers["mig"]
        above = (m["peak_rss_mb"] - m["import_rss_mb"]) / (g["peak_rss_mb"] - g["import_rss_mb"])
        transient = (m["peak_rss_mb"] - m["ready_rss_mb"]) / max(g["peak_rss_mb"] - g["ready_rss_mb"], 1e-9)
        memory = {
            "grpo_peak_rss_mb": round(g["peak_rss_mb"], 1),
            "mig_peak_rss_mb": round(m["peak_rss_mb"], 1),
            "grpo_import_rss_mb": round(g["import_rss_mb"], 1),
            "mig_import_rss_mb": round(m["import_rss_mb"], 1),
            "grpo_ready_rss_mb": round(g["ready_rss_mb"], 1),
            "mig_ready_rss_mb": round(m["ready_rss_mb"], 1),
            "ratio": round(above, 3),
            "raw_rss_ratio": round(m["peak_rss_mb"] / g["peak_rss_mb"], 3),
            "step_transient_ratio": round(transient, 3),
            "peak_is_steps_only": g["peak_is_steps_only"] and m["peak_is_steps_only"],
        }
        print(
            f"peak RSS during steps: grpo {g['peak_rss_mb']:.1f} MB, mig {m['peak_rss_mb']:.1f} MB (raw ratio "
            f"{memory['raw_rss_ratio']:.3f})\n"
            f"  above the import baseline ({g['import_rss_mb']:.0f} / {m['import_rss_mb']:.0f} MB; weights, "
            f"gradients, activations): ratio {above:.3f}\n"
            f"  above the RSS before the steps ({g['ready_rss_mb']:.0f} / {m['ready_rss_mb']:.0f} MB; the step's "
            f"transient memory: {g['peak_rss_mb'] - g['ready_rss_mb']:.1f} / "
            f"{m['peak_rss_mb'] - m['ready_rss_mb']:.1f} MB): ratio {transient:.3f}"
        )
    summary = {
        "benchmark": "step",
        "machine": machine(),
        "rollout": args.rollout,
        "completion_length": args.completion_length,
        "max_steps": args.max_steps,
        "scoring_batch_size": args.scoring_batch_size,
        "repeats": args.repeats,
        "grpo_step_s": round(grpo_s, 4),
        "mig_step_s": round(mig_s, 4),
        "time_ratio": round(time_ratio, 3),
        "memory_ratio": None if not memory else round(memory["ratio"], 3),
        "memory": memory,
        "targets_met": {
            "time_ratio<=1.10": time_ratio <= 1.10,
            "memory_ratio<=1.20": None if not memory else memory["ratio"] <= 1.20,
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
