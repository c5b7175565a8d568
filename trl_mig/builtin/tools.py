"""The built-in tool task: multi-step integer arithmetic on numbers the tiny model cannot reliably compute (results
up to 99 by default), with a `calculator` tool that does each operation. The model decides which calls to make
(which operands, in which order, whether to call at all) and copies the results into its answer.

A problem is a chain of operations on a start value, as in the arithmetic task (`builtin:arithmetic`), e.g.
`((4+3)*6)-9`; its worked solution is a tool-calling conversation, one `### Step i` and one calculator call per
operation, the calls' results listed in the answer::

    <|assistant|><think>### Step 1
    <tool_call>calculator
    expression=4+3
    </tool_call><eos><|tool|>7
    <|assistant|>### Step 2
    <tool_call>calculator
    expression=7*6
    </tool_call><eos><|tool|>42
    <|assistant|>### Step 3
    <tool_call>calculator
    expression=42-9
    </tool_call><eos><|tool|>33
    <|assistant|></think>
    <answer>7 42 33</answer><eos>

That is the char tokenizer's tool chat template (`tiny.TOOL_CHAT_TEMPLATE`) and exactly the ids that TRL's
GRPOTrainer builds in its tool loop (generate to `<eos>`, parse the call, run the tool, append the result, generate
again). The warm start (`tool_sft_rows`) trains on such conversations, the loss on the assistant's tokens only, and
writes a fraction of the steps (`skip_rate`) without a call (`7*6=42` computed in the head, by a demonstrator who
can): the tiny model copies that habit but cannot do the sum, so RL has a decision to improve, calling the tool.

Rows have the columns `prompt` (chat messages), `solution` (every step's result in order, or with `answer="final"`
the last one; compared exactly), `expression` and `num_ops`. Splits `train`, `validation`, `test` (disjoint) and
`ood` (longer chains) as in the arithmetic task, drawn with its generator (`trl_mig.builtin.task`) from the ranges of
`ToolTaskConfig`.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from ..rewards import AnswerAccuracyReward, StepFormatReward
from ..segmentation import FormatSpec
from .task import SPLITS, ArithmeticTaskConfig, Problem, apply, generate_splits, warmstart_problems

TOOLS_TASK_VERSION = 1  # bump when the generated problems or conversations change, so cached warm starts are rebuilt
PROMPT_TEMPLATE = "Compute {expression}."  # the format is taught by the warm start (every character is a token)
_OPERATION = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*$")
_EXPRESSION_START = re.compile(r"^\(*(\d+)")
_EXPRESSION_OPS = re.compile(r"([+\-*])(\d+)")
MAX_CALCULATOR_DIGITS = 12  # operands longer than this are refused (a runaway generation must not stall the run)


def calculator(expression: str) -> str:
    """
    Computes one operation on two integers.

    Args:
        expression: Two integers joined by +, - or *, e.g. 47+38.
    """
    match = _OPERATION.match(str(expression))
    if match is None:
        raise ValueError(f"calculator: expected two integers joined by +, - or *, like 47+38; got {expression!r}.")
    left, operator, right = match.groups()
    if max(len(left), len(right)) > MAX_CALCULATOR_DIGITS:
        raise ValueError(f"calculator: operands have at most {MAX_CALCULATOR_DIGITS} digits; got {expression!r}.")
    return str(apply(int(left), operator, int(right)))


TOOLS = (calculator,)


@dataclass(frozen=True)
class ToolTaskConfig(ArithmeticTaskConfig):
    """
    Sizes and number ranges of the built-in tool task (all splits are a pure function of these): the arithmetic
    task's settings, with wider default ranges (single-digit operands, results up to 99, such as 7*8 or 42-9, which
    the tiny model cannot compute itself) and a smaller ood split.
    """

    ood_size: int = 100
    max_operand: int = 9  # operand of + and - in [1, max_operand]
    max_factor: int = 9  # operand of * in [2, max_factor]
    max_value: int = 99  # every intermediate result stays in [0, max_value]

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as err:
            raise ValueError(f"builtin:tools: {err} (the ranges are the tools_* settings)") from None

    def arithmetic(self) -> ArithmeticTaskConfig:
        """The same problems as an arithmetic-task configuration (its generator draws them)."""
        return ArithmeticTaskConfig(**asdict(self))

    def to_dict(self) -> dict:  # `prompt` is unused: this task asks with its own chat prompt (PROMPT_TEMPLATE)
        return {**super().to_dict(), "version": TOOLS_TASK_VERSION}


def parse_expression(expression: str) -> Problem:
    """The problem of a task expression such as `((47+38)*6)-91` (its start value and operations, in order)."""
    start = _EXPRESSION_START.match(expression)
    ops = _EXPRESSION_OPS.findall(expression)
    if start is None or not ops:
        raise ValueError(f"Not an expression of the built-in task: {expression!r}.")
    return Problem(int(start.group(1)), tuple((op, int(operand)) for op, operand in ops))


def tool_prompt(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": PROMPT_TEMPLATE.format(expression=problem.expression)}]


def tool_conversation(problem: Problem, skipped: tuple[bool, ...] = (), answer: str = "running") -> list[dict]:
    """
    The worked solution as chat messages after the prompt: assistant turns that end in a calculator call, the
    calls' results as tool messages, and a last assistant turn with the answer. A step marked in `skipped` is written
    out with its result (`47+38=85`) instead of a call. `answer`: "running" (every result) or "final" (the last).
    """
    messages, content = [], "<think>"
    for index, (left, op, right, result) in enumerate(problem.steps(), start=1):
        content += f"### Step {index}\n"
        if index <= len(skipped) and skipped[index - 1]:
            content += f"{left}{op}{right}={result}\n"
            continue
        arguments = {"expression": f"{left}{op}{right}"}
        call = {"type": "function", "function": {"name": "calculator", "arguments": arguments}}
        messages.append({"role": "assistant", "content": content, "tool_calls": [call]})
        messages.append({"role": "tool", "name": "calculator", "content": str(result)})
        content = ""
    messages.append({"role": "assistant", "content": f"{content}</think>\n<answer>{problem.answer(answer)}</answer>"})
    return messages


def problem_row(problem: Problem, answer: str = "running") -> dict:
    return {
        "prompt": tool_prompt(problem),
        "solution": problem.answer(answer),
        "expression": problem.expression,
        "num_ops": len(problem.ops),
    }


def generate_tool_splits(config: ToolTaskConfig | None = None, splits=SPLITS) -> dict[str, list[dict]]:
    """Rows of each requested split (the arithmetic task's problems and split rules, this task's ranges)."""
    config = config or ToolTaskConfig()
    drawn = generate_splits(config.arithmetic(), splits)
    return {
        name: [problem_row(parse_expression(row["expression"]), config.answer) for row in rows]
        for name, rows in drawn.items()
    }


def load_tools_dataset(config: ToolTaskConfig | None = None, splits=SPLITS):
    """The task as a `datasets.DatasetDict`: columns prompt (chat messages), solution, expression, num_ops."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in generate_tool_splits(config, splits).items()})


# ---------------------------------------------------------------------------------------------- token ids, warm start
def conversation_ids(tokenizer, prompt: list[dict], messages: list[dict], tools=TOOLS) -> tuple[list[int], list[int]]:
    """
    `(input_ids, labels)` of `prompt` + `messages` rendered by the tokenizer's chat template, in the order a rollout
    builds them (the generation prompt, each assistant turn, each tool result and the next generation prompt):
    labels are the assistant turns' ids and -100 elsewhere (prompt, tool results, role headers). Needs a
    prefix-preserving template (each message extends the rendering of the ones before it).
    """
    rendered = tokenizer.apply_chat_template(prompt, tools=list(tools), add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(input_ids)
    conversation = list(prompt)
    for message in messages:
        conversation.append(message)
        text = tokenizer.apply_chat_template(
            conversation, tools=list(tools), add_generation_prompt=message["role"] != "assistant", tokenize=False
        )
        if not text.startswith(rendered):
            raise ValueError(
                "The chat template is not prefix-preserving: rendering a conversation with one more message changed "
                f"the text before it ({rendered[-40:]!r} is not a prefix of {text[len(rendered) - 40:]!r})."
            )
        piece = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
        input_ids += piece
        labels += piece if message["role"] == "assistant" else [-100] * len(piece)
        rendered = text
    return input_ids, labels


def tool_sft_rows(config: ToolTaskConfig, tokenizer, count: int, seed: int, min_ops: int | None = None,
                  max_ops: int | None = None, skip_rate: float = 0.0) -> list[dict]:
    """
    `count` tokenized warm-start rows (`input_ids`, `labels`) of worked tool conversations (`warmstart_problems`, with
    their own stream); each step is computed without a call with probability `skip_rate`.
    """
    if not 0.0 <= skip_rate <= 1.0:
        raise ValueError(f"tools_warmstart_skip_rate must be in [0, 1], got {skip_rate}.")
    rng = random.Random(f"trl-mig/{config.seed}/tools-sft/{seed}")
    rows = []
    for problem in warmstart_problems(config.arithmetic(), rng, min_ops, max_ops):
        if len(rows) == count:
            break
        skipped = tuple(rng.random() < skip_rate for _ in problem.ops) if skip_rate > 0 else ()
        conversation = tool_conversation(problem, skipped, config.answer)
        input_ids, labels = conversation_ids(tokenizer, tool_prompt(problem), conversation)
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


# ------------------------------------------------------------------------------------------ evaluation with the tool
def tool_response_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The ids the chat template puts after an assistant turn that called tools: the results and the next generation
    prompt (what TRL's tool loop appends before generating again)."""
    call = {"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}
    head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    before = tokenizer.apply_chat_template(head, tokenize=False)
    after = tokenizer.apply_chat_template(head + tool_messages, add_generation_prompt=True, tokenize=False)
    if not after.startswith(before):
        raise ValueError("The chat template is not prefix-preserving around tool messages.")
    return tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]


def run_tool_rollouts(model, tokenizer, prompts: list[list[dict]], *, tools=TOOLS, max_completion_length: int = 320,
                      max_tool_calls: int = 8, batch_size: int = 64, temperature: float = 0.0) -> list[dict]:
    """
    Tool-calling rollouts (greedy, or sampled at `temperature` > 0), as TRL's GRPOTrainer runs them in training:
    generate a turn to `<eos>`, parse it with the tokenizer's `response_template`, run the calls, append the results
    and generate again, until a turn makes no call, `max_tool_calls` calls were made, or the completion (turns and
    results) would pass `max_completion_length` tokens.

    Returns one dict per prompt: `completion` (the decoded completion, tool results included), `tool_calls`,
    `tool_failures` (calls that raised or named an unknown tool) and `truncated`.
    """
    import torch
    from trl.chat_template_utils import parse_response

    tool_map = {tool.__name__: tool for tool in tools}
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            prompt_ids = [
                tokenizer.apply_chat_template(p, tools=list(tools), add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
                for p in batch
            ]
            completion = [[] for _ in batch]
            calls, failures, truncated = [0] * len(batch), [0] * len(batch), [False] * len(batch)
            active = list(range(len(batch)))
            while active:
                rows = [prompt_ids[i] + completion[i] for i in active]
                width = max(len(r) for r in rows)
                input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
                attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                budget = max(max_completion_length - len(completion[i]) for i in active)
                sampling = (
                    dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0
                    else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
                )
                with torch.no_grad():
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention, max_new_tokens=budget, pad_token_id=pad_id,
                        eos_token_id=eos_id, **sampling,
                    )
                still_active = []
                for row, i in enumerate(active):
                    new = output[row, width:].tolist()
                    new = new[: new.index(eos_id) + 1] if eos_id in new else new
                    new = new[: max_completion_length - len(completion[i])]
                    turn_prefix = prompt_ids[i] + completion[i]
                    completion[i] += new
                    if not new or new[-1] != eos_id:
                        truncated[i] = True
                        continue
                    turn = parse_response(tokenizer, new, prefix=turn_prefix, tools=list(tools))
                    requested = turn.get("tool_calls") or []
                    if not requested:
                        continue
                    if calls[i] + len(requested) > max_tool_calls:
                        truncated[i] = True
                        continue
                    tool_messages = []
                    for call in requested:
                        function = call.get("function", call)
                        calls[i] += 1
                        try:
                            content = tool_map[function["name"]](**function.get("arguments", {}))
                        except Exception as err:  # a tool error is the model's mistake: it sees the message
                            failures[i] += 1
                            content = {"error": str(err) if function["name"] in tool_map else "unknown tool"}
                        tool_messages.append({"role": "tool", "name": function["name"], "content": content})
                    suffix = tool_response_ids(tokenizer, tool_messages)
                    if len(completion[i]) + len(suffix) >= max_completion_length:
                        truncated[i] = True
                        continue
                    completion[i] += suffix
                    still_active.append(i)
                active = still_active
            for i in range(len(batch)):
                results.append({
                    "completion": tokenizer.decode(completion[i], skip_special_tokens=True),
                    "tool_calls": calls[i],
                    "tool_failures": failures[i],
                    "truncated": truncated[i],
                })
    finally:
        model.train(was_training)
    return results


def evaluate_tool_task(
    model, tokenizer, dataset, *, spec=None, max_completion_length: int = 320, max_tool_calls: int = 8,
    batch_size: int = 64, temperature: float = 0.0,
) -> tuple[dict, list[dict]]:
    """
    pass@1 of tool rollouts (`run_tool_rollouts`; greedy, or one sample per problem at `temperature` > 0) on a split
    of the tool task, with how the tool was used.

    Returns:
        `(metrics, records)`. `metrics`: `num_examples`, `pass@1` (the answer matches the solution, as
        `spec.answer_match` compares them), `format_rate` (steps, closed thought, answer), `tool_calls_per_problem`,
        `tool_call_rate` (calls per operation of the problem), `tool_failure_rate` (failed calls per call),
        `truncated_rate` and `pass@1_by_group` (per `num_ops`). `records`: per row, the completion, solution,
        correctness and counts.
    """
    spec = spec or FormatSpec(answer_match="exact")
    rollouts = run_tool_rollouts(
        model, tokenizer, dataset["prompt"], max_completion_length=max_completion_length,
        max_tool_calls=max_tool_calls, batch_size=batch_size, temperature=temperature,
    )
    texts = [r["completion"] for r in rollouts]
    correct = AnswerAccuracyReward(spec)(texts, solution=dataset["solution"])
    formatted = StepFormatReward(spec)(texts)
    num_ops = dataset["num_ops"]
    calls = [r["tool_calls"] for r in rollouts]
    n = max(1, len(rollouts))
    by_group: dict[str, list[float]] = {}
    for ops, ok in zip(num_ops, correct):
        by_group.setdefault(str(ops), []).append(float(ok))
    metrics = {
        "num_examples": len(rollouts),
        "pass@1": sum(correct) / n,
        "format_rate": sum(formatted) / n,
        "tool_calls_per_problem": sum(calls) / n,
        "tool_call_rate": sum(calls) / max(1, sum(num_ops)),
        "tool_failure_rate": sum(r["tool_failures"] for r in rollouts) / max(1, sum(calls)),
        "truncated_rate": sum(r["truncated"] for r in rollouts) / n,
        "pass@1_by_group": {key: sum(v) / len(v) for key, v in sorted(by_group.items(), key=lambda kv: int(kv[0]))},
    }
    records = [
        {"index": i, "completion": r["completion"], "solution": s, "correct": bool(ok), "tool_calls": r["tool_calls"],
         "tool_failures": r["tool_failures"]}
        for i, (r, s, ok) in enumerate(zip(rollouts, dataset["solution"], correct))
    ]
    return metrics, records
