"""The built-in tiny model: a small Qwen2/Llama-style causal LM with the local character tokenizer, created on the
spot and warm-started by a short SFT (TRL's `SFTTrainer`) on worked solutions of the built-in arithmetic task.

The result is saved with `save_pretrained` in a cache folder keyed by every setting that shapes it, so the second run
loads it instead of training again; from then on it is an ordinary local model path. Under a multi-process launch
the ranks run the warm start together (data parallel) and the local main process of every node writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .addition import AdditionTaskConfig, addition_sft_rows
from .task import ArithmeticTaskConfig, asdict_without_defaults, sft_rows
from .tiny import build_char_tokenizer, build_tiny_model, build_tiny_vlm, build_tool_char_tokenizer
from .tools import tool_sft_rows

logger = logging.getLogger(__name__)

WARMSTART_VERSION = 3  # bump when the warm-start recipe or the saved files change, so cached models are rebuilt
# 3: byte-level tokenizer files that `AutoTokenizer` reloads unchanged (same ids and weights as version 2)
METADATA_FILE = "trl_mig_builtin.json"
ARCHITECTURES = ("qwen2", "llama")
# built-in vision-language models (random initialisation): saved with their processor, which AutoProcessor reloads
# without torchvision (a Qwen2-VL processor would load a video processor, which needs it)
VLM_ARCHITECTURES = ("llava",)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the built-in tiny model."""

    architecture: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0
    step_token: bool = False  # "### Step " as one token of the char tokenizer (`tiny.build_char_tokenizer`)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown tiny architecture {self.architecture!r}; expected one of {list(ARCHITECTURES)}.")
        if self.hidden_size < 1 or self.num_layers < 1 or self.num_heads < 1 or self.num_kv_heads < 1:
            raise ValueError("tiny_hidden_size, tiny_num_layers, tiny_num_heads and tiny_num_kv_heads must be >= 1.")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"tiny_hidden_size={self.hidden_size} must be divisible by tiny_num_heads={self.num_heads}, and "
                f"tiny_num_heads by tiny_num_kv_heads={self.num_kv_heads}."
            )


@dataclass(frozen=True)
class WarmStartConfig:
    """
    The warm-start SFT: `max_steps` optimiser steps of `batch_size` worked solutions (global batch) of chains of
    `min_ops`-`max_ops` operations (default: the task's lengths). Step count and seeds decide the result: there is
    no time cap, so the same settings give the same model on every machine (up to floating-point differences).
    """

    max_steps: int = 350
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    min_ops: int | None = None
    max_ops: int | None = None
    shortcut_rate: float = 0.0  # probability that a demonstrated step skips writing its calculation
    slip_rate: float = 0.0  # probability that a demonstrated subtraction is added instead (`8-3=11`)

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"warmstart_max_steps must be >= 0, got {self.max_steps}.")
        if self.batch_size < 1:
            raise ValueError(f"warmstart_batch_size must be >= 1, got {self.batch_size}.")
        if not self.learning_rate > 0:
            raise ValueError(f"warmstart_learning_rate must be > 0, got {self.learning_rate}.")
        low, high = self.min_ops, self.max_ops
        if (low is not None and low < 1) or (high is not None and high < 1) or (low and high and low > high):
            raise ValueError(
                f"warmstart_min_ops={low} and warmstart_max_ops={high} must be >= 1 with min <= max (or unset)."
            )


def default_cache_dir() -> Path:
    """`$TRL_MIG_CACHE`, else `$XDG_CACHE_HOME/trl-mig`, else `~/.cache/trl-mig`."""
    if os.environ.get("TRL_MIG_CACHE"):
        return Path(os.environ["TRL_MIG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl-mig"


def cache_key(spec: TinyModelSpec, warm: WarmStartConfig | None,
              task: ArithmeticTaskConfig | AdditionTaskConfig | None) -> str:
    payload = {"spec": asdict_without_defaults(spec, ("step_token",)), "version": WARMSTART_VERSION}
    if warm is not None:
        payload["warm"] = asdict_without_defaults(warm, ("slip_rate",))
        payload["task"] = task.to_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def trained_task_prompt(model_path) -> str | None:
    """
    The `task_prompt` that a built-in model was warm-started with, read from its cache folder, or through the
    `run_summary.json` of a `trl-mig train` output folder; None when `model_path` is neither.
    """
    folder = Path(model_path)
    summary = folder / "run_summary.json"
    if summary.is_file():
        folder = Path(json.loads(summary.read_text()).get("model_path") or folder)
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        return None
    task = json.loads(metadata.read_text()).get("task") or {}
    return task.get("prompt", ArithmeticTaskConfig().prompt)


def build_model_and_tokenizer(spec: TinyModelSpec, max_length: int = 2048):
    tokenizer = build_char_tokenizer(model_max_length=max_length, step_token=spec.step_token)
    model = build_tiny_model(
        tokenizer,
        architecture=spec.architecture,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        seed=spec.seed,
        max_position_embeddings=max_length,
    ).float()
    return model, tokenizer


def prepare_tiny_model(
    name: str,
    spec: TinyModelSpec,
    warm: WarmStartConfig | None,
    task: ArithmeticTaskConfig | AdditionTaskConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    use_cpu: bool = False,
    bf16: bool = False,
    fp16: bool = False,
) -> str:
    """
    Path of a saved tiny model (and its tokenizer) for `name`, building it first if the cache lacks it.

    `warm=None` gives the randomly initialised model; otherwise it is warm-started by SFT on the task's worked
    solutions (the arithmetic task's, or with an `AdditionTaskConfig` the addition task's correct ones). Every process
    of a distributed launch must call this (the ranks agree on whether to build, and build together).
    """
    task = task or ArithmeticTaskConfig()
    make_rows = None
    if isinstance(task, AdditionTaskConfig) and warm is not None:
        unused = [f"warmstart_{name}" for name in ("min_ops", "max_ops", "shortcut_rate", "slip_rate")
                  if getattr(warm, name) != getattr(WarmStartConfig(), name)]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} shape(s) the builtin:arithmetic warm start only; the addition warm start trains "
                "on correct solutions of addition_min_digits-addition_max_digits digits. Remove them."
            )

        def make_rows(count):
            return addition_sft_rows(task, count, warm.seed)

    path, state, ready = _cache_slot(name, cache_key(spec, warm, task), cache_dir, use_cpu)
    if ready:
        return str(path)

    started = time.perf_counter()
    model, tokenizer = build_model_and_tokenizer(spec)
    info = {"name": name, "spec": asdict(spec), "warmstart": None, "task": task.to_dict()}
    if warm is not None:
        state.print(f"[trl-mig] warm-starting {name} by SFT on the built-in task ({warm.max_steps} steps), cached at {path}")
        model, info["warmstart"] = _warm_start(model, tokenizer, warm, task, use_cpu=use_cpu, bf16=bf16, fp16=fp16,
                                               make_rows=make_rows)
    info["build_seconds"] = round(time.perf_counter() - started, 2)
    _save_once(state, model, tokenizer, info, path)
    return str(path)


def prepare_tiny_vlm(
    name: str,
    architecture: str = "llava",
    hidden_size: int = 128,
    num_layers: int = 4,
    seed: int = 0,
    cache_dir=None,
    *,
    use_cpu: bool = False,
) -> str:
    """
    Path of a saved, randomly initialised tiny vision-language model and its processor (`tiny.build_tiny_vlm`),
    built into the cache first if needed. For smoke tests of image training (`builtin:visual`): it has learned nothing.
    """
    if architecture not in VLM_ARCHITECTURES:
        raise ValueError(f"Unknown built-in VLM architecture {architecture!r}; expected one of {VLM_ARCHITECTURES}.")
    if hidden_size < 4 or hidden_size % 4 or num_layers < 1:
        raise ValueError(
            f"A built-in VLM needs tiny_hidden_size divisible by its 4 heads and tiny_num_layers >= 1, got "
            f"{hidden_size} and {num_layers}."
        )
    shape = {"architecture": architecture, "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed,
             "version": WARMSTART_VERSION}
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    path, state, ready = _cache_slot(name, key, cache_dir, use_cpu)
    if not ready:
        model, processor = build_tiny_vlm(architecture, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
        _save_once(state, model, processor, {"name": name, "spec": shape, "warmstart": None}, path)
    return str(path)


def _cache_slot(name: str, key: str, cache_dir, use_cpu: bool):
    """
    `(path, state, ready)`: the cache folder of a built-in model, accelerate's process state, and whether the model is
    there already on every process (the ranks agree, so that they build together or not at all).
    """
    from accelerate import PartialState

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = root / f"{name}-{key}"
    state = PartialState(cpu=use_cpu)  # the existing state when training arguments made one
    ready = (path / METADATA_FILE).is_file()
    if state.num_processes > 1:
        ready = _all_processes(state, ready)
    if ready:
        logger.info("Using the cached built-in model %s at %s", name, path)
    return path, state, ready


def _save_once(state, model, tokenizer, info: dict, path: Path) -> None:
    """Save a freshly built model into the cache from one process per node; the others wait for it."""
    info["num_parameters"] = sum(p.numel() for p in model.parameters())
    if state.is_local_main_process:
        _save_atomically(model, tokenizer, info, path)
    state.wait_for_everyone()


def _all_processes(state, flag: bool) -> bool:
    import torch
    from accelerate.utils import gather

    local = torch.tensor([1.0 if flag else 0.0], device=state.device)
    return bool(gather(local).min().item() > 0)


def _save_atomically(model, tokenizer, info: dict, path: Path) -> None:
    """Save model, tokenizer (or processor) and `info` to `path`, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():  # built concurrently (another node or run): keep one, atomically replaced
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _warm_start(model, tokenizer, warm: WarmStartConfig, task: ArithmeticTaskConfig, *, use_cpu, bf16, fp16,
                make_rows=None, max_length: int = 512):
    """
    SFT of `model` for `warm.max_steps` steps. The rows are the arithmetic task's worked solutions, or
    `make_rows(count)` (e.g. the tool task's tokenized conversations).
    """
    from accelerate import PartialState
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if warm.max_steps == 0:
        return model, {"steps": 0, "seconds": 0.0}
    num_processes = PartialState().num_processes
    per_device = max(1, -(-warm.batch_size // num_processes))
    count = warm.max_steps * per_device * num_processes
    if make_rows is None:
        rows = sft_rows(task, count, warm.seed, warm.min_ops, warm.max_ops, warm.shortcut_rate,
                       warm.slip_rate)
    else:
        rows = make_rows(count)

    with tempfile.TemporaryDirectory(prefix="trl-mig-warmstart-") as output_dir:
        args = SFTConfig(
            output_dir=output_dir,
            max_steps=warm.max_steps,
            per_device_train_batch_size=per_device,
            learning_rate=warm.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=min(20, warm.max_steps // 10),
            weight_decay=0.0,
            gradient_checkpointing=False,  # TRL's default is on; it only slows a tiny model down
            logging_steps=max(1, warm.max_steps // 8),
            save_strategy="no",
            report_to="none",
            seed=warm.seed,
            data_seed=warm.seed,
            use_cpu=use_cpu,
            bf16=bf16,
            fp16=fp16,
            max_length=max_length,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        )
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
        model = trainer.accelerator.unwrap_model(trainer.model)
    info = {
        **asdict(warm),
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "train_loss": round(float(result.training_loss), 5),
        "num_processes": num_processes,
    }
    PartialState().print(
        f"[trl-mig] warm start done: {info['steps']} SFT steps in {seconds:.0f}s, mean loss "
        f"{info['train_loss']:.4f}"
    )
    return model.float().cpu(), info


# ------------------------------------------------------------------------------------------------ the tool task's model
TOOLS_WARMSTART_VERSION = 1  # the tool task's own cache version (WARMSTART_VERSION keys the arithmetic models)
TOOL_WARMSTART_BASES = ("arithmetic", "scratch")


@dataclass(frozen=True)
class ToolWarmStartConfig:
    """
    The tool task's warm-start SFT: `max_steps` optimiser steps of `batch_size` tokenized worked conversations (loss
    on the assistant's tokens only) of `min_ops`-`max_ops` operations, each step computed without the calculator with
    probability `skip_rate`, starting from `base`: "arithmetic" (the `builtin:arithmetic` warm start of the same
    shape, which has learned to copy numbers from the prompt, something the tiny model learns slowly from scratch) or
    "scratch" (random initialisation). Step count and seeds decide the result (no time cap).
    """

    max_steps: int = 250
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    min_ops: int | None = None
    max_ops: int | None = None
    skip_rate: float = 0.25
    base: str = "arithmetic"

    def __post_init__(self):
        WarmStartConfig(self.max_steps, self.batch_size, self.learning_rate, self.seed, self.min_ops, self.max_ops)
        if not 0.0 <= self.skip_rate <= 1.0:
            raise ValueError(f"tools_warmstart_skip_rate must be in [0, 1], got {self.skip_rate}.")
        if self.base not in TOOL_WARMSTART_BASES:
            raise ValueError(f"tools_warmstart_base={self.base!r} is not one of {list(TOOL_WARMSTART_BASES)}.")


def prepare_tiny_tool_model(
    name: str,
    spec: TinyModelSpec,
    warm: ToolWarmStartConfig | None,
    task,
    cache_dir: str | os.PathLike | None = None,
    *,
    base_path: str | None = None,
    use_cpu: bool = False,
    bf16: bool = False,
    fp16: bool = False,
) -> str:
    """
    Path of a saved tiny model with the tool-calling char tokenizer (`trl_mig.builtin.tiny.build_tool_char_tokenizer`),
    warm-started on the tool task's conversations (`task`, a `ToolTaskConfig`) unless `warm` is None; built into the
    cache first if needed, as `prepare_tiny_model` does. With `warm.base == "arithmetic"`, `base_path` is the saved
    arithmetic warm start (`prepare_tiny_model`) that the SFT starts from; its folder name (which holds its cache key)
    is part of this model's key.
    """
    from_arithmetic = warm is not None and warm.base == "arithmetic"
    if from_arithmetic and not base_path:
        raise ValueError("tools_warmstart_base='arithmetic' needs the path of the arithmetic warm start (base_path).")
    base = Path(base_path).name if from_arithmetic else None  # the folder name ends with the base's cache key
    payload = {"spec": asdict(spec), "version": TOOLS_WARMSTART_VERSION, "tokenizer": "tool-char"}
    if warm is not None:
        payload |= {"warm": asdict(warm), "task": task.to_dict(), "base": base}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    path, state, ready = _cache_slot(name, key, cache_dir, use_cpu)
    if ready:
        return str(path)

    started = time.perf_counter()
    tokenizer = build_tool_char_tokenizer(model_max_length=2048)
    if from_arithmetic:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        torch.manual_seed(spec.seed)  # the new tool tokens' embeddings are drawn: keep the result reproducible
        model.resize_token_embeddings(len(tokenizer))  # the char ids are kept; the tool tokens come after them
    else:
        model = build_tiny_model(
            tokenizer, architecture=spec.architecture, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
            num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, seed=spec.seed, max_position_embeddings=2048,
        ).float()
    info = {"name": name, "spec": asdict(spec), "warmstart": None, "task": task.to_dict(), "base": base}
    if warm is not None:
        state.print(f"[trl-mig] warm-starting {name} by SFT on the built-in tool task ({warm.max_steps} steps), "
                    f"cached at {path}")

        def make_rows(count):
            return tool_sft_rows(task, tokenizer, count, warm.seed, warm.min_ops, warm.max_ops, warm.skip_rate)

        plain = WarmStartConfig(warm.max_steps, warm.batch_size, warm.learning_rate, warm.seed, warm.min_ops,
                                warm.max_ops)
        model, info["warmstart"] = _warm_start(
            model, tokenizer, plain, None, use_cpu=use_cpu, bf16=bf16, fp16=fp16, make_rows=make_rows, max_length=1024
        )
        info["warmstart"]["skip_rate"] = warm.skip_rate
    info["build_seconds"] = round(time.perf_counter() - started, 2)
    _save_once(state, model, tokenizer, info, path)
    return str(path)
