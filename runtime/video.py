"""Classify a video stream frame by frame: a camera, a video file, an RTSP or HTTP URL or a GStreamer
pipeline, read through OpenCV (the ``[video]`` extra, imported only when a source is opened).

OpenCV gives BGR frames; each goes to the model as ``Frame(pixels, "BGR")``, so a frame is preprocessed
exactly as the same picture in an image file would be. ``TemporalSmoother`` smooths the predictions over
the last N classified frames.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import FewShotInputError
from .model import FewShotModel, Prediction
from .preprocess import Frame
from .store import RESERVED_LABEL

VIDEO_EXTRA = "fewshot-edge[video]"
# The codec of an annotated video, by the output file's extension: both are in OpenCV's pip wheels.
WRITERS = {".avi": "MJPG", ".mp4": "mp4v"}
# Frames per second of an annotated video when the source does not say (cameras, many streams).
DEFAULT_FPS = 30.0


def import_cv2() -> ModuleType:
    """OpenCV, or an ImportError that names the extra to install."""
    try:
        import cv2
    except ImportError:
        raise ModuleNotFoundError(
            f"video sources need OpenCV: pip install '{VIDEO_EXTRA}' (opencv-python-headless)"
        ) from None
    return cv2


def open_capture(source: str | int) -> Any:
    """A ``cv2.VideoCapture`` on ``source``: a camera index (0 or "0"), a GStreamer pipeline (anything with "!",
    ending in appsink, e.g. a Jetson CSI camera's ``nvarguscamerasrc ! ... ! appsink``), a URL (rtsp://,
    http://) or a video file. One that OpenCV cannot open is a ``FewShotInputError``."""
    cv2 = import_cv2()
    source = str(source)
    args: tuple[Any, ...]
    if source.isdigit():
        args, what = (int(source),), f"camera {source}"
    elif "!" in source:
        if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise FewShotInputError(
                "a GStreamer pipeline needs an OpenCV built with GStreamer (the opencv-python-headless wheel is not;"
                " on a Jetson use JetPack's OpenCV)"
            )
        args, what = (source, cv2.CAP_GSTREAMER), f"GStreamer pipeline {source!r}"
    elif "://" in source:
        args, what = (source,), f"stream {source}"
    else:
        path = Path(source)
        if not path.exists():
            raise FewShotInputError(f"video file not found: {source}")
        if not path.is_file():
            raise FewShotInputError(f"not a video file: {source}")
        args, what = (str(path),), f"video file {source} (not a video, or in a codec it lacks)"
    with _quiet(cv2):
        capture = cv2.VideoCapture(*args)
    if not capture.isOpened():
        capture.release()
        raise FewShotInputError(f"OpenCV cannot open {what}")
    return capture


@contextlib.contextmanager
def _quiet(cv2: ModuleType) -> Iterator[None]:
    """OpenCV's own log off while a source opens: a failure is then the one line of our error."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(level)


class TemporalSmoother:
    """Smooths a stream of predictions over the last ``window`` of them: the label is the class with the
    highest mean probability (over each prediction's ``top_k``; a class missing from one counts 0 there),
    or "unknown" when more than half of them were unknown; the distance is their mean distance."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise FewShotInputError(f"the smoothing window must be at least 1 frame, got {window}")
        self._recent: deque[Prediction] = deque(maxlen=window)

    def update(self, prediction: Prediction) -> Prediction:
        """Take in the newest prediction; the smoothed prediction of the window ending with it."""
        self._recent.append(prediction)
        n = len(self._recent)
        totals: dict[str, float] = {}
        for p in self._recent:
            for label, probability in p.top_k:
                totals[label] = totals.get(label, 0.0) + probability
        ranked = sorted(((label, total / n) for label, total in totals.items()), key=lambda item: -item[1])
        top = ranked[: len(prediction.top_k)]
        unknown = 2 * sum(p.label == RESERVED_LABEL for p in self._recent) > n
        distance = sum(p.distance for p in self._recent) / n
        return Prediction(RESERVED_LABEL if unknown else top[0][0], top[0][1], distance, top)


@dataclass(frozen=True)
class WatchedFrame:
    """One classified frame: its index in the stream (from 0), its own prediction (``top_k`` over every
    enrolled class), that prediction smoothed over the last classified frames, and the seconds the
    classification took (preprocessing included)."""

    index: int
    prediction: Prediction
    smoothed: Prediction
    seconds: float


class VideoWatch:
    """Reads ``source`` (see ``open_capture``) and classifies every ``every``-th frame with ``model``,
    smoothing over the last ``smooth`` classified frames; iterate for the ``WatchedFrame``s. It stops at
    the end of the stream or after ``max_frames`` frames read. With ``out`` (.avi or .mp4) every frame read
    is also written there with the latest smoothed label drawn on it. ``frames_read`` counts the frames
    read so far. Close it (or use ``with``) to release the source and the output.

    Frames skipped by ``every`` are only grabbed (not converted or copied out) unless written to ``out``."""

    def __init__(
        self,
        model: FewShotModel,
        source: str | int,
        every: int = 1,
        smooth: int = 5,
        max_frames: int | None = None,
        out: str | Path | None = None,
    ) -> None:
        for name, value in (("every", every), ("max_frames", max_frames)):
            if value is not None and value < 1:
                raise FewShotInputError(f"{name} must be at least 1, got {value}")
        self.smoother = TemporalSmoother(smooth)
        self.out = None if out is None else Path(out)
        if self.out is not None and self.out.suffix.lower() not in WRITERS:
            raise FewShotInputError(f"the annotated video must be a {' or '.join(WRITERS)} file, got {self.out}")
        if self.out is not None and not self.out.parent.is_dir():
            raise FewShotInputError(f"folder not found for the annotated video: {self.out.parent}")
        if not model.labels:
            raise FewShotInputError("no classes enrolled; enroll some before watching")
        self.model, self.source, self.every, self.max_frames = model, source, every, max_frames
        self.frames_read = 0
        self._cv2 = import_cv2()
        self._capture = open_capture(source)
        self._writer: Any = None

    def __iter__(self) -> Iterator[WatchedFrame]:
        latest: WatchedFrame | None = None
        while self.max_frames is None or self.frames_read < self.max_frames:
            classify = self.frames_read % self.every == 0
            if classify or self.out is not None:
                ok, pixels = self._capture.read()
            else:
                ok, pixels = self._capture.grab(), None
            if not ok:
                if self.frames_read == 0:
                    raise FewShotInputError(f"no frame could be read from {self.source}")
                return
            if classify:
                start = time.perf_counter()
                labels = len(self.model.labels)  # every class in top_k, for the smoother
                raw = self.model.predict(Frame(pixels, "BGR"), top_k=max(1, labels))[0]
                latest = WatchedFrame(self.frames_read, raw, self.smoother.update(raw), time.perf_counter() - start)
            if self.out is not None:
                assert latest is not None  # frame 0 is always classified
                self._write(pixels, latest.smoothed)
            self.frames_read += 1
            if classify:
                assert latest is not None
                yield latest

    def _write(self, pixels: Any, shown: Prediction) -> None:
        """Write one frame to ``out`` with ``shown``'s label and probability drawn in its top-left corner."""
        cv2 = self._cv2
        height, width = pixels.shape[:2]
        if self._writer is None:
            assert self.out is not None
            fourcc = cv2.VideoWriter_fourcc(*WRITERS[self.out.suffix.lower()])
            fps = float(self._capture.get(cv2.CAP_PROP_FPS))
            fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
            self._writer = cv2.VideoWriter(str(self.out), fourcc, fps, (width, height), pixels.ndim == 3)
            if not self._writer.isOpened():
                raise FewShotInputError(f"OpenCV cannot write the annotated video {self.out}")
        scale = max(0.4, height / 480)
        text = f"{shown.label} {shown.probability:.2f}"
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(pixels, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
        cv2.putText(pixels, text, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        self._writer.write(pixels)

    def close(self) -> None:
        """Release the source and finish the annotated video."""
        self._capture.release()
        if self._writer is not None:
            self._writer.release()

    def __enter__(self) -> VideoWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
