"""Builders shared by the tests: tokenizers trained locally (no hub), tiny saved models, small datasets, CPU-sized
configs, scripted rollouts and a tool, and the independent computations the tests compare the trainer with (l_k by
plain teacher forcing, group normalisation, GRPO's policy loss, the gated NLL). The fixtures that wrap them live in
conftest.py."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_mig import MIGConfig, MIGGRPOTrainer
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model
from trl_mig.scoring import ScoringItem, StepLikelihoodScorer

BPE_CORPUS = [
    "<think>### Step 1\n12+7=19\n### Step 2\n19*3=57\n</think>\n<answer>57</answer>",
    "<think>### Step 1\n5-2=3\n</think>\n<answer>3</answer>",
    "Compute (12+7)*3. Think step by step.",
    "<answer>19</answer> <answer>3</answer> <answer>57</answer> >57 >19 >3",
    "The answer is 42. Then 42 + 8 = 50, and 50 / 5 = 10.",
    "héllo wörld ünïcode ✓ → ∑",
]


def build_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained locally on a tiny corpus: multi-character tokens, merges across tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build_metaspace_tokenizer(vocab_size: int = 200):
    """A SentencePiece-style (metaspace) BPE: single tokens decode without their leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"])
    backend.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_qwen3_tool_tokenizer():
    """The char-level tokenizer with Qwen3's chat template (which renders tool calls and which TRL knows how to
    parse) and its special tokens; `<|im_end|>` is the EOS."""
    from trl.chat_template_utils import qwen3_chat_template

    tokenizer = build_char_tokenizer()
    specials = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


# one layer, hidden size 32: the smallest tiny model, for tests that only need a model on disk
SMALLEST_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def save_tiny_model(folder, tokenizer=None, **sizes):
    """A tiny causal LM (`build_tiny_model(tokenizer, **sizes)`) saved with its tokenizer (the char tokenizer by
    default) in `folder`, as a user's local model is; returns `folder`."""
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer()
    build_tiny_model(tokenizer, **sizes).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def addition_dataset(n: int = 16, offset: int = 0, operands: int = 4) -> Dataset:
    """Rows `offset .. offset + n` of the additions `a + b` for a, b in `range(operands)`, a before b: the prompt opens
    the thought and step 1 and writes `a+b=`, the solution is `str(a + b)`."""
    pairs = [(a, b) for a in range(operands) for b in range(operands)]
    rows = [{"prompt": f"<think>### Step 1\n{a}+{b}=", "solution": str(a + b)} for a, b in pairs]
    if offset + n > len(rows):
        raise ValueError(f"addition_dataset(operands={operands}) has {len(rows)} rows, not {offset}..{offset + n}.")
    return Dataset.from_list(rows[offset : offset + n])


def cpu_config(output_dir, config_class=None, **overrides):
    """A MIGConfig (or `config_class`) sized for a CPU test: tiny batches, short completions, no saving, no
    reporting."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=24,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    defaults.update(overrides)
    return (config_class or MIGConfig)(**defaults)


def scripted_rollout(script: dict, end_with_eos=lambda text: text.rstrip().endswith("</answer>")):
    """
    A TRL `rollout_func` that returns fixed completions: `script[prompt][i % num_generations]` for the i-th prompt
    of the global batch (GRPO repeats each prompt `num_generations` times in a row, ranks in order). Completions that `end_with_eos` get the
    EOS token; the others look truncated.
    """

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        # this process's rows come after those of the lower ranks in the global batch
        first = trainer.accelerator.process_index * len(prompts)
        group = trainer.num_generations
        texts = [script[_prompt_key(prompt)][(first + i) % group] for i, prompt in enumerate(prompts)]
        if isinstance(prompts[0], list):
            prompt_ids = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                for p in prompts
            ]
        else:
            prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids = [
            tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end_with_eos(t) else [])
            for t in texts
        ]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def _prompt_key(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# a tool for TRL's multi-turn tool loop: its docstring is the schema TRL reads
def multiply_tool(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


# ------------------------------------------------------------------------------ a trainer on scripted completions
SCAFFOLD = "\n</think>\n<answer>"
PROMPTS = ["Compute (2+3)*4.\n", "Compute 7-1.\n"]
SOLUTIONS = ["20", "6"]
# four scripted completions per prompt: correct with steps, wrong, truncated, correct without step headers
SCRIPT = {
    PROMPTS[0]: [
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=20\n</think>\n<answer>20</answer>",
        "<think>### Step 1\n2+3=6\n### Step 2\n6*4=24\n</think>\n<answer>24</answer>",
        "<think>### Step 1\n2+3=5\n### Step 2\n5*4=",
        "<think>2+3=5\n\n5*4=20</think>\n<answer>20</answer>",
    ],
    # identical completions: zero spread in both rewards, so zero advantages
    PROMPTS[1]: ["<think>### Step 1\n7-1=6\n</think>\n<answer>6</answer>"] * 4,
}
OUTCOME = {PROMPTS[0]: [2.0, 1.0, 0.0, 1.0], PROMPTS[1]: [2.0] * 4}  # accuracy + step format


def scripted_batch():
    return [{"prompt": p, "solution": s} for p, s in zip(PROMPTS, SOLUTIONS) for _ in range(4)]


def make_trainer(tmp_path, tokenizer, model=None, rollout=None, dataset=None, **overrides):
    model = model if model is not None else build_tiny_model(tokenizer).float()
    dataset = dataset if dataset is not None else Dataset.from_list(scripted_batch())
    trainer = MIGGRPOTrainer(
        model,
        args=cpu_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollout or scripted_rollout(SCRIPT),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


# ----------------------------------------------------------- the scorer against plain per-prefix teacher forcing
ATOL = 1e-4


@torch.no_grad()
def reference_scores(model, item: ScoringItem) -> torch.Tensor:
    """l_0..l_K by one plain forward per prefix and variant; (K+1,) float32."""
    per_variant = []
    for block in item.answers:
        values = []
        for boundary in item.boundaries:
            prefix = list(item.prompt_ids) + list(item.completion_ids[:boundary])
            logps = model(input_ids=torch.tensor([prefix + list(block.ids)])).logits[0].float().log_softmax(-1)
            scored = range(*block.scored)
            values.append(sum(logps[len(prefix) + m - 1, block.ids[m]].item() for m in scored) / len(scored))
        per_variant.append(values)
    return torch.tensor(per_variant).max(dim=0).values


def assert_scores_close(got, expected):
    assert len(got) == len(expected)
    for value, ref in zip(got, expected):
        assert value.shape == ref.shape
        torch.testing.assert_close(value, ref, atol=ATOL, rtol=0)


def scorers():
    """Every exact path: block with split attention (sdpa only), block with the full mask, prefix."""
    return {
        "block-split": StepLikelihoodScorer("block", batch_size=2),
        "block-full": StepLikelihoodScorer("block", batch_size=2, split_attention=False),
        "prefix": StepLikelihoodScorer("prefix", batch_size=3),
    }


def assert_every_path_matches(model, items, expected):
    """All three paths equal the reference; with sdpa the split path really ran (no silent fall-back)."""
    paths = scorers()
    for scorer in paths.values():
        assert_scores_close(scorer.score(model, items), expected)
    sdpa = model.config._attn_implementation == "sdpa"
    assert paths["block-split"]._split_verified == sdpa and paths["block-split"].split_attention
    assert not paths["block-full"]._split_verified


# ------------------------------------------------------- the trainer's credit, computed without the code under test
@torch.no_grad()
def reference_logliks(model, tokenizer, prompt, completion, solution, scaffold=SCAFFOLD):
    """
    l_0..l_K of a text completion by one plain forward per prefix, the step boundaries found by hand in the text
    (`### Step` headers, else blank lines; the thought ends at `</think>` or at the end of a truncated completion).

    Returns:
        values (`list[float]`): l_0..l_K.
        bounds (`list[int]`): the token offsets in the completion where the prefixes end (K + 1 of them: the start
            of the thought, then the end of each step).
    """
    cot_start = completion.index("<think>") + len("<think>")
    cot_end = completion.index("</think>") if "</think>" in completion else len(completion)
    cot = completion[cot_start:cot_end]
    headers = [i for i in range(len(cot)) if cot.startswith("### Step", i)]
    if headers:
        cuts = [cot_start] + [cot_start + h for h in headers[1:]] + [cot_end]
    else:
        paragraphs = [i + 2 for i in range(len(cot) - 1) if cot[i : i + 2] == "\n\n"]
        cuts = [cot_start] + [cot_start + p for p in paragraphs] + [cot_end]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, answer_ids, scaffold_ids = encode(prompt), encode(scaffold + solution), encode(scaffold)
    values = []
    for cut in cuts:
        ids = prompt_ids + encode(completion[:cut]) + answer_ids
        logps = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        start = len(ids) - len(answer_ids) + len(scaffold_ids)
        values.append(sum(logps[t - 1, ids[t]].item() for t in range(start, len(ids))) / (len(ids) - start))
    return values, [len(encode(completion[:cut])) for cut in cuts]


def watermark_sum(values):
    """Sum of the watermark gains of l_0..l_K: max(0, l_k - max(l_0..l_{k-1})) over k."""
    best, total = values[0], 0.0
    for value in values[1:]:
        total += max(0.0, value - best)
        best = max(best, value)
    return total


def progress(values):
    """Watermark lift after each step: [h_1 - h_0, h_2 - h_0, ...]."""
    return [max(values[: k + 1]) - values[0] for k in range(1, len(values))]


def group_normalise(values, scale="group", group_size=None):
    """
    GRPO's group-relative advantages of one reward per completion, in float64: `(r - group mean) / (std + 1e-4)`
    with the sample std of the group (`"group"`) or of all `values` (`"batch"`), or `r - group mean` (`"none"`).
    `group_size` defaults to all `values` (one group).
    """
    values = torch.tensor(values, dtype=torch.float64)
    grouped = values.view(-1, group_size or len(values))
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "none":
        return centred.tolist()
    std = grouped.std(1, keepdim=True).expand_as(grouped).flatten() if scale == "group" else values.std()
    return (centred / (std + 1e-4)).tolist()


def policy_logps_and_entropies(model, inputs, temperature=1.0):
    """
    Log-probabilities of the completion tokens and the entropies of the next-token distributions, by one plain forward
    of `model` over prompt + completion with logits divided by `temperature` (as TRL's policy loss scales them).

    Args:
        inputs (`dict`): a GRPO batch: `prompt_ids`, `prompt_mask` `(B, P)`, `completion_ids`, `completion_mask`
            `(B, T)`.

    Returns:
        Two `(B, T)` float32 tensors: per-token log-probs and entropies (differentiable unless under no_grad).
    """
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1].float() / temperature
    logps = logits.log_softmax(-1)
    token_logps = logps.gather(2, inputs["completion_ids"].unsqueeze(2)).squeeze(2)
    return token_logps, -(logps.exp() * logps).sum(-1)


def grpo_loss_options(args) -> dict:
    """The GRPOConfig fields that shape GRPO's policy loss, as keywords of `reference_policy_loss`."""
    return dict(
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        delta=args.delta,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        top_entropy_quantile=args.top_entropy_quantile,
        entropy_coef=args.entropy_coef,
        max_completion_length=args.max_completion_length,
        steps_per_generation=args.steps_per_generation,
        accumulation_steps=args.gradient_accumulation_steps,
    )


def reference_policy_loss(inputs, logps, entropies=None, old_logps=None, num_items=None, **options):
    """
    GRPO's policy loss on one micro-batch (training mode, one process, beta = 0, no vLLM), written out from the
    formulas of TRL's documentation for each loss type:

        r = exp(logp - old_logp) per token, or exp(masked mean of logp - old_logp) per sequence
        grpo/bnpo/dr_grpo/dapo/luspo: -min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        cispo: -min(r, eps_high) * A * logp        sapo: -sigmoid(tau * (r - 1)) * 4 / tau * A (tau by the sign of A)

    and normalised per loss type: grpo and sapo, mean over sequences of the per-sequence token mean; bnpo, mean over
    the batch's tokens; dr_grpo, sum / (B * max_completion_length); dapo and cispo, sum / the tokens of one
    accumulation window (`num_items` over the whole generation batch, times `accumulation_steps` /
    `steps_per_generation`); luspo, mean over sequences of the per-sequence sum. `top_entropy_quantile < 1` keeps only
    the tokens whose entropy reaches that quantile of the batch's; `entropy_coef` subtracts that times the mean
    entropy over the kept tokens. Every term but dapo's and cispo's is divided by `accumulation_steps`.

    Args:
        inputs (`dict`): the micro-batch: `advantages` `(B, T)` or `(B,)`, `completion_mask` `(B, T)`, and
            `tool_mask` `(B, T)` if any (external tokens are left out).
        logps, entropies (`torch.Tensor` of shape `(B, T)`): the policy's, e.g. from `policy_logps_and_entropies`.
        old_logps (`torch.Tensor` of shape `(B, T)`, *optional*): the generating policy's; None: on-policy (r = 1).
        num_items (`int`, *optional*): completion tokens of the generation batch (dapo and cispo).
        options: `grpo_loss_options(args)`, possibly changed.

    Returns:
        The loss, a 0-d tensor.
    """
    mask = inputs["completion_mask"].float()
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
    if options["importance_sampling_level"] == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(1)
    ratio = log_ratio.exp()
    loss_type = options["loss_type"]
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=options["epsilon_high"]).detach() * advantages * logps
    elif loss_type == "sapo":
        tau = torch.where(advantages > 0, options["sapo_temperature_pos"], options["sapo_temperature_neg"])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        clipped = ratio.clamp(1 - options["epsilon_low"], 1 + options["epsilon_high"])
        unclipped = ratio if options["delta"] is None else ratio.clamp(max=options["delta"])
        per_token = -torch.minimum(unclipped * advantages, clipped * advantages)
    else:
        raise ValueError(f"reference_policy_loss has no formula for loss_type={loss_type!r}.")
    kept = mask
    if options["top_entropy_quantile"] < 1.0:
        threshold = torch.quantile(entropies[mask.bool()].float(), 1 - options["top_entropy_quantile"])
        kept = mask * (entropies >= threshold)
    per_token = per_token * kept
    accumulation = options["accumulation_steps"]
    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1) / accumulation
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (per_token.shape[0] * options["max_completion_length"]) / accumulation
    elif loss_type in ("dapo", "cispo"):
        loss = per_token.sum() / (num_items * accumulation / options["steps_per_generation"])
    else:  # luspo
        loss = per_token.sum(-1).mean() / accumulation
    if options["entropy_coef"]:
        loss = loss - options["entropy_coef"] * (entropies * kept).sum() / kept.sum().clamp(min=1) / accumulation
    return loss


def reference_gated_nll(logps, inputs, gate):
    """The gated SFT term: mean NLL over the tokens of the completions with `gate` 1 (`(B,)`), external tokens
    (`tool_mask` 0) left out; 0 when no completion passes."""
    weights = inputs["completion_mask"].float() * gate.unsqueeze(1)
    if "tool_mask" in inputs:
        weights = weights * inputs["tool_mask"]
    return -(logps * weights).sum() / weights.sum().clamp(min=1)


def assert_loss_is_reference(trainer, inputs):
    """
    The trainer's loss on a freshly generated (on-policy) generation batch, value and gradient, equals GRPO's policy
    loss (`reference_policy_loss`) plus `sft_weight` times the gated NLL (`reference_gated_nll`) when the batch has an
    `sft_gate`, both computed here from the batch's advantages and one plain forward. Returns the two NLL-free parts
    (the trainer's loss, the reference policy loss) for further checks.
    """
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    loss = trainer.compute_loss(trainer.model, inputs)
    logps, _ = policy_logps_and_entropies(trainer.model, inputs, trainer.args.temperature)
    # the batch is a whole generation batch here: its loss tokens are dapo's normaliser
    mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
    policy_loss = reference_policy_loss(inputs, logps, num_items=mask.sum(), **grpo_loss_options(trainer.args))
    expected = policy_loss
    if "sft_gate" in inputs:
        expected = expected + trainer.args.sft_weight * reference_gated_nll(logps, inputs, inputs["sft_gate"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    got, wanted = torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)
    for (name, _), a, b in zip(named, got, wanted):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda message: f"gradient of {name}: {message}")
    return loss.detach(), policy_loss.detach()
