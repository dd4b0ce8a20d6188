"""``export_bundle``: a source -> ONNX graphs -> draft bundle -> parity -> calibration -> bundle, atomically.

The source is a training checkpoint (its method, and its run's held-out validation classes to check and
calibrate on), or a ``FrozenBackbone``: a pretrained timm backbone under prototypes, calibrated on a
class-per-folder image set, with no meta-training. Both take the one path below.

The graphs are first written as an uncalibrated draft bundle that the runtime opens (checking its
hashes) and runs through its own adapter of the bundle's default mode (``export_draft``): parity,
calibration and precision variants are measured on exactly what the device runs.

Every bundle holds ``encoder.onnx`` (role "encoder") and one ``<role>.onnx`` per graph the method
declares in ``export_graphs`` (see ``onnx.py``), each checked for parity. A FiLM method declares
``context.onnx`` (role "context", support images -> FiLM); its encoder takes images and FiLM, and its
default adaptation is "film".
``precisions`` ("fp16", "int8") add precision variants of the encoder, measured against fp32 (see ``variants``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
from fewshot_edge.data import load_dataset
from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.data.splits import load_splits
from fewshot_edge.methods import FewShotMethod, create_method
from fewshot_edge.models import create_backbone, timm_input_spec, timm_model_name
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
from fewshot_edge.runtime.signing import SigningKey, load_signing_key

from .calibration import calibrate, episode_sizes
from .onnx import FILM_NAME, INPUT_NAME, export_graph, export_onnx, graph_roles, has_film
from .parity import ParityError, check_parity
from .variants import VARIANTS, build_variants, check_precisions, variant_file

ENCODER_FILE = "encoder.onnx"
PARITY_IMAGES = 64


@dataclass
class ExportSource:
    """What a bundle is made from: the method (in eval mode) and its input spec, held-out classes to check
    parity on and calibrate with, training images (int8 activation ranges), and provenance."""

    method: FewShotMethod
    spec: InputSpec
    validation: FewShotDataset
    train: FewShotDataset
    provenance: dict[str, Any]


@dataclass(frozen=True)
class FrozenBackbone:
    """A bundle without meta-training: prototypes over a timm backbone's embeddings (``timm:NAME``, its
    weights from the file ``weights`` or, with ``pretrained``, timm's hub), calibrated on the classes of
    ``calibration_data`` (class-per-folder images, folders or zips). The input spec is the model's
    pretrained config's, at ``image_size`` when given.

    The calibration images are loaded by the ``folders`` loader at the spec's size, mean and std (whole
    images, box filter: the loader does not take the spec's crop and interpolation yet)."""

    backbone: str
    calibration_data: str | Path | Sequence[str | Path]
    weights: str | Path | None = None
    pretrained: bool = False
    image_size: int | None = None
    metric: str = "sqeuclidean"

    def load(self) -> ExportSource:
        model = timm_model_name(self.backbone)
        if model is None:
            raise FewShotInputError(f"a bundle without a checkpoint needs a timm:NAME backbone, got {self.backbone!r}")
        if self.weights is None and not self.pretrained:
            raise FewShotInputError(f"{self.backbone} needs trained weights: give --weights FILE or --pretrained")
        spec = timm_input_spec(model, image_size=self.image_size)
        sources = (
            [self.calibration_data] if isinstance(self.calibration_data, (str, Path)) else list(self.calibration_data)
        )
        fit = {"resize": spec.resize, "crop_mode": spec.crop_mode, "crop_pct": spec.crop_pct}
        data = load_dataset(
            "folders", sources, size=spec.height, channels=spec.channels, mean=spec.mean, std=spec.std, **fit
        )
        backbone = create_backbone(
            self.backbone, spec.channels, spec.height, weights=self.weights, pretrained=self.pretrained
        )
        method = create_method("protonet", backbone, metric=self.metric).eval()
        provenance = {
            "method": "protonet",
            "method_options": {"metric": self.metric},
            "backbone": self.backbone,
            "weights": _weights_provenance(self.weights, self.pretrained),
            "data": {"kind": "folders", "sources": [Path(s).name for s in sources], "classes": data.num_classes},
            "checkpoint": None,
            "episodes_trained": 0,
            "validation": None,
        }
        return ExportSource(method, spec, data, data, provenance)


def checkpoint_source(checkpoint: str | Path) -> ExportSource:
    """A training checkpoint's method and spec, with its run's training and held-out validation classes."""
    method, config, spec, payload = load_checkpoint(checkpoint)
    train_data, validation = load_splits(config)
    return ExportSource(method, spec, validation, train_data, _provenance(config, payload, Path(checkpoint)))


def export_bundle(
    source: str | Path | FrozenBackbone,
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
    sign: str | Path | SigningKey | None = None,
) -> Bundle:
    """Export a checkpoint (a path) or a ``FrozenBackbone`` as a bundle in ``out_dir`` and return it, opened.

    The graphs are checked against PyTorch on random and held-out images (ParityError past
    ``tolerance``), calibrated on ``calibration_episodes`` held-out episode pairs (smaller episodes when
    the held-out set is small, see ``episode_sizes``), then written with ``write_bundle`` (a temporary
    folder renamed into place): any failure leaves no bundle behind. An existing ``out_dir`` is refused
    unless ``overwrite``. Each of ``precisions`` adds a variant measured on ``variant_episodes``
    validation episodes; one past its limits, or int8 for an attention model (see ``check_precisions``),
    raises VariantRefused (nothing written) unless ``force_variants``. ``sign`` (an Ed25519 private key,
    a PEM file or a loaded ``SigningKey``) signs the manifest; it is loaded first, so a bad key fails
    before any work.
    """
    signing_key = load_signing_key(sign) if sign is not None else None
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FewShotInputError(f"bundle folder already exists: {out} (overwrite to replace it)")
    unknown = [p for p in precisions if p not in VARIANTS]
    if unknown:
        raise FewShotInputError(f"precision variants must be among {', '.join(VARIANTS)}, got {', '.join(unknown)}")
    loaded = source.load() if isinstance(source, FrozenBackbone) else checkpoint_source(source)
    method, spec, validation = loaded.method, loaded.spec, loaded.validation
    n_way, max_shot, q_query = episode_sizes(validation)
    with tempfile.TemporaryDirectory(prefix="fewshot-edge-export-") as tmp:
        adapter = export_draft(method, spec, Path(tmp))
        draft = adapter.bundle
        check_precisions(draft.encoder_file(), precisions, force=force_variants)
        real = np.random.default_rng(seed).choice(len(validation), min(PARITY_IMAGES, len(validation)), replace=False)
        parity = check_parity(method, adapter, spec, validation.images[np.sort(real)], tolerance=tolerance, seed=seed)
        if not parity.passed:
            raise ParityError(parity)
        calibration, head = calibrate(
            adapter,
            validation,
            episodes=calibration_episodes,
            n_way=n_way,
            max_shot=max_shot,
            q_query=q_query,
            target_false_reject=target_false_reject,
            seed=seed,
        )
        adaptation = draft.manifest.adaptation
        if head is not None:
            temperatures = {k: v for k, v in head.to_dict().items() if k != "open_set"}
            adaptation = replace(
                adaptation,
                modes={**adaptation.modes, "finetune": {**adaptation.modes["finetune"], **temperatures}},
            )
        variants = (
            build_variants(
                adapter,
                precisions,
                loaded.train,
                validation,
                episodes=variant_episodes,
                seed=seed,
                force=force_variants,
            )
            if precisions
            else {}
        )
        files = [*draft.manifest.files, *(variant_file(p) for p in precisions)]
        return write_bundle(
            out,
            {name: draft.path / name for name in files},
            input_spec=spec,
            embedding=draft.manifest.embedding,
            adaptation=adaptation,
            calibration=calibration,
            provenance={
                **loaded.provenance,
                "parity": parity.to_dict(),
                "package_version": __version__,
                "torch_version": torch.__version__,
                "onnx_version": onnx.__version__,
                "onnxruntime_version": onnxruntime.__version__,
                "opset": draft.manifest.provenance["opset"],
                "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
            overwrite=overwrite,
            variants=variants,
            signing_key=signing_key,
        )


def export_draft(method: FewShotMethod, spec: InputSpec, folder: Path) -> Adapter:
    """Write ``method``'s graphs (the encoder and each one it declares, with its role) into ``folder`` as an
    uncalibrated bundle (``folder / "draft"``), open it with the runtime (hashes checked) and return the
    runtime adapter of its default mode over its fp32 encoder: what export measures through it is what a
    device runs."""
    info = method.export_info()
    files = {ENCODER_FILE: folder / ENCODER_FILE}
    for role in graph_roles(method):
        files[f"{role}.onnx"] = folder / f"{role}.onnx"
        export_graph(method, role, spec, files[f"{role}.onnx"])
    encoder = export_onnx(method, spec, files[ENCODER_FILE], film=has_film(method))
    opset = encoder.opset_import[0].version
    # what the encoder outputs (a relation method's flattened feature maps), else the backbone's width
    size = encoder.graph.output[0].type.tensor_type.shape.dim[1].dim_value or method.backbone.out_dim
    embedding = EmbeddingSpec(size=size, metric=info["metric"], scale=info["scale"])
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


def _provenance(config: TrainConfig, payload: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """What the manifest records about where a checkpoint's model came from; data sources by file name only."""
    best = payload.get("best") or {}
    return {
        "method": config.method,
        "method_options": dict(config.method_options),
        "backbone": config.backbone,
        "weights": _weights_provenance(config.weights, config.pretrained),
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
    }


def _weights_provenance(weights: str | Path | None, pretrained: bool) -> str | None:
    """The backbone's starting weights: a file by name, or timm's hub."""
    if weights is not None:
        return Path(weights).name
    return "timm hub" if pretrained else None
