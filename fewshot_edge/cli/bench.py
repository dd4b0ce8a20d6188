"""``bench``: latency, throughput, cold start and memory of a bundle here; precisions and modes side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from fewshot_edge.pretrained import default_bundle
from fewshot_edge.runtime import InputSpec, open_bundle, preprocess
from fewshot_edge.runtime.bench import run_benchmark, shape_text, source_images, time_calls

from .common import InputError, emit_json, main, reports_input_errors
from .options import engine_options


@main.command()
@click.argument("bundle", required=False)
@click.option(
    "--threads",
    type=int,
    metavar="N",
    default=os.cpu_count() or 1,
    show_default=True,
    help="Threads for onnxruntime (and PyTorch with --checkpoint).",
)
@click.option("--checkpoint", metavar="CKPT", help="Also time this checkpoint's model in PyTorch eager (needs torch).")
@click.option("--quick", is_flag=True, help="Fewer runs: a few seconds, rougher figures.")
@click.option(
    "--all-variants",
    is_flag=True,
    help="Instead: the bundle's precisions side by side (latency, throughput, export-time accuracy).",
)
@click.option(
    "--adapt",
    "modes",
    multiple=True,
    metavar="MODE",
    help="Instead: refit time and prediction latency of MODE beside prototype, 20 classes x 5 shots (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@engine_options
@reports_input_errors
def bench(
    bundle: str | None,
    threads: int,
    checkpoint: str | None,
    quick: bool,
    all_variants: bool,
    modes: tuple[str, ...],
    as_json: bool,
    engine: dict[str, Any],
) -> None:
    """Latency, throughput, cold start and memory of a bundle on this machine.

    \b
    Inputs are decoded 105x105 uint8 images, so preprocessing is included where it says so.
    With --checkpoint, the same model in PyTorch eager is timed in the same run, same threads.
    --all-variants and --adapt MODE compare precisions and adaptation modes instead.
    """
    bundle_dir = bundle or default_bundle()
    if all_variants or modes:
        compare(bundle_dir, threads, quick, all_variants, modes, as_json, engine)
        return
    spec = open_bundle(bundle_dir).manifest.input_spec
    eager = pytorch_model(checkpoint, spec, threads)
    sizes = dict(runs=200, batch=128, seconds=0.5, enroll_runs=20, child_runs=50) if quick else {}
    report = run_benchmark(bundle_dir, threads=threads, **sizes, **engine)
    report["pytorch"] = pytorch_figures(eager, report)
    if as_json:
        emit_json(report)
    else:
        click.echo(format_bench(report))


def compare(
    bundle: str,
    threads: int,
    quick: bool,
    all_variants: bool,
    modes: Sequence[str],
    as_json: bool,
    engine: dict[str, Any],
) -> None:
    """``bench --all-variants`` and ``--adapt``: the side-by-side tables (or JSON)."""
    from fewshot_edge.runtime.bench_compare import compare_modes, compare_precisions

    opened = {key: value for key, value in engine.items() if key != "precision"}
    report: dict[str, Any] = {}
    if all_variants:
        report["precisions"] = compare_precisions(
            bundle, threads=threads, **opened, **(dict(runs=50, batch=64, seconds=0.2) if quick else {})
        )
    if modes:
        report["adaptation"] = compare_modes(
            bundle, modes, threads=threads, **engine, **(dict(runs=50, refits=3) if quick else {})
        )
    if as_json:
        emit_json(report)
    else:
        click.echo("\n\n".join(format_compare(name, r) for name, r in report.items()))


def format_compare(name: str, r: dict[str, Any]) -> str:
    """A --all-variants or --adapt report as an aligned table."""

    def ms(t: dict[str, float]) -> str:
        return f"{t['p50_ms']:.3f} / {t['p99_ms']:.3f}"

    m = r["machine"]
    head = f"{r['bundle']}: {m['cpu']}, {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}, {r['threads'] or 'default'} threads"
    if name == "precisions":
        header = [
            "precision",
            "predict p50/p99 ms",
            "encoder p50/p99 ms",
            f"encoder img/s (batch {r['batch']})",
            "vs fp32",
            "accuracy",
        ]
        rows = [
            [
                p,
                ms(v["predict"]),
                ms(v["encoder"]),
                f"{v['encoder_images_per_s']:,.0f}",
                f"{v['throughput_vs_fp32']:.2f}x",
                "not measured"
                if v["accuracy"] is None
                else f"{100 * v['accuracy']:.2f}% +- {100 * v['ci95']:.2f}"
                + ("" if v["delta"] is None else f" ({100 * v['delta']:+.2f} +- {100 * v['delta_ci95']:.2f} pts)"),
            ]
            for p, v in r["precisions"].items()
        ]
        foot = f"accuracy: measured at export on {r['accuracy_on'] or 'no episodes'} (from the manifest)"
    else:
        header = ["mode", "refit p50/p99 ms", "predict p50/p99 ms"]
        rows = [[mode, ms(v["refit"]), ms(v["predict"])] for mode, v in r["modes"].items()]
        foot = f"{r['enrolled']} enrolled, {r['precision']} encoder; refit = fitting the mode to the stored shots after a change"
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join([head, *lines, foot])


def pytorch_model(checkpoint: str | None, spec: InputSpec, threads: int) -> str | tuple[Any, InputSpec]:
    """The checkpoint's method (eval mode) and input spec, with torch set to ``threads`` threads; or why
    there is none, as a string."""
    if checkpoint is None:
        return "no --checkpoint"
    try:
        import torch
    except ImportError:
        return "torch not installed"
    from fewshot_edge.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    method, _, model_spec, _ = load_checkpoint(checkpoint, "cpu")
    if shape_text(model_spec) != shape_text(spec):
        raise InputError(f"checkpoint takes {shape_text(model_spec)} inputs but the bundle takes {shape_text(spec)}")
    return method, model_spec


def pytorch_figures(eager: str | tuple[Any, InputSpec], report: dict[str, Any]) -> dict[str, Any]:
    """One-image latency of the PyTorch model's encoder in eager mode, and how many times slower it
    is than onnxruntime's encoder and whole prediction; or why it was skipped."""
    if isinstance(eager, str):
        return {"skipped": eager}
    import torch

    method, spec = eager
    x = torch.from_numpy(preprocess(source_images(spec, 1), spec))
    with torch.inference_mode():
        encoder = time_calls(lambda: method.embed(x), report["encoder"]["runs"])
    return {
        "encoder": encoder,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "times_encoder": encoder["p50_ms"] / report["encoder"]["p50_ms"],
        "times_predict": encoder["p50_ms"] / report["predict"]["p50_ms"],
    }


def format_bench(r: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    m = r["machine"]

    def ms(t: dict[str, float]) -> str:
        return f"p50 {t['p50_ms']:.3f} ms   p99 {t['p99_ms']:.3f} ms"

    lines = [
        ("bundle", f"{r['bundle']} (model {r['model_id'][:12]}, input {r['input']})"),
        (
            "machine",
            f"{m['cpu']}, {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}, {r['threads'] or 'default'} threads",
        ),
        (f"predict, one {r['source_image']} image", f"{ms(r['predict'])}   (preprocess + encode + score)"),
        ("encoder, one image", ms(r["encoder"])),
        (f"encoder, batches of {r['batch']}", f"{r['encoder_images_per_s']:,.0f} images/s"),
        (
            f"end to end, batches of {r['batch']}",
            f"{r['end_to_end_images_per_s']:,.0f} images/s   (preprocess + encode)",
        ),
        ("enroll, one class of 5 shots", f"{ms(r['enroll'])}   (SQLite store)"),
        ("cold start", f"{r['cold_start_s']:.3f} s   (new process to its first prediction)"),
        ("peak RSS", f"{r['peak_rss_mb']:.0f} MB   (new process, {r['rss_predictions']} predictions)"),
    ]
    torch_figures = r["pytorch"]
    if "skipped" in torch_figures:
        lines.append(("pytorch", f"skipped ({torch_figures['skipped']})"))
    else:
        lines.append(
            (
                "pytorch eager, encoder, one image",
                f"{ms(torch_figures['encoder'])}   = {torch_figures['times_encoder']:.1f}x onnxruntime's encoder, "
                f"{torch_figures['times_predict']:.1f}x its whole prediction",
            )
        )
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
