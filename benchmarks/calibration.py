"""Calibration of every device mode: ECE and NLL before and after the calibrated temperature, and the
open-set decision by each uncertainty statistic vs by distance (AUROC, known vs unenrolled classes).

For each ``--run CHECKPOINT BUNDLE MODE`` (repeatable), seeded episodes of the checkpoint's held-out
classes are drawn with ``EpisodeSampler`` (way + ``--unknown`` classes each, ``--shot`` support and
``--query`` query images per class). The runtime (``FewShotModel`` on the bundle in MODE, an in-memory
store) enrolls the first ``way`` classes from their support images, as a device receives them, and
scores the queries of all classes; the other ``--unknown`` classes' queries are the unknowns. From the
enrolled classes' queries: accuracy, ECE (15 equal-width bins of the top-1 confidence) and NLL at
temperature 1 and at the temperature the device divides by (``FewShotModel.temperatures``: the
mode's own when its parameters hold one, else the bundle's; the one for this shot count where export
fitted one per count), and the ECE at the "oracle" temperature, the one minimising the NLL of these
very queries (what a temperature fitted for this shot count could reach). From all queries: the AUROC
of telling unknowns from knowns by the distance to the nearest class, 1 - the top probability, the
entropy and (``bayes``) the epistemic part, each taken from the calibrated distribution as
``Prediction`` reports it.

Writes OUT/NAME.json and a reliability diagram OUT/NAME.png per run (NAME = the bundle folder's name
with the mode; rows = shots, columns = before/after temperature), and prints a markdown table.

    python benchmarks/calibration.py --run runs/protonet/last.pt bundles/protonet prototype \\
        --run runs/versa/last.pt bundles/versa bayes --episodes 500 --shots 1,5 --out build/calibration
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from runtime_parity import as_drawn

from fewshot_edge.checkpoint import read_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export.calibration import fit_temperature
from fewshot_edge.runtime import FewShotModel
from fewshot_edge.runtime.stats import auroc, confidence_interval, expected_calibration_error, reliability
from fewshot_edge.runtime.uncertainty import log_predictive, predictive

BINS = 15
STATISTICS = ("distance", "1 - max probability", "entropy", "epistemic")
SPLIT_FIELDS = ("data", "sources", "data_options", "val_sources", "holdout", "holdout_groups", "seed")  # load_splits'


@dataclass
class EpisodeScores:
    """One episode's queries, enrolled classes' first: true class (>= way for an unenrolled one), the
    class probabilities at temperature 1 and at the device's temperature, log p of the true class both
    ways and the logits (enrolled classes' queries only), and the open-set statistics (higher = more
    likely unknown)."""

    truth: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray
    log_likelihood_raw: np.ndarray
    log_likelihood: np.ndarray
    statistics: dict[str, np.ndarray]
    known_logits: np.ndarray


def episode_scores(model: FewShotModel, images: np.ndarray, index: np.ndarray, way: int, shot: int) -> EpisodeScores:
    """Enroll classes 0..way-1 of ``index`` (classes x image ids of ``images``, uint8 (N, C, H, W) as
    ``to_pixels`` gives them) from their first ``shot`` images, score every class's other images, then
    remove the classes again (the store is left as it was)."""
    labels = [f"class {c}" for c in range(way)]
    model.enroll_many(
        {
            label: [as_drawn(images[j], model.spec) for j in ids[:shot]]
            for label, ids in zip(labels, index, strict=False)
        }
    )
    try:
        columns = [model.labels.index(label) for label in labels]  # fits the mode to the enrolled shots
        queries = model.embed([as_drawn(images[j], model.spec) for j in index[:, shot:].ravel()])
        logits, nearest, shots = model.adapter.score(queries)
    finally:
        for label in labels:
            model.remove_class(label)
    logits = logits[..., columns]
    truth = np.repeat(np.arange(len(index)), index.shape[1] - shot)
    known = truth < way
    temperature = model.temperatures(shots)  # per query, as predict divides
    calibrated, entropy, epistemic = predictive(logits, temperature)
    statistics = {"distance": nearest, "1 - max probability": 1.0 - calibrated.max(axis=1), "entropy": entropy}
    if epistemic is not None:
        statistics["epistemic"] = epistemic
    rows = np.flatnonzero(known)
    return EpisodeScores(
        truth=truth,
        raw=predictive(logits, 1.0)[0],
        calibrated=calibrated,
        log_likelihood_raw=log_predictive(logits[known], 1.0)[0][np.arange(len(rows)), truth[known]],
        log_likelihood=log_predictive(logits[known], temperature[known])[0][np.arange(len(rows)), truth[known]],
        statistics=statistics,
        known_logits=logits[known],
    )


def held_out_classes(checkpoint: str) -> FewShotDataset:
    """The held-out classes of the checkpoint's training config."""
    config = read_checkpoint(checkpoint, "cpu")["config"]
    return _held_out(json.dumps({k: config[k] for k in SPLIT_FIELDS}, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _held_out(split: str) -> FewShotDataset:
    """Cached by the fields ``load_splits`` reads, so runs on one data set and split load it once."""
    return load_splits(TrainConfig.from_dict(json.loads(split)))[1]


def measure(
    checkpoint: str, bundle: str, mode: str, episodes: int, way: int, shot: int, query: int, unknown: int, seed: int
) -> tuple[dict[str, object], tuple[np.ndarray, ...]]:
    """The report of one run at one shot count, and the reliability bins (counts, accuracy, confidence)
    before and after temperature."""
    held_out = held_out_classes(checkpoint)
    sampler = EpisodeSampler(held_out, way + unknown, shot, query, seed=seed)
    parts: list[EpisodeScores] = []
    with FewShotModel.open(bundle, adapt=mode) as model, torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(episodes):
            parts.append(episode_scores(model, held_out.images, sampler.sample().index.numpy(), way, shot))
        seconds = time.perf_counter() - t0
        temperature, model_id = float(model.temperatures(np.array([shot]))[0]), model.bundle.model_id
    truth = np.concatenate([p.truth for p in parts])
    known = truth < way
    raw, calibrated = (np.concatenate([getattr(p, name) for p in parts])[known] for name in ("raw", "calibrated"))
    logits = np.concatenate([p.known_logits for p in parts])
    oracle = fit_temperature(logits, truth[known])  # the best one temperature could do on these very queries
    correct = [(p.calibrated[p.truth < way].argmax(1) == p.truth[p.truth < way]).mean() for p in parts]
    accuracy, ci = confidence_interval(np.array(correct))
    open_set = {}
    for name in STATISTICS:
        if name in parts[0].statistics:
            score = np.concatenate([p.statistics[name] for p in parts])
            open_set[name] = round(auroc(score[known], score[~known]), 4)
    report: dict[str, object] = {
        "checkpoint": checkpoint,
        "bundle": bundle,
        "model_id": model_id,
        "mode": mode,
        "task": (
            f"{episodes} episodes of {way}-way {shot}-shot {query}-query, {unknown} unenrolled classes"
            f" x {query} queries each, seed {seed}"
        ),
        "held_out_classes": held_out.num_classes,
        "temperature": round(temperature, 4),
        "accuracy_pct": round(100 * accuracy, 2),
        "ci95_pct": round(100 * ci, 2),
        "ece_pct_t1": round(100 * expected_calibration_error(raw, truth[known], BINS), 2),
        "ece_pct": round(100 * expected_calibration_error(calibrated, truth[known], BINS), 2),
        "oracle_temperature": round(oracle, 4),
        "ece_pct_oracle": round(100 * expected_calibration_error(predictive(logits, oracle)[0], truth[known], BINS), 2),
        "nll_t1": round(-float(np.concatenate([p.log_likelihood_raw for p in parts]).mean()), 4),
        "nll": round(-float(np.concatenate([p.log_likelihood for p in parts]).mean()), 4),
        "auroc_open_set": open_set,
        "seconds": round(seconds, 1),
    }
    return report, (*reliability(raw, truth[known], BINS), *reliability(calibrated, truth[known], BINS))


def plot(
    name: str, by_shot: dict[int, tuple[np.ndarray, ...]], reports: dict[int, dict[str, object]], out: Path
) -> None:
    """The reliability diagram: per shot count (rows), accuracy and mean confidence per confidence bin
    at temperature 1 and at the device's temperature (columns), against the diagonal of perfect
    calibration, with the share of queries per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(by_shot), 2, figsize=(9, 3.8 * len(by_shot)), squeeze=False)
    centers = (np.arange(BINS) + 0.5) / BINS
    for row, (shot, bins) in zip(axes, by_shot.items(), strict=True):
        report = reports[shot]
        for ax, (counts, accuracy, confidence), (title, ece) in zip(
            row,
            (bins[:3], bins[3:]),
            (("temperature 1", report["ece_pct_t1"]), (f"temperature {report['temperature']}", report["ece_pct"])),
            strict=True,
        ):
            shown = counts > 0
            ax.bar(centers[shown], accuracy[shown], width=1 / BINS, edgecolor="black", label="accuracy")
            ax.scatter(centers[shown], confidence[shown], marker="_", s=250, color="tab:red", label="mean confidence")
            share = ax.twinx()  # where the queries are: most sit in the top bin
            share.step(centers, np.maximum(counts, 0.5) / counts.sum(), where="mid", color="darkorange", linewidth=1.5)
            share.set_yscale("log")
            share.set_ylim(1 / counts.sum() / 2, 1)
            share.set_ylabel("share of queries (orange, log)", fontsize=8)
            ax.plot([0, 1], [0, 1], "k--", linewidth=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="accuracy")
            ax.set_title(f"{shot}-shot, {title}: ECE {ece}%", fontsize=10)
            ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{name}: reliability on held-out classes", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=80)
    plt.close(fig)


def table(reports: list[dict[str, object]]) -> str:
    """The markdown table of the reports, one row per run and shot count."""
    lines = [
        "| model / mode | shots | accuracy % | T | ECE % T=1 | ECE % T | NLL T=1 | NLL T | oracle T | ECE % oracle T | "
        + " | ".join(f"AUROC {s}" for s in STATISTICS)
        + " |",
        "|" + "---|" * (10 + len(STATISTICS)),
    ]
    for r in reports:
        open_set = r["auroc_open_set"]
        assert isinstance(open_set, dict)
        lines.append(
            f"| {r['name']} | {r['shot']} | {r['accuracy_pct']} ± {r['ci95_pct']} | {r['temperature']} | "
            f"{r['ece_pct_t1']} | {r['ece_pct']} | {r['nll_t1']} | {r['nll']} | "
            f"{r['oracle_temperature']} | {r['ece_pct_oracle']} | "
            + " | ".join(str(open_set.get(s, "–")) for s in STATISTICS)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("CHECKPOINT", "BUNDLE", "MODE"))
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shots", default="1", help="comma-separated shot counts, e.g. 1,5")
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--unknown", type=int, default=5, help="unenrolled held-out classes per episode")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the episodes")
    parser.add_argument("--out", type=Path, default=Path("build/calibration"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shots = [int(s) for s in args.shots.split(",")]
    reports = []
    for checkpoint, bundle, mode in args.run:
        name = f"{Path(bundle).name.removesuffix('-bundle')}-{mode}"
        by_shot, per_shot = {}, {}
        for shot in shots:
            report, bins = measure(
                checkpoint, bundle, mode, args.episodes, args.way, shot, args.query, args.unknown, args.seed
            )
            report = {"name": name, "shot": shot, **report}
            by_shot[shot], per_shot[shot] = bins, report
            reports.append(report)
            print(json.dumps(report), flush=True)
        (args.out / f"{name}.json").write_text(json.dumps(list(per_shot.values()), indent=2) + "\n")
        plot(name, by_shot, per_shot, args.out)
    print(table(reports))


if __name__ == "__main__":
    main()
