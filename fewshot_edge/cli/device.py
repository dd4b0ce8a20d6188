"""``enroll``, ``predict``, ``classes`` and ``bench``: the device half (numpy + onnxruntime, never torch).

Every command that opens an enrollment store takes ``--bundle`` (default: the pretrained bundle),
``--store`` and ``--reembed``. Inputs are checked before anything is written, so a bad image or
label leaves the store as it was; every such error is one line with exit code 2.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import click
from tqdm import tqdm

from fewshot_edge.imagefiles import class_folders, image_files
from fewshot_edge.pretrained import default_bundle
from fewshot_edge.runtime import FewShotInputError, FewShotModel, InputSpec, Prediction, open_bundle, preprocess, validate_label
from fewshot_edge.runtime.bench import run_benchmark, shape_text, source_images, time_calls
from fewshot_edge.runtime.preprocess import load_image

from .common import InputError, emit_json, main, reports_input_errors
from .deploy import engine_options

PROGRESS_MIN_IMAGES = 50
PREDICT_CHUNK = 256


def store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --bundle, --store and --reembed, the options of every command that opens a store."""
    for option in reversed([
        click.option("--bundle", metavar="DIR", help="Bundle folder (manifest.json + ONNX) [the pretrained Omniglot Conv-4]."),
        click.option("--store", required=True, metavar="FILE", help="Enrollment store, a SQLite file (enroll creates it)."),
        click.option("--reembed", is_flag=True,
                     help="The store was enrolled with another model: re-embed its stored shots with this "
                          "bundle's model, keeping every class (the model update path)."),
    ]):
        func = option(func)
    return func


def open_model(bundle: Optional[str], store: str, reembed: bool, adapt: Optional[str] = None,
               create: bool = False, adapt_options: Optional[dict[str, Any]] = None,
               engine: Optional[dict[str, Any]] = None) -> FewShotModel:
    """The model on ``bundle`` (default: the pretrained one) with ``store``; a missing store is an
    error unless ``create``. ``engine``: precision/backend arguments of ``FewShotModel.open``."""
    if not create and not Path(store).is_file():
        raise InputError(f"no enrollment store at {store}; enroll classes first")
    try:
        return FewShotModel.open(bundle or default_bundle(), store=store, adapt=adapt, reembed=reembed,
                                 adapt_options=adapt_options, **(engine or {}))
    except FewShotInputError as exc:  # name the option, not the API argument
        raise InputError(str(exc).replace("open it with reembed=True", "pass --reembed")) from None


def bundle_args(bundle: Optional[str], store: str) -> str:
    """The --bundle/--store part of a command line, quoted for a shell (--bundle only when given)."""
    given = ["--bundle", bundle] if bundle else []
    return shlex.join([*given, "--store", store])


def expand_images(paths: Sequence[str]) -> list[Path]:
    """Image files and the images directly in folders, in the order given; none found is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise InputError(f"no image files in folder {p}")
            files += found
        elif not p.exists():
            raise InputError(f"image file not found: {p}")
        else:
            files.append(p)
    return files


def enrollment_plan(paths: Sequence[str], label: Optional[str]) -> dict[str, list[Path]]:
    """Label -> image files: every path under ``label``, or else a class per subfolder of each path."""
    if label is not None:
        return {validate_label(label): expand_images(paths)}
    plan: dict[str, list[Path]] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise InputError(f"{root} is not a folder; give --label NAME to enroll image files, "
                             "or folders with a subfolder of images per class")
        folders = class_folders(root)
        if not folders:
            raise InputError(f"no class subfolders in {root} (expected {root}/<label>/<image>)")
        for name, files in folders.items():
            name = validate_label(name)
            if not files:
                raise InputError(f"no image files in folder {root / name}")
            if name in plan:
                raise InputError(f"class {name!r} is given twice")
            plan[name] = files
    return plan


@main.command()
@store_options
@click.option("--label", metavar="NAME", help="Enroll every image given (files or folders of images) as this class.")
@click.option("--add", is_flag=True, help="Add the images to classes that are already enrolled.")
@click.option("--adapt", metavar="MODE", help="Make MODE (one the bundle lists) this store's adaptation mode: "
                                              "predict uses it unless given another.")
@click.argument("paths", nargs=-1, required=True)
@engine_options
@reports_input_errors
def enroll(bundle: Optional[str], store: str, reembed: bool, label: Optional[str], add: bool, adapt: Optional[str],
           paths: tuple[str, ...], engine: dict[str, Any]) -> None:
    """Enroll classes from a few images each.

    \b
    One class from image files or folders of images:
      fewshot-edge enroll --store device.db --label cat cat1.png cat2.png
    A class per subfolder (the folder's name is the label):
      fewshot-edge enroll --store device.db shots/          # shots/cat/*.png, shots/dog/*.png
    More images for an enrolled class:
      fewshot-edge enroll --store device.db --label cat --add cat3.png
    """
    plan = enrollment_plan(paths, label)
    for files in plan.values():
        for f in files:
            load_image(f)  # decode every image first: a bad one stops the command before any write
    with open_model(bundle, store, reembed, adapt, create=not add, engine=engine) as model:
        enrolled = dict(model.classes())
        for name in plan:
            if add and name not in enrolled:
                raise InputError(f"no class {name!r} enrolled; enroll it without --add first")
            if not add and name in enrolled:
                raise InputError(f"class {name!r} is already enrolled; use --add to add images to it")
        total = sum(len(files) for files in plan.values())
        write = model.add_shots if add else model.enroll
        with tqdm(total=total, unit="img", desc="enrolling", disable=total < PROGRESS_MIN_IMAGES or None) as bar:
            for name, files in plan.items():
                write(name, files)
                bar.update(len(files))
        if adapt:
            model.store.set_adaptation(model.adapter.name)
        counts = dict(model.classes())
    for name, files in plan.items():
        verb = f"added {len(files)} to" if add else "enrolled"
        click.echo(f"{verb} {name!r}: {counts[name]} shot{'s' * (counts[name] != 1)}")
    click.echo(f"{store}: {len(counts)} class{'es' * (len(counts) != 1)}, {sum(counts.values())} shots")


@main.command()
@store_options
@click.option("--adapt", metavar="MODE",
              help="Adaptation mode (one the bundle lists) [the store's, set by enroll --adapt, else the bundle's default].")
@click.option("--steps", type=int, metavar="N", help="finetune mode: gradient steps on the shots [as meta-trained].")
@click.option("--top-k", default=1, metavar="K", show_default=True, help="Also list the K most likely classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@click.argument("images", nargs=-1, required=True)
@engine_options
@reports_input_errors
def predict(bundle: Optional[str], store: str, reembed: bool, adapt: Optional[str], steps: Optional[int], top_k: int,
            as_json: bool, images: tuple[str, ...], engine: dict[str, Any]) -> None:
    """Classify images (files, or folders of images) among the enrolled classes.

    \b
    Prints the label, its probability and the distance to the nearest class prototype; the label is
    "unknown" when that distance is beyond the bundle's open-set threshold for that class's number of shots.
      fewshot-edge predict --store device.db photo.png --top-k 3
    """
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    files = expand_images(images)
    with open_model(bundle, store, reembed, adapt, adapt_options=None if steps is None else {"steps": steps},
                    engine=engine) as model:
        predictions: list[Prediction] = []
        with tqdm(total=len(files), unit="img", desc="predicting",
                  disable=len(files) < PROGRESS_MIN_IMAGES * 4 or None) as bar:
            for start in range(0, len(files), PREDICT_CHUNK):
                chunk = files[start:start + PREDICT_CHUNK]
                predictions += model.predict(chunk, top_k=top_k)
                bar.update(len(chunk))
    if as_json:
        emit_json([{"image": str(f), "label": p.label, "probability": p.probability, "distance": p.distance,
                    "unknown": p.label != p.top_k[0][0], "top_k": [{"label": k, "probability": v} for k, v in p.top_k]}
                   for f, p in zip(files, predictions)])
        return
    name_width = max(len(str(f)) for f in files)
    label_width = max(len(p.label) for p in predictions)
    for f, p in zip(files, predictions):
        line = f"{str(f):<{name_width}}  {p.label:<{label_width}}  p={p.probability:.3f}  d={p.distance:.4g}"
        if p.label != p.top_k[0][0]:
            line += f"  (nearest: {p.top_k[0][0]})"
        if top_k > 1:
            line += "  top: " + ", ".join(f"{k} {v:.3f}" for k, v in p.top_k)
        click.echo(line)


@main.group()
def classes() -> None:
    """List, remove or rename enrolled classes."""


@classes.command(name="list")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print the classes as JSON.")
@engine_options
@reports_input_errors
def list_classes(bundle: Optional[str], store: str, reembed: bool, as_json: bool, engine: dict[str, Any]) -> None:
    """The enrolled classes with their numbers of shots, in enrollment order."""
    with open_model(bundle, store, reembed, engine=engine) as model:
        enrolled = model.classes()
    if as_json:
        emit_json([{"label": label, "shots": n} for label, n in enrolled])
        return
    width = max((len(label) for label, _ in enrolled), default=0)
    for label, n in enrolled:
        click.echo(f"{label:<{width}}  {n} shot{'s' * (n != 1)}")
    click.echo(f"{len(enrolled)} class{'es' * (len(enrolled) != 1)}, {sum(n for _, n in enrolled)} shots")


@classes.command()
@store_options
@click.argument("labels", nargs=-1, required=True)
@engine_options
@reports_input_errors
def remove(bundle: Optional[str], store: str, reembed: bool, labels: tuple[str, ...], engine: dict[str, Any]) -> None:
    """Remove classes and their shots."""
    with open_model(bundle, store, reembed, engine=engine) as model:
        enrolled = dict(model.classes())
        missing = [label for label in labels if label not in enrolled]
        if missing:
            raise InputError(f"no class {missing[0]!r} enrolled")
        for label in dict.fromkeys(labels):
            model.remove_class(label)
            click.echo(f"removed {label!r} ({enrolled[label]} shot{'s' * (enrolled[label] != 1)})")


@classes.command()
@store_options
@click.argument("old")
@click.argument("new")
@engine_options
@reports_input_errors
def rename(bundle: Optional[str], store: str, reembed: bool, old: str, new: str, engine: dict[str, Any]) -> None:
    """Rename class OLD to NEW."""
    with open_model(bundle, store, reembed, engine=engine) as model:
        model.rename(old, new)
    click.echo(f"renamed {old!r} to {validate_label(new)!r}")


@main.command()
@click.argument("bundle", required=False)
@click.option("--threads", type=int, metavar="N", default=os.cpu_count() or 1, show_default=True,
              help="Threads for onnxruntime (and PyTorch with --checkpoint).")
@click.option("--checkpoint", metavar="CKPT", help="Also time this checkpoint's model in PyTorch eager (needs torch).")
@click.option("--quick", is_flag=True, help="Fewer runs: a few seconds, rougher figures.")
@click.option("--all-variants", is_flag=True,
              help="Instead: the bundle's precisions side by side (latency, throughput, export-time accuracy).")
@click.option("--adapt", "modes", multiple=True, metavar="MODE",
              help="Instead: refit time and prediction latency of MODE beside prototype, 20 classes x 5 shots (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@engine_options
@reports_input_errors
def bench(bundle: Optional[str], threads: int, checkpoint: Optional[str], quick: bool, all_variants: bool,
          modes: tuple[str, ...], as_json: bool, engine: dict[str, Any]) -> None:
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


def compare(bundle: str, threads: int, quick: bool, all_variants: bool, modes: Sequence[str], as_json: bool,
            engine: dict[str, Any]) -> None:
    """``bench --all-variants`` and ``--adapt``: the side-by-side tables (or JSON)."""
    from fewshot_edge.runtime.bench_compare import compare_modes, compare_precisions

    opened = {key: value for key, value in engine.items() if key != "precision"}
    report: dict[str, Any] = {}
    if all_variants:
        report["precisions"] = compare_precisions(bundle, threads=threads, **opened,
                                                  **(dict(runs=50, batch=64, seconds=0.2) if quick else {}))
    if modes:
        report["adaptation"] = compare_modes(bundle, modes, threads=threads, **engine, **(dict(runs=50, refits=3) if quick else {}))
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
        header = ["precision", "predict p50/p99 ms", "encoder p50/p99 ms", f"encoder img/s (batch {r['batch']})", "vs fp32", "accuracy"]
        rows = [[p, ms(v["predict"]), ms(v["encoder"]), f"{v['encoder_images_per_s']:,.0f}", f"{v['throughput_vs_fp32']:.2f}x",
                 "not measured" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}% +- {100 * v['ci95']:.2f}"
                 + ("" if v["delta"] is None else f" ({100 * v['delta']:+.2f} +- {100 * v['delta_ci95']:.2f} pts)")]
                for p, v in r["precisions"].items()]
        foot = f"accuracy: measured at export on {r['accuracy_on'] or 'no episodes'} (from the manifest)"
    else:
        header = ["mode", "refit p50/p99 ms", "predict p50/p99 ms"]
        rows = [[mode, ms(v["refit"]), ms(v["predict"])] for mode, v in r["modes"].items()]
        foot = f"{r['enrolled']} enrolled, {r['precision']} encoder; refit = fitting the mode to the stored shots after a change"
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([head, *lines, foot])


def pytorch_model(checkpoint: Optional[str], spec: InputSpec, threads: int) -> Union[str, tuple[Any, InputSpec]]:
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


def pytorch_figures(eager: Union[str, tuple[Any, InputSpec]], report: dict[str, Any]) -> dict[str, Any]:
    """One-image latency of the PyTorch model's encoder in eager mode, and how many times slower it
    is than onnxruntime's encoder and whole prediction; or why it was skipped."""
    if isinstance(eager, str):
        return {"skipped": eager}
    import torch

    method, spec = eager
    x = torch.from_numpy(preprocess(source_images(spec, 1), spec))
    with torch.inference_mode():
        encoder = time_calls(lambda: method.embed(x), report["encoder"]["runs"])
    return {"encoder": encoder, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "times_encoder": encoder["p50_ms"] / report["encoder"]["p50_ms"],
            "times_predict": encoder["p50_ms"] / report["predict"]["p50_ms"]}


def format_bench(r: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    m = r["machine"]

    def ms(t: dict[str, float]) -> str:
        return f"p50 {t['p50_ms']:.3f} ms   p99 {t['p99_ms']:.3f} ms"

    lines = [
        ("bundle", f"{r['bundle']} (model {r['model_id'][:12]}, input {r['input']})"),
        ("machine", f"{m['cpu']}, {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}, {r['threads'] or 'default'} threads"),
        (f"predict, one {r['source_image']} image", f"{ms(r['predict'])}   (preprocess + encode + score)"),
        ("encoder, one image", ms(r["encoder"])),
        (f"encoder, batches of {r['batch']}", f"{r['encoder_images_per_s']:,.0f} images/s"),
        (f"end to end, batches of {r['batch']}", f"{r['end_to_end_images_per_s']:,.0f} images/s   (preprocess + encode)"),
        ("enroll, one class of 5 shots", f"{ms(r['enroll'])}   (SQLite store)"),
        ("cold start", f"{r['cold_start_s']:.3f} s   (new process to its first prediction)"),
        ("peak RSS", f"{r['peak_rss_mb']:.0f} MB   (new process, {r['rss_predictions']} predictions)"),
    ]
    torch_figures = r["pytorch"]
    if "skipped" in torch_figures:
        lines.append(("pytorch", f"skipped ({torch_figures['skipped']})"))
    else:
        lines.append(("pytorch eager, encoder, one image",
                      f"{ms(torch_figures['encoder'])}   = {torch_figures['times_encoder']:.1f}x onnxruntime's encoder, "
                      f"{torch_figures['times_predict']:.1f}x its whole prediction"))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)

