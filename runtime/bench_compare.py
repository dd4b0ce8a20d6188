"""Side-by-side benchmarks: the bundle's encoder precisions, and its adaptation modes.

``compare_precisions``: per precision (fp32 and each variant the bundle has), one-image prediction
latency, the encoder alone on one image, encoder throughput on a batch and its ratio to fp32's, with
the accuracy export measured for that precision on the same validation episodes (from the manifest).

``compare_modes``: per adaptation mode, with ``MODES_N_WAY`` classes x ``K_SHOT`` shots enrolled, the refit
time after an enrollment change (``FewShotModel.refit``, which fits the adapter to the stored shots) and the
one-image prediction latency in that mode. Latencies in milliseconds, throughputs in images per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .bench import K_SHOT, N_WAY, enroll_random, machine, rate, source_images, time_calls
from .bundle import open_bundle
from .errors import FewShotInputError
from .model import FewShotModel
from .preprocess import preprocess

MODES_N_WAY = 20  # classes enrolled to time each adaptation mode
ACCURACY_FIELDS = ("accuracy", "ci95", "delta", "delta_ci95")


def compare_precisions(
    bundle: str | Path, runs: int = 1000, batch: int = 256, seconds: float = 2.0, **opened: Any
) -> dict[str, Any]:
    """Figures per precision (see the module docstring) as a JSON-ready dict; ``opened`` are further
    ``FewShotModel.open`` arguments (threads, backend, providers, engines)."""
    opened_bundle = open_bundle(bundle)
    manifest, variants = opened_bundle.manifest, opened_bundle.manifest.variants
    rows: dict[str, dict[str, Any]] = {}
    for precision in opened_bundle.precisions:
        with FewShotModel.open(bundle, precision=precision, **opened) as model:
            enroll_random(model, N_WAY, K_SHOT)
            one = source_images(model.spec, 1)
            encoder_one, encoder_batch = (
                preprocess(one, model.spec),
                preprocess(source_images(model.spec, batch, seed=7), model.spec),
            )
            rows[precision] = {
                "providers": model.engine.providers,
                "predict": time_calls(partial(model.predict, one), runs),
                "encoder": time_calls(partial(model.engine.embed, encoder_one), runs),
                "encoder_images_per_s": rate(partial(model.engine.embed, encoder_batch), batch, seconds),
                **{k: variants.get(precision, {}).get(k) for k in ACCURACY_FIELDS},
            }
    for row in rows.values():
        row["throughput_vs_fp32"] = row["encoder_images_per_s"] / rows["fp32"]["encoder_images_per_s"]
    return {
        "bundle": str(bundle),
        "model_id": manifest.model_id,
        "machine": machine(),
        "threads": opened.get("threads"),
        "batch": batch,
        "accuracy_on": variants.get("fp32", {}).get("episodes"),
        "precisions": rows,
    }


def compare_modes(
    bundle: str | Path, modes: Sequence[str], runs: int = 1000, refits: int = 20, **opened: Any
) -> dict[str, Any]:
    """Figures per adaptation mode, prototype first when the bundle has it (see the module docstring), as a JSON-ready dict;
    ``opened`` as ``compare_precisions``'s (precision too). A mode the bundle does not list is a
    FewShotInputError before anything runs."""
    listed = open_bundle(bundle).manifest.adaptation.modes
    missing = [m for m in modes if m not in listed]
    if missing:
        raise FewShotInputError(
            f"bundle does not support adaptation mode {missing[0]!r} (it supports: {', '.join(listed)})"
        )
    rows: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys([*(["prototype"] if "prototype" in listed else []), *modes]):
        with FewShotModel.open(bundle, adapt=mode, **opened) as model:
            enroll_random(model, MODES_N_WAY, K_SHOT)
            one = source_images(model.spec, 1)
            rows[mode] = {
                "refit": time_calls(model.refit, refits, warmup=1),
                "predict": time_calls(partial(model.predict, one), runs),
            }
    return {
        "bundle": str(bundle),
        "machine": machine(),
        "threads": opened.get("threads"),
        "precision": opened.get("precision", "fp32"),
        "enrolled": f"{MODES_N_WAY} classes x {K_SHOT} shots",
        "modes": rows,
    }
