"""The command group and how every command reports errors.

Bad input (``FewShotInputError``, a missing file, a usage error) is one line and exit code 2. Any other
error is a bug or an unexpected condition: one line naming it and exit code 1, or the full traceback
with ``--debug`` or ``FEWSHOT_EDGE_DEBUG=1``.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fewshot_edge import __version__
from fewshot_edge.runtime.errors import FewShotInputError

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "FEWSHOT_EDGE_DEBUG"
INPUT_ERRORS = (FewShotInputError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class InputError(click.ClickException):
    """Bad input or usage: printed as one line, exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(exc).splitlines()[0] if str(exc).strip() else exc.__class__.__name__


def reports_input_errors(func: F) -> F:
    """Turn the library's input errors (``FewShotInputError``, missing files) into ``InputError``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except INPUT_ERRORS as exc:
            raise InputError(first_line(exc)) from None

    return wrapper  # type: ignore[return-value]


class CommandGroup(click.Group):
    """A group whose commands report an unexpected error in one line (exit 1) unless ``--debug`` is on."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                f"unexpected {exc.__class__.__name__}: {first_line(exc)} "
                f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
            ) from None


def require_modules(*names: str, extra: str = "train") -> None:
    """Fail in one line (exit 1) when a command runs on an install without the extra it needs ([train])."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise click.ClickException(f"this command needs {', '.join(missing)}: pip install 'fewshot-edge[{extra}]'")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fewshot-edge")
@click.option(
    "--debug",
    is_flag=True,
    envvar=DEBUG_ENV,
    show_envvar=True,
    help="Show the full traceback of an unexpected error instead of one line.",
)
def main(debug: bool) -> None:
    """Few-shot learning from meta-training to on-device enrollment.

    \b
    Desktop:  train -> eval -> export        (needs the [train] extra: torch, onnx)
    Device:   enroll -> predict -> classes   (numpy + onnxruntime only)
    Try:      fewshot-edge demo
    """
