"""``info`` and ``build-engine``: what this machine can run a bundle on, and TensorRT engines built on it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from fewshot_edge.runtime import open_bundle
from fewshot_edge.runtime.backends import availability, engine_dir, select, tensorrt_missing
from fewshot_edge.runtime.pretrained import default_bundle

from .common import InputError, emit_json, main, reports_input_errors
from .options import engine_dir_option, resolved_bundle


@main.command()
@click.argument("bundle", required=False, callback=resolved_bundle)
@engine_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_input_errors
def info(bundle: str | None, engines: str | None, as_json: bool) -> None:
    """What this machine can run BUNDLE on: its precisions, each backend (and why not), cached engines.

    \b
    Backends, best first: tensorrt (a TensorRT engine) -> tensorrt-ep (onnxruntime's
    TensorrtExecutionProvider) -> cuda -> cpu; --backend auto takes the first that can run.
    """
    opened = open_bundle(bundle or default_bundle())
    reasons = availability()
    cache = engine_dir(opened.path, engines)
    built = [{"file": p.name, **_sidecar(p)} for p in sorted(cache.glob("*.engine"))] if cache.is_dir() else []
    report = {
        "bundle": str(opened.path),
        "model_id": opened.model_id,
        "precisions": {p: opened.manifest.variants.get(p, {}) for p in opened.precisions},
        "backends": {name: {"available": why is None, "reason": why} for name, why in reasons.items()},
        "auto": select().describe(),
        "engine_dir": str(cache),
        "engines": built,
    }
    if as_json:
        emit_json(report)
        return
    click.echo(f"bundle      {opened.path} (model {opened.model_id[:12]})")
    for precision, figures in report["precisions"].items():
        accuracy = (
            f"5-way 1-shot {100 * figures['accuracy']:.2f}%" if "accuracy" in figures else "accuracy not measured"
        )
        delta = f" ({100 * figures['delta']:+.2f} vs fp32)" if "delta" in figures else ""
        click.echo(f"precision   {precision:<5} {accuracy}{delta}")
    for name, why in reasons.items():
        click.echo(f"backend     {name:<12} {'yes' if why is None else 'no: ' + why}")
    click.echo(f"auto picks  {report['auto']}")
    click.echo(f"engines     {cache}: " + (", ".join(e["file"] for e in built) or "none built"))


def _sidecar(engine: Path) -> dict[str, Any]:
    """The key an engine was built for, from its JSON sidecar ({} when unreadable)."""
    try:
        return dict(json.loads(engine.with_suffix(".json").read_text(encoding="utf-8")).get("key", {}))
    except (OSError, ValueError, AttributeError):
        return {}


@main.command(name="build-engine")
@click.argument("bundle", callback=resolved_bundle)
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 engine (from the fp32 encoder).")
@click.option("--int8", "precision", flag_value="int8", help="INT8 engine (from the bundle's QDQ int8 encoder).")
@click.option("--min-batch", default=1, show_default=True, help="Smallest batch of the optimisation profile.")
@click.option("--opt-batch", default=16, show_default=True, help="Batch TensorRT optimises for.")
@click.option("--max-batch", default=64, show_default=True, help="Largest batch (bigger ones run in chunks).")
@engine_dir_option
@reports_input_errors
def build_engine(
    bundle: str, precision: str | None, min_batch: int, opt_batch: int, max_batch: int, engines: str | None
) -> None:
    """Build (on the target device) and cache a TensorRT engine of BUNDLE's encoder [fp32].

    \b
    The engine is keyed by model id, TensorRT version, GPU and compute capability, precision and
    batch profile; an up-to-date one is kept, a stale or foreign one rebuilt. The runtime's
    tensorrt backend then loads it. Needs tensorrt and cuda-python (JetPack provides TensorRT).
    """
    why = tensorrt_missing()
    if why is not None:
        raise InputError(f"build-engine needs TensorRT on this machine: {why}")
    from fewshot_edge.runtime.tensorrt import Profile, cached_engine, engine_key, engine_source

    precision = precision or "fp32"
    opened = open_bundle(bundle)
    opened.encoder_file(precision)
    key = engine_key(opened, precision, Profile(min_batch, opt_batch, max_batch))
    start = time.perf_counter()
    path, built = cached_engine(engine_source(opened, precision), key, engine_dir(opened.path, engines))
    state = f"built in {time.perf_counter() - start:.1f} s" if built else "up to date, kept"
    click.echo(f"engine {path} ({state})")
    click.echo(
        f"  key: {precision}, batch {min_batch}/{opt_batch}/{max_batch}, TensorRT {key.tensorrt_version}, "
        f"{key.gpu_name} (compute {key.compute_capability}), model {opened.model_id[:12]}"
    )
