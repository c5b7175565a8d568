"""Step benchmark: MIG-GRPO vs plain GRPO over whole generation cycles, same model, data, generation length and seeds.

Both trainers get an identical tiny Qwen2 model (same seed, loaded from the same folder), the same `--prompts` prompts
x `--generations` completions (64 x 8 = 512 completions per generation batch by default), the same reward functions
and the same rollout. The rollout samples every completion token from the model with `model.generate` (real
generation cost), under a template that forces step headers, the think/answer tags and EOS at fixed places, so
completions have K in [1, --max-steps] steps and exactly `--completion-length` tokens (a random tiny model would
otherwise write no steps, and MIG would have nothing to score). Free positions take any token that decodes to plain
text (lower-case letters, digits, arithmetic, math symbols): single characters with `--tokenizer char`, also
multi-character tokens with the trained tokenizers of `trl_mig.builtin.tokenizers` (`byte_bpe`,
`metaspace_unigram`), where every step also holds one forced multi-byte math symbol (e.g. `×`, `≤`, `→`; some are
learned tokens, others spread over byte tokens), so segmentation maps characters to tokens that cover several bytes. `--rollout scripted` skips generation (the completions are drawn from
the template without the model): the cycle is then rewards + MIG scoring + TRL's forwards and backwards, which bounds
MIG's relative overhead from above.

Presets (`--preset`; `all` runs the four in sequence and ends with a markdown table of them). Every preset keeps the
generation batch and the micro-batch (`per_device_train_batch_size`, `--micro-batch`, 64 by default), so
`steps_per_generation` = generation batch / micro-batch (8 by default) in all of them:

- `default`: num_iterations 1, gradient_accumulation_steps = steps_per_generation (one optimizer step covers the
  generation batch). TRL runs no extra forward: the loss's own forward and backward only.
- `old_logps`: gradient_accumulation_steps = steps_per_generation / 2 (8 and 4 by default; 2 and 1 with `--quick` or
  `--micro-batch 256`), so one generation feeds two optimizer steps and TRL runs its no-grad policy forward for
  `old_per_token_logps` (`gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0` in
  `_generate_and_score_completions`); on the CPU this stands in for vLLM, where TRL always runs that forward.
- `iterations2`: num_iterations 2: each generation batch is trained on twice (TRL then runs the old-logp forward too).
- `reference`: beta 0.04: TRL loads a reference model and runs its forward for the KL term; MIG scores with that
  reference model (`mig_likelihood_model="reference"`).

Time: one generation cycle, i.e. the `steps_per_generation * num_iterations` calls of `trainer.training_step` between
two generations (the first generates, rewards, MIG-scores and trains on the first micro-batch; the others train on
the buffered ones; what TRL's `step_time` sums over, without the optimizer step, which is the same for both). The two
trainers alternate cycle by cycle in one process, after `--warmup` cycles each, same seed per pair; the median of
`--repeats` pairs. The JSON line also records which of TRL's no-grad forwards ran (`trl_forwards`: whether the
buffered micro-batches carry `old_per_token_logps` / `ref_per_token_logps`), how many generations and training
steps each cycle held, and the tokens of each trainer's no-gradient forwards besides generation (`no_grad_tokens`,
rows x columns with padding: TRL's old-logp or reference forward, MIG's scoring pass; `no_grad_token_ratio`, MIG's
over GRPO's, where GRPO runs one): unlike time, a count that other jobs on the machine cannot disturb.

Memory: on CUDA, `torch.cuda.max_memory_allocated` per cycle, in the same interleaved run. On the CPU there is no
allocator statistic, so each variant runs in its own subprocess (`--worker`) for `--memory-cycles` cycles and reports
its peak resident set size over those cycles (the kernel's VmHWM, reset after a warm-up cycle through
/proc/self/clear_refs: exact, not sampled), its RSS just after the imports and its RSS just before the cycles. The
headline ratio is of the peaks above the import baseline (weights, gradients, activations, trainer state, the
reference model: what `max_memory_allocated` counts on CUDA); the raw peak-RSS ratio and the ratio of the cycle's
transient memory (peak above the RSS before the cycles) are printed too.

    python benchmarks/bench_step.py                      # preset default: 64 prompts x 8, L = 256, K <= 8
    python benchmarks/bench_step.py --preset all         # the four presets, then a markdown table
    python benchmarks/bench_step.py --preset old_logps --tokenizer byte_bpe
    python benchmarks/bench_step.py --quick              # tiny sizes: a smoke test, not a measurement
    python benchmarks/bench_step.py --rollout scripted
    python benchmarks/bench_step.py --profile outputs/profile.txt   # + torch profiler tables of one cycle each

`--profile FILE`: after a preset's timed cycles, one more cycle of each trainer runs under `torch.profiler` (CPU, and
CUDA where present), and FILE gets, per trainer, trl-mig's named stages (`mig/...` ranges of trl_mig/trainer.py,
time including what they call) and the operators that took the most self time (device time on CUDA, else CPU);
with `--preset all`, one file per preset (FILE's stem + the preset's name). The profiled cycle is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import library_commit, machine  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


IMPORT_RSS = None  # set after the heavy imports, in main()

FREE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=().,"
# multi-byte in UTF-8 (2-3 bytes each): forced once per step with tokenizers that encode them
MATH_SYMBOLS = ("×", "÷", "−", "≤", "≥", "≠", "√", "∑", "π", "→")
VARIANTS = ("grpo", "mig")
TOKENIZERS = ("char", "byte_bpe", "metaspace_unigram")


# ------------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """What a preset changes in TRL's configuration; the batch sizes are the command line's."""

    description: str
    num_iterations: int = 1
    optimizer_steps_per_generation: int = 1  # > 1: generation and optimizer steps misaligned (old-logp forward)
    beta: float = 0.0
    mig_likelihood_model: str = "policy"


TIME_TARGETS = {"default": 1.08, "old_logps": 1.03, "iterations2": 1.03, "reference": 1.03}
PRESETS = {
    "default": Preset("num_iterations 1, one optimizer step per generation batch"),
    "old_logps": Preset(
        "two optimizer steps per generation batch: TRL's no-grad old-logp forward", optimizer_steps_per_generation=2
    ),
    "iterations2": Preset("num_iterations 2: two passes over each generation batch", num_iterations=2),
    "reference": Preset("beta 0.04, MIG scores with the reference model", beta=0.04, mig_likelihood_model="reference"),
}


def batch_plan(args, preset: Preset) -> dict:
    """TRL's batch settings for `preset`: the generation batch split into micro-batches, and the cycle's length."""
    completions = args.prompts * args.generations
    if completions % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch} must divide the generation batch ({completions}).")
    steps_per_generation = completions // args.micro_batch
    if steps_per_generation % preset.optimizer_steps_per_generation:
        raise ValueError(
            f"steps_per_generation {steps_per_generation} (generation batch / --micro-batch) must be a multiple of "
            f"{preset.optimizer_steps_per_generation} for this preset."
        )
    return {
        "prompts": args.prompts,
        "generations": args.generations,
        "completions_per_generation": completions,
        "per_device_train_batch_size": args.micro_batch,
        "steps_per_generation": steps_per_generation,
        "gradient_accumulation_steps": steps_per_generation // preset.optimizer_steps_per_generation,
        "num_iterations": preset.num_iterations,
        "training_steps_per_cycle": steps_per_generation * preset.num_iterations,
    }


# ---------------------------------------------------------------------------------------------------------- data
def make_prompts(n: int, answer: str = "final") -> dict[str, str]:
    """`n` distinct arithmetic prompts -> their solutions (fixed seed): the final value, or with `answer="running"`
    every intermediate value and the final one, space-separated (the built-in task's `task_answer: running`, whose
    longer answers make every answer copy longer)."""
    rng = random.Random(0)
    prompts = {}
    while len(prompts) < n:
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        d = rng.randint(1, (a + b) * c - 1)
        values = [a + b, (a + b) * c, (a + b) * c - d]
        prompts[f"Compute ({a}+{b})*{c}-{d}.\n"] = " ".join(map(str, values if answer == "running" else values[-1:]))
    return prompts


def build_tokenizer(kind: str):
    """A local tokenizer of `kind` (`trl_mig.builtin.tokenizers`): the byte-level BPE and Unigram kinds learn from a
    corpus in the step format with math symbols, so some symbols are single tokens and others span byte tokens."""
    from trl_mig.builtin.tokenizers import tiny_tokenizer

    return tiny_tokenizer(kind)


def free_token_ids(tokenizer) -> list[int]:
    """The tokens a free position may take: those that decode to `FREE_CHARS` and `MATH_SYMBOLS` only (for BPE
    tokenizers, multi-character and merged multi-byte tokens too; never special tokens or partial bytes)."""
    alphabet = set(FREE_CHARS) | set("".join(MATH_SYMBOLS))
    special = set(tokenizer.all_special_ids)
    free = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id not in special and text and set(text) <= alphabet:
            free.append(token_id)
    return free


def encodable_symbols(tokenizer) -> list[str]:
    """The `MATH_SYMBOLS` the tokenizer encodes and decodes back unchanged (none for the ASCII char tokenizer)."""
    symbols = []
    for symbol in MATH_SYMBOLS:
        ids = tokenizer(symbol, add_special_tokens=False)["input_ids"]
        if ids and tokenizer.unk_token_id not in ids and tokenizer.decode(ids).strip() == symbol:
            symbols.append(symbol)
    return symbols


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
def template_plans(tokenizer, solutions, length, max_steps, generator, symbols=()):
    """
    Per completion, a (length,) long tensor: the forced token id at each position, -1 where the model samples freely.
    `<think>`, K step headers with free text between them (and one forced symbol from `symbols` in each step's text,
    when there are any), `</think>\\n<answer>`, the answer (the solution for even rows, a wrong one for odd rows),
    `</answer>`, EOS at the last position.
    """
    import torch

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    symbol_ids = [ids(symbol) for symbol in symbols]
    plans = []
    for row, solution in enumerate(solutions):
        *head_values, last = solution.split()
        answer = solution if row % 2 == 0 else " ".join([*head_values, str(int(last) + 1)])
        steps = int(torch.randint(1, max_steps + 1, (1,), generator=generator))
        head, tail = ids("<think>"), ids("\n</think>\n<answer>" + answer + "</answer>") + [tokenizer.eos_token_id]
        headers = [ids(f"### Step {k}\n") for k in range(1, steps + 1)]
        # one symbol per step (none without symbols), in the middle of the step's free text
        marks = [symbol_ids[int(torch.randint(len(symbol_ids), (1,), generator=generator))] if symbol_ids else []
                 for _ in headers]
        free = length - len(head) - len(tail) - sum(map(len, headers)) - sum(map(len, marks))
        if free < steps:
            raise ValueError(f"--completion-length {length} is too short for {steps} steps")
        cuts = sorted(torch.randperm(free - 1, generator=generator)[: steps - 1].add(1).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, free])]
        plan = list(head)
        for header, mark, size in zip(headers, marks, sizes):
            plan += header + [-1] * (size // 2) + mark + [-1] * (size - size // 2)
        plan += tail
        plans.append(torch.tensor(plan))
    return torch.stack(plans)


def make_rollout(mode: str, length: int, max_steps: int, solutions: dict[str, str]):
    """A TRL `rollout_func` (see the module docstring); `rollout.calls` counts its calls (one per generation)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Template(LogitsProcessor):
        """Forces the planned tokens; free positions sample from the free tokens only (no tags, no EOS)."""

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

    tokens = {}  # per tokenizer: its free token ids and the symbols it encodes, found once

    def rollout(prompts, trainer):
        rollout.calls += 1
        tokenizer = trainer.processing_class
        if id(tokenizer) not in tokens:
            tokens[id(tokenizer)] = (torch.tensor(free_token_ids(tokenizer)), encodable_symbols(tokenizer))
        free, symbols = tokens[id(tokenizer)]
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))  # follows the cycle's seed
        plans = template_plans(tokenizer, [solutions[p] for p in prompts], length, max_steps, generator, symbols)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if mode == "scripted":
            fill = free[torch.randint(0, free.numel(), plans.shape, generator=generator)]
            completions = torch.where(plans >= 0, plans, fill)
        else:
            allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
            allowed[free] = True
            # left padding by hand: the tokenizer is shared (cached), so its padding side stays as it is
            width = max(map(len, prompt_ids))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompt_ids])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
            device = trainer.accelerator.device
            model = trainer.accelerator.unwrap_model(trainer.model)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=length,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList([Template(plans, width, allowed)]),
                    disable_compile=True,
                )
            completions = out[:, width:].cpu()
        return {"prompt_ids": prompt_ids, "completion_ids": completions.tolist(), "logprobs": None}

    rollout.calls = 0
    return rollout


# ------------------------------------------------------------------------------------------------------ trainers
def save_model(args, folder):
    """The tiny model and its tokenizer saved in `folder`: TRL builds the reference model from that path."""
    from trl_mig.builtin.tiny import build_tiny_model

    tokenizer = build_tokenizer(args.tokenizer)
    model = build_tiny_model(tokenizer, "qwen2", args.hidden, args.layers, args.heads, args.kv_heads, seed=0).float()
    model.save_pretrained(folder)
    return tokenizer


def build_trainer(variant, args, preset_name, model_folder, tokenizer, prompts, output_dir):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from trl_mig import MIGConfig, MIGGRPOTrainer

    preset = PRESETS[preset_name]
    plan = batch_plan(args, preset)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=plan["per_device_train_batch_size"],
        steps_per_generation=plan["steps_per_generation"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        num_iterations=plan["num_iterations"],
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        beta=preset.beta,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not cuda,
        bf16=False,
        seed=0,
    )
    if variant == "mig":
        scaffold = {} if args.scaffold is None else {"mig_scaffold": args.scaffold.replace("\\n", "\n")}
        config = MIGConfig(
            **common,
            mig_scoring_batch_size=args.scoring_batch_size,
            mig_likelihood_model=preset.mig_likelihood_model,
            **scaffold,
        )
    else:
        config = GRPOConfig(**common)
    trainer_class = MIGGRPOTrainer if variant == "mig" else GRPOTrainer
    dataset = Dataset.from_list([{"prompt": p, "solution": s} for p, s in prompts.items()])
    trainer = trainer_class(
        model,
        reward_funcs=[accuracy_reward, format_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=make_rollout(args.rollout, args.completion_length, args.max_steps, prompts),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # what Trainer's loop sets
    return trainer


class NoGradTokens:
    """
    Counts the tokens (rows x columns, padding included) of a trainer's no-gradient forwards outside generation:
    TRL's old-logp or reference forward, MIG's scoring pass (fused or not). `tokens` grows with every such forward.
    """

    def __init__(self, trainer):
        import torch

        self.tokens, self.generating = 0, False
        modules = [trainer.model] + ([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])
        for module in modules:
            module.register_forward_pre_hook(self.count, with_kwargs=True)
        generate = trainer._generate

        def flagged(*args, **kwargs):
            self.generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating = False

        trainer._generate = flagged
        self._grad_enabled = torch.is_grad_enabled

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and not self.generating and not self._grad_enabled():
            self.tokens += ids.numel()


def generation_rows(args, prompts):
    """One generation batch as TRL's sampler hands it over: each prompt `--generations` times in a row."""
    return [{"prompt": p, "solution": s} for p, s in prompts.items() for _ in range(args.generations)]


def run_cycle(trainer, rows, seed):
    """One generation cycle (see the module docstring); returns (seconds, peak CUDA bytes or None)."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(trainer.args.steps_per_generation * trainer.num_iterations):
        trainer.training_step(trainer.model, rows, None)  # TRL ignores `rows` while it has buffered micro-batches
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    trainer.model.zero_grad(set_to_none=False)  # keep the gradient buffers: every cycle then has the same footprint
    return seconds, peak


def trl_forwards(trainer) -> dict[str, bool]:
    """Which of TRL's no-grad forwards ran at the latest generation: their outputs ride in the buffered micro-batches
    (`_generate_and_score_completions` only puts them there when it ran that forward)."""
    buffered = trainer._buffered_inputs[0]
    return {key: buffered.get(key) is not None for key in ("old_per_token_logps", "ref_per_token_logps")}


def profile_path(args, preset_name: str) -> str:
    if args.preset != "all":
        return args.profile
    stem, ext = os.path.splitext(args.profile)
    return f"{stem}_{preset_name}{ext or '.txt'}"


def write_profile(trainers, rows, path: str, seed: int, top: int = 30):
    """One untimed cycle of each trainer under torch.profiler; the top operators by self time written to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for variant, trainer in trainers.items():
        with profile(activities=activities) as prof:
            seconds, _ = run_cycle(trainer, rows, seed=seed)
        averages = prof.key_averages()
        table = averages.table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
        # trl-mig's named stages (record_function in trl_mig/trainer.py), total time including what they call
        stages = [
            f"  {e.key:<28} calls {e.count:>4}  cpu {e.cpu_time_total / 1e3:10.1f} ms"
            + (f"  device {e.device_time_total / 1e3:10.1f} ms" if cuda else "")
            for e in averages
            if e.key.startswith("mig/")
        ]
        sections.append(
            f"## {variant}: one cycle, {seconds:.3f} s under the profiler\n\n"
            + ("trl-mig stages:\n" + "\n".join(stages) + "\n\n" if stages else "")
            + f"operators by {sort_by}:\n{table}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    print(f"profile of one cycle per trainer: {path}", flush=True)


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
    """One variant of one preset alone in this process: its peak RSS over `--memory-cycles` cycles, after a warm-up
    cycle."""
    prompts = make_prompts(args.prompts, args.answer)
    rows = generation_rows(args, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_model(args, os.path.join(tmp, "model"))
        trainer = build_trainer(args.worker, args, args.preset, os.path.join(tmp, "model"), tokenizer, prompts, tmp)
        run_cycle(trainer, rows, seed=999)  # gradients allocated, caches warm: the steady state
        exact = reset_peak_rss()
        ready = rss_mb()
        for cycle in range(args.memory_cycles):
            run_cycle(trainer, rows, seed=1000 + cycle)
        peak = status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"variant": args.worker, "import_rss_mb": IMPORT_RSS, "ready_rss_mb": ready, "peak_rss_mb": peak,
             "peak_is_steps_only": exact}
        )
    )


def measure_memory_cpu(raw_argv: list[str], preset_name: str):
    """Each variant in its own subprocess, run one after the other (never at the same time)."""
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), *raw_argv, "--preset", preset_name, "--worker", variant]
        # a fixed mmap threshold: glibc then hands large freed blocks straight back, so RSS follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {variant} ({preset_name}) failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def cpu_memory_summary(workers) -> dict:
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
        f"peak RSS during cycles: grpo {g['peak_rss_mb']:.1f} MB, mig {m['peak_rss_mb']:.1f} MB (raw ratio "
        f"{memory['raw_rss_ratio']:.3f})\n"
        f"  above the import baseline ({g['import_rss_mb']:.0f} / {m['import_rss_mb']:.0f} MB; weights, "
        f"gradients, activations): ratio {above:.3f}\n"
        f"  above the RSS before the cycles ({g['ready_rss_mb']:.0f} / {m['ready_rss_mb']:.0f} MB; the cycle's "
        f"transient memory: {g['peak_rss_mb'] - g['ready_rss_mb']:.1f} / "
        f"{m['peak_rss_mb'] - m['ready_rss_mb']:.1f} MB): ratio {transient:.3f}"
    )
    return memory


# ---------------------------------------------------------------------------------------------------------- runs
def run_preset(preset_name: str, args, raw_argv: list[str]) -> dict:
    """Times one preset (GRPO and MIG interleaved), measures its memory, prints its table and its JSON line."""
    import torch

    preset = PRESETS[preset_name]
    plan = batch_plan(args, preset)
    prompts = make_prompts(args.prompts, args.answer)
    rows = generation_rows(args, prompts)
    print(
        f"\npreset {preset_name}: {preset.description}\n"
        f"  batch {args.prompts} prompts x {args.generations} = {plan['completions_per_generation']} completions per "
        f"generation, micro-batch {args.micro_batch}, steps_per_generation {plan['steps_per_generation']}, "
        f"gradient_accumulation_steps {plan['gradient_accumulation_steps']}, num_iterations "
        f"{plan['num_iterations']} -> {plan['training_steps_per_cycle']} training steps per cycle; tokenizer "
        f"{args.tokenizer}; median of {args.repeats} interleaved cycle pairs after {args.warmup} warm-up cycle(s) each",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_folder = os.path.join(tmp, "model")
        tokenizer = save_model(args, model_folder)
        trainers = {
            v: build_trainer(v, args, preset_name, model_folder, tokenizer, prompts, os.path.join(tmp, v))
            for v in VARIANTS
        }
        no_grad = {v: NoGradTokens(t) for v, t in trainers.items()}
        times = {v: [] for v in VARIANTS}
        peaks = {v: [] for v in VARIANTS}
        counts = {v: None for v in VARIANTS}  # (rollout calls, training steps) when the timed cycles start
        for cycle in range(args.warmup + args.repeats):
            if cycle == args.warmup:
                counts = {v: (t.rollout_func.calls, t._step, no_grad[v].tokens) for v, t in trainers.items()}
            order = list(VARIANTS) if cycle % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                seconds, peak = run_cycle(trainers[variant], rows, seed=cycle)
                if cycle >= args.warmup:
                    times[variant].append(seconds)
                    peaks[variant].append(peak)
            if cycle >= args.warmup:
                pair = cycle - args.warmup + 1
                print(f"  pair {pair}: grpo {times['grpo'][-1]:.3f} s, mig {times['mig'][-1]:.3f} s", flush=True)
        forwards = {v: trl_forwards(t) for v, t in trainers.items()}
        per_cycle = {
            v: {
                "generations": (t.rollout_func.calls - counts[v][0]) / args.repeats,
                "training_steps": (t._step - counts[v][1]) / args.repeats,
                "no_grad_tokens": (no_grad[v].tokens - counts[v][2]) / args.repeats,
            }
            for v, t in trainers.items()
        }
        if args.profile:
            write_profile(trainers, rows, profile_path(args, preset_name), seed=args.warmup + args.repeats)
        reference_scorer = trainers["mig"]._scoring_model_context()[0] is trainers["mig"].ref_model
        steps_logged = trainers["mig"]._metrics["train"].get("mig/steps", [])
    grpo_s, mig_s = statistics.median(times["grpo"]), statistics.median(times["mig"])
    time_ratio = mig_s / grpo_s
    print(f"cycle time: grpo {grpo_s:.3f} s, mig {mig_s:.3f} s (median) -> ratio {time_ratio:.3f}")
    print(f"TRL no-grad forwards per generation: {forwards['grpo']}")
    print("no-grad forward tokens per cycle (padding included, generation not counted): "
          + ", ".join(f"{v} {per_cycle[v]['no_grad_tokens']:.0f}" for v in VARIANTS))
    if steps_logged:
        print(f"mean steps per completion K (mig/steps): {statistics.mean(steps_logged):.2f}")

    memory = {}
    if torch.cuda.is_available():
        grpo_peak, mig_peak = max(peaks["grpo"]), max(peaks["mig"])
        memory = {"grpo_peak_mb": grpo_peak / 2**20, "mig_peak_mb": mig_peak / 2**20, "ratio": mig_peak / grpo_peak}
        print(
            f"peak CUDA memory: grpo {memory['grpo_peak_mb']:.1f} MB, mig {memory['mig_peak_mb']:.1f} MB -> "
            f"ratio {memory['ratio']:.3f}"
        )
    elif not args.no_memory:
        memory = cpu_memory_summary(measure_memory_cpu(raw_argv, preset_name))
    summary = {
        "benchmark": "step",
        "preset": preset_name,
        "machine": machine(),
        "library_commit": library_commit(),
        "tokenizer": args.tokenizer,
        "rollout": args.rollout,
        "batch": plan,
        "completion_length": args.completion_length,
        "max_steps": args.max_steps,
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads},
        "beta": preset.beta,
        "mig_likelihood_model": preset.mig_likelihood_model,
        "mig_scores_with_reference_model": reference_scorer,
        "scoring_batch_size": args.scoring_batch_size,
        "scaffold": args.scaffold,
        "answer": args.answer,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "grpo_s": round(grpo_s, 4),
        "mig_s": round(mig_s, 4),
        "time_ratio": round(time_ratio, 3),
        "memory_ratio": None if not memory else round(memory["ratio"], 3),
        "memory": memory,
        "trl_forwards": forwards,
        "per_cycle": per_cycle,
        "mean_steps_per_completion": round(statistics.mean(steps_logged), 2) if steps_logged else None,
        # tokens of the no-gradient forwards besides generation (padding included), MIG's over GRPO's
        "no_grad_token_ratio": (
            round(per_cycle["mig"]["no_grad_tokens"] / per_cycle["grpo"]["no_grad_tokens"], 3)
            if per_cycle["grpo"]["no_grad_tokens"] else None
        ),
        # issue 23's targets: 1.08 on CPU where there is no TRL forward to fold the scoring into, else 1.03
        "targets_met": {
            f"time_ratio<={TIME_TARGETS[preset_name]}": time_ratio <= TIME_TARGETS[preset_name],
            "memory_ratio<=1.05": None if not memory else memory["ratio"] <= 1.05,
        },
    }
    print(json.dumps(summary), flush=True)
    return summary


def markdown_table(summaries: list[dict]) -> str:
    """One row per preset: TRL's extra forwards, the batch, the median cycle times and the two ratios."""
    names = {"old_per_token_logps": "old-logp", "ref_per_token_logps": "reference"}
    header = ["preset", "TRL no-grad forwards", "batch (micro-batch)", "steps / cycle", "L", "tokenizer",
              "GRPO s / cycle", "MIG s / cycle", "time ratio", "memory ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        b = s["batch"]
        forwards = ", ".join(names[key] for key, ran in s["trl_forwards"]["grpo"].items() if ran) or "none"
        memory = "n/a" if s["memory_ratio"] is None else f"{s['memory_ratio']:.3f}"
        cells = [
            s["preset"], forwards, f"{b['prompts']} x {b['generations']} ({b['per_device_train_batch_size']})",
            b["training_steps_per_cycle"], s["completion_length"], s["tokenizer"], f"{s['grpo_s']:.3f}",
            f"{s['mig_s']:.3f}", f"{s['time_ratio']:.3f}", memory,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


QUICK = dict(  # tiny sizes: a smoke test of every code path, in seconds
    prompts=2, generations=2, micro_batch=2, completion_length=64, max_steps=3, hidden=64, layers=2, heads=4,
    kv_heads=2, scoring_batch_size=4, repeats=2, warmup=1, memory_cycles=1,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="default")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--micro-batch", type=int, default=64, help="per_device_train_batch_size")
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=8, help="K per completion is drawn from 1..max-steps")
    parser.add_argument("--rollout", choices=["generate", "scripted"], default="generate")
    parser.add_argument("--scoring-batch-size", type=int, default=8, help="MIGConfig.mig_scoring_batch_size")
    parser.add_argument(
        "--scaffold",
        help="MIGConfig.mig_scaffold, a written \\n read as a newline (default: MIGConfig's). '</think>\\n<answer>' "
        "is the text the template writes after a step (a step keeps its closing newline), so the copy after the last "
        "step reuses it",
    )
    parser.add_argument(
        "--answer", choices=["final", "running"], default="final",
        help="the ground truth: the final value, or every intermediate value too (as the CPU demo's studies use)",
    )
    parser.add_argument("--repeats", type=int, default=8, help="timed cycle pairs (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed cycles per variant first")
    parser.add_argument(
        "--memory-cycles", "--memory-steps", dest="memory_cycles", type=int, default=2,
        help="cycles per memory worker (CPU)",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes for a smoke test (2 prompts x 2, micro-batch 2, L = 64, hidden 64, 2 cycle pairs); "
        "options given explicitly still win",
    )
    parser.add_argument(
        "--profile", metavar="FILE",
        help="after the timed cycles, profile one more cycle of each trainer (torch.profiler) into FILE",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.worker and args.preset == "all":
        parser.error("a memory worker runs one preset")
    return args


def main(argv=None):
    global IMPORT_RSS
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)

    import logging

    import torch
    import transformers

    import trl  # noqa: F401  (heavy imports before the baseline RSS)
    import trl_mig  # noqa: F401

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # saving and loading the tiny model
    if args.threads:
        torch.set_num_threads(args.threads)
    IMPORT_RSS = rss_mb()
    if args.worker:
        return worker(args)

    print(f"machine: {machine()}")
    print(
        f"model: qwen2 {args.layers} layers, hidden {args.hidden}; completions {args.completion_length} tokens, K in "
        f"1..{args.max_steps}, rollout: {args.rollout}, MIG scoring micro-batch {args.scoring_batch_size}"
    )
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    summaries = [run_preset(name, args, raw_argv) for name in names]
    if len(summaries) > 1:
        print("\n" + markdown_table(summaries))
    return summaries


if __name__ == "__main__":
    main()
