"""Per-frame accuracy and frames/s of ``fewshot-edge watch`` on a generated video of enrolled symbols.

Draws N symbols (``fewshot_edge.glyphs``), enrolls each from a few camera-like renders of it
(``glyphs.on_camera``: perturbed, shifted on a tinted sheet, with sensor noise), writes a video (MJPG .avi)
that shows each symbol in turn for a segment of frames, every frame a new render, then runs the real CLI
(``watch --json``, one process per smoothing window) and scores every classified frame against the symbol
on screen: raw (the frame's own prediction) and smoothed. "unknown" counts as wrong. Each frame being a
new drawing at a new place is harder than a camera on one drawing, whose frames are alike.

    python benchmarks/watch_accuracy.py --symbols 5 --segment 60 --smooth 1 3 5 9
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fewshot_edge import glyphs

CLI = [sys.executable, "-c", "from fewshot_edge.cli import main; main()"]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"fewshot-edge {' '.join(map(str, args[:1]))} failed: {result.stderr.strip()}")
    return result


def make_video(out: Path, args: argparse.Namespace) -> list[str]:
    """Shots under out/shots/<label>/, the video at out/video.avi; the label on screen per frame."""
    rng = np.random.default_rng(args.seed)
    symbols = [glyphs.draw(int(s)) for s in rng.integers(2**31, size=args.symbols)]
    labels = [f"symbol-{i + 1}" for i in range(args.symbols)]
    for label, symbol in zip(labels, symbols, strict=True):
        (out / "shots" / label).mkdir(parents=True, exist_ok=True)
        for k in range(args.shots):
            render = glyphs.on_camera(symbol, int(rng.integers(2**31)), args.size, args.strength, args.noise)
            Image.fromarray(render).save(out / "shots" / label / f"{k}.png")
    writer = cv2.VideoWriter(str(out / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30, (args.size, args.size))
    truth = []
    for _ in range(args.rounds):
        for label, symbol in zip(labels, symbols, strict=True):
            for _ in range(args.segment):
                render = glyphs.on_camera(symbol, int(rng.integers(2**31)), args.size, args.strength, args.noise)
                writer.write(np.ascontiguousarray(render[:, :, ::-1]))  # OpenCV writes BGR
                truth.append(label)
    writer.release()
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=5, help="enrolled symbols")
    parser.add_argument("--shots", type=int, default=3, help="camera-like renders enrolled per symbol")
    parser.add_argument("--segment", type=int, default=60, help="frames per symbol in a row")
    parser.add_argument("--rounds", type=int, default=2, help="times the sequence of symbols is shown")
    parser.add_argument("--size", type=int, default=128, help="frame width and height (a symbol is 105 px)")
    parser.add_argument("--strength", type=float, default=1.0, help="glyphs.perturb strength per render")
    parser.add_argument("--noise", type=float, default=6.0, help="sensor noise, grey levels (std)")
    parser.add_argument("--smooth", type=int, nargs="+", default=[1, 3, 5, 9], help="smoothing windows to run")
    parser.add_argument("--every", type=int, default=1, help="classify every K-th frame")
    parser.add_argument("--bundle", default="omniglot-conv4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("build/watch_accuracy"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    truth = make_video(args.out, args)
    store = args.out / "device.db"
    store.unlink(missing_ok=True)
    cli("enroll", "--bundle", args.bundle, "--store", store, args.out / "shots")
    results: dict[str, object] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "frames": len(truth),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "runs": [],
    }
    print(
        f"{len(truth)} frames ({args.symbols} symbols x {args.segment} frames x {args.rounds} rounds), {args.size} px"
    )
    print(f"{'smooth':>6}  {'raw acc':>8}  {'smoothed acc':>12}  {'frames/s':>8}  {'ms/classification':>17}")
    for window in args.smooth:
        watched = cli("watch", "--bundle", args.bundle, "--store", store, args.out / "video.avi", "--json",
                      "--every", args.every, "--smooth", window)  # fmt: skip
        rows = [json.loads(line) for line in watched.stdout.splitlines()]
        raw = float(np.mean([r["raw"]["label"] == truth[r["frame"]] for r in rows]))
        smoothed = float(np.mean([r["label"] == truth[r["frame"]] for r in rows]))
        summary = re.search(r"([\d.]+) frames/s, ([\d.]+) ms per classification", watched.stderr)
        assert summary, watched.stderr
        fps, ms = float(summary[1]), float(summary[2])
        results["runs"].append(  # type: ignore[attr-defined]
            {"smooth": window, "classified": len(rows), "raw": raw, "smoothed": smoothed, "fps": fps, "ms": ms}
        )
        print(f"{window:>6}  {100 * raw:>7.1f}%  {100 * smoothed:>11.1f}%  {fps:>8.1f}  {ms:>17.2f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
