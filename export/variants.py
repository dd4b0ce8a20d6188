"""Precision variants of the exported encoder, each measured against fp32 before it may ship.

- fp16: onnxruntime's float16 converter (``convert_float_to_float16``, ``keep_io_types``), so inputs and
  outputs stay float32 and the runtime feeds it like the fp32 encoder.
- int8: static QDQ quantization (``onnxruntime.quantization.quantize_static``) after
  ``quant_pre_process``; per-channel int8 weights, int8 activations, min-max ranges calibrated on
  normalised images of the checkpoint's own training split (a FiLM encoder's film input calibrated
  with the runtime context of each calibration batch). The stem stays float (``float_stem``): a convolution
  reading the image has 1 or 3 input channels, where onnxruntime's int8 kernels are slower than float
  ones (Conv-4 on 28x28: 5.5 ms vs 2.2 ms of a batch of 256). It only pays with onnxruntime's QDQ
  propagation off, which would move the first QuantizeLinear above the float max-pool and run that as a
  slow int8 NCHW pool, so the manifest entry names that optimizer in ``disabled_optimizers`` and the
  runtime opens the variant without it.

int8 is not offered for attention models (``check_precisions``: a graph whose Softmax reads a product of two
activations, as a ViT's self-attention): int8 ViTs often run slower than fp16 on TensorRT
(NVIDIA/TensorRT#4273), so they get fp16 unless forced.

``build_variants`` embeds the same 5-way 1-shot validation episodes with the runtime adapter over the
fp32 encoder and over each variant, and records per precision: accuracy with its 95% CI, the paired
delta vs fp32 with its CI, and the embeddings' parity (largest absolute and relative difference). A variant that loses more than
``MAX_ACCURACY_LOSS`` or exceeds its parity tolerance is refused (``VariantRefused``) unless forced.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.runtime import Adapter, EmbeddingSpec, Engine, FewShotInputError
from fewshot_edge.runtime.adapters import FilmAdapter, distances
from fewshot_edge.runtime.bundle import encoder_role
from fewshot_edge.runtime.preprocess import normalize
from fewshot_edge.runtime.stats import confidence_interval

from .calibration import episode_embedder
from .onnx import FILM_NAME, INPUT_NAME

VARIANTS = ("fp16", "int8")
MAX_ACCURACY_LOSS = 0.01  # 1 percentage point of 5-way 1-shot accuracy
PARITY_TOLERANCE = {"fp16": 0.01, "int8": 0.25}  # largest |variant - fp32| / |fp32| of one embedding
DISABLED_OPTIMIZERS = {"int8": ["QDQPropagationTransformer"]}  # see the module docstring
N_WAY, K_SHOT, Q_QUERY = 5, 1, 15
CALIBRATION_IMAGES, CALIBRATION_BATCH = 512, 32
_BETWEEN_SCORES_AND_SOFTMAX = ("Mul", "Div", "Add", "Sub", "Where", "Cast")  # scale, mask, bias, dtype


class VariantRefused(FewShotInputError):
    """A precision variant lost too much accuracy or parity against fp32; no bundle is written."""


def variant_file(precision: str) -> str:
    """The bundle file name of a variant: ``encoder.<precision>.onnx`` (role ``encoder.<precision>``)."""
    return f"{encoder_role(precision)}.onnx"


def to_fp16(source: Path, dest: Path) -> dict[str, Any]:
    """Write the float16 encoder (float32 inputs and outputs) to ``dest``; returns how it was made."""
    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(dest))
    return {"converter": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def attention_softmaxes(model: onnx.ModelProto) -> list[str]:
    """Names of the Softmax nodes over a MatMul of two activations (neither a weight), reached through
    the scaling, masking and casts between them: the graph's self-attention."""
    constants = {i.name for i in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    constants |= {name for name, node in producers.items() if node.op_type == "Constant"}

    def reads_product(name: str) -> bool:
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type == "MatMul":
            return not any(i in constants for i in node.input)
        return node.op_type in _BETWEEN_SCORES_AND_SOFTMAX and any(reads_product(i) for i in node.input)

    return [node.name for node in model.graph.node if node.op_type == "Softmax" and reads_product(node.input[0])]


def check_precisions(encoder: Path, precisions: Sequence[str], force: bool = False) -> None:
    """Refuse int8 for an attention encoder unless ``force`` (see the module docstring)."""
    if "int8" not in precisions or force:
        return
    attention = attention_softmaxes(onnx.load(str(encoder)))
    if attention:
        raise VariantRefused(
            f"int8 is not offered for attention models ({len(attention)} attention softmaxes in this encoder):"
            " int8 ViTs often run slower than fp16 on TensorRT (NVIDIA/TensorRT#4273); export --fp16 instead,"
            " or force int8 with --force-variant"
        )


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def float_stem(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes the int8 encoder keeps float: the convolutions that read the images input and
    the nodes after them up to (not including) the next Conv, MatMul or Gemm; none without such a convolution."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stem = [node for node in consumers.get(INPUT_NAME, []) if node.op_type == "Conv"]
    frontier = [output for node in stem for output in node.output]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node not in stem and node.op_type not in ("Conv", "MatMul", "Gemm"):
                stem.append(node)
                frontier.extend(node.output)
    return [node.name for node in stem]


def to_int8(source: Path, dest: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Write the QDQ int8 encoder, calibrated on ``feeds`` (input name -> float32 batch), to ``dest``."""
    options = {
        "per_channel": True,
        "activation_type": QuantType.QInt8,
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
    }
    with tempfile.TemporaryDirectory(prefix="fewshot-edge-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        stem = float_stem(onnx.load(str(prepared)))
        quantize_static(
            str(prepared), str(dest), _Feeds(feeds), quant_format=QuantFormat.QDQ, nodes_to_exclude=stem, **options
        )
    return {
        "tool": "onnxruntime.quantization.quantize_static after quant_pre_process",
        "format": "QDQ",
        **{k: str(v).rsplit(".", 1)[-1] if not isinstance(v, bool) else v for k, v in options.items()},
        "float_nodes": stem,
        "calibration_images": sum(len(f[INPUT_NAME]) for f in feeds),
    }


def calibration_feeds(
    adapter: Adapter,
    train: FewShotDataset,
    images: int = CALIBRATION_IMAGES,
    batch: int = CALIBRATION_BATCH,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Batches of normalised training images as the encoder takes them (with each batch's FiLM, from the
    adapter's context engine, for a FiLM encoder)."""
    ids = np.sort(np.random.default_rng(seed).choice(len(train), min(images, len(train)), replace=False))
    feeds = []
    for i in range(0, len(ids), batch):
        x = normalize(train.images[ids[i : i + batch]], train.spec)
        feeds.append(
            {INPUT_NAME: x, **({FILM_NAME: adapter.context.run(x)} if isinstance(adapter, FilmAdapter) else {})}
        )
    return feeds


def build_variants(
    adapter: Adapter,
    precisions: Sequence[str],
    train: FewShotDataset,
    validation: FewShotDataset,
    episodes: int = 1000,
    seed: int = 0,
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write each variant of the fp32 encoder of ``adapter``'s bundle beside it (``variant_file``) and
    measure it through the same adapter class over the variant's engine; returns the manifest's
    ``variants`` mapping (fp32's accuracy first). Raises VariantRefused unless ``force``."""
    source = adapter.bundle.encoder_file()
    sampler = EpisodeSampler(validation, N_WAY, K_SHOT, Q_QUERY, seed=seed)
    index = np.stack([sampler.sample().index.cpu().numpy() for _ in range(episodes)])  # (E, n, k + q)
    described = (
        f"{episodes} {N_WAY}-way {K_SHOT}-shot validation episodes ({Q_QUERY} queries per class, seed {seed})"
        f" on {validation.num_classes} held-out classes"
    )
    reference = _embed_all(adapter, validation, index)
    base = _accuracies(reference, adapter.embedding)
    accuracy, ci95 = confidence_interval(base)
    variants: dict[str, dict[str, Any]] = {
        "fp32": {"role": "encoder", "accuracy": accuracy, "ci95": ci95, "episodes": described}
    }
    for precision in precisions:
        path = source.with_name(variant_file(precision))
        method = (
            to_fp16(source, path)
            if precision == "fp16"
            else to_int8(source, path, calibration_feeds(adapter, train, seed=seed))
        )
        disabled = DISABLED_OPTIMIZERS.get(precision, [])
        variant = type(adapter)(adapter.bundle, Engine(path, disabled_optimizers=disabled))
        embedded = _embed_all(variant, validation, index)
        accuracies = _accuracies(embedded, adapter.embedding)
        entry = {
            "role": encoder_role(precision),
            **dict(zip(("accuracy", "ci95"), confidence_interval(accuracies), strict=True)),
            **dict(zip(("delta", "delta_ci95"), confidence_interval(accuracies - base), strict=True)),
            "parity": _parity(reference, embedded, PARITY_TOLERANCE[precision]),
            "episodes": described,
            "method": method,
            **({"disabled_optimizers": disabled} if disabled else {}),
        }
        if not force:
            _check(precision, entry, accuracy)
        variants[precision] = entry
    return variants


def _embed_all(adapter: Adapter, data: FewShotDataset, index: np.ndarray) -> np.ndarray:
    """Embeddings (E, n, k + q, D) of every episode in ``index`` (E, n, k + q)."""
    embed = episode_embedder(adapter, data, index)
    return np.stack([embed(ids, K_SHOT) for ids in index]).astype(np.float64)


def _accuracies(embedded: np.ndarray, embedding: EmbeddingSpec) -> np.ndarray:
    """Per-episode prototype accuracy of the embedded episodes (E, n, k + q, D)."""
    labels = np.repeat(np.arange(N_WAY), Q_QUERY)
    return np.array(
        [
            (
                distances(e[:, K_SHOT:].reshape(-1, e.shape[-1]), e[:, :K_SHOT].mean(1), embedding.metric).argmin(1)
                == labels
            ).mean()
            for e in embedded
        ]
    )


def _parity(reference: np.ndarray, embedded: np.ndarray, tolerance: float) -> dict[str, float]:
    diff = embedded - reference
    relative = np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(reference, axis=-1), 1e-12)
    return {"max_abs_diff": float(np.abs(diff).max()), "max_rel_diff": float(relative.max()), "tolerance": tolerance}


def _check(precision: str, entry: dict[str, Any], fp32_accuracy: float) -> None:
    """Refuse a variant past the accuracy-loss limit or its parity tolerance."""
    parity = entry["parity"]
    if -entry["delta"] > MAX_ACCURACY_LOSS:
        raise VariantRefused(
            f"{precision} encoder loses {100 * -entry['delta']:.2f} points of {N_WAY}-way {K_SHOT}-shot accuracy"
            f" ({100 * entry['accuracy']:.2f}% vs fp32 {100 * fp32_accuracy:.2f}%), more than {100 * MAX_ACCURACY_LOSS:g};"
            " no bundle written (force it with --force-variant)"
        )
    if parity["max_rel_diff"] > parity["tolerance"]:
        raise VariantRefused(
            f"{precision} encoder's embeddings differ from fp32's by up to {100 * parity['max_rel_diff']:.1f}%"
            f" (tolerance {100 * parity['tolerance']:g}%); no bundle written (force it with --force-variant)"
        )
