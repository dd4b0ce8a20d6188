"""``watch``: videos the tests write (OpenCV, the [video] extra), classified frame by frame through the CLI
with the shipped bundles; the smoother against hand-computed means; bad sources and options in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_support import BLOCK_TORCH

from fewshot_edge import glyphs
from fewshot_edge.cli import main
from fewshot_edge.runtime import FewShotInputError, FewShotModel, Frame, Prediction
from fewshot_edge.runtime.video import TemporalSmoother, VideoWatch

cv2 = pytest.importorskip("cv2")

SYMBOLS, SHOTS, SEGMENT, SIZE = 3, 3, 8, 112


def run(*args: object, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def write_video(path: Path, rgb_frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """An MJPG .avi of RGB frames, written as OpenCV writes: BGR."""
    height, width = rgb_frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for frame in rgb_frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video, as OpenCV gives it (BGR)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            capture.release()
            return frames
        frames.append(frame)


@pytest.fixture(scope="module")
def glyph_video(tmp_path_factory) -> dict:
    """Three drawn symbols enrolled with the default bundle (three camera-like shots each, as PNGs) and a
    video of SEGMENT new camera-like drawings of each in turn."""
    tmp = tmp_path_factory.mktemp("watch")
    rng = np.random.default_rng(7)
    symbols = [glyphs.draw(int(seed)) for seed in rng.integers(2**31, size=SYMBOLS)]
    for i, symbol in enumerate(symbols):
        (tmp / "shots" / f"symbol-{i}").mkdir(parents=True)
        for k in range(SHOTS):
            Image.fromarray(glyphs.on_camera(symbol, 100 * i + k, SIZE)).save(
                tmp / "shots" / f"symbol-{i}" / f"{k}.png"
            )
    frames = [
        glyphs.on_camera(symbol, 1000 + 100 * i + j, SIZE) for i, symbol in enumerate(symbols) for j in range(SEGMENT)
    ]
    store = tmp / "device.db"
    run("enroll", "--store", store, tmp / "shots")
    return {
        "tmp": tmp,
        "store": store,
        "video": write_video(tmp / "symbols.avi", frames),
        "truth": [f"symbol-{i}" for i in range(SYMBOLS) for _ in range(SEGMENT)],
    }


def watch_json(env: dict, *options: object) -> list[dict]:
    result = run("watch", "--store", env["store"], env["video"], "--json", *options)
    return [json.loads(line) for line in result.stdout.splitlines()]


def probabilities_by_hand(env: dict) -> tuple[list[str], np.ndarray]:
    """The enrolled labels and each video frame's class probabilities, from the frames read back with OpenCV
    and turned to RGB here (so watch's own BGR handling is what is checked)."""
    with FewShotModel.open("omniglot-conv4", store=env["store"]) as model:
        frames = [Frame(np.ascontiguousarray(f[:, :, ::-1]), "RGB") for f in read_video(env["video"])]
        return model.labels, model.predict_proba(frames)


def test_watch_classifies_every_frame_as_predict_does(glyph_video):
    rows = watch_json(glyph_video, "--every", "1", "--smooth", "1")
    labels, probabilities = probabilities_by_hand(glyph_video)
    assert [r["frame"] for r in rows] == list(range(SYMBOLS * SEGMENT))
    assert [r["raw"]["label"] for r in rows] == [labels[j] for j in probabilities.argmax(axis=1)]
    np.testing.assert_allclose([r["raw"]["probability"] for r in rows], probabilities.max(axis=1), rtol=1e-5)
    correct = sum(r["raw"]["label"] == t for r, t in zip(rows, glyph_video["truth"], strict=True))
    assert correct >= 0.75 * len(rows)  # new drawings of enrolled symbols, as a camera sees them: mostly right
    assert all(r["label"] == r["raw"]["label"] and r["probability"] == r["raw"]["probability"] for r in rows)


def test_every_k_and_smoothing_over_n_classified_frames(glyph_video):
    rows = watch_json(glyph_video, "--every", "3", "--smooth", "4", "--max-frames", "20")
    labels, probabilities = probabilities_by_hand(glyph_video)
    classified = list(range(0, 20, 3))
    assert [r["frame"] for r in rows] == classified
    for n, row in enumerate(rows):
        window = probabilities[classified[max(0, n - 3) : n + 1]].mean(axis=0)  # the last 4 classified frames
        assert row["label"] == labels[int(window.argmax())]
        assert row["probability"] == pytest.approx(float(window.max()), rel=1e-5)
        assert row["raw"]["probability"] == pytest.approx(float(probabilities[classified[n]].max()), rel=1e-5)
    summary = run("watch", "--store", glyph_video["store"], glyph_video["video"], "--every", "3", "--max-frames", "20")
    assert "20 frames read, 7 classified" in summary.stdout and "frames/s" in summary.stdout


def test_out_writes_every_frame_read_with_the_label_drawn(glyph_video):
    out = glyph_video["tmp"] / "annotated.avi"
    result = run("watch", "--store", glyph_video["store"], glyph_video["video"], "--every", "2", "--out", out)
    source, written = read_video(glyph_video["video"]), read_video(out)
    assert len(written) == len(source) == SYMBOLS * SEGMENT
    assert written[0].shape == source[0].shape
    corner = (slice(0, 12), slice(0, 40))
    assert np.abs(written[0][corner].astype(int) - source[0][corner]).mean() > 50  # the label's box
    assert np.abs(written[0][64:].astype(int) - source[0][64:]).mean() < 8  # the rest, through MJPG twice
    assert f"annotated video: {out}" in result.stdout and "24 frames read, 12 classified" in result.stdout


def test_colour_frames_are_read_in_opencvs_bgr_order(tmp_path):
    """With the colour (RGB) bundle: red and blue enrolled from RGB PNGs; the video's red frames, which
    OpenCV hands over as BGR, come out red (read as RGB they would be blue, as the control shows)."""
    rng = np.random.default_rng(0)

    def patch(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.clip(np.array(rgb) + rng.normal(0, 12, size=(96, 96, 3)), 0, 255).astype(np.uint8)

    red, blue = (200, 40, 40), (40, 40, 200)
    for name, colour in (("red", red), ("blue", blue)):
        (tmp_path / "shots" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(patch(colour)).save(tmp_path / "shots" / name / f"{k}.png")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", "mini-conv4", "--store", store, tmp_path / "shots")
    video = write_video(tmp_path / "colours.avi", [patch(red) for _ in range(3)] + [patch(blue) for _ in range(3)])
    result = run("watch", "--bundle", "mini-conv4", "--store", store, video, "--json", "--smooth", "1")
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == ["red"] * 3 + ["blue"] * 3
    with FewShotModel.open("mini-conv4", store=store) as model:
        swapped = [Frame(frame, "RGB") for frame in read_video(video)]  # BGR pixels taken as RGB
        assert [p.label for p in model.predict(swapped)] == ["blue"] * 3 + ["red"] * 3


def prediction(top: list[tuple[str, float]], distance: float, unknown: bool = False) -> Prediction:
    return Prediction("unknown" if unknown else top[0][0], top[0][1], distance, top)


def test_smoother_means_the_last_n_predictions():
    smoother = TemporalSmoother(3)
    first = smoother.update(prediction([("a", 0.6), ("b", 0.4)], 0.2))
    assert first == prediction([("a", 0.6), ("b", 0.4)], 0.2)
    second = smoother.update(prediction([("b", 0.9), ("a", 0.1)], 0.4))
    assert second.label == "b" and second.top_k == [("b", 0.65), ("a", 0.35)] and second.distance == pytest.approx(0.3)
    third = smoother.update(prediction([("a", 0.7)], 0.6, unknown=True))  # top 1 only: b counts 0 here
    assert third.label == "a" and third.top_k == [("a", pytest.approx(1.4 / 3))]
    fourth = smoother.update(prediction([("a", 0.8)], 1.0, unknown=True))  # the first falls out of the window
    assert fourth.label == "unknown" and fourth.top_k == [("a", pytest.approx(1.6 / 3))]  # 2 of 3 unknown
    assert fourth.distance == pytest.approx(2.0 / 3)
    with pytest.raises(ValueError, match="at least 1 frame"):
        TemporalSmoother(0)


def gstreamer_refusal() -> str:
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        return "OpenCV cannot open GStreamer pipeline"
    return "needs an OpenCV built with GStreamer"


BAD_WATCHES = {
    "missing file": (lambda e: [e["tmp"] / "nope.avi"], "video file not found"),
    "a folder": (lambda e: [e["tmp"]], "not a video file"),
    "not a video": (lambda e: [e["tmp"] / "notes.avi"], "OpenCV cannot open video file"),
    "camera absent": (lambda e: ["97"], "OpenCV cannot open camera 97"),
    "stream refused": (lambda e: ["rtsp://127.0.0.1:9/none"], "OpenCV cannot open stream rtsp://127.0.0.1:9/none"),
    "no gstreamer": (lambda e: ["videotestsrc num-buffers=3 ! appsink"], gstreamer_refusal()),
    "every 0": (lambda e: [e["video"], "--every", "0"], "--every must be at least 1, got 0"),
    "negative smoothing": (lambda e: [e["video"], "--smooth", "-2"], "--smooth must be at least 1, got -2"),
    "max frames 0": (lambda e: [e["video"], "--max-frames", "0"], "--max-frames must be at least 1"),
    "out format": (lambda e: [e["video"], "--out", e["tmp"] / "out.gif"], "must be a .avi or .mp4 file"),
    "out folder": (lambda e: [e["video"], "--out", e["tmp"] / "no" / "out.avi"], "folder not found"),
}


@pytest.mark.parametrize("case", BAD_WATCHES, ids=list(BAD_WATCHES))
def test_bad_sources_and_options_are_one_line_errors(glyph_video, case):
    (glyph_video["tmp"] / "notes.avi").write_text("not a video")
    args, message = BAD_WATCHES[case]
    result = run("watch", "--store", glyph_video["store"], *args(glyph_video), ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (glyph_video["tmp"] / "out.gif").exists()


def test_an_empty_store_and_a_missing_opencv_are_refused(glyph_video, tmp_path, monkeypatch):
    run("enroll", "--store", tmp_path / "one.db", "--label", "x", glyph_video["tmp"] / "shots" / "symbol-0" / "0.png")
    run("classes", "remove", "--store", tmp_path / "one.db", "x")
    empty = run("watch", "--store", tmp_path / "one.db", glyph_video["video"], ok=False)
    assert empty.exit_code == 2 and "no classes enrolled" in empty.stderr
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    missing = run("watch", "--store", glyph_video["store"], glyph_video["video"], ok=False)
    assert missing.exit_code == 1 and "pip install 'fewshot-edge[video]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_ctrl_c_ends_cleanly_with_a_summary(glyph_video, tmp_path):
    """A long video watched in a process of its own, where torch cannot be imported (watch is device-side);
    SIGINT once it streams: exit 0, the summary on stderr."""
    frame = glyphs.on_camera(glyphs.draw(1, size=48), 0, 64)
    video = write_video(tmp_path / "long.avi", [frame] * 3000)
    # Python's own SIGINT handler, as in a terminal: a process started in the background (as CI may run
    # the tests) inherits SIGINT ignored, and Python keeps it so
    restore = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    command = BLOCK_TORCH + restore + "from fewshot_edge.cli import main\nmain()\n"
    args = ["watch", "--store", str(glyph_video["store"]), str(video), "--json"]
    process = subprocess.Popen(
        [sys.executable, "-c", command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines = [first] + [json.loads(line) for line in rest.splitlines()]
    assert [r["frame"] for r in lines] == list(range(len(lines)))
    assert "(interrupted)" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 2
    read = int(stderr.split(" frames read")[0].rsplit(" ", 1)[1])
    assert len(lines) <= read < 3000


def test_the_python_api_takes_paths_and_camera_numbers(glyph_video):
    with FewShotModel.open("omniglot-conv4", store=glyph_video["store"]) as model:
        with VideoWatch(model, str(glyph_video["video"]), every=5, smooth=2) as frames:
            assert [f.index for f in frames] == list(range(0, SYMBOLS * SEGMENT, 5))
            assert frames.frames_read == SYMBOLS * SEGMENT
        with pytest.raises(FewShotInputError, match="OpenCV cannot open camera 97"):
            VideoWatch(model, 97)
