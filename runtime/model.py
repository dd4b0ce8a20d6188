"""The public device API: open a bundle and a store, enroll classes from a few images, predict."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from .adapters import ADAPTERS, Adapter
from .backends import open_encoder
from .bundle import Bundle, Calibration, open_bundle
from .engine import Engine
from .errors import FewShotInputError
from .preprocess import Frame, ImageLike, InputSpec, normalize, preprocess, source_hash, to_pixels
from .pretrained import resolve_bundle
from .signing import TrustedKeys
from .store import RESERVED_LABEL, EnrollmentStore, NewShots, store_path, validate_label
from .uncertainty import predictive

Images = ImageLike | Sequence[ImageLike]
T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    """One query's answer. ``label`` is "unknown" when the nearest distance exceeds the calibrated
    threshold for the nearest class's number of shots; ``probability`` and ``top_k`` always describe
    the enrolled classes. ``entropy`` is the predictive entropy of the calibrated class distribution in
    nats (0 = certain, log C = uniform over C classes); ``epistemic`` is the part of it due to the
    mode's uncertainty about the model (mutual information; ``uncertainty.predictive``), None for a
    mode with one model (every mode but ``bayes``)."""

    label: str
    probability: float
    distance: float
    top_k: list[tuple[str, float]]
    entropy: float | None = None
    epistemic: float | None = None


class _ReadWriteLock:
    """Many readers at once, or one writer; a waiting writer holds off new readers so writes are not
    starved. Not re-entrant: a holder never asks again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class FewShotModel:
    """A bundle's encoder, an adaptation mode and an enrollment store. Open with ``FewShotModel.open``.

    Thread-safe: one model may be shared by threads (a camera thread and a UI thread, a server's
    workers). Reads (``predict``, ``predict_proba``, ``embed``, ``labels``, ``classes``) run in
    parallel; writes (enrolling, removing, renaming, refitting) are serialised and wait for the reads
    in flight. Images are decoded and preprocessed outside any lock. A TensorRT engine, which is not
    safe to run from two threads, is run by one thread at a time.
    """

    def __init__(self, bundle: Bundle, engine: Engine, adapter: Adapter, store: EnrollmentStore) -> None:
        self.bundle = bundle
        self.engine = engine
        self.adapter = adapter
        self.store = store
        self.spec: InputSpec = bundle.manifest.input_spec
        self._calibration = bundle.manifest.calibration
        # the logits' temperatures: the mode's own when its parameters hold one (a fine-tuned head's
        # logits are sharper than the prototypes'), else the bundle's
        own = adapter.params
        self._temperatures = (
            Calibration(own["temperature"], temperatures_by_shots=own.get("temperatures_by_shots"))
            if "temperature" in own
            else self._calibration
        )
        self._fitted_version: int | None = None
        self._lock = _ReadWriteLock()
        # onnxruntime sessions may be run from several threads at once; anything else (TensorRT) may not
        self._engine_lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if type(engine) is Engine else threading.Lock()
        )

    @classmethod
    def open(
        cls,
        bundle_dir: str | Path,
        store: str | Path | None = None,
        adapt: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        reembed: bool = False,
        adapt_options: Mapping[str, Any] | None = None,
        precision: str = "fp32",
        backend: str = "auto",
        engines: str | Path | None = None,
        create: bool = True,
        trusted_keys: TrustedKeys | None = None,
    ) -> FewShotModel:
        """Open a bundle (a folder, or the name of one that ships with the runtime, e.g. "omniglot-conv4")
        with an enrollment store (a SQLite path; None = in memory). A new store file is created only
        once the bundle, the mode and the encoder have all checked out, and not at all unless ``create``
        (then a missing or zero-byte file is refused, as read-only uses want).

        ``adapt`` names the adaptation mode (None = the store's remembered mode when the bundle has
        it, else the bundle's default); ``adapt_options`` overrides that mode's parameters (e.g.
        ``{"steps": 20}`` for finetune). A store bound to another model is refused unless
        ``reembed``: then its stored shots are re-embedded with this model and the store is rebound
        in one transaction, so the device keeps its classes.

        ``precision`` picks the encoder file (fp32, or a variant the bundle has: fp16, int8); a store
        is bound to the model and precision it was enrolled with. ``backend`` ("auto" = the best this
        machine can run, logged; tensorrt, tensorrt-ep, cuda, cpu) runs it, or exactly ``providers``
        when given; TensorRT engines are cached in ``engines`` (default: beside the bundle).

        ``trusted_keys`` (Ed25519 public key files or bytes, or folders of ``*.pub``/``*.pem``; needs
        ``fewshot-edge[sign]``): open only a bundle signed by one of them (see docs/deploy.md).
        """
        store_path(store)  # not a path (e.g. a number) or an empty one: refused before anything is opened
        bundle = open_bundle(resolve_bundle(bundle_dir), trusted_keys)
        modes = bundle.manifest.adaptation.modes
        asked = (
            _mode(bundle, adapt, None) if adapt else None
        )  # a bad mode, precision or backend fails before the store is touched
        film_input = str(modes.get("film", {}).get("film_input", "film"))
        engine = open_encoder(bundle, precision, backend, providers, threads, film_input, engines)
        bound_to = bundle.model_id if precision == "fp32" else f"{bundle.model_id}+{precision}"
        new_store = store is not None and not _holds_data(store)
        if new_store and not create:
            raise FewShotInputError(f"no enrollment store at {store}; enroll classes first")
        # an existing store is opened now (its remembered mode may pick the adapter); a new one only
        # once everything else checked out, so a refused bundle creates and binds nothing
        enrollment = None if new_store else EnrollmentStore.open(store, bound_to, reembed=reembed, create=create)
        try:
            mode = asked or _mode(bundle, None, enrollment.adaptation if enrollment else None)
            adapter = ADAPTERS[mode](bundle, engine, adapt_options)
            _check_encoder(engine, adapter, bundle)
            if enrollment is None:
                enrollment = EnrollmentStore.open(store, bound_to, reembed=reembed, create=create)
            if enrollment.needs_reembed:
                _reembed(enrollment, adapter, bundle)
            return cls(bundle, engine, adapter, enrollment)
        except BaseException:
            if enrollment is not None:
                enrollment.close()
            raise

    def enroll(self, label: str, images: Images) -> None:
        """Enroll a new class from its images (paths, PIL images, gray arrays or ``Frame``s), in one transaction."""
        self.enroll_many({label: images})

    def add_shots(self, label: str, images: Images) -> None:
        """Add images to an enrolled class, in one transaction."""
        self.enroll_many({label: images}, add=True, skip_duplicates=False)

    def enroll_many(
        self, classes: Mapping[str, Images], add: bool = False, skip_duplicates: bool = True
    ) -> dict[str, list[int]]:
        """Enroll several new classes (or with ``add``, add images to enrolled ones) all or nothing:
        every image is decoded, converted and embedded first (an image that fails is named in the
        one-line error), then every class is written in ONE transaction.

        With ``add`` and ``skip_duplicates``, an image whose source (file bytes or pixels) its class
        already holds, or that is given twice, is skipped rather than stored again, so re-running an
        interrupted add stores nothing twice. Returns label -> indices of the images skipped."""
        if not classes:
            raise FewShotInputError("no classes given")
        prepared: list[tuple[str, np.ndarray, list[str]]] = []
        for label, given in classes.items():
            label = validate_label(label)
            images = _as_list(given)
            if not images:
                raise FewShotInputError(f"no images given for class {label!r}")
            pixels = np.stack([_pixels_of(image, i, label, self.spec) for i, image in enumerate(images)])
            prepared.append((label, pixels, [source_hash(image) for image in images]))
        with self._lock.write():
            with self._engine_lock:
                batches = [
                    NewShots(label, self.adapter.embed(normalize(pixels, self.spec)), pixels, hashes)
                    for label, pixels, hashes in prepared
                ]
            if not add:
                enrolled = {label for label, _ in self.store.list_classes()}
                self.adapter.admit(len(enrolled | {batch.label for batch in batches}))
            before = self._fitted_version
            added = self.store.add_many(batches, new_classes=not add, skip_duplicates=add and skip_duplicates)
            in_step = before is not None and added.version == before + 1
            for batch in batches if in_step else ():
                kept = np.setdiff1d(np.arange(len(batch.hashes)), added.skipped.get(batch.label, []))
                if add and batch.label not in self.adapter.labels:
                    in_step = False
                elif len(kept) and not self.adapter.add(batch.label, batch.embeddings[kept], batch.pixels[kept]):
                    in_step = False
            if added.version != before:
                self._fitted_version = added.version if in_step else None
            return added.skipped

    def remove_class(self, label: str) -> None:
        self.store.remove_class(label)

    def rename(self, old: str, new: str) -> None:
        self.store.rename(old, new)

    def classes(self) -> list[tuple[str, int]]:
        """(label, number of shots) per enrolled class, in enrollment order."""
        return self.store.list_classes()

    @property
    def labels(self) -> list[str]:
        """The enrolled labels in the order of ``predict_proba``'s columns."""
        return self._fitted(lambda: list(self.adapter.labels))

    def embed(self, images: Images) -> np.ndarray:
        """Embeddings (N, D) as the store keeps them: the adapter's ``embed`` (the encoder's, or for
        FiLM the encoder's under the current film)."""
        batch = preprocess(_as_list(images), self.spec)
        with self._lock.read(), self._engine_lock:
            return self.adapter.embed(batch)

    def predict_proba(self, images: Images) -> np.ndarray:
        """Class probabilities (N, C), columns in ``labels`` order."""
        return self._score(images)[0]

    def predict(self, images: Images, top_k: int = 1) -> list[Prediction]:
        """The most likely class per image, "unknown" beyond the open-set threshold, and the top k."""
        if top_k < 1:
            raise FewShotInputError(f"top_k must be at least 1, got {top_k}")
        probabilities, nearest, shots, entropy, epistemic = self._score(images)
        labels = self.adapter.labels
        counts, inverse = np.unique(shots, return_inverse=True)
        limits = np.array([self._calibration.open_set.threshold_for(int(k)) for k in counts], dtype=np.float64)
        unknowns = nearest > limits[inverse]  # a None threshold is NaN: never exceeded
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions = []
        mutual = [None] * len(probabilities) if epistemic is None else epistemic.tolist()
        for i, (p, ranked, unknown) in enumerate(zip(probabilities, order, unknowns, strict=True)):
            top = [(labels[j], float(p[j])) for j in ranked]
            label = RESERVED_LABEL if unknown else top[0][0]
            predictions.append(Prediction(label, top[0][1], float(nearest[i]), top, float(entropy[i]), mutual[i]))
        return predictions

    def refit(self) -> None:
        """Fit the adaptation mode to the stored shots now (prediction does it when the enrolled set
        changed; this forces it, e.g. to time it or to pay it before the first query)."""
        with self._lock.write():
            self._fitted_version = None
            self._fit_if_changed(reuse=False)

    def close(self) -> None:
        with self._lock.write():
            self.store.close()

    def __enter__(self) -> FewShotModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fitted(self, read: Callable[[], T]) -> T:
        """``read()`` on an adapter fitted to the stored shots: under the read lock when the fit is
        current (the common case, in parallel), else refitted and read under the write lock."""
        with self._lock.read():
            if self.store.data_version() == self._fitted_version:
                return read()
        with self._lock.write():
            self._fit_if_changed()
            return read()

    def _fit_if_changed(self, reuse: bool = True) -> None:
        """Refit the adapter when the enrolled set changed since the last fit (in any process). A
        persistent mode takes back the state the store kept for this very set (unless not ``reuse``),
        and saves what it fits. Called under the write lock."""
        if self.store.data_version() != self._fitted_version:
            adapter = self.adapter
            shots = self.store.shots(pixels=adapter.needs_pixels)
            saved = self.store.load_state(adapter.state_key, shots.version) if adapter.persistent and reuse else None
            adapter.fit(shots, saved)
            if adapter.persistent and saved is None:
                self.store.save_state(adapter.state_key, shots.version, adapter.state())
            self._fitted_version = shots.version

    def temperatures(self, shots: np.ndarray) -> np.ndarray:
        """The calibrated temperature per query, given the shot count of each query's nearest class
        (``adapter.score``'s third output): the mode's own when its parameters hold one, else the
        bundle's; each the one fitted for that shot count where export fitted one per count."""
        counts, inverse = np.unique(np.asarray(shots, dtype=np.int64), return_inverse=True)
        return np.array([self._temperatures.temperature_for(int(k)) for k in counts])[inverse.reshape(-1)]

    def _score(self, images: Images) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Probabilities (N, C), nearest-prototype distances (N,), the nearest classes' shot counts (N,),
        the predictive entropy (N,) and its epistemic part (N,) or None (``uncertainty.predictive``).
        Each query's logits are divided by ``temperatures`` of its nearest class's shot count."""
        batch = preprocess(_as_list(images), self.spec)
        return self._fitted(lambda: self._score_fitted(batch))

    def _score_fitted(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        if not self.adapter.labels:
            raise FewShotInputError("no classes enrolled; enroll some before predicting")
        with self._engine_lock:
            queries = self.adapter.embed(batch)
        logits, nearest, shots = self.adapter.score(queries)
        probabilities, entropy, epistemic = predictive(logits, self.temperatures(shots))
        return probabilities, nearest, shots, entropy, epistemic


def _pixels_of(image: ImageLike, index: int, label: str, spec: InputSpec) -> np.ndarray:
    """``to_pixels`` of one enrollment image, an error naming the file (or the image's place) it came from."""
    try:
        return to_pixels(image, spec)
    except FewShotInputError as exc:
        where = str(image) if isinstance(image, (str, Path)) else f"image {index} of class {label!r}"
        message = str(exc)
        raise FewShotInputError(message if where in message else f"{where}: {message}") from None


def _holds_data(path: object) -> bool:
    """Whether the store path names a file with something in it (no store is created for this check)."""
    try:
        file = Path(store_path(path))
        return file.is_file() and file.stat().st_size > 0
    except OSError:
        return False


def _mode(bundle: Bundle, asked: str | None, remembered: str | None) -> str:
    """The adaptation mode to use: the one asked for, else the store's if the bundle has it, else the bundle's default."""
    adaptation = bundle.manifest.adaptation
    mode = asked or (remembered if remembered in adaptation.modes else adaptation.default)
    if mode not in adaptation.modes:
        raise FewShotInputError(
            f"bundle does not support adaptation mode {mode!r} (it supports: {', '.join(adaptation.modes)})"
        )
    if mode not in ADAPTERS:
        raise FewShotInputError(f"this runtime has no adaptation mode {mode!r} (it has: {', '.join(ADAPTERS)})")
    return mode


def _as_list(images: Images) -> list[ImageLike]:
    """One path, PIL image, Frame or colour array (H, W, 3|4) becomes a list of one (a bare colour array is
    then refused for its unknown channel order, not split into rows); a sequence (or an array, along its
    first axis) a list."""
    if isinstance(images, (str, Path, Image.Image, Frame)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[2] in (3, 4):
        return [images]
    return list(images)


def _check_encoder(engine: Engine, adapter: Adapter, bundle: Bundle) -> None:
    """The encoder's fixed input dims must match the input spec and it must give the manifest's
    embedding size (run through the adapter, which feeds a FiLM encoder its film vector)."""
    spec = bundle.manifest.input_spec
    expected = (spec.channels, spec.height, spec.width)
    declared = engine.input_shape[1:]
    if len(declared) != 3 or any(d is not None and d != e for d, e in zip(declared, expected, strict=True)):
        raise FewShotInputError(
            f"encoder input shape {engine.input_shape} does not match the input spec {_fmt(expected)}"
        )
    out = adapter.embed(np.zeros((1, *expected), dtype=np.float32))
    if out.shape != (1, bundle.manifest.embedding.size):
        raise FewShotInputError(
            f"encoder output shape {out.shape[1:]} does not match the manifest's embedding size {bundle.manifest.embedding.size}"
        )


def _reembed(store: EnrollmentStore, adapter: Adapter, bundle: Bundle) -> None:
    """Re-embed every stored shot with this model (the adapter's ``embed``) and rebind the store to it."""
    spec = bundle.manifest.input_spec
    expected = (spec.channels, spec.height, spec.width)
    if store.pixel_shape not in (None, expected):
        raise FewShotInputError(
            f"stored shots are {_fmt(store.pixel_shape)} but the new model takes {_fmt(expected)} inputs;"
            " they cannot be re-embedded, enroll the classes again in a new store"
        )
    shots = store.shots(pixels=True)
    assert shots.pixels is not None
    embeddings = (
        adapter.embed(normalize(shots.pixels, spec))
        if len(shots.ids)
        else np.zeros((0, bundle.manifest.embedding.size), dtype=np.float32)
    )
    store.rebind(shots.ids, embeddings)


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)
