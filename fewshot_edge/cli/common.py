"""The command group and the one way every command reports bad input: one line, exit code 2."""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any, Callable, TypeVar

import click

from fewshot_edge import __version__

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """Bad input or usage: printed as one line, exit code 2."""

    exit_code = 2


def reports_input_errors(func: F) -> F:
    """Turn the library's input errors (ValueError and its subclasses, missing files) into ``InputError``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise InputError(message) from None

    return wrapper  # type: ignore[return-value]


def require_modules(*names: str) -> None:
    """Fail in one line (exit 1) when a desktop command runs on an install without the [train] extra."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise click.ClickException(f"this command needs {', '.join(missing)}: pip install 'fewshot-edge[train]'")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fewshot-edge")
def main() -> None:
    """Few-shot learning from meta-training to on-device enrollment.

    \b
    Desktop:  train -> eval -> export        (needs the [train] extra: torch, onnx)
    Device:   enroll -> predict -> classes   (numpy + onnxruntime only)
    Try:      fewshot-edge demo
    """

