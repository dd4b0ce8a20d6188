"""The options the device commands share, each declared once: the bundle, the store, the keys a bundle must be
signed by, the encoder's engine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fewshot_edge.runtime.backends import AUTO, BACKENDS
from fewshot_edge.runtime.bundle import PRECISIONS
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.pretrained import resolve_bundle

from .common import InputError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def resolved_bundle(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> Path | None:
    """A --bundle value (or BUNDLE argument) as a folder: itself, or the shipped bundle it names."""
    if value is None:
        return None
    try:
        return resolve_bundle(value)
    except FewShotInputError as exc:
        raise InputError(str(exc)) from None


bundle_option: Decorator = click.option(
    "--bundle",
    metavar="DIR|NAME",
    callback=resolved_bundle,
    help="Bundle folder (manifest.json + ONNX), or the name of a shipped one [omniglot-conv4].",
)
trusted_key_option: Decorator = click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="FILE|DIR",
    envvar="FEWSHOT_EDGE_TRUSTED_KEYS",
    help="Run only bundles signed by this Ed25519 public key (a PEM file, or a folder of *.pub/*.pem files);"
    " repeatable, or FEWSHOT_EDGE_TRUSTED_KEYS (space-separated). Without any, signatures are not required.",
)
engine_dir_option: Decorator = click.option(
    "--engine-dir", "engines", metavar="DIR", help="Where TensorRT engines are cached [BUNDLE/engines if writable]."
)


def _apply(func: Callable[..., Any], options: list[Decorator]) -> Callable[..., Any]:
    """``func`` decorated with ``options``, listed in ``--help`` in the order given."""
    for option in reversed(options):
        func = option(func)
    return func


def store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --bundle, --store, --reembed and --trusted-key, the options of every command that opens a store
    (each also takes ``engine_options``, which hands the trusted keys to ``FewShotModel.open``)."""
    return _apply(
        func,
        [
            bundle_option,
            click.option(
                "--store", required=True, metavar="FILE", help="Enrollment store, a SQLite file (enroll creates it)."
            ),
            click.option(
                "--reembed",
                is_flag=True,
                help="The store was enrolled with another model: re-embed its stored shots with this "
                "bundle's model, keeping every class (the model update path).",
            ),
            trusted_key_option,
        ],
    )


def mode_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --adapt and --steps, the adaptation mode of a command that predicts with a store's classes."""
    return _apply(
        func,
        [
            click.option(
                "--adapt",
                metavar="MODE",
                help="Adaptation mode (one the bundle lists) [the store's, set by enroll --adapt, else the bundle's"
                " default].",
            ),
            click.option(
                "--steps", type=int, metavar="N", help="finetune mode: gradient steps on the shots [as meta-trained]."
            ),
        ],
    )


def engine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --precision, --backend, --provider and --engine-dir; the command gets them as one ``engine``
    dict of ``FewShotModel.open`` arguments, with ``trusted_keys`` when the command also has --trusted-key
    (``store_options``)."""

    @functools.wraps(func)
    def wrapper(
        *args: Any, precision: str, backend: str, provider: tuple[str, ...], engines: str | None, **kwargs: Any
    ) -> Any:
        if provider and backend != AUTO:
            raise InputError("give --backend or --provider, not both")
        engine: dict[str, Any] = {
            "precision": precision,
            "backend": backend,
            "providers": list(provider) or None,
            "engines": engines,
        }
        if "trusted_keys" in kwargs:
            engine["trusted_keys"] = list(kwargs.pop("trusted_keys")) or None
        return func(*args, engine=engine, **kwargs)

    return _apply(
        wrapper,
        [
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="fp32",
                show_default=True,
                help="Encoder precision: fp32, or a variant the bundle has (export --fp16/--int8).",
            ),
            click.option(
                "--backend",
                type=click.Choice((AUTO, *BACKENDS)),
                default=AUTO,
                show_default=True,
                help="Where the encoder runs; auto = the best this machine can (see fewshot-edge info).",
            ),
            click.option(
                "--provider",
                multiple=True,
                metavar="NAME",
                help="Exactly these onnxruntime execution providers, in order (repeatable); instead of --backend.",
            ),
            engine_dir_option,
        ],
    )
