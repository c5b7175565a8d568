"""Running `trl-mig train` under `accelerate launch`: TRL's packaged accelerate configs by name, and the relaunch of
`trl-mig train ...` as `accelerate launch [options] -m trl_mig train ...`."""

from __future__ import annotations

import os

from .errors import CLIError

# Short names for the accelerate configs that TRL packages in `trl/accelerate_configs` (no copies here).
ACCELERATE_CONFIG_ALIASES = {"ddp": "multi_gpu", "fsdp": "fsdp2"}


def inside_launcher() -> bool:
    """True in a process started by `accelerate launch` (or torchrun)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|PATH` to `--config_file PATH`, with TRL's packaged configs (plus ddp/fsdp aliases)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    launch_args = list(launch_args)
    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config")
        if index + 1 < len(launch_args):
            value = launch_args[index + 1]
            launch_args[index + 1] = ACCELERATE_CONFIG_ALIASES.get(value, value)
    try:
        return resolve_accelerate_config_argument(launch_args)
    except ValueError as err:
        raise CLIError(f"{err} Names: {accelerate_config_names()}.") from None


def accelerate_config_names() -> list[str]:
    """The names `--accelerate_config` accepts: the configs TRL packages, then the aliases."""
    import importlib.resources as resources

    names = [p.name[: -len(".yaml")] for p in resources.files("trl.accelerate_configs").iterdir()
             if p.name.endswith(".yaml")]
    return sorted(names) + sorted(ACCELERATE_CONFIG_ALIASES)


def relaunch_with_accelerate(launch_args: list[str], train_argv: list[str]) -> int:
    """Run `accelerate launch [launch_args] -m trl_mig train [train_argv]`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args = resolve_accelerate_config(launch_args)
    parser = launch_command_parser()
    try:
        launch_namespace = parser.parse_args([*launch_args, "--module", "trl_mig", "train", *train_argv])
    except SystemExit:
        raise CLIError(
            f"Unknown argument(s) {launch_args}: they are neither recipe fields (script, builtin, MIGConfig, "
            "ModelConfig, DatasetMixtureConfig) nor `accelerate launch` options."
        ) from None
    launch_command(launch_namespace)
    return 0


def remove_subsequence(items: list[str], remove: list[str]) -> list[str]:
    """`items` without the ordered subsequence `remove`."""
    out, pending = [], iter(remove)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            out.append(item)
    return out


def accelerate_config_command(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: trl-mig accelerate-config NAME   (NAME: {', '.join(accelerate_config_names())})")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    resolved = resolve_accelerate_config(["--accelerate_config", argv[0]])
    print(resolved[1])
    return 0
