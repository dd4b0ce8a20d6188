"""TensorRT engines for the encoder: build (on the target device), cache, and run.

``tensorrt`` (TensorRT 10 Python API) and CUDA bindings (cuda-python's ``cudart``) are imported only
when an engine is built or run. An engine is cached as ``encoder-<precision>-<key>.engine`` with a JSON
sidecar holding its ``EngineKey`` (model id, TensorRT version, GPU name and compute capability,
precision, batch profile) and its sha256; an engine whose sidecar does not match the key asked for
(stale, foreign or corrupt) is rebuilt, never loaded.

Sources: fp32 and fp16 engines are built from the fp32 ONNX encoder (fp16 with ``BuilderFlag.FP16``,
TensorRT choosing per layer), int8 from the bundle's QDQ ``encoder.int8`` (explicit quantization).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, sha256_file
from .engine import Engine
from .errors import FewShotInputError

WORKSPACE_BYTES = 1 << 30
log = logging.getLogger("fewshot_edge.runtime")


@dataclass(frozen=True)
class Profile:
    """The optimisation profile of the batch dimension: min <= opt <= max."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise FewShotInputError(
                f"batch profile needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine is only valid for; a change in any field means a rebuild."""

    model_id: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: Profile

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()

    @property
    def file_name(self) -> str:
        return f"encoder-{self.precision}-{self.digest()[:16]}.engine"


Builder = Callable[[Path, str, Profile], bytes]


def engine_source(bundle: Bundle, precision: str) -> Path:
    """The ONNX file an engine of ``precision`` is built from: the QDQ encoder for int8, else fp32's."""
    return bundle.encoder_file("int8" if precision == "int8" else "fp32")


def cached_engine(source: Path, key: EngineKey, cache: Path, build: Builder | None = None) -> tuple[Path, bool]:
    """(engine path, whether it was built now): the cached engine for ``key`` when its sidecar matches
    the key and its hash, else one built from ``source`` with ``build`` (default ``build_engine``)."""
    path = cache / key.file_name
    sidecar = path.with_suffix(".json")
    if engine_matches(path, sidecar, key):
        return path, False
    serialized = (build or build_engine)(source, key.precision, key.profile)
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, serialized)
    _write_atomically(
        sidecar, (json.dumps({"key": key.to_dict(), "sha256": sha256_file(path)}, indent=2) + "\n").encode("utf-8")
    )
    return path, True


def engine_matches(path: Path, sidecar: Path, key: EngineKey) -> bool:
    """Whether ``path`` is an engine built for exactly ``key`` (its sidecar says so and its hash agrees)."""
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("key") == json.loads(json.dumps(key.to_dict()))
        and meta.get("sha256") == sha256_file(path)
    )


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _modules() -> tuple[Any, Any]:
    """(tensorrt, cudart); a missing one is a FewShotInputError naming what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise FewShotInputError(
            "TensorRT engines need the tensorrt Python package (JetPack's python3-libnvinfer, "
            "or pip install 'fewshot-edge[tensorrt]')"
        ) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise FewShotInputError("TensorRT engines need CUDA bindings: pip install cuda-python") from None
    return trt, cudart


def _cuda(result: Any) -> Any:
    """The value of a cudart call's (error, value...) tuple; an error raises RuntimeError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def device_fields() -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability "major.minor") of GPU 0."""
    trt, cudart = _modules()
    props = _cuda(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
    return trt.__version__, name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


def engine_key(bundle: Bundle, precision: str, profile: Profile) -> EngineKey:
    """The key of this bundle's engine on this machine."""
    version, gpu, capability = device_fields()
    return EngineKey(bundle.model_id, version, gpu, capability, precision, profile)


def open_engine(
    bundle: Bundle,
    precision: str,
    cache: Path,
    providers: Sequence[str],
    threads: int | None = None,
    film_input: str = "film",
    profile: Profile = Profile(),
) -> TensorRTEngine:
    """The bundle's engine for ``precision`` on this GPU, from the cache or built now (logged)."""
    path, built = cached_engine(engine_source(bundle, precision), engine_key(bundle, precision, profile), cache)
    if built:
        log.info("fewshot-edge: built TensorRT engine %s", path)
    return TensorRTEngine(path, providers, threads, film_input)


def build_engine(source: Path, precision: str, profile: Profile) -> bytes:
    """A serialized TensorRT engine of the ONNX encoder ``source``, its batch dimension under ``profile``."""
    trt, _ = _modules()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(source).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FewShotInputError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    shapes = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if dims and dims[0] == -1:  # the images' batch dimension; the FiLM vector is static
            shapes.set_shape(tensor.name, (profile.min, *dims[1:]), (profile.opt, *dims[1:]), (profile.max, *dims[1:]))
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {source} ({precision})")
    return bytes(serialized)


class TensorRTEngine(Engine):
    """A serialized TensorRT engine behind ``Engine``'s interface (``embed``, chunked by the profile's
    max batch). Device buffers are allocated once, for the largest batch."""

    def __init__(
        self,
        engine_path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        film_input: str = "film",
    ) -> None:
        trt, self._cudart = _modules()
        self.path, self.providers, self.threads = Path(engine_path), list(providers), threads
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise FewShotInputError(
                f"cannot load TensorRT engine {engine_path} (built by another TensorRT or for another GPU?)"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if n not in inputs][:1]
        self._film_name = film_input if film_input in inputs and len(inputs) == 2 else None
        self._input_name = next(n for n in inputs if n != self._film_name)
        self.input_shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(self._input_name))
        self.film_size = int(self._engine.get_tensor_shape(self._film_name)[0]) if self._film_name else None
        self._fixed_batch = None
        self.max_batch = int(self._engine.get_tensor_profile_shape(self._input_name, 0)[2][0])
        self._stream = _cuda(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, Any]] = {}  # tensor name -> (device pointer, numpy dtype)
        self._context.set_input_shape(self._input_name, (self.max_batch, *self.input_shape[1:]))
        if self._film_name:
            self._context.set_input_shape(self._film_name, (self.film_size,))
        for name in names:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            size = int(np.prod(tuple(self._context.get_tensor_shape(name)))) * dtype.itemsize
            self._buffers[name] = (_cuda(self._cudart.cudaMalloc(size)), dtype)
            self._context.set_tensor_address(name, int(self._buffers[name][0]))

    def _run(self, batch: np.ndarray, film: np.ndarray | None) -> np.ndarray:
        cudart, copy = self._cudart, self._cudart.cudaMemcpyKind
        feed = {self._input_name: batch, **({self._film_name: film} if film is not None else {})}
        arrays = {
            name: np.ascontiguousarray(a, dtype=self._buffers[name][1]) for name, a in feed.items()
        }  # alive until the sync
        for name, array in arrays.items():
            self._context.set_input_shape(name, array.shape)
            _cuda(
                cudart.cudaMemcpyAsync(
                    self._buffers[name][0], array.ctypes.data, array.nbytes, copy.cudaMemcpyHostToDevice, self._stream
                )
            )
        output = self._output_names[0]
        out = np.empty(tuple(self._context.get_tensor_shape(output)), dtype=self._buffers[output][1])
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execution failed")
        _cuda(
            cudart.cudaMemcpyAsync(
                out.ctypes.data, self._buffers[output][0], out.nbytes, copy.cudaMemcpyDeviceToHost, self._stream
            )
        )
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32, copy=False)

    def __del__(self) -> None:
        for pointer, _ in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(pointer)
