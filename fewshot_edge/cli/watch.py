"""``watch``: classify a camera, a video file, a stream or a GStreamer pipeline frame by frame (the device
half: numpy, onnxruntime and OpenCV from the ``[video]`` extra, never torch)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import click

from fewshot_edge.runtime import Prediction
from fewshot_edge.runtime.video import VideoWatch, WatchedFrame, import_cv2

from .common import InputError, main, reports_input_errors
from .device import open_model
from .options import engine_options, mode_options, store_options


@main.command()
@store_options
@mode_options
@click.option(
    "--every", default=1, metavar="K", show_default=True, help="Classify every K-th frame (the others are skipped)."
)
@click.option(
    "--smooth",
    default=5,
    metavar="N",
    show_default=True,
    help="Smooth over the last N classified frames: the class of highest mean probability, unknown when most"
    " of them were (1 = no smoothing).",
)
@click.option("--max-frames", type=int, metavar="N", help="Stop after N frames read [the end of the source].")
@click.option(
    "--out",
    metavar="FILE",
    help="Also write the frames read, with the smoothed label drawn on, to FILE (.avi or .mp4).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Stream a JSON object per classified frame, one a line (summary on stderr)."
)
@click.argument("source")
@engine_options
@reports_input_errors
def watch(
    bundle: str | None,
    store: str,
    reembed: bool,
    adapt: str | None,
    steps: int | None,
    every: int,
    smooth: int,
    max_frames: int | None,
    out: str | None,
    as_json: bool,
    source: str,
    engine: dict[str, Any],
) -> None:
    """Classify the frames of a camera, a video file, a stream or a GStreamer pipeline as they come.

    \b
    SOURCE is a camera index (0), a video file, an RTSP or HTTP URL, or a GStreamer pipeline ending in
    appsink (needs an OpenCV built with GStreamer, e.g. JetPack's, for a Jetson CSI camera). Prints the
    smoothed label per classified frame, then a summary (frames/s); Ctrl-C stops it with the summary.
    Needs the [video] extra: pip install 'fewshot-edge[video]'.
      fewshot-edge watch --store device.db 0
      fewshot-edge watch --store device.db clip.mp4 --every 3 --json --out annotated.avi
    """
    for name, value in (("--every", every), ("--smooth", smooth), ("--max-frames", max_frames)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own messages off, so a failure is one line
    try:
        import_cv2()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    adapt_options = None if steps is None else {"steps": steps}
    with (
        open_model(bundle, store, reembed, adapt, adapt_options=adapt_options, engine=engine) as model,
        VideoWatch(model, source, every, smooth, max_frames, out) as frames,
    ):
        width = max(len(label) for label in [*model.labels, "unknown"])
        shown: Counter[str] = Counter()
        seconds = 0.0
        start, interrupted = time.perf_counter(), False
        try:
            for frame in frames:
                shown[frame.smoothed.label] += 1
                seconds += frame.seconds
                click.echo(frame_json(frame) if as_json else frame_line(frame, width))
        except KeyboardInterrupt:
            interrupted = True
        elapsed = time.perf_counter() - start
    classified = sum(shown.values())
    summary = [
        f"{source}: {frames.frames_read} frames read, {classified} classified in {elapsed:.2f} s:"
        f" {frames.frames_read / max(elapsed, 1e-9):.1f} frames/s,"
        f" {1e3 * seconds / max(classified, 1):.2f} ms per classification{' (interrupted)' if interrupted else ''}",
        "smoothed labels: " + (", ".join(f"{label} {n}" for label, n in shown.most_common()) or "none"),
    ]
    if out:
        summary.append(f"annotated video: {out}")
    for line in summary:
        click.echo(line, err=as_json)


def prediction_json(p: Prediction) -> dict[str, Any]:
    return {"label": p.label, "probability": p.probability, "distance": p.distance, "unknown": p.label != p.top_k[0][0]}


def frame_json(frame: WatchedFrame) -> str:
    """One line of JSON: the frame's index, the smoothed prediction, the frame's own ("raw") and its time."""
    return json.dumps(
        {
            "frame": frame.index,
            **prediction_json(frame.smoothed),
            "raw": prediction_json(frame.prediction),
            "ms": round(1e3 * frame.seconds, 3),
        }
    )


def frame_line(frame: WatchedFrame, width: int) -> str:
    smoothed, raw = frame.smoothed, frame.prediction
    return (
        f"frame {frame.index:>6}  {smoothed.label:<{width}}  p={smoothed.probability:.3f}"
        f"  (this frame: {raw.label} p={raw.probability:.3f} d={raw.distance:.4g})"
    )
