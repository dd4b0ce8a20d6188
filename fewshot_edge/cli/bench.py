"""``bench``: latency, throughput, cold start and memory of a bundle here; precisions and modes side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import click

from fewshot_edge.runtime import InputSpec, open_bundle, preprocess
from fewshot_edge.runtime.bench import (
    latency_by_classes,
    peak_rss_mb,
    rate,
    run_benchmark,
    shape_text,
    source_images,
    time_calls,
)
from fewshot_edge.runtime.pretrained import default_bundle

from .common import InputError, emit_json, main, reports_input_errors
from .options import engine_options, resolved_bundle

BY_CLASSES = ("matching", "relation")  # modes whose prediction cost grows with the enrolled classes


@main.command()
@click.argument("bundle", required=False, callback=resolved_bundle)
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
    help="Instead: refit time and prediction latency of MODE beside prototype, 20 classes x 5 shots (repeatable);"
    " for relation and matching also the prediction latency at 5, 20, 50 and 100 classes.",
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
    With --checkpoint, the same model in PyTorch eager is measured in the same run, same threads: one
    image's latency, batch throughput and a fresh process's peak RSS, each beside the runtime's.
    --all-variants and --adapt MODE compare precisions and adaptation modes instead.
    """
    bundle_dir = bundle or default_bundle()
    if all_variants or modes:
        compare(bundle_dir, threads, quick, all_variants, modes, as_json, engine)
        return
    spec = open_bundle(bundle_dir).manifest.input_spec
    eager = pytorch_model(checkpoint, spec, threads)
    sizes: dict[str, Any] = dict(runs=200, batch=128, seconds=0.5, enroll_runs=20, child_runs=50) if quick else {}
    report = run_benchmark(bundle_dir, threads=threads, **sizes, **engine)
    report["pytorch"] = pytorch_figures(eager, report, sizes.get("seconds", 2.0))
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
        for mode in (m for m in dict.fromkeys(modes) if m in BY_CLASSES):
            sizes: dict[str, Any] = dict(runs=20, counts=(5, 20)) if quick else {}
            report[f"{mode} by classes"] = latency_by_classes(bundle, mode, threads=threads, **engine, **sizes)
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
    if name.endswith(" by classes"):
        header = ["classes", "predict p50/p99 ms"]
        rows = [[n, ms(v)] for n, v in r["classes"].items()]
        foot = f"mode {r['mode']}, {r['shots_per_class']} shots per class, one image per prediction"
    elif name == "precisions":
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


Eager = tuple[Any, InputSpec, str, int]  # the checkpoint's method, its input spec, the file, torch's threads


def pytorch_model(checkpoint: str | None, spec: InputSpec, threads: int) -> str | Eager:
    """The checkpoint's method (eval mode), input spec, path and threads, with torch set to ``threads``
    threads; or why there is none, as a string."""
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
    return method, model_spec, checkpoint, threads


def pytorch_figures(eager: str | Eager, report: dict[str, Any], seconds: float = 2.0) -> dict[str, Any]:
    """The PyTorch model in eager mode beside the runtime's figures in ``report``: its encoder's one-image
    latency (and how many times onnxruntime's encoder and whole prediction it takes), its throughput on
    batches of the same size (``seconds`` of them) and a fresh process's peak RSS; or why it was skipped."""
    if isinstance(eager, str):
        return {"skipped": eager}
    import torch

    method, spec, checkpoint, threads = eager
    one = torch.from_numpy(preprocess(source_images(spec, 1), spec))
    batch = torch.from_numpy(preprocess(source_images(spec, report["batch"], seed=1), spec))
    with torch.inference_mode():
        encoder = time_calls(lambda: method.embed(one), report["encoder"]["runs"])
        throughput = rate(lambda: method.embed(batch), report["batch"], seconds)
    rss = _torch_process_rss(checkpoint, threads, report["rss_predictions"])
    return {
        "encoder": encoder,
        "encoder_images_per_s": throughput,
        "peak_rss_mb": rss,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "times_encoder": encoder["p50_ms"] / report["encoder"]["p50_ms"],
        "times_predict": encoder["p50_ms"] / report["predict"]["p50_ms"],
        "throughput_vs_runtime": throughput / report["encoder_images_per_s"],
        "rss_vs_runtime": rss / report["peak_rss_mb"],
    }


def _torch_process_rss(checkpoint: str, threads: int, runs: int) -> float:
    """Peak RSS (MB) of a new interpreter that loads the checkpoint in PyTorch and embeds one image ``runs``
    times: the counterpart of the runtime's fresh-process figure."""
    code = "import sys; from fewshot_edge.cli.bench import _torch_child; _torch_child(*sys.argv[1:])"
    child = subprocess.run(
        [sys.executable, "-c", code, checkpoint, str(threads), str(runs)], capture_output=True, text=True, timeout=600
    )
    if child.returncode != 0:
        raise RuntimeError(f"PyTorch benchmark process failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(child.stdout)


def _torch_child(checkpoint: str, threads: str, runs: str) -> None:
    """The process of ``_torch_process_rss``: load, embed one image ``runs`` times, print the peak RSS."""
    import torch

    from fewshot_edge.checkpoint import load_checkpoint

    torch.set_num_threads(int(threads))
    method, _, spec, _ = load_checkpoint(checkpoint, "cpu")
    x = torch.from_numpy(preprocess(source_images(spec, 1), spec))
    with torch.inference_mode():
        for _ in range(int(runs)):
            method.embed(x)
    print(peak_rss_mb())


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
        t = torch_figures
        lines += [
            (
                "pytorch eager, encoder, one image",
                f"{ms(t['encoder'])}   = {t['times_encoder']:.1f}x onnxruntime's encoder, "
                f"{t['times_predict']:.1f}x its whole prediction",
            ),
            (
                f"pytorch eager, batches of {r['batch']}",
                f"{t['encoder_images_per_s']:,.0f} images/s   = {t['throughput_vs_runtime']:.2f}x onnxruntime's",
            ),
            ("pytorch eager, peak RSS", f"{t['peak_rss_mb']:.0f} MB   = {t['rss_vs_runtime']:.1f}x the runtime's"),
        ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
