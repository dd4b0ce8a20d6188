"""``enroll``, ``predict`` and ``classes``: the device half (numpy + onnxruntime, never torch).

Every command that opens an enrollment store takes ``--bundle`` (default: the pretrained bundle),
``--store`` and ``--reembed``. Inputs are checked before anything is written, so a bad image or
label leaves the store as it was; every such error is one line with exit code 2.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from fewshot_edge.imagefiles import class_folders, image_files
from fewshot_edge.runtime import FewShotInputError, FewShotModel, Prediction, validate_label
from fewshot_edge.runtime.preprocess import load_image
from fewshot_edge.runtime.pretrained import default_bundle
from fewshot_edge.runtime.store import normalize_label

from .common import InputError, emit_json, main, reports_input_errors
from .options import engine_options, mode_options, store_options

PROGRESS_MIN_IMAGES = 50
PREDICT_CHUNK = 256


def open_model(
    bundle: str | None,
    store: str,
    reembed: bool,
    adapt: str | None = None,
    create: bool = False,
    adapt_options: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
) -> FewShotModel:
    """The model on ``bundle`` (default: the pretrained one) with ``store``; a missing or empty
    (zero-byte) store is an error, left as it is, unless ``create``; a new store file is made only once
    the bundle checked out. ``engine``: precision/backend arguments of ``FewShotModel.open``."""
    check_store_path(store)
    try:
        return FewShotModel.open(
            bundle or default_bundle(),
            store=store,
            adapt=adapt,
            reembed=reembed,
            adapt_options=adapt_options,
            create=create,
            **(engine or {}),
        )
    except FewShotInputError as exc:  # name the option, not the API argument
        raise InputError(str(exc).replace("open it with reembed=True", "pass --reembed")) from None


def check_store_path(store: str) -> None:
    """Refuse a --store that keeps nothing: an empty path or ":memory:" (sqlite would hold the store in
    memory or in a temporary file deleted at exit, and the command would report classes it lost)."""
    if not store.strip() or store.strip() == ":memory:":
        raise InputError(f"--store {store!r} keeps nothing once the command ends; give the store's file path")
    if Path(store).is_dir():
        raise InputError(f"--store {store} is a folder; give the store's file path")


def bundle_args(bundle: str | Path | None, store: str | Path) -> str:
    """The --bundle/--store part of a command line, quoted for a shell (--bundle only when given)."""
    given = ["--bundle", str(bundle)] if bundle else []
    return shlex.join([*given, "--store", str(store)])


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


def enrollment_plan(paths: Sequence[str], label: str | None) -> dict[str, list[Path]]:
    """Label -> image files: every path under ``label``, or else a class per subfolder of each path."""
    if label is not None:
        return {validate_label(label): expand_images(paths)}
    plan: dict[str, list[Path]] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise InputError(
                f"{root} is not a folder; give --label NAME to enroll image files, "
                "or folders with a subfolder of images per class"
            )
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


@contextlib.contextmanager
def removed_if_new_and_failed(store: Path) -> Iterator[None]:
    """Remove the store file (and SQLite's -wal/-shm files) this command created when the command fails:
    a failed first enrollment leaves no empty store behind (the store of a later, correct command would
    be bound to whatever bundle this one named)."""
    existed = store.exists()
    try:
        yield
    except BaseException:
        if not existed:
            for path in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
                path.unlink(missing_ok=True)
        raise


@main.command()
@store_options
@click.option("--label", metavar="NAME", help="Enroll every image given (files or folders of images) as this class.")
@click.option("--add", is_flag=True, help="Add the images to classes that are already enrolled.")
@click.option(
    "--adapt",
    metavar="MODE",
    help="Make MODE (one the bundle lists) this store's adaptation mode: predict uses it unless given another.",
)
@click.argument("paths", nargs=-1, required=True)
@engine_options
@reports_input_errors
def enroll(
    bundle: str | None,
    store: str,
    reembed: bool,
    label: str | None,
    add: bool,
    adapt: str | None,
    paths: tuple[str, ...],
    engine: dict[str, Any],
) -> None:
    """Enroll classes from a few images each.

    \b
    One class from image files or folders of images:
      fewshot-edge enroll --store device.db --label cat cat1.png cat2.png
    A class per subfolder (the folder's name is the label):
      fewshot-edge enroll --store device.db shots/          # shots/cat/*.png, shots/dog/*.png
    More images for an enrolled class:
      fewshot-edge enroll --store device.db --label cat --add cat3.png
    """
    check_store_path(store)
    plan = enrollment_plan(paths, label)
    for files in plan.values():
        for f in files:
            load_image(f)  # decode every image first: a bad one stops the command before the store is opened
    with (
        removed_if_new_and_failed(Path(store)),
        open_model(bundle, store, reembed, adapt, create=not add, engine=engine) as model,
    ):
        enrolled = {normalize_label(name) for name, _ in model.classes()}
        for name in plan:
            if add and name not in enrolled:
                raise InputError(f"no class {name!r} enrolled; enroll it without --add first")
            if not add and name in enrolled:
                raise InputError(f"class {name!r} is already enrolled; use --add to add images to it")
        # every image converted and embedded, then every class written in one transaction: all or nothing
        skipped = model.enroll_many(plan, add=add)
        if adapt:
            model.store.set_adaptation(model.adapter.name)
        counts = {normalize_label(name): n for name, n in model.classes()}
    for name, files in plan.items():
        dropped = skipped.get(name, [])
        if dropped:
            shown = ", ".join(str(files[i]) for i in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
            click.echo(f"skipped {len(dropped)} image{'s' * (len(dropped) != 1)} {name!r} already holds: {shown}")
        verb = f"added {len(files) - len(dropped)} to" if add else "enrolled"
        click.echo(f"{verb} {name!r}: {counts[name]} shot{'s' * (counts[name] != 1)}")
    click.echo(f"{store}: {len(counts)} class{'es' * (len(counts) != 1)}, {sum(counts.values())} shots")


@main.command()
@store_options
@mode_options
@click.option("--top-k", default=1, metavar="K", show_default=True, help="Also list the K most likely classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@click.argument("images", nargs=-1, required=True)
@engine_options
@reports_input_errors
def predict(
    bundle: str | None,
    store: str,
    reembed: bool,
    adapt: str | None,
    steps: int | None,
    top_k: int,
    as_json: bool,
    images: tuple[str, ...],
    engine: dict[str, Any],
) -> None:
    """Classify images (files, or folders of images) among the enrolled classes.

    \b
    Prints the label, its probability, the distance to the nearest class prototype and the predictive
    entropy H in nats (with its epistemic part for the bayes mode); the label is "unknown" when that
    distance is beyond the bundle's open-set threshold for that class's number of shots.
      fewshot-edge predict --store device.db photo.png --top-k 3
    """
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    files = expand_images(images)
    with open_model(
        bundle, store, reembed, adapt, adapt_options=None if steps is None else {"steps": steps}, engine=engine
    ) as model:
        predictions: list[Prediction] = []
        with tqdm(
            total=len(files), unit="img", desc="predicting", disable=len(files) < PROGRESS_MIN_IMAGES * 4 or None
        ) as bar:
            for start in range(0, len(files), PREDICT_CHUNK):
                chunk = files[start : start + PREDICT_CHUNK]
                predictions += model.predict(chunk, top_k=top_k)
                bar.update(len(chunk))
    if as_json:
        emit_json(
            [
                {
                    "image": str(f),
                    "label": p.label,
                    "probability": p.probability,
                    "distance": p.distance,
                    "unknown": p.label != p.top_k[0][0],
                    "top_k": [{"label": k, "probability": v} for k, v in p.top_k],
                    "entropy": p.entropy,
                    "epistemic": p.epistemic,
                }
                for f, p in zip(files, predictions, strict=True)
            ]
        )
        return
    name_width = max(len(str(f)) for f in files)
    label_width = max(len(p.label) for p in predictions)
    for f, p in zip(files, predictions, strict=True):
        line = f"{str(f):<{name_width}}  {p.label:<{label_width}}  p={p.probability:.3f}  d={p.distance:.4g}"
        line += f"  H={p.entropy:.3f}" + (f" (epistemic {p.epistemic:.3f})" if p.epistemic is not None else "")
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
def list_classes(bundle: str | None, store: str, reembed: bool, as_json: bool, engine: dict[str, Any]) -> None:
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
def remove(bundle: str | None, store: str, reembed: bool, labels: tuple[str, ...], engine: dict[str, Any]) -> None:
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
def rename(bundle: str | None, store: str, reembed: bool, old: str, new: str, engine: dict[str, Any]) -> None:
    """Rename class OLD to NEW."""
    with open_model(bundle, store, reembed, engine=engine) as model:
        model.rename(old, new)
    click.echo(f"renamed {old!r} to {validate_label(new)!r}")
