"""Datasets for training and evaluation: loading (`builtin:` names, local files or folders, hub ids) and mapping a
split's columns to what the trainer and the evaluation read: `prompt` and the ground-truth solution column."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..builtin import is_builtin, load_builtin_dataset
from .errors import CLIError

logger = logging.getLogger(__name__)

ANSWER_EXTRACTIONS = ("none", "gsm8k", "boxed", "answer_tag")
# the columns TRL's GRPOTrainer reads a prompt's images from: one image, or a list of them
IMAGE_COLUMNS = ("image", "images")
DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class DataArguments:
    """How the dataset's columns become a prompt and a ground-truth answer."""

    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Dataset column with the prompt (a string, or a list of chat messages)."},
    )
    answer_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column with the ground truth, copied (after `answer_extraction`) into the MIG solution "
            "column. Default: the solution column itself (`solution_column`, 'solution')."
        },
    )
    answer_extraction: str = field(
        default="none",
        metadata={
            "help": "How the ground truth is read from `answer_column`: 'none' (as is), 'gsm8k' (the text after the "
            "last '####', commas removed), 'boxed' (the content of the last \\boxed{...}) or 'answer_tag' (the "
            "content of the last <answer>...</answer>, else the text as is).",
            "choices": list(ANSWER_EXTRACTIONS),
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column with the prompt's image, for vision-language models: an image, an image file "
            "path, or a list of either (several images). It becomes the column 'image' (or 'images' for lists) that "
            "GRPOTrainer puts into the prompt, and prompts become chat messages. Default: no images."
        },
    )
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths in `image_column` are read from. Default: the folder of the "
            "dataset file (local files), else the working directory."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt. When set, string prompts become chat messages [system, user]."},
    )
    conversational: bool = field(
        default=False,
        metadata={"help": "Turn string prompts into chat messages ([user]) even without a system prompt."},
    )


def load_dataset_dict(
    name: str, config_name: str | None = None, builtin_args=None, *, streaming=False, where="dataset_name"
):
    """
    A `DatasetDict` from a `builtin:` name, a local file or folder, or a hub id. A single file is the split 'train'.
    `where` names the field that gave `name`, for the error messages.
    """
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

    if not name:
        raise CLIError(f"No dataset: set `{where}` (a hub id, a local path, or builtin:arithmetic).")
    if is_builtin(name):
        try:
            return load_builtin_dataset(name, builtin_args, where)
        except ValueError as err:
            raise CLIError(str(err)) from None
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise CLIError(
                    f"Cannot read the dataset file {name!r} (`{where}`): expected one of "
                    f"{sorted(DATASET_FILE_BUILDERS)}."
                )
            data = load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            data = load_from_disk(str(path))
        else:
            data = load_dataset(name, name=config_name, streaming=streaming)
    except CLIError:
        raise
    except Exception as err:  # hub/network/format problems: name the dataset and the field
        raise CLIError(f"Could not load the dataset {name!r} (`{where}`): {type(err).__name__}: {err}") from err
    if isinstance(data, (Dataset, IterableDataset)):
        data = DatasetDict({"train": data})
    return data


def get_split(data, split: str, name: str, where: str):
    """Split `split` of the dataset `name`, or a `CLIError` (naming the field `where`) listing the splits it has."""
    if split not in data:
        raise CLIError(f"The dataset {name!r} has no split {split!r} (`{where}`); its splits are {list(data)}.")
    return data[split]


def extract_gsm8k(text) -> str | None:
    """The text after the last `####` (GSM8K's answer marker), commas removed; None when there is none."""
    if not isinstance(text, str) or "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def extract_boxed(text) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start + len("\\boxed") :].strip().split()
        return rest[0].rstrip("$") if rest else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip() or None
    return None


def extract_answer_tag(text) -> str | None:
    """Content of the last `<answer>...</answer>` (R1-V-style CLEVR solutions), else the text as is."""
    if not isinstance(text, str):
        return None
    start = text.rfind("<answer>")
    end = text.find("</answer>", start)
    if start >= 0 and end >= 0:
        return text[start + len("<answer>") : end].strip() or None
    return text.strip() or None


EXTRACTORS = {
    "none": lambda value: value,
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "answer_tag": extract_answer_tag,
}


def prepare_dataset(dataset, data_args: DataArguments, solution_column: str, where: str, data_dir=None):
    """
    Map a split to what the trainer reads: `prompt` (text, or chat messages when a system prompt is set,
    `conversational` or images), `solution_column` (the ground truth, from `answer_column` through
    `answer_extraction`) and, with `image_column`, `image` / `images` (relative paths read from `image_root`, else
    `data_dir`, the dataset file's folder).
    """
    from trl.data_utils import get_dataset_column_names

    answer_column = data_args.answer_column or solution_column
    if data_args.answer_extraction not in EXTRACTORS:
        raise CLIError(
            f"answer_extraction={data_args.answer_extraction!r} is not one of {list(ANSWER_EXTRACTIONS)}."
        )
    columns = get_dataset_column_names(dataset)
    if columns is not None:
        named = [(data_args.prompt_column, "prompt_column"), (answer_column, "answer_column")]
        if data_args.image_column is not None:
            named.append((data_args.image_column, "image_column"))
        for column, field_name in named:
            if column not in columns:
                raise CLIError(
                    f"{where} has no column {column!r} (`{field_name}`); its columns are {list(columns)}. Map the "
                    "dataset's columns with `prompt_column` / `answer_column` in the recipe."
                )
    extract = EXTRACTORS[data_args.answer_extraction]
    system_prompt = data_args.system_prompt
    # GRPOTrainer puts images into chat messages only
    chat = bool(system_prompt) or data_args.conversational or data_args.image_column is not None
    if data_args.image_column is not None:
        dataset = _undecoded_images(dataset, data_args.image_column, data_args.image_root or data_dir, where)

    def convert(row):
        if data_args.prompt_column not in row or answer_column not in row:
            raise CLIError(f"A row of {where} lacks column {data_args.prompt_column!r} or {answer_column!r}.")
        prompt = row[data_args.prompt_column]
        if isinstance(prompt, str):
            if chat:
                prompt = [{"role": "user", "content": prompt}]
                if system_prompt:
                    prompt = [{"role": "system", "content": system_prompt}, *prompt]
        elif isinstance(prompt, list):
            if system_prompt and not (prompt and prompt[0].get("role") == "system"):
                prompt = [{"role": "system", "content": system_prompt}, *prompt]
        else:
            raise CLIError(
                f"Column {data_args.prompt_column!r} of {where} must hold text or chat messages, got "
                f"{type(prompt).__name__}: {prompt!r}."
            )
        return {"prompt": prompt, solution_column: extract(row[answer_column])}

    if data_args.prompt_column == "prompt" and answer_column == solution_column and not chat and (
        data_args.answer_extraction == "none"
    ):
        return dataset  # already in shape
    mapped = dataset.map(convert)
    if data_args.image_column is not None:
        mapped = _decoded_image_column(mapped, data_args.image_column)
    if data_args.answer_extraction != "none" and hasattr(mapped, "__len__"):  # not for streaming datasets
        missing = sum(value is None for value in mapped[solution_column])
        if missing == len(mapped) and len(mapped) > 0:
            raise CLIError(
                f"answer_extraction={data_args.answer_extraction!r} found no answer in column {answer_column!r} of "
                f"{where} (e.g. {dataset[0][answer_column]!r})."
            )
        if missing:
            logger.warning(
                "%d of %d rows of %s have no %s answer in column %r: they get no accuracy or MIG credit.",
                missing, len(mapped), where, data_args.answer_extraction, answer_column,
            )
    return mapped


def _undecoded_images(dataset, column: str, root, where: str):
    """
    `column` as an undecoded image feature (paths resolved against `root`), so that mapping the other columns does
    not decode and re-encode every image; `_decoded_image_column` turns it back.
    """
    from datasets import Image, List, Sequence, Value

    feature = (getattr(dataset, "features", None) or {}).get(column)
    many = isinstance(feature, (List, Sequence))
    inner = feature.feature if many else feature
    if isinstance(inner, Image):
        return dataset.cast_column(column, List(Image(decode=False)) if many else Image(decode=False))
    if not (isinstance(inner, Value) and inner.dtype in ("string", "large_string")):
        raise CLIError(
            f"Column {column!r} (`image_column`) of {where} must hold images or image file paths, got {feature}."
        )
    base = Path(root).expanduser() if root else Path.cwd()

    def resolve(path):
        if not isinstance(path, str) or not path:
            raise CLIError(f"Column {column!r} (`image_column`) of {where} has an empty or non-text path: {path!r}.")
        resolved = Path(path).expanduser()
        resolved = resolved if resolved.is_absolute() else base / resolved
        if not resolved.is_file():
            raise CLIError(
                f"Image {path!r} in column {column!r} (`image_column`) of {where} is not a file (looked at "
                f"{resolved}; set `image_root` to the folder that relative paths start from)."
            )
        return str(resolved)

    dataset = dataset.map(
        lambda value: {column: [resolve(p) for p in value] if many else resolve(value)}, input_columns=[column]
    )
    return dataset.cast_column(column, List(Image(decode=False)) if many else Image(decode=False))


def _decoded_image_column(dataset, column: str):
    """The images of `column` decoded again, in the column GRPOTrainer reads: 'image', or 'images' for lists."""
    from datasets import Image, List, Sequence

    many = isinstance(dataset.features[column], (List, Sequence))
    dataset = dataset.cast_column(column, List(Image()) if many else Image())
    target = IMAGE_COLUMNS[1] if many else IMAGE_COLUMNS[0]
    # GRPOTrainer looks at 'images' before 'image': leave only the mapped column under either name
    stale = [name for name in IMAGE_COLUMNS if name in dataset.column_names and name != column]
    dataset = dataset.remove_columns(stale)
    return dataset.rename_column(column, target) if column != target else dataset


def select_samples(dataset, max_samples: int | None):
    """The first `max_samples` rows of `dataset` (all of them when None)."""
    if max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset
