"""`trl-mig inspect`: the MIG credit of one prompt's completions, step by step (a table, an HTML page, a PNG plot).

    trl-mig inspect --model PATH --dataset builtin:arithmetic --split test --index 3 --num_samples 4
    trl-mig inspect --model PATH --prompt "Compute 2+3." --solution 5 --completion "<think>...</think>..."
    trl-mig inspect --config recipes/demo/mig.yaml --model outputs/demo/mig --index 3

With `--config`, a training recipe gives the MIG settings (format, scaffold, gain, credit, weights), the sampling
temperature, the reward weights, the dataset and the model, so the view matches that run; flags override it.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field, fields, make_dataclass

import torch
from transformers import HfArgumentParser
from trl import GRPOConfig

from ..builtin import BuiltinArguments, check_answer_match
from ..config import MIGSettings, field_like
from ..inspection import CreditSettings, inspect_completion, prompt_token_ids
from ..render import render_png, write_html
from .data import IMAGE_COLUMNS, DataArguments, get_split, load_dataset_dict, prepare_dataset
from .errors import CLIError
from .eval import answer_match_argument, warn_on_prompt_mismatch
from .models import ModelArguments, load_model_for_eval
from .output import write_json
from .recipes import TRAIN_DATACLASSES, read_recipe


@dataclass
class InspectArguments(ModelArguments, DataArguments):
    """What `trl-mig inspect` looks at, and where it writes."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "Dataset to take the prompt and ground truth from: a hub id, a local file or folder, or a "
                  "builtin: name. Alternative: --prompt and --solution."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    split: str = field(default="test", metadata={"help": "Split of --dataset."})
    index: int = field(default=0, metadata={"help": "Row of the split."})
    prompt: str | None = field(default=None, metadata={"help": "The prompt (instead of a dataset row)."})
    solution: str | None = field(
        default=None, metadata={"help": "The ground truth; with --dataset it replaces the row's."}
    )
    completion: list[str] | None = field(
        default=None,
        metadata={"help": "Completion(s) to inspect; several form one group. Default: sample --num_samples."},
    )
    num_samples: int = field(default=4, metadata={"help": "Completions sampled from the model (one group)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy, one completion)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum generated tokens per completion."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    html: str = field(default="trl-mig-inspect.html", metadata={"help": "Where the HTML page is written."})
    png: str = field(
        default="trl-mig-inspect.png",
        metadata={"help": "Where the PNG plot is written ('' for none); it needs matplotlib (the `plots` extra)."},
    )
    json: str | None = field(default=None, metadata={"help": "Also write every number to this JSON file."})
    dtype: str = field(  # float32: l_k without the rounding of a half-precision checkpoint
        default="float32",
        metadata={"help": "dtype of the model weights.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )


# The settings `inspect_completion` reads (CreditSettings: MIGSettings plus GRPO's reward fields), minus those that do
# not apply to a text view scored with --model: which model scores, tool masks, training-time pages, and the gate's
# reward (inspect judges correctness with the built-in accuracy reward).
_NOT_INSPECT_SETTINGS = frozenset(
    {"mig_likelihood_model", "mig_turn_steps", "mig_inspect_html", "sft_correctness_reward"}
)


def _settings_dataclass():
    """The `trl-mig inspect` settings arguments: the MIG fields as [`MIGSettings`] declares them, the GRPO fields as
    `GRPOConfig` does (same types, defaults, help and choices)."""
    mig_names = {f.name for f in fields(MIGSettings)}
    hints = {**typing.get_type_hints(GRPOConfig), **typing.get_type_hints(MIGSettings)}
    specs = []
    for setting in fields(CreditSettings):
        name = setting.name
        if name in _NOT_INSPECT_SETTINGS or not setting.init:
            continue
        if name == "answer_match":  # like `trl-mig eval`: None picks exact for the built-in task's running answers
            specs.append((name, str | None, answer_match_argument()))
        else:
            specs.append((name, hints[name], field_like(MIGSettings if name in mig_names else GRPOConfig, name)))
    return make_dataclass("InspectSettings", specs)


InspectSettings = _settings_dataclass()
# recipe keys of `trl-mig train` that mean the same here under another name
_RECIPE_ALIASES = {"model_name_or_path": "model", "dataset_name": "dataset", "max_completion_length": "max_new_tokens",
                   "num_generations": "num_samples"}


def parse_inspect_args(argv: list[str]):
    """`(InspectArguments, InspectSettings, BuiltinArguments)` from the command line and an optional `--config`
    recipe."""
    parser = HfArgumentParser(
        (InspectArguments, InspectSettings, BuiltinArguments), prog="trl-mig inspect", allow_abbrev=False,
        description="Per-step MIG credit of one prompt's completions. --config RECIPE.yaml reads the MIG settings, "
        "model, dataset and sampling temperature of a training recipe; flags override it.",
    )
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise CLIError("--config needs the path of a YAML recipe.")
        recipe = read_recipe(argv[index + 1])
        del argv[index : index + 2]
        ours = {action.dest for action in parser._actions}
        training = {f.name for cls in TRAIN_DATACLASSES for f in fields(cls)}
        unknown = [key for key in recipe if key not in ours and key not in training and key not in _RECIPE_ALIASES]
        if unknown:
            raise CLIError(f"Unknown key(s) in recipe: {unknown}; check the spelling (see `trl-mig inspect --help`).")
        defaults = {_RECIPE_ALIASES.get(key, key): value for key, value in recipe.items()}
        parser.set_defaults(**{key: value for key, value in defaults.items() if key in ours})
    inspect_args, settings, builtin_args, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if remaining:
        raise CLIError(f"Unknown argument(s) {remaining} (see `trl-mig inspect --help`).")
    return inspect_args, settings, builtin_args


def inspect_command(argv: list[str]) -> int:
    run_inspect(*parse_inspect_args(argv))
    return 0


def run_inspect(args: InspectArguments, settings, builtin_args: BuiltinArguments | None = None) -> list:
    """Inspect the completions of one prompt: print a table per completion, write the HTML page, the PNG plot and
    (with `args.json`) the numbers. Returns the [`CompletionCredit`]s."""
    builtin_args = builtin_args or BuiltinArguments()
    prompt, solution = _prompt_and_solution(args, settings, builtin_args)
    try:
        settings.answer_match = check_answer_match(args.dataset, builtin_args, settings.answer_match, "--answer_match")
        credit_settings = CreditSettings.from_config(settings)  # validates every field, as MIGConfig does
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not args.model:
        raise CLIError("No model: pass --model (a hub id, a local folder or a builtin: name).")
    model, tokenizer, model_path = load_model_for_eval(args, builtin_args)
    if args.completion is None:  # it generates: from the prompts the model learnt?
        warn_on_prompt_mismatch(args.dataset, model_path, builtin_args)

    if args.completion:
        completions = list(args.completion)
    else:
        completions = _sample(model, tokenizer, prompt, args)
    try:
        result = inspect_completion(model, tokenizer, prompt, completions if len(completions) > 1 else completions[0],
                                    solution, credit_settings)
    except (ValueError, TypeError, KeyError) as err:
        raise CLIError(str(err)) from err
    credits = result if isinstance(result, list) else [result]

    solution_text = " | ".join(credits[0].solution) if credits[0].solution else "(none)"
    print(f"[trl-mig] prompt:\n{credits[0].prompt}\n[trl-mig] ground truth: {solution_text}")
    for number, credit in enumerate(credits, 1):
        print(f"\n#{number}: {credit.summary()}")
        for message in credit.messages:
            print(f"  note: {message}")
        print(credit.table())
    title = f"MIG credit of {args.model}"
    write_html(args.html, [credits], title=title)
    print(f"\n[trl-mig] HTML page: {args.html}")
    if args.png:
        try:
            render_png(credits, args.png, title=f"{title}, ground truth {solution_text}")
            print(f"[trl-mig] plot: {args.png}")
        except ImportError as err:  # matplotlib is optional: the page and the numbers do without it
            if err.name != "matplotlib":
                raise
            print(f"[trl-mig] plot skipped: {err} (or --png '' to ask for none)", file=sys.stderr)
    if args.json:
        write_json(args.json, {"model": args.model, "completions": [c.to_dict() for c in credits]})
        print(f"[trl-mig] numbers: {args.json}")
    return credits


def _prompt_and_solution(args: InspectArguments, settings, builtin_args):
    if args.prompt is not None:
        return args.prompt, args.solution
    if not args.dataset:
        raise CLIError("Nothing to inspect: pass --dataset (with --split and --index) or --prompt (and --solution).")
    data = load_dataset_dict(args.dataset, args.dataset_config, builtin_args, where="--dataset")
    dataset = get_split(data, args.split, args.dataset, "--split")
    if not 0 <= args.index < len(dataset):
        raise CLIError(f"--index {args.index} is out of range: split {args.split!r} of {args.dataset!r} has "
                       f"{len(dataset)} rows.")
    dataset = prepare_dataset(dataset.select([args.index]), args, settings.solution_column,
                              f"split {args.split!r} of {args.dataset!r}")
    row = dataset[0]
    images = [column for column in IMAGE_COLUMNS if row.get(column) is not None]
    if images:
        raise CLIError(
            f"Row {args.index} of split {args.split!r} of {args.dataset!r} has images (column {images[0]!r}): "
            "`trl-mig inspect` scores text prompts only, and l_k of an image prompt needs its images. Training scores "
            "image prompts with their images (docs/vision.md)."
        )
    solution = args.solution if args.solution is not None else row.get(settings.solution_column)
    return row["prompt"], solution


def _sample(model, tokenizer, prompt, args: InspectArguments) -> list[list[int]]:
    """`args.num_samples` completions (token ids, EOS included) sampled from `model`, from the prompt tokens the
    trainer would use."""
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise CLIError("--num_samples and --max_new_tokens must be >= 1.")
    if args.num_samples > 1 and args.temperature <= 0:
        raise CLIError("--num_samples > 1 needs --temperature > 0 (greedy decoding gives the same completion).")
    torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_token_ids(tokenizer, prompt)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad)
    if args.temperature > 0:
        generation.update(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                          num_return_sequences=args.num_samples)
    else:
        generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.eval()
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation)
    return [row[ids.shape[1] :].tolist() for row in output]
