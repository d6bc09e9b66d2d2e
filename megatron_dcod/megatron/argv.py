"""Megatron's command line: built from `--hf-config` and the user's flags, parsed once.

Training, its dry run, the checkpoint converters and the tests all go through `parse`, so they
see the same architecture flags, the same vocabulary padding and the same validation. Megatron
reads its arguments from `sys.argv` and a few environment variables; `parse` sets them for the
parse only and restores both afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import traceback
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator

UNFUSED_FLAGS = (
    "--transformer-impl=local",
    "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--no-masked-softmax-fusion",
    "--no-rope-fusion",
)
"""Megatron's kernel fusions come from Transformer Engine or Apex; without both they are off."""
CPU_FLAGS = ("--distributed-backend=gloo", "--use-cpu-initialization", *UNFUSED_FLAGS)
"""Megatron flags the CPU mode needs; the user's flags come after them."""
ALWAYS_FLAGS = ("--calculate-per-token-loss",)
"""The loss is normalized over the whole step (Megatron's per-token mode; docs/method.md)."""
CPU_ENVIRONMENT = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Megatron's validation asks for it with TP > 1 before Blackwell; it means nothing on a CPU."""
_PERCENT = re.compile(r"%%|%\(\w+\)|%")  # an escaped %, a named format, or a bare %


def megatron_argv(argv: list[str], cpu: bool) -> list[str]:
    """The command line Megatron parses: architecture flags from --hf-config, then the user's
    (argparse keeps the last value, so a user's flag overrides a derived one)."""
    from megatron_dcod.models.student import load_hf_config, megatron_architecture_flags

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--hf-config", metavar="DIR")
    hf_dir = peek.parse_known_args(argv)[0].hf_config
    prefix = [] if hf_dir is None else megatron_architecture_flags(load_hf_config(hf_dir))
    prefix += ALWAYS_FLAGS  # without --hf-config only --help gets past the parser
    if cpu:
        prefix += CPU_FLAGS
    elif not fused_kernels_available():
        prefix += UNFUSED_FLAGS
    return prefix + list(argv)


def fused_kernels_available() -> bool:
    """Whether Transformer Engine or Apex (Megatron's sources of fused kernels) is installed."""
    from megatron_dcod.models.student import transformer_engine_available

    return transformer_engine_available() or find_spec("apex") is not None


@contextlib.contextmanager
def command_line(argv: list[str], environment: dict[str, str]) -> Iterator[None]:
    """`sys.argv` = [program, *argv] and the `environment` variables set for the block; after
    it, sys.argv and those variables (only those) are as they were."""
    saved_argv = sys.argv
    saved_variables = {name: os.environ.get(name) for name in environment}
    sys.argv = [saved_argv[0] if saved_argv else "megatron_dcod", *argv]
    os.environ.update(environment)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def escape_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Double every bare `%` of the parser's help strings, so that `--help` can format them
    (argparse expands `%(default)s`; one megatron-core 0.19.2 help text has a plain "10%")."""
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = _PERCENT.sub(lambda m: "%%" if m[0] == "%" else m[0], action.help)
    return parser


def _rule_of(error: BaseException) -> str:
    """The message of a failed check, or (a bare `assert`) the check's source line."""
    if str(error):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{frame.line} ({Path(frame.filename).name}:{frame.lineno})"


def parse(
    argv: list[str],
    *,
    cpu: bool,
    world_size: int | None = None,
    set_globals: bool = False,
    quiet: bool = False,
) -> argparse.Namespace:
    """Megatron's validated arguments, with the project's flags (`add_dcod_args`).

    cpu: add the CPU mode's flags (else the unfused ones where TE and Apex are absent).
    world_size: validate as a run of that many processes would be (rank 0); default: the
        launcher's WORLD_SIZE / RANK.
    set_globals: also set Megatron's global arguments (what `pretrain` reads).
    quiet: Megatron's printout of every argument is shown only when validation fails.

    Megatron's validation errors become `SystemExit("megatron rejects the flags: ...")`.
    Needs `patches.apply()` first (megatron.training imports on Python 3.11, device checks).
    """
    from megatron.training.arguments import parse_and_validate_args, parse_args, validate_args

    from megatron_dcod.arguments import add_dcod_args

    environment = dict(CPU_ENVIRONMENT) if cpu else {}
    if world_size is not None:
        environment.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    full_argv = megatron_argv(argv, cpu)
    printed = io.StringIO()
    extra_args = lambda parser: escape_help(add_dcod_args(parser))  # noqa: E731
    output = contextlib.redirect_stdout(printed) if quiet else contextlib.nullcontext()
    try:
        with command_line(full_argv, environment), output:
            if set_globals:
                return parse_and_validate_args(extra_args_provider=extra_args)
            args = parse_args(extra_args_provider=extra_args)  # argparse errors, --help exit
            validate_args(args)
            return args
    except (AssertionError, ValueError, RuntimeError) as error:  # Megatron's rules
        sys.stdout.write(printed.getvalue())
        raise SystemExit(f"megatron rejects the flags: {_rule_of(error)}") from None
    except SystemExit:
        sys.stdout.write(printed.getvalue())  # --help, or argparse's usage message
        raise
