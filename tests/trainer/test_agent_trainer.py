"""MIGGRPOTrainer on agent trajectories: a `rollout_func` returns scripted multi-turn completions and an `env_mask`.

The expected credit is computed here without the code under test: boundaries from the scripted pieces, l_k by one
plain forward per prefix, watermark sums and group normalisation by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from helpers import (
    SCAFFOLD,
    assert_loss_is_reference,
    build_qwen3_tool_tokenizer,
    cpu_config,
    group_normalise,
    multiply_tool,
    policy_logps_and_entropies,
    reference_gated_nll,
)
import trl_mig.trainer
from trl_mig import MIGGRPOTrainer
from trl_mig.builtin.tiny import build_tiny_model

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

MODEL, TOOL = 1, 0
PROMPTS = ["Compute (2+3)*4.\n", "Compute 7-1.\n"]
SOLUTIONS = ["20", "6"]
# per prompt, four trajectories of (text, written by the model) pieces; the first piece ends where the thought starts
SCRIPT = {
    PROMPTS[0]: [
        [("<think>", MODEL), ("add 2 3</think><call>2+3</call>", MODEL), ("<result>5</result>\n", TOOL),
         ("<think>5*4=20\n", MODEL), ("</think>\n<answer>20</answer>", MODEL)],
        [("<think>", MODEL), ("add</think><call>2+3</call>", MODEL), ("<result>5</result>\n", TOOL),
         ("<think>times</think><call>5*4</call>", MODEL), ("<result>20</result>\n", TOOL),
         ("<think>so 20\n", MODEL), ("</think>\n<answer>20</answer>", MODEL)],
        [("<think>", MODEL), ("### Step 1\n2+3=5\n", MODEL), ("### Step 2\n5*4=24\n", MODEL),
         ("</think>\n<answer>24</answer>", MODEL)],  # no tool call
        [("<think>", MODEL), ("guess</think><call>2*4</call>", MODEL), ("<result>8</result>\n", TOOL)],  # cut off
    ],
    PROMPTS[1]: [
        [("<think>", MODEL), ("sub</think><call>7-1</call>", MODEL), ("<result>6</result>\n", TOOL),
         ("<think>it is 6\n", MODEL), ("</think>\n<answer>6</answer>", MODEL)],
        [("<think>", MODEL), ("sub</think><call>7+1</call>", MODEL), ("<result>8</result>\n", TOOL),
         ("<think>it is 8\n", MODEL), ("</think>\n<answer>8</answer>", MODEL)],
        [("<think>", MODEL), ("### Step 1\n7-1=6\n", MODEL), ("</think>\n<answer>6</answer>", MODEL)],
        [("<think>", MODEL), ("sub</think><call>7-1</call>", MODEL), ("<result>6</result>\n", TOOL),
         ("<answer>6</answer>", MODEL)],
    ],
}


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pieces_of(prompt, index):
    return SCRIPT[prompt][index % 4]


def assemble(tokenizer, pieces):
    """(ids, mask, piece ends), each piece tokenised on its own; an EOS ends a trajectory that answered."""
    ids, mask, ends = [], [], []
    for text, by_model in pieces:
        piece = encode(tokenizer, text)
        ids, mask = ids + piece, mask + [by_model] * len(piece)
        ends.append(len(ids))
    if pieces[-1][0].endswith("</answer>"):
        ids, mask = ids + [tokenizer.eos_token_id], mask + [MODEL]
    return ids, mask, ends


def multi_turn_rollout(with_env_mask=True):
    """A TRL `rollout_func`: the scripted trajectory `i % 4` of each prompt, with its `env_mask`."""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        first = trainer.accelerator.process_index * len(prompts)
        built = [assemble(tokenizer, pieces_of(p, first + i)) for i, p in enumerate(prompts)]
        output = {
            "prompt_ids": [encode(tokenizer, p) for p in prompts],
            "completion_ids": [ids for ids, _, _ in built],
            "logprobs": None,
        }
        if with_env_mask:
            output["env_mask"] = [mask for _, mask, _ in built]
        return output

    return rollout


def batch():
    return [{"prompt": p, "solution": s} for p, s in zip(PROMPTS, SOLUTIONS) for _ in range(4)]


def make_trainer(tmp_path, tokenizer, rollout=None, **overrides):
    trainer = MIGGRPOTrainer(
        build_tiny_model(tokenizer).float(),
        args=cpu_config(tmp_path, max_completion_length=96, **overrides),
        train_dataset=Dataset.from_list(batch()),
        processing_class=tokenizer,
        rollout_func=rollout or multi_turn_rollout(),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@torch.no_grad()
def reference_logliks(model, tokenizer, prompt, ids, bounds, solution):
    prompt_ids, answer_ids, scaffold = encode(tokenizer, prompt), encode(tokenizer, SCAFFOLD + solution), SCAFFOLD
    start = len(encode(tokenizer, scaffold))
    values = []
    for b in bounds:
        row = prompt_ids + ids[:b] + answer_ids
        logps = model(torch.tensor([row])).logits[0].float().log_softmax(-1)
        first = len(row) - len(answer_ids) + start
        values.append(sum(logps[t - 1, row[t]].item() for t in range(first, len(row))) / (len(row) - first))
    return values


def record_scored_items(monkeypatch) -> list:
    """The trainer's scoring items, one per completion, in order (recorded before the prefixes several completions
    share are scored once)."""
    scored = []
    distinct_prefixes = trl_mig.trainer.distinct_prefixes
    monkeypatch.setattr(trl_mig.trainer, "distinct_prefixes",
                        lambda items: scored.extend(items) or distinct_prefixes(items))
    return scored


# boundaries written out by hand from the pieces (indices into each trajectory's piece ends)
BOUNDS = {
    PROMPTS[0]: [lambda e: [e[0], e[2], e[3]], lambda e: [e[0], e[2], e[4], e[5]],
                 lambda e: [e[0], e[1], e[2]], lambda e: [e[0], e[2]]],
    PROMPTS[1]: [lambda e: [e[0], e[2], e[3]], lambda e: [e[0], e[2], e[3]],
                 lambda e: [e[0], e[1]], lambda e: [e[0], e[2]]],
}


def test_mig_credit_follows_turns_and_never_lands_on_external_tokens(tmp_path, char_tokenizer, monkeypatch):
    # outcome_weight = 0: the advantage is the MIG credit alone
    trainer = make_trainer(tmp_path, char_tokenizer, mig_weight=0.7, outcome_weight=0.0)
    scored = record_scored_items(monkeypatch)
    output = trainer._generate_and_score_completions(batch())
    advantages, tool_mask = output["advantages"], output["tool_mask"]

    for group, prompt in enumerate(PROMPTS):
        built = [assemble(char_tokenizer, pieces_of(prompt, j)) for j in range(4)]
        bounds = [BOUNDS[prompt][j](ends) for j, (_, _, ends) in enumerate(built)]
        logliks = [reference_logliks(trainer.model, char_tokenizer, prompt, ids, b, SOLUTIONS[group])
                   for (ids, _, _), b in zip(built, bounds)]
        expected_mig = group_normalise([max(v) - v[0] for v in logliks])  # sum of watermark gains
        for j, ((ids, mask, ends), b) in enumerate(zip(built, bounds)):
            row = group * 4 + j
            assert list(scored[row].boundaries) == b, (row, "l_k prefixes end after the tool's result")
            assert tool_mask[row, : len(mask)].tolist() == mask
            tokens = advantages[row, : len(ids)]
            external = torch.tensor(mask) == TOOL
            assert tokens[external].eq(0).all(), "a tool result got credit"
            in_steps = torch.zeros(len(ids), dtype=torch.bool)
            in_steps[b[0] : b[-1]] = True
            credited = in_steps & ~external
            assert tokens[credited].tolist() == pytest.approx([0.7 * expected_mig[j]] * int(credited.sum()), abs=2e-3)
            assert tokens[~credited].eq(0).all(), "tokens outside the steps get no MIG credit"
    assert advantages.ne(0).any()


def test_gated_sft_never_trains_on_external_tokens(tmp_path, char_tokenizer):
    """Every row through the gate: the loss (value and gradient) is GRPO's policy loss plus the NLL of the tokens the
    model wrote, both computed here without the tool results; counting those too would give another loss."""
    trainer = make_trainer(tmp_path, char_tokenizer, sft_weight=1.0)
    output = trainer._generate_and_score_completions(batch())
    output["sft_gate"] = torch.ones_like(output["sft_gate"])  # every row through the gate
    loss, policy_loss = assert_loss_is_reference(trainer, output)
    external = (output["tool_mask"] == 0) & output["completion_mask"].bool()
    assert external.any(), "the batch has tool results inside its completions"
    with torch.no_grad():
        logps, _ = policy_logps_and_entropies(trainer.model, output)
    every_token = {"completion_mask": output["completion_mask"]}
    with_external = reference_gated_nll(logps, every_token, output["sft_gate"])
    assert abs((loss - policy_loss).item() - with_external.item()) > 1e-3


def test_training_on_agent_trajectories_updates_parameters_and_logs_turn_metrics(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, mig_credit="step", mig_inspect_html=True)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    logged = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    for metric in ("tools/mig_gain_per_call", "tools/mig_breakthrough_frac", "tools/mig_call_steps", "mig/steps"):
        assert metric in logged, metric
    # tool calls per completion: 1, 2, 0, 1 and 1, 1, 0, 1; steps: 2, 3, 2, 1 and 2, 2, 1, 1
    assert logged["tools/mig_call_steps"] == pytest.approx(7 / 8)
    assert logged["mig/steps"] == pytest.approx(14 / 8)
    assert 0.0 <= logged["tools/mig_breakthrough_frac"] <= 1.0 and logged["tools/mig_gain_per_call"] >= 0.0
    # the inspection pages show the turns: a step that ends after a tool's result, whose text is marked external
    first = next(c for c in trainer._mig_credit_log if c.completion.startswith("<think>add 2 3"))
    assert [step.after_response for step in first.steps] == [True, False]
    assert [first.completion[a:b] for a, b in first.external_spans] == ["<result>5</result>\n"]
    assert os.listdir(tmp_path / "mig_inspect")


def test_turn_steps_never_reads_tool_results_as_text(tmp_path, char_tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, char_tokenizer, mig_turn_steps="never")
    scored = record_scored_items(monkeypatch)
    output = trainer._generate_and_score_completions(batch())
    _, _, ends = assemble(char_tokenizer, pieces_of(PROMPTS[0], 0))
    # the first </think> ends the thought: one step, the tool's result and the last turn are "answer"
    assert list(scored[0].boundaries) == [ends[0], ends[0] + len("add 2 3")]
    assert output["advantages"][output["tool_mask"] == 0].eq(0).all()  # still no credit on external tokens
    assert not any(key.startswith("tools/mig") for key in trainer._metrics["train"])


def test_turn_steps_always_needs_a_mask(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, rollout=multi_turn_rollout(with_env_mask=False),
                           mig_turn_steps="always")
    with pytest.raises(ValueError, match="mig_turn_steps='always' needs TRL's tool_mask"):
        trainer._generate_and_score_completions(batch())


# ------------------------------------------------------------------------------------------ TRL's own tool loop


def test_trl_tool_calls_become_steps_that_end_after_the_tool_response(tmp_path, monkeypatch):
    """With `tools`, TRL runs the calls and builds the tool_mask itself: the step of a call ends after its
    `<tool_response>`, which gets no credit, and the turn metrics sit next to TRL's tools/call_frequency."""
    from unittest.mock import patch

    from trl_mig.segmentation import FormatSpec, segment_completion

    tokenizer = build_qwen3_tool_tokenizer()
    call = '<think>### Step 1\nneed 3*4\n</think><tool_call>\n{"name": "multiply_tool", "arguments": {"a": 3, "b": 4}}\n'
    first_turn = [call + "</tool_call><|im_end|>", "<think>### Step 1\n3*4=12\n</think>\n<answer>12</answer><|im_end|>"]
    second_turn = "<think>so 12\n</think>\n<answer>12</answer><|im_end|>"
    calls = []

    def fake_generate(input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        texts = first_turn if len(calls) == 1 else [second_turn]
        rows = [encode(tokenizer, texts[i % len(texts)]) for i in range(input_ids.shape[0])]
        width = max(map(len, rows))
        padded = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=-1)

    rows = [{"prompt": [{"role": "user", "content": "What is 3*4?"}], "solution": "12"}] * 4
    trainer = MIGGRPOTrainer(
        build_tiny_model(tokenizer).float(),
        args=cpu_config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_completion_length=160),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        tools=[multiply_tool],
    )
    trainer.model.train()
    scored = record_scored_items(monkeypatch)
    with patch.object(trainer.model, "generate", side_effect=fake_generate):
        output = trainer._generate_and_score_completions(rows)
    assert len(calls) == 2, "the tool's result was fed back for a second turn"

    tool_mask = output["tool_mask"]
    for row in (0, 2):  # the completions that called the tool
        ids, item = scored[row].completion_ids, scored[row]
        mask = tool_mask[row, : len(ids)].tolist()
        response_start, response_end = mask.index(0), len(mask) - mask[::-1].index(0)
        response = tokenizer.decode(ids[response_start:response_end])
        assert "<tool_response>\n12\n</tool_response>" in response and response.endswith("assistant\n")
        assert item.boundaries[1] == response_end, "l_1 is measured after the tool's response"
        assert tokenizer.decode(ids[item.boundaries[1] : item.boundaries[2]]) == "<think>so 12\n"
        assert output["advantages"][row, response_start:response_end].eq(0).all()
    # the completion without a call is segmented as text
    plain = list(scored[1].completion_ids)
    assert list(scored[1].boundaries) == list(segment_completion(tokenizer, plain, FormatSpec()).boundaries)
    metrics = trainer._metrics["train"]
    assert metrics["tools/call_frequency"] == [pytest.approx(0.5)]
    assert metrics["tools/mig_call_steps"] == [pytest.approx(0.5)]
    assert len(metrics["tools/mig_gain_per_call"]) == 1 and len(metrics["tools/mig_breakthrough_frac"]) == 1
