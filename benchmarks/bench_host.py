"""Host-time benchmark: the CPU work MIG adds to a generation batch outside the model, per stage.

Each case is one generation batch of B completions of exactly L tokens with K steps, written in the built-in step
format (`<think>`, K `### Step k` headers with free text between them, `</think>`, `<answer>...</answer>`), in one of
the tokenizer kinds of `trl_mig.builtin.tokenizers` (char; byte-level BPE, Qwen style; Metaspace/Unigram,
SentencePiece style). The free text mixes words and numbers with, for the trained kinds, a share of multi-byte words
(`--multibyte-share`: math symbols, accented letters, CJK, emoji), many of which byte_bpe splits into byte tokens and
metaspace_unigram does not know; the step boundaries are cut at random tokens, as sampling does.

Stages (`STAGES`: name -> function of a `HostBatch`, timed over the whole batch):

- `segment`: `segment_completion` on every completion (decode, per-token character offsets, step boundaries).
- `rows`: `build_block_batches`, the block scoring pass's inputs for the whole batch (ids, positions, the copies'
  mask inputs, the scored tokens) in micro-batches of `--scoring-batch-size`, from a 32-token prompt, the steps and
  one answer variant per completion, as the trainer builds them (`keep_completion`: the fused pass's rows, the whole
  completion in the shared part).

The piece tables that segmentation caches per tokenizer are warm before timing (one untimed pass), as they are after
the first training step. Printed: a markdown table of ms per generation batch and per completion for each stage
(median of `--repeats`), then one JSON line.

    python benchmarks/bench_host.py            # B in {64, 512}, L in {256, 1024}, K in {4, 8, 16}, 3 tokenizer kinds
    python benchmarks/bench_host.py --quick    # B = 16, L = 128, K = 4, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine  # noqa: E402
from trl_mig.builtin.tokenizers import TOKENIZER_KINDS, tiny_tokenizer  # noqa: E402
from trl_mig.scoring import ScoringItem, build_block_batches, encode_answer  # noqa: E402
from trl_mig.segmentation import FormatSpec, segment_completion  # noqa: E402

ASCII_WORDS = ("so", "then", "the", "sum", "is", "we", "get", "carry", "x", "=", "+", "-", "*", "(", ")", "12", "7",
               "19", "57", "3", "42", "and", "next", "check:", "ok.", "\n")
MULTIBYTE_WORDS = ("×", "÷", "−", "√", "≤", "≥", "≠", "≈", "π", "λ", "∫", "∂", "∑", "α²", "café", "naïve", "déjà",
                   "Ångström", "数学", "等于", "你好", "€", "🙂")


@dataclass
class HostBatch:
    """One generation batch: `completion_ids[i]` is completion i's content tokens (L of them, K steps)."""

    kind: str
    tokenizer: object
    spec: FormatSpec
    completion_ids: list[list[int]]
    length: int
    steps: int
    items: list[ScoringItem] | None = None  # what the scoring pass is given, built once (untimed) for `rows`
    scoring_batch_size: int = 8


def segment_stage(batch: HostBatch) -> None:
    for ids in batch.completion_ids:
        segment_completion(batch.tokenizer, ids, batch.spec)


def rows_stage(batch: HostBatch) -> None:
    if batch.items is None:
        prompt = batch.tokenizer("Compute (12+7)*3 - 5, step by step. " * 2, add_special_tokens=False)["input_ids"]
        answer = encode_answer(batch.tokenizer, "\n</think>\n<answer>", "57")
        batch.items = [
            ScoringItem(prompt[:32], ids, segment_completion(batch.tokenizer, ids, batch.spec).boundaries, [answer],
                        keep_completion=True)
            for ids in batch.completion_ids
        ]
    build_block_batches(batch.items, batch.scoring_batch_size, pad_token_id=batch.tokenizer.pad_token_id)


STAGES: dict[str, Callable[[HostBatch], None]] = {"segment": segment_stage, "rows": rows_stage}


def make_batch(kind: str, size: int, length: int, steps: int, seed: int, multibyte_share: float = 0.25) -> HostBatch:
    """`size` completions of exactly `length` tokens: the format's tokens, and free text cut at random tokens, whose
    words are multi-byte with probability `multibyte_share` (never for the char tokenizer, which has ASCII only)."""
    tokenizer = tiny_tokenizer(kind)
    rng = random.Random(seed)
    share = multibyte_share if kind != "char" else 0.0

    def word() -> str:
        return rng.choice(MULTIBYTE_WORDS if rng.random() < share else ASCII_WORDS)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head, headers = ids("<think>"), [ids(f"### Step {k}\n") for k in range(1, steps + 1)]
    free_texts = [" ".join(word() for _ in range(2 * length)) for _ in range(size)]
    free_ids = tokenizer(free_texts, add_special_tokens=False)["input_ids"]
    completions = []
    for row, free in enumerate(free_ids):
        tail = ids(f"\n</think>\n<answer>{rng.randint(0, 999)}</answer>")
        budget = length - len(head) - len(tail) - sum(map(len, headers))
        if budget < steps or len(free) < budget:
            raise ValueError(f"L={length} is too short for K={steps} steps of the {kind} tokenizer")
        cuts = sorted(rng.sample(range(1, budget), steps - 1))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, budget])]
        completion, start = list(head), 0
        for header, count in zip(headers, sizes):
            completion += header + free[start : start + count]
            start += count
        completions.append(completion + tail)
    return HostBatch(kind, tokenizer, FormatSpec(max_steps=max(steps, 16)), completions, length, steps)


def time_stages(batch: HostBatch, repeats: int) -> dict[str, float]:
    """Median seconds of each stage over the whole batch, after one untimed pass (warm caches)."""
    seconds = {}
    for name, stage in STAGES.items():
        stage(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            stage(batch)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512], help="B: completions per batch")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="L: tokens per completion")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="K: steps per completion")
    parser.add_argument("--kinds", nargs="+", default=list(TOKENIZER_KINDS), choices=TOKENIZER_KINDS)
    parser.add_argument(
        "--multibyte-share", type=float, default=0.25, help="share of multi-byte words in the free text"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="B = 16, L = 128, K = 4, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.lengths, args.steps, args.repeats = [16], [128], [4], 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    print(
        f"stages: {', '.join(STAGES)}; free text {args.multibyte_share:.0%} multi-byte words (not for char); median of "
        f"{args.repeats} after one warm-up pass; ms per batch (per completion)"
    )
    print()
    print("| tokenizer | B | L | K | " + " | ".join(f"{name} ms/batch (/completion)" for name in STAGES) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(STAGES))
    cases = []
    for kind in args.kinds:
        for size in args.batch_sizes:
            for length in args.lengths:
                for steps in args.steps:
                    seed = size * 100_000 + length * 100 + steps
                    batch = make_batch(kind, size, length, steps, seed, args.multibyte_share)
                    seconds = time_stages(batch, args.repeats)
                    case = {"tokenizer": kind, "B": size, "L": length, "K": steps}
                    for name, value in seconds.items():
                        case[f"{name}_ms"] = round(1000 * value, 3)
                        case[f"{name}_ms_per_completion"] = round(1000 * value / size, 4)
                    cases.append(case)
                    cells = " | ".join(
                        f"{case[f'{name}_ms']:.1f} ({case[f'{name}_ms_per_completion']:.3f})" for name in STAGES
                    )
                    print(f"| {kind} | {size} | {length} | {steps} | {cells} |", flush=True)
    summary = {
        "benchmark": "host",
        "machine": machine(),
        "repeats": args.repeats,
        "multibyte_share": args.multibyte_share,
        "stages": list(STAGES),
        "cases": cases,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
