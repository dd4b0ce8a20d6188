"""``demo``: enroll and classify offline, on symbols drawn on the spot or on Omniglot episodes."""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from fewshot_edge import glyphs
from fewshot_edge.runtime import FewShotModel, Prediction
from fewshot_edge.runtime.preprocess import decode_image
from fewshot_edge.runtime.pretrained import default_bundle
from fewshot_edge.runtime.stats import confidence_interval

from .common import InputError, main, reports_input_errors
from .device import bundle_args
from .options import bundle_option


@main.command()
@bundle_option
@click.option(
    "--data",
    metavar="ZIP",
    help="An Omniglot zip (or the same tree unpacked): run N-way 1-shot "
    "episodes on its characters instead of drawn symbols.",
)
@click.option("--ways", "n_way", default=5, metavar="N", show_default=True, help="Classes to enroll, one shot each.")
@click.option(
    "--queries", "q_query", default=5, metavar="Q", show_default=True, help="New drawings to classify per class."
)
@click.option("--episodes", default=200, metavar="E", show_default=True, help="With --data: episodes to average over.")
@click.option("--seed", default=0, metavar="S", show_default=True, help="Seed of the drawings (or episodes).")
@click.option("--out", metavar="DIR", help="Folder for the PNGs drawn [a new temporary folder].")
@reports_input_errors
def demo(
    bundle: str | None, data: str | None, n_way: int, q_query: int, episodes: int, seed: int, out: str | None
) -> None:
    """Teach the model new symbols from one drawing each, then classify new drawings.

    \b
    Draws N random symbols and one more it never enrolls, enrolls one drawing of each of the
    N symbols, classifies Q new (perturbed) drawings of each and the unseen symbol, which
    should come out "unknown", and prints the command lines that do the same with the PNGs it drew.
    With --data it runs real N-way 1-shot episodes on Omniglot characters and prints the accuracy
    with a 95% confidence interval.
    """
    if n_way < 2 or q_query < 1 or episodes < 1:
        raise InputError("--ways must be at least 2, --queries and --episodes at least 1")
    bundle_dir = bundle or default_bundle()
    if data:
        omniglot_episodes(bundle_dir, data, n_way, q_query, episodes, seed)
    else:
        drawn_symbols(bundle_dir, bundle, n_way, q_query, seed, out)


def classify(model: FewShotModel, images: Sequence[Any]) -> tuple[list[Prediction], list[float]]:
    """Predict one image at a time; the predictions and each one's latency in seconds."""
    predictions, latencies = [], []
    for image in images:
        start = time.perf_counter()
        predictions += model.predict([image])
        latencies.append(time.perf_counter() - start)
    return predictions, latencies


def drawn_symbols(bundle_dir: Path, bundle: str | None, n_way: int, q_query: int, seed: int, out: str | None) -> None:
    """The default demo: procedural symbols, written as PNGs, enrolled into a temporary store."""
    rng = np.random.default_rng(seed)
    symbol_seeds = rng.integers(2**31, size=n_way + 1)
    symbols = [glyphs.draw(int(s)) for s in symbol_seeds]
    labels = [f"symbol-{i + 1}" for i in range(n_way)]
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="fewshot-edge-demo-"))
    shots = {
        label: glyphs.perturb(symbol, int(rng.integers(2**31)))
        for label, symbol in zip(labels, symbols[:-1], strict=True)
    }
    drawings = {
        f"{label}-{j + 1}": (label, glyphs.perturb(symbol, int(rng.integers(2**31))))
        for label, symbol in zip(labels, symbols[:-1], strict=True)
        for j in range(q_query)
    }
    drawings["unseen"] = ("unknown", glyphs.perturb(symbols[-1], int(rng.integers(2**31))))
    for label, image in shots.items():
        _save(image, folder / "shots" / label / "1.png")
    for name, (_, image) in drawings.items():
        _save(image, folder / "queries" / f"{name}.png")

    with (
        tempfile.TemporaryDirectory(prefix="fewshot-edge-demo-") as tmp,
        FewShotModel.open(bundle_dir, store=Path(tmp) / "demo.db") as model,
    ):
        for label, image in shots.items():
            model.enroll(label, [image])
        predictions, latencies = classify(model, [image for _, image in drawings.values()])
        threshold = model.bundle.manifest.calibration.open_set.threshold_for(1)
    truth = [label for label, _ in drawings.values()]
    known = list(zip(predictions[:-1], truth[:-1], strict=True))
    correct = sum(p.label == t for p, t in known)
    unseen = predictions[-1]
    click.echo(f"drew {n_way} symbols and one unseen symbol; PNGs in {folder}")
    click.echo(f"enrolled {n_way} symbols from one drawing each")
    click.echo(
        f"new drawings: {correct}/{len(known)} correct ({100 * correct / len(known):.1f}%), "
        f"{sum(p.label == 'unknown' for p, _ in known)} answered unknown"
    )
    limit = "no open-set threshold in this bundle" if threshold is None else f"1-shot threshold {threshold:.4g}"
    click.echo(
        f"unseen symbol: {unseen.label} (nearest {unseen.top_k[0][0]}, distance {unseen.distance:.4g}, {limit}) "
        f"-> {'rejected' if unseen.label == 'unknown' else 'NOT rejected'}"
    )
    click.echo(f"latency: {1e3 * float(np.median(latencies)):.2f} ms per image (median; decoded image -> label)")
    store = str(folder / "store.db")
    click.echo("\nthe same from the command line:")
    click.echo(f"  fewshot-edge enroll {bundle_args(bundle, store)} {shlex.quote(str(folder / 'shots'))}")
    click.echo(f"  fewshot-edge predict {bundle_args(bundle, store)} {shlex.quote(str(folder / 'queries'))}")
    click.echo(f"  fewshot-edge classes list {bundle_args(bundle, store)}")


def omniglot_episodes(bundle_dir: Path, data: str, n_way: int, q_query: int, episodes: int, seed: int) -> None:
    """N-way 1-shot episodes on the characters of an Omniglot zip or folder, through the runtime."""
    from fewshot_edge.data._sources import collect, open_sources

    rng = np.random.default_rng(seed)
    accuracy, latencies, unknown = [], [], 0
    with open_sources(data) as trees, FewShotModel.open(bundle_dir) as model:
        characters = list(collect(trees, depth=2).values())
        if len(characters) < n_way:
            raise InputError(f"{data} has {len(characters)} characters, fewer than --ways {n_way}")
        for _ in tqdm(range(episodes), desc="episodes", unit="episode", disable=None):
            drawings = [
                _sample(characters[c], 1 + q_query, rng) for c in rng.choice(len(characters), n_way, replace=False)
            ]
            predictions, times = _episode(model, drawings)
            truth = [c for c in range(n_way) for _ in range(q_query)]
            accuracy.append(np.mean([p.top_k[0][0] == f"class-{t}" for p, t in zip(predictions, truth, strict=True)]))
            unknown += sum(p.label == "unknown" for p in predictions)
            latencies += times
    mean, ci95 = confidence_interval(np.asarray(accuracy))
    click.echo(
        f"{n_way}-way 1-shot on {data}: {100 * mean:.2f}% +- {100 * ci95:.2f} (95% CI, {episodes} episodes, "
        f"{q_query} queries per class)"
    )
    click.echo(
        f"answered unknown: {100 * unknown / (episodes * n_way * q_query):.1f}% of queries (all were of enrolled classes)"
    )
    click.echo(f"latency: {1e3 * float(np.median(latencies)):.2f} ms per image (median; decoded image -> label)")


def _episode(model: FewShotModel, drawings: list[list[Image.Image]]) -> tuple[list[Prediction], list[float]]:
    """Enroll the first drawing of each class as "class-<i>", classify the others in order, unenroll."""
    labels = [f"class-{c}" for c in range(len(drawings))]
    for label, images in zip(labels, drawings, strict=True):
        model.enroll(label, images[:1])
    try:
        return classify(model, [image for images in drawings for image in images[1:]])
    finally:
        for label in labels:
            model.remove_class(label)


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _sample(files: Sequence[Any], n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` of a character's drawings (``(tree, name)`` files from ``collect``), decoded, in random order."""
    picked = [files[i] for i in rng.choice(len(files), n, replace=False)]
    return [decode_image(tree.read(name), f"{tree.path}/{name}") for tree, name in picked]
