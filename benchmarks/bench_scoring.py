"""Scoring benchmark: one block pass vs per-prefix teacher forcing, same model and inputs, interleaved.

For each (K, L) it scores `--completions` completions (prompt P tokens, completion L tokens cut into K equal steps,
one answer variant) in two ways and checks they agree:

- block: `StepLikelihoodScorer("block")`, one forward per micro-batch over prompt + completion + (K+1) answer copies;
- per-prefix: K+1 plain teacher-forced forwards per completion over prompt + completion[:b_k] + answer, one row each
  (no padding, the causal fast path, logits only at the answer): the naive method at its cheapest.

Printed per case: median times, the time ratio, the token-count ratio (tokens the per-prefix passes process over
tokens the block pass processes: the bound) and the attention-aware FLOP ratio (block with split attention: causal
prompt + completion, copies against their prefix). A final line is JSON.

    python benchmarks/bench_scoring.py            # 4 layers, hidden 256, K in {4, 8, 16}, L in {256, 512, 1024}
    python benchmarks/bench_scoring.py --quick    # fewer repeats and completions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine  # noqa: E402
from trl_mig.scoring import ScoringItem, StepLikelihoodScorer, encode_answer  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402

SCAFFOLD = "\n</think>\n<answer>"


def make_items(n, K, L, P, block, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (P,), generator=g).tolist()
        completion = torch.randint(3, vocab, (L,), generator=g).tolist()
        boundaries = [0] + [round(L * k / K) for k in range(1, K + 1)]  # K equal steps, b_0 = 0
        items.append(ScoringItem(prompt, completion, boundaries, [block]))
    return items


@torch.no_grad()
def per_prefix(model, items) -> list[torch.Tensor]:
    """Naive teacher forcing: one plain forward per prefix; logits only at the answer's last |block| positions."""
    out = []
    for item in items:
        (block,) = item.answers
        start, end = block.scored
        values = []
        for boundary in item.boundaries:
            ids = torch.tensor([list(item.prompt_ids) + list(item.completion_ids[:boundary]) + list(block.ids)])
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(block.ids)).logits[0].float()
            # position j of the kept logits predicts block token j + 1
            logps = logits[start - 1 : end - 1].log_softmax(-1)
            values.append(logps.gather(1, torch.tensor(block.ids[start:end]).unsqueeze(1)).mean().item())
        out.append(torch.tensor(values))
    return out


def token_counts(items):
    naive = sum(len(it.prompt_ids) + b + len(it.answers[0].ids) for it in items for b in it.boundaries)
    block = sum(len(it.prompt_ids) + it.boundaries[-1] + len(it.answers[0].ids) * it.num_prefixes for it in items)
    return naive, block


def flop_counts(items, config):
    """Forward FLOPs under a simple model: 2 x weights per token, 4 x hidden per attended (query, key) pair."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_token = layers * 2 * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)
    per_pair = layers * 4 * h

    def causal(n):
        return n * (n + 1) // 2

    naive = block = 0
    for it in items:
        a = len(it.answers[0].ids)
        for b in it.boundaries:
            n = len(it.prompt_ids) + b + a
            naive += n * per_token + causal(n) * per_pair
        shared = len(it.prompt_ids) + it.boundaries[-1]
        copies = a * it.num_prefixes
        pairs = causal(shared) + sum(a * (len(it.prompt_ids) + b) + causal(a) for b in it.boundaries)
        block += (shared + copies) * per_token + pairs * per_pair
    return naive, block


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="K values")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="completion lengths L")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--answer", default="57", help="answer text (after the scaffold)")
    parser.add_argument("--completions", type=int, default=4, help="completions scored per measurement")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="block scorer micro-batch size (on the CPU, one long row per forward is fastest)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-split", action="store_true", help="block scorer with the full (B, 1, W, W) mask")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--with-fallback", action="store_true", help="also time the scorer's batched per-prefix fallback ('prefix')"
    )
    parser.add_argument("--quick", action="store_true", help="2 completions, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.completions, args.repeats = 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        tokenizer, "qwen2", args.hidden, args.layers, args.heads, args.kv_heads, args.attention, seed=0
    )
    model = model.float().eval().to(device)
    block = encode_answer(tokenizer, SCAFFOLD, args.answer)
    scorer = StepLikelihoodScorer("block", batch_size=args.batch_size, split_attention=not args.no_split)
    fallback = StepLikelihoodScorer("prefix", batch_size=args.batch_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"machine: {machine()}")
    print(
        f"model: qwen2 {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
        f"{args.attention}{', full mask' if args.no_split else ', split attention'}; prompt {args.prompt_length}, "
        f"answer block {len(block.ids)} tokens, {args.completions} completions, block micro-batch {args.batch_size}, "
        f"median of {args.repeats}"
    )
    header = (
        f"{'K':>3} {'L':>5} {'block s':>9} {'prefix s':>9} {'ratio':>7} {'best':>6} {'tokens':>7} {'eff':>5} "
        f"{'flops':>6} {'max|d|':>8}"
    )
    print(header)
    cases = []
    for K in args.steps:
        for L in args.lengths:
            items = make_items(args.completions, K, L, args.prompt_length, block, len(tokenizer), seed=K * 10_000 + L)
            runs = {"block": lambda: scorer.score(model, items), "prefix": lambda: per_prefix(model, items)}
            if args.with_fallback:
                runs["fallback"] = lambda: fallback.score(model, items)
            results = {name: run() for name, run in runs.items()}  # warm-up, and the exactness check
            diff = max(
                (a - b).abs().max().item() for name in results if name != "prefix"
                for a, b in zip(results[name], results["prefix"])
            )
            times = {name: [] for name in runs}
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]  # interleaved, alternating order
                for name in order:
                    sync()
                    start = time.perf_counter()
                    runs[name]()
                    sync()
                    times[name].append(time.perf_counter() - start)
            block_s, prefix_s = statistics.median(times["block"]), statistics.median(times["prefix"])
            naive_tokens, block_tokens = token_counts(items)
            naive_flops, block_flops = flop_counts(items, model.config)
            case = {
                "K": K,
                "L": L,
                "block_s": round(block_s, 4),
                "prefix_s": round(prefix_s, 4),
                "time_ratio": round(prefix_s / block_s, 2),
                "time_ratio_best": round(min(times["prefix"]) / min(times["block"]), 2),
                "token_ratio": round(naive_tokens / block_tokens, 2),
                "efficiency": round(prefix_s / block_s / (naive_tokens / block_tokens), 3),
                "flop_ratio": round(naive_flops / block_flops, 2),
                "max_abs_diff": diff,
            }
            if args.with_fallback:
                case["fallback_s"] = round(statistics.median(times["fallback"]), 4)
            cases.append(case)
            print(
                f"{K:>3} {L:>5} {block_s:>9.4f} {prefix_s:>9.4f} {case['time_ratio']:>6.2f}x "
                f"{case['time_ratio_best']:>5.2f}x {case['token_ratio']:>6.2f}x "
                f"{case['efficiency']:>5.2f} {case['flop_ratio']:>5.2f}x {diff:>8.1e}"
                + (f"  fallback {case['fallback_s']:.4f} s" if args.with_fallback else ""),
                flush=True,
            )

    def ratio(K, L):
        return next((c["time_ratio"] for c in cases if c["K"] == K and c["L"] == L), None)

    targets = {
        "K8_L512_ratio>=4": None if ratio(8, 512) is None else ratio(8, 512) >= 4,
        "K16_L1024_ratio>=7": None if ratio(16, 1024) is None else ratio(16, 1024) >= 7,
        "efficiency>=0.85_everywhere": all(c["efficiency"] >= 0.85 for c in cases),
        "exact_1e-4": all(c["max_abs_diff"] <= 1e-4 for c in cases),
    }
    print(
        "ratio = per-prefix time / block time (medians); best = the same with each side's fastest repeat; "
        "tokens = token-count ratio (the bound); eff = ratio / tokens; flops = FLOP ratio counting causal attention "
        "(block: split attention)"
    )
    summary = {
        "benchmark": "scoring",
        "machine": machine(),
        "model": {
            "layers": args.layers, "hidden": args.hidden, "attention": args.attention, "split": not args.no_split
        },
        "completions": args.completions,
        "repeats": args.repeats,
        "cases": [
            {k: c[k] for k in ("K", "L", "time_ratio", "time_ratio_best", "token_ratio", "efficiency", "flop_ratio",
                               "fallback_s") if k in c}
            for c in cases
        ],
        "targets_met": targets,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
