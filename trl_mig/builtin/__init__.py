"""Built-in task and tiny model, reachable from recipes and the CLI by `builtin:` names; they need no network.

Datasets (`dataset_name` / `--dataset`):
    builtin:arithmetic          multi-step integer arithmetic, splits `train`, `validation`, `test` (same
                                lengths, disjoint problems) and `ood` (longer chains); columns prompt, solution,
                                gold_completion, expression, num_ops.
    builtin:visual              counting coloured shapes in synthetic PIL scenes (for vision-language models), one
                                filtering/counting step per `### Step`; splits as above (`ood`: more objects);
                                columns prompt (chat), image, solution, gold_completion, question_type,
                                num_objects. Sizes from `task_seed` / `task_*_size`, scenes from `visual_*`.
    builtin:tools               multi-step arithmetic on numbers up to `tools_max_value`, each operation done by a
                                `calculator` tool that the model calls (TRL's multi-turn tool loop); splits as
                                above; columns prompt (chat), solution, expression, num_ops. Ranges from `tools_*`.

Models (`model_name_or_path` / `--model`):
    builtin:tiny-qwen2          Qwen2-style tiny LM + char tokenizer, warm-started by SFT on the task (cached).
    builtin:tiny-llama          the same with a Llama-style config.
    builtin:tiny-qwen2-scratch  randomly initialised, no warm start (for smoke tests).
    builtin:tiny-llama-scratch  idem, Llama-style.
    builtin:tiny-qwen2-tools    Qwen2-style tiny LM + tool-calling char tokenizer, warm-started by SFT on
                                builtin:tools conversations from builtin:tiny-qwen2 (cached; `tools_warmstart_*`).
    builtin:tiny-llama-tools    the same with a Llama-style config.
    builtin:tiny-llava-scratch  LLaVA-style tiny vision-language model (CLIP + Llama) with the char tokenizer and
                                its processor, randomly initialised: smoke tests of builtin:visual.

Their sizes are set by the `task_*`, `tiny_*` and `warmstart_*` arguments of [`BuiltinArguments`].
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .addition import AdditionTaskConfig, load_addition_dataset
from .model import (
    ARCHITECTURES,
    VLM_ARCHITECTURES,
    TinyModelSpec,
    ToolWarmStartConfig,
    WarmStartConfig,
    default_cache_dir,
    prepare_tiny_model,
    prepare_tiny_tool_model,
    prepare_tiny_vlm,
)
from .task import (
    ANSWER_FORMATS,
    PROMPT_TEMPLATES,
    SCAFFOLD,
    ArithmeticTaskConfig,
    generate_splits,
    load_arithmetic_dataset,
)
from .tools import ToolTaskConfig, load_tools_dataset
from .visual import VisualTaskConfig, load_visual_dataset

BUILTIN_PREFIX = "builtin:"
_TASK, _WARM = ArithmeticTaskConfig(), WarmStartConfig()  # the defaults, in one place
_ADDITION = AdditionTaskConfig()
_VISUAL = VisualTaskConfig()
_TOOLS, _TOOLS_WARM = ToolTaskConfig(), ToolWarmStartConfig()
BUILTIN_DATASETS = {
    "arithmetic": "multi-step integer arithmetic (splits: train, validation, test, ood)",
    "visual": "counting coloured shapes in synthetic images, for VLMs (splits: train, validation, test, ood)",
    "tools": "multi-step arithmetic done with a calculator tool the model calls (splits: train, validation, test, ood)",
    "addition": "column addition of two numbers, one column per step, the sum as the answer (splits: train, "
    "validation, test, ood)",
}
BUILTIN_MODELS = {
    **{f"tiny-{arch}": f"tiny {arch} model with a char tokenizer, warm-started by SFT on builtin:arithmetic (cached)"
       for arch in ARCHITECTURES},
    **{f"tiny-{arch}-scratch": f"tiny {arch} model with a char tokenizer, random initialisation" for arch in ARCHITECTURES},
    **{f"tiny-{arch}-scratch": f"tiny {arch}-style vision-language model and processor, random initialisation (for "
       "builtin:visual smoke tests)" for arch in VLM_ARCHITECTURES},
    **{f"tiny-{arch}-tools": f"tiny {arch} model with a tool-calling char tokenizer, warm-started by SFT on "
       "builtin:tools conversations (cached)" for arch in ARCHITECTURES},
    **{f"tiny-{arch}-addition": f"tiny {arch} model with a char tokenizer, warm-started by SFT on correct "
       "builtin:addition solutions (cached)" for arch in ARCHITECTURES},
}
TOOL_TASK_DATASETS = (BUILTIN_PREFIX + "tools",)  # the built-in datasets whose rollouts call tools


def is_builtin(name) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def _suffix(name: str, known: dict, kind: str, field_name: str) -> str:
    suffix = name[len(BUILTIN_PREFIX) :]
    if suffix not in known:
        names = ", ".join(BUILTIN_PREFIX + k for k in known)
        raise ValueError(f"Unknown built-in {kind} {name!r} in `{field_name}`; the built-in {kind}s are: {names}.")
    return suffix


@dataclass
class BuiltinArguments:
    """Settings of the built-in task and tiny model (used only when a `builtin:` name is given)."""

    builtin_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the cached built-in models. Default: $TRL_MIG_CACHE, else ~/.cache/trl-mig."},
    )
    task_seed: int = field(default=0, metadata={"help": "Seed of the built-in arithmetic task (all splits)."})
    task_train_size: int = field(default=_TASK.train_size, metadata={"help": "Problems in the train split."})
    task_validation_size: int = field(
        default=_TASK.validation_size, metadata={"help": "Problems in the validation split (for choosing settings)."}
    )
    task_test_size: int = field(default=_TASK.test_size, metadata={"help": "Problems in the test split."})
    task_ood_size: int = field(default=_TASK.ood_size, metadata={"help": "Problems in the ood split."})
    task_min_ops: int = field(default=_TASK.min_ops, metadata={"help": "Fewest operations per train/validation/test problem."})
    task_max_ops: int = field(default=_TASK.max_ops, metadata={"help": "Most operations per train/validation/test problem."})
    task_ood_min_ops: int = field(
        default=_TASK.ood_min_ops, metadata={"help": "Fewest operations per ood problem (> task_max_ops)."}
    )
    task_ood_max_ops: int = field(default=_TASK.ood_max_ops, metadata={"help": "Most operations per ood problem."})
    task_max_start: int = field(default=_TASK.max_start, metadata={"help": "Start values are drawn from 1..this."})
    task_max_operand: int = field(default=_TASK.max_operand, metadata={"help": "Operands of + and - are 1..this."})
    task_max_factor: int = field(default=_TASK.max_factor, metadata={"help": "Operands of * are 2..this."})
    task_max_value: int = field(default=_TASK.max_value, metadata={"help": "Every intermediate result is 0..this."})
    task_answer: str = field(
        default=_TASK.answer,
        metadata={
            "help": "The answer: 'running' (every step's result, in order) or 'final' (the last result). With "
            "'running', compare answers with answer_match: exact (math-verify reads a list as one number), or last "
            "(the final value only). It sets the solution column of every split and the answers the warm start is "
            "taught (another cached model); the prompts are the same.",
            "choices": list(ANSWER_FORMATS),
        },
    )
    task_prompt: str = field(
        default=_TASK.prompt,
        metadata={
            "help": "How a problem is asked: 'instructions' (the expression and the answer format) or 'expression' "
            "(the expression alone: less than half the prompt tokens; the warm start teaches the format).",
            "choices": list(PROMPT_TEMPLATES),
        },
    )
    addition_min_digits: int = field(
        default=_ADDITION.min_digits,
        metadata={"help": "builtin:addition: fewest digits per number (train/validation/test)."},
    )
    addition_max_digits: int = field(
        default=_ADDITION.max_digits,
        metadata={"help": "builtin:addition: most digits per number (train/validation/test)."},
    )
    addition_ood_min_digits: int = field(
        default=_ADDITION.ood_min_digits,
        metadata={"help": "builtin:addition: fewest digits per number of the ood split (> addition_max_digits)."},
    )
    addition_ood_max_digits: int = field(
        default=_ADDITION.ood_max_digits, metadata={"help": "builtin:addition: most digits per number of the ood split."}
    )
    visual_image_size: int = field(
        default=_VISUAL.image_size, metadata={"help": "Side in pixels of the scenes of builtin:visual."}
    )
    visual_min_objects: int = field(
        default=_VISUAL.min_objects,
        metadata={"help": "Fewest objects per builtin:visual scene (train/validation/test)."},
    )
    visual_max_objects: int = field(
        default=_VISUAL.max_objects,
        metadata={"help": "Most objects per builtin:visual scene (train/validation/test); ood scenes have more."},
    )
    tools_max_start: int = field(
        default=_TOOLS.max_start, metadata={"help": "builtin:tools: start values are drawn from 1..this."}
    )
    tools_max_operand: int = field(
        default=_TOOLS.max_operand, metadata={"help": "builtin:tools: operands of + and - are 1..this."}
    )
    tools_max_factor: int = field(
        default=_TOOLS.max_factor, metadata={"help": "builtin:tools: operands of * are 2..this."}
    )
    tools_max_value: int = field(
        default=_TOOLS.max_value, metadata={"help": "builtin:tools: every intermediate result is 0..this."}
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Hidden size of the built-in tiny model."})
    tiny_num_layers: int = field(default=4, metadata={"help": "Layers of the built-in tiny model."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Attention heads of the built-in tiny model."})
    tiny_num_kv_heads: int = field(default=2, metadata={"help": "Key/value heads of the built-in tiny model."})
    tiny_seed: int = field(default=0, metadata={"help": "Initialisation seed of the built-in tiny model."})
    tiny_step_token: bool = field(
        default=False,
        metadata={
            "help": "Give the tiny model's char tokenizer one token for '### Step ' (the step header): the same text "
            "in about 40 percent fewer completion tokens, so faster generation and training on CPU."
        },
    )
    warmstart_max_steps: int = field(default=_WARM.max_steps, metadata={"help": "SFT steps of the warm start (0: none)."})
    warmstart_batch_size: int = field(default=_WARM.batch_size, metadata={"help": "Global batch size of the warm-start SFT."})
    warmstart_learning_rate: float = field(
        default=_WARM.learning_rate, metadata={"help": "Peak learning rate of the warm-start SFT (linear decay)."}
    )
    warmstart_seed: int = field(default=_WARM.seed, metadata={"help": "Seed of the warm-start SFT data and shuffling."})
    warmstart_min_ops: int | None = field(
        default=_WARM.min_ops, metadata={"help": "Shortest chains in the warm-start SFT data (None: task_min_ops)."}
    )
    warmstart_max_ops: int | None = field(
        default=_WARM.max_ops,
        metadata={"help": "Longest chains in the warm-start SFT data (None: task_max_ops); RL may train on longer."},
    )
    warmstart_shortcut_rate: float = field(
        default=_WARM.shortcut_rate,
        metadata={
            "help": "Probability that a step of a warm-start demonstration skips writing its calculation ('=8' "
            "instead of '4*2=8'): a demonstrator with a habit that RL can unlearn."
        },
    )
    warmstart_slip_rate: float = field(
        default=_WARM.slip_rate,
        metadata={
            "help": "Probability that a subtraction in a warm-start demonstration is added instead ('8-3=11', the "
            "solution going on from 11): a demonstrator's systematic slip. Above 0.5 the warm-started model's greedy "
            "answer copies the slip while its samples are sometimes right: an error that RL can unlearn."
        },
    )
    tools_warmstart_max_steps: int = field(
        default=_TOOLS_WARM.max_steps, metadata={"help": "SFT steps of the builtin:tiny-*-tools warm start (0: none)."}
    )
    tools_warmstart_batch_size: int = field(
        default=_TOOLS_WARM.batch_size, metadata={"help": "Global batch size of the tool warm-start SFT."}
    )
    tools_warmstart_learning_rate: float = field(
        default=_TOOLS_WARM.learning_rate, metadata={"help": "Peak learning rate of the tool warm-start SFT."}
    )
    tools_warmstart_base: str = field(
        default=_TOOLS_WARM.base,
        metadata={
            "help": "What the tool warm start starts from: 'arithmetic' (the builtin:tiny-* arithmetic warm start of "
            "the same shape, built with the warmstart_* and task_* settings and cached; it has learned to copy "
            "numbers, which the tiny model learns slowly from scratch) or 'scratch' (random initialisation).",
            "choices": ["arithmetic", "scratch"],
        },
    )
    tools_warmstart_skip_rate: float = field(
        default=_TOOLS_WARM.skip_rate,
        metadata={
            "help": "Probability that a step of a tool warm-start demonstration is computed without the calculator "
            "('47+38=85' written out): a habit the tiny model copies but cannot carry out, which RL can unlearn."
        },
    )

    def task_config(self) -> ArithmeticTaskConfig:
        return ArithmeticTaskConfig(**{f.name: getattr(self, f"task_{f.name}") for f in fields(ArithmeticTaskConfig)})

    def addition_task_config(self) -> AdditionTaskConfig:
        """builtin:addition: seed, sizes and prompt style from the `task_*` fields, number lengths from `addition_*`."""
        return AdditionTaskConfig(
            seed=self.task_seed,
            train_size=self.task_train_size,
            validation_size=self.task_validation_size,
            test_size=self.task_test_size,
            ood_size=self.task_ood_size,
            min_digits=self.addition_min_digits,
            max_digits=self.addition_max_digits,
            ood_min_digits=self.addition_ood_min_digits,
            ood_max_digits=self.addition_ood_max_digits,
            prompt=self.task_prompt,
        )

    def visual_task_config(self) -> VisualTaskConfig:
        return VisualTaskConfig(
            seed=self.task_seed,
            train_size=self.task_train_size,
            validation_size=self.task_validation_size,
            test_size=self.task_test_size,
            ood_size=self.task_ood_size,
            image_size=self.visual_image_size,
            min_objects=self.visual_min_objects,
            max_objects=self.visual_max_objects,
        )

    def tools_task_config(self) -> ToolTaskConfig:
        """builtin:tools: sizes and operation counts from the `task_*` fields, number ranges from `tools_*`."""
        ranges = ("max_start", "max_operand", "max_factor", "max_value")
        names = [f.name for f in fields(ToolTaskConfig) if f.name != "prompt"]  # the tool task has its own prompt
        prefix = {name: "tools" if name in ranges else "task" for name in names}
        return ToolTaskConfig(**{name: getattr(self, f"{source}_{name}") for name, source in prefix.items()})

    def tools_warmstart_config(self) -> ToolWarmStartConfig:
        return ToolWarmStartConfig(
            max_steps=self.tools_warmstart_max_steps,
            batch_size=self.tools_warmstart_batch_size,
            learning_rate=self.tools_warmstart_learning_rate,
            seed=self.warmstart_seed,
            min_ops=self.warmstart_min_ops,
            max_ops=self.warmstart_max_ops,
            skip_rate=self.tools_warmstart_skip_rate,
            base=self.tools_warmstart_base,
        )

    def model_spec(self, architecture: str) -> TinyModelSpec:
        return TinyModelSpec(
            architecture=architecture,
            hidden_size=self.tiny_hidden_size,
            num_layers=self.tiny_num_layers,
            num_heads=self.tiny_num_heads,
            num_kv_heads=self.tiny_num_kv_heads,
            seed=self.tiny_seed,
            step_token=self.tiny_step_token,
        )

    def warmstart_config(self) -> WarmStartConfig:
        return WarmStartConfig(
            max_steps=self.warmstart_max_steps,
            batch_size=self.warmstart_batch_size,
            learning_rate=self.warmstart_learning_rate,
            seed=self.warmstart_seed,
            min_ops=self.warmstart_min_ops,
            max_ops=self.warmstart_max_ops,
            shortcut_rate=self.warmstart_shortcut_rate,
            slip_rate=self.warmstart_slip_rate,
        )


def check_answer_match(dataset_name, args: BuiltinArguments | None, answer_match: str | None, field_name: str) -> str:
    """
    The answer comparison to use on `dataset_name`: `answer_match`, or when None, "exact" for the running answers
    (a list of values) of the built-in arithmetic and tool tasks, and "math" otherwise. Asking math-verify to
    compare running answers is an error: it reads "3 7 9" as the number 9, so wrong lists would count as right
    ("last" does that on purpose: it scores the final value only).
    """
    with_steps = dataset_name in (BUILTIN_PREFIX + "arithmetic", *TOOL_TASK_DATASETS)
    running = with_steps and (args or BuiltinArguments()).task_answer == "running"
    if answer_match is None:
        return "exact" if running else "math"
    if running and answer_match == "math":
        raise ValueError(
            f"{field_name}={answer_match!r} cannot compare the running answers of {dataset_name} (task_answer: "
            "running, e.g. '3 7 9'): math-verify reads them as their last number. Use exact (every value), last (the "
            "final value only), or task_answer: final."
        )
    return answer_match


def load_builtin_dataset(name: str, args: BuiltinArguments | None = None, field_name: str = "dataset_name"):
    """The `DatasetDict` of a `builtin:` dataset name."""
    suffix = _suffix(name, BUILTIN_DATASETS, "dataset", field_name)
    args = args or BuiltinArguments()
    if suffix == "visual":
        return load_visual_dataset(args.visual_task_config())
    if suffix == "tools":
        return load_tools_dataset(args.tools_task_config())
    if suffix == "addition":
        return load_addition_dataset(args.addition_task_config())
    return load_arithmetic_dataset(args.task_config())


def resolve_builtin_model(
    name: str,
    args: BuiltinArguments | None = None,
    *,
    use_cpu: bool = False,
    bf16: bool = False,
    fp16: bool = False,
    field_name: str = "model_name_or_path",
) -> str:
    """Local path of a `builtin:` model, built (and warm-started) into the cache first if needed."""
    suffix = _suffix(name, BUILTIN_MODELS, "model", field_name)
    args = args or BuiltinArguments()
    scratch = suffix.endswith("-scratch")
    architecture = suffix[len("tiny-") :].removesuffix("-scratch")
    if suffix.endswith("-tools"):
        architecture = architecture.removesuffix("-tools")
        spec, warm = args.model_spec(architecture), args.tools_warmstart_config()
        base_path = None
        if warm.base == "arithmetic":  # the arithmetic warm start the tool SFT starts from (cached as usual)
            base_path = prepare_tiny_model(
                f"tiny-{architecture}", spec, args.warmstart_config(), args.task_config(), args.builtin_cache_dir,
                use_cpu=use_cpu, bf16=bf16, fp16=fp16,
            )
        return prepare_tiny_tool_model(
            suffix, spec, warm, args.tools_task_config(), args.builtin_cache_dir, base_path=base_path,
            use_cpu=use_cpu, bf16=bf16, fp16=fp16,
        )
    if suffix.endswith("-addition"):
        architecture = architecture.removesuffix("-addition")
        return prepare_tiny_model(
            suffix, args.model_spec(architecture), args.warmstart_config(), args.addition_task_config(),
            args.builtin_cache_dir, use_cpu=use_cpu, bf16=bf16, fp16=fp16,
        )
    if architecture in VLM_ARCHITECTURES:
        return prepare_tiny_vlm(
            suffix, architecture, args.tiny_hidden_size, args.tiny_num_layers, args.tiny_seed, args.builtin_cache_dir,
            use_cpu=use_cpu,
        )
    return prepare_tiny_model(
        suffix,
        args.model_spec(architecture),
        None if scratch else args.warmstart_config(),
        args.task_config(),
        args.builtin_cache_dir,
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=fp16,
    )


__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "SCAFFOLD",
    "TOOL_TASK_DATASETS",
    "AdditionTaskConfig",
    "ArithmeticTaskConfig",
    "BuiltinArguments",
    "check_answer_match",
    "TinyModelSpec",
    "ToolTaskConfig",
    "ToolWarmStartConfig",
    "VisualTaskConfig",
    "WarmStartConfig",
    "default_cache_dir",
    "generate_splits",
    "is_builtin",
    "load_builtin_dataset",
    "resolve_builtin_model",
]
