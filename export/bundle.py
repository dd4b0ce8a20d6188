"""``export_bundle``: checkpoint -> ONNX graphs -> draft bundle -> parity -> calibration -> bundle, atomically.

The graphs are first written as an uncalibrated draft bundle that the runtime opens (checking its
hashes) and runs through its own adapter of the bundle's default mode (``export_draft``): parity,
calibration and precision variants are measured on exactly what the device runs.

A FiLM method's bundle holds two graphs: ``context.onnx`` (role "context", support images -> FiLM)
and ``encoder.onnx`` (role "encoder", images and FiLM -> embeddings); its default adaptation is "film".
``precisions`` ("fp16", "int8") add precision variants of the encoder, measured against fp32 (see ``variants``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from fewshot_edge import __version__
from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.methods import FewShotMethod
from fewshot_edge.runtime import (
    ADAPTERS,
    Adaptation,
    Adapter,
    Bundle,
    EmbeddingSpec,
    Engine,
    FewShotInputError,
    open_bundle,
    write_bundle,
)
from fewshot_edge.runtime.preprocess import InputSpec

from .calibration import calibrate
from .onnx import FILM_NAME, INPUT_NAME, export_context_onnx, export_onnx, has_film
from .parity import ParityError, ParityReport, check_parity
from .variants import VARIANTS, build_variants, variant_file

ENCODER_FILE = "encoder.onnx"
CONTEXT_FILE = "context.onnx"
PARITY_IMAGES = 64


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    calibration_episodes: int = 500,
    target_false_reject: float = 0.05,
    tolerance: float = 1e-4,
    seed: int = 0,
    precisions: Sequence[str] = (),
    variant_episodes: int = 1000,
    force_variants: bool = False,
) -> Bundle:
    """Export a checkpoint as a bundle in ``out_dir`` and return it, opened.

    The graphs are checked against PyTorch on random and held-out validation images (ParityError past
    ``tolerance``), calibrated on ``calibration_episodes`` validation episode pairs, then written with
    ``write_bundle`` (a temporary folder renamed into place): any failure leaves no bundle behind.
    An existing ``out_dir`` is refused unless ``overwrite``. Each of ``precisions`` adds a variant
    measured on ``variant_episodes`` validation episodes; one past its limits raises VariantRefused
    (nothing written) unless ``force_variants``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FewShotInputError(f"bundle folder already exists: {out} (overwrite to replace it)")
    unknown = [p for p in precisions if p not in VARIANTS]
    if unknown:
        raise FewShotInputError(f"precision variants must be among {', '.join(VARIANTS)}, got {', '.join(unknown)}")
    method, config, spec, payload = load_checkpoint(checkpoint)
    train_data, validation = load_splits(config)
    with tempfile.TemporaryDirectory(prefix="fewshot-edge-export-") as tmp:
        adapter = export_draft(method, spec, Path(tmp))
        draft = adapter.bundle
        real = np.random.default_rng(seed).choice(len(validation), min(PARITY_IMAGES, len(validation)), replace=False)
        parity = check_parity(method, adapter, spec, validation.images[np.sort(real)], tolerance=tolerance, seed=seed)
        if not parity.passed:
            raise ParityError(parity)
        calibration, head_temperature = calibrate(
            adapter, validation, episodes=calibration_episodes, target_false_reject=target_false_reject, seed=seed
        )
        adaptation = draft.manifest.adaptation
        if head_temperature is not None:
            adaptation = replace(
                adaptation,
                modes={
                    **adaptation.modes,
                    "finetune": {**adaptation.modes["finetune"], "temperature": head_temperature},
                },
            )
        variants = (
            build_variants(
                adapter, precisions, train_data, validation, episodes=variant_episodes, seed=seed, force=force_variants
            )
            if precisions
            else {}
        )
        files = [*draft.manifest.files, *(variant_file(p) for p in precisions)]
        provenance = _provenance(config, payload, Path(checkpoint), parity, draft.manifest.provenance["opset"])
        return write_bundle(
            out,
            {name: draft.path / name for name in files},
            input_spec=spec,
            embedding=draft.manifest.embedding,
            adaptation=adaptation,
            calibration=calibration,
            provenance=provenance,
            overwrite=overwrite,
            variants=variants,
        )


def export_draft(method: FewShotMethod, spec: InputSpec, folder: Path) -> Adapter:
    """Write ``method``'s graphs into ``folder`` as an uncalibrated bundle (``folder / "draft"``), open it
    with the runtime (hashes checked) and return the runtime adapter of its default mode over its fp32
    encoder: what export measures through it is what a device runs."""
    info = method.export_info()
    embedding = EmbeddingSpec(size=method.backbone.out_dim, metric=info["metric"], scale=info["scale"])
    files = {ENCODER_FILE: folder / ENCODER_FILE}
    if has_film(method):
        files[CONTEXT_FILE] = folder / CONTEXT_FILE
        export_context_onnx(method, spec, files[CONTEXT_FILE])
    opset = export_onnx(method, spec, files[ENCODER_FILE], film=has_film(method)).opset_import[0].version
    adaptation = _adaptation(method, info)
    write_bundle(
        folder / "draft",
        files,
        input_spec=spec,
        embedding=embedding,
        adaptation=adaptation,
        provenance={"opset": opset},
    )
    bundle = open_bundle(folder / "draft")
    return ADAPTERS[adaptation.default](bundle, Engine(bundle.encoder_file()))


def _adaptation(method: FewShotMethod, info: dict[str, Any]) -> Adaptation:
    """The method's modes and default (its first mode). A FiLM method's film mode also records the
    graphs' FiLM size, input names and identity FiLM; its prototype mode runs the encoder under that
    identity (the unconditioned backbone, no context)."""
    if has_film(method):
        film = {
            **info["modes"]["film"],
            "film_size": int(method.context.identity.numel()),
            "context_input": INPUT_NAME,
            "film_input": FILM_NAME,
            "identity": method.context.identity.tolist(),
        }
        return Adaptation(default="film", modes={**info["modes"], "film": film, "prototype": {}})
    return Adaptation(default=next(iter(info["modes"])), modes=info["modes"])


def _provenance(
    config: TrainConfig, payload: dict[str, Any], checkpoint: Path, parity: ParityReport, opset: int
) -> dict[str, Any]:
    """What the manifest records about where the model came from; data sources by file name only."""
    best = payload.get("best") or {}
    return {
        "method": config.method,
        "method_options": dict(config.method_options),
        "backbone": config.backbone,
        "data": {
            "kind": config.data,
            "sources": [Path(s).name for s in config.sources],
            "val_sources": [Path(s).name for s in config.val_sources],
            "holdout": list(config.holdout_groups) or config.holdout,
            "options": dict(config.data_options),
        },
        "checkpoint": checkpoint.name,
        "episodes_trained": payload.get("episode"),
        "validation": {
            key: best[key]
            for key in ("accuracy", "ci95", "n_way", "k_shot", "q_query", "episodes", "episode")
            if key in best
        }
        or None,
        "parity": parity.to_dict(),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "opset": opset,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
