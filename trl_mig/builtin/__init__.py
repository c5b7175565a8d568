"""Built-in task and tiny model, reachable from recipes and the CLI by `builtin:` names; they need no network.

Datasets (`dataset_name` / `--dataset`):
    builtin:arithmetic          multi-step integer arithmetic, splits `train`, `test` (same lengths, disjoint
                                problems) and `ood` (longer chains); columns prompt, solution, gold_completion,
                                expression, num_ops.

Models (`model_name_or_path` / `--model`):
    builtin:tiny-qwen2          Qwen2-style tiny LM + char tokenizer, warm-started by SFT on the task (cached).
    builtin:tiny-llama          the same with a Llama-style config.
    builtin:tiny-qwen2-scratch  randomly initialised, no warm start (for smoke tests).
    builtin:tiny-llama-scratch  idem, Llama-style.

Their sizes are set by the `task_*`, `tiny_*` and `warmstart_*` arguments of [`BuiltinArguments`].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ARCHITECTURES, TinyModelSpec, WarmStartConfig, default_cache_dir, prepare_tiny_model
from .task import SCAFFOLD, ArithmeticTaskConfig, generate_splits, load_arithmetic_dataset

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = {"arithmetic": "multi-step integer arithmetic (splits: train, test, ood)"}
BUILTIN_MODELS = {
    **{f"tiny-{arch}": f"tiny {arch} model with a char tokenizer, warm-started by SFT on builtin:arithmetic (cached)"
       for arch in ARCHITECTURES},
    **{f"tiny-{arch}-scratch": f"tiny {arch} model with a char tokenizer, random initialisation" for arch in ARCHITECTURES},
}


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
    task_train_size: int = field(default=4000, metadata={"help": "Problems in the built-in task's train split."})
    task_test_size: int = field(default=200, metadata={"help": "Problems in the built-in task's test split."})
    task_ood_size: int = field(default=200, metadata={"help": "Problems in the built-in task's ood split."})
    task_min_ops: int = field(default=1, metadata={"help": "Fewest operations per train/test problem."})
    task_max_ops: int = field(default=3, metadata={"help": "Most operations per train/test problem."})
    task_ood_min_ops: int = field(default=4, metadata={"help": "Fewest operations per ood problem (> task_max_ops)."})
    task_ood_max_ops: int = field(default=5, metadata={"help": "Most operations per ood problem."})
    tiny_hidden_size: int = field(default=128, metadata={"help": "Hidden size of the built-in tiny model."})
    tiny_num_layers: int = field(default=4, metadata={"help": "Layers of the built-in tiny model."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Attention heads of the built-in tiny model."})
    tiny_num_kv_heads: int = field(default=2, metadata={"help": "Key/value heads of the built-in tiny model."})
    tiny_seed: int = field(default=0, metadata={"help": "Initialisation seed of the built-in tiny model."})
    warmstart_max_steps: int = field(default=800, metadata={"help": "SFT steps of the warm start (0: none)."})
    warmstart_batch_size: int = field(default=32, metadata={"help": "Global batch size of the warm-start SFT."})
    warmstart_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the warm-start SFT."})
    warmstart_max_seconds: float | None = field(
        default=None,
        metadata={"help": "Stop the warm-start SFT after this many seconds (a time cap; default: no cap)."},
    )
    warmstart_seed: int = field(default=0, metadata={"help": "Seed of the warm-start SFT data and shuffling."})

    def task_config(self) -> ArithmeticTaskConfig:
        return ArithmeticTaskConfig(
            seed=self.task_seed,
            train_size=self.task_train_size,
            test_size=self.task_test_size,
            ood_size=self.task_ood_size,
            min_ops=self.task_min_ops,
            max_ops=self.task_max_ops,
            ood_min_ops=self.task_ood_min_ops,
            ood_max_ops=self.task_ood_max_ops,
        )

    def model_spec(self, architecture: str) -> TinyModelSpec:
        return TinyModelSpec(
            architecture=architecture,
            hidden_size=self.tiny_hidden_size,
            num_layers=self.tiny_num_layers,
            num_heads=self.tiny_num_heads,
            num_kv_heads=self.tiny_num_kv_heads,
            seed=self.tiny_seed,
        )

    def warmstart_config(self) -> WarmStartConfig:
        return WarmStartConfig(
            max_steps=self.warmstart_max_steps,
            batch_size=self.warmstart_batch_size,
            learning_rate=self.warmstart_learning_rate,
            max_seconds=self.warmstart_max_seconds,
            seed=self.warmstart_seed,
        )


def load_builtin_dataset(name: str, args: BuiltinArguments | None = None, field_name: str = "dataset_name"):
    """The `DatasetDict` of a `builtin:` dataset name."""
    _suffix(name, BUILTIN_DATASETS, "dataset", field_name)
    return load_arithmetic_dataset((args or BuiltinArguments()).task_config())


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
    "ArithmeticTaskConfig",
    "BuiltinArguments",
    "TinyModelSpec",
    "WarmStartConfig",
    "default_cache_dir",
    "generate_splits",
    "is_builtin",
    "load_builtin_dataset",
    "resolve_builtin_model",
]
