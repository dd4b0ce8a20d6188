"""Speed and memory of a bundle on this machine, with the runtime alone (numpy + onnxruntime + Pillow).

``run_benchmark`` measures: one-image prediction latency from a decoded uint8 array (preprocessing,
encoder, scoring, store check), the encoder alone on one image, encoder throughput on a batch,
end-to-end throughput from decoded arrays, enrollment latency (one class of 5 shots into a SQLite
store), cold start and peak RSS of a fresh process that opens the bundle and predicts.
``latency_by_classes``: one-image prediction latency of a mode as the enrolled classes grow (the
relation mode runs one relation-graph pair per class, matching attends to every shot).
Latencies are in milliseconds, throughputs in images per second.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .model import FewShotModel
from .preprocess import Frame, ImageLike, InputSpec, preprocess

SOURCE_SIZE = 105
N_WAY = 5  # classes enrolled before timing predictions
K_SHOT = 5  # shots per enrolled class
CLASS_COUNTS = (5, 20, 50, 100)  # enrolled classes at which ``latency_by_classes`` times a prediction


def time_calls(
    fn: Callable[[], Any], runs: int, warmup: int = 10, undo: Callable[[], Any] | None = None
) -> dict[str, float]:
    """p50 and p99 wall time of ``fn()`` over ``runs`` calls after ``warmup`` calls, in milliseconds;
    ``undo()``, untimed, after each call."""
    times = np.empty(runs)
    for i in range(-warmup, runs):
        start = time.perf_counter()
        fn()
        if i >= 0:
            times[i] = time.perf_counter() - start
        if undo is not None:
            undo()
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return {"p50_ms": float(p50), "p99_ms": float(p99), "runs": runs}


def rate(fn: Callable[[], Any], items: int, seconds: float) -> float:
    """Items per second of ``fn()`` (which handles ``items`` items), run for at least ``seconds`` after one warm-up."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return items * calls / (time.perf_counter() - start)


def source_images(spec: InputSpec, n: int, seed: int = 0, size: int = SOURCE_SIZE) -> list[ImageLike]:
    """``n`` decoded uint8 images (size, size) of sparse random strokes, as a camera or file would give:
    gray arrays, or RGB ``Frame``s for a colour bundle."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if spec.channels == 1 else (n, size, size, 3)
    images = np.where(rng.random(shape) < 0.1, 0, 255).astype(np.uint8)
    return list(images) if spec.channels == 1 else [Frame(image, "RGB") for image in images]


def enroll_random(model: FewShotModel, n_way: int, k_shot: int) -> None:
    """Enroll ``n_way`` classes of ``k_shot`` random-stroke images each (seeds 1..n_way)."""
    for c in range(n_way):
        model.enroll(f"class-{c}", source_images(model.spec, k_shot, seed=c + 1))


def run_benchmark(
    bundle: str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    runs: int = 1000,
    batch: int = 256,
    seconds: float = 2.0,
    enroll_runs: int = 100,
    child_runs: int = 300,
    precision: str = "fp32",
    backend: str = "auto",
    engines: str | None = None,
) -> dict[str, Any]:
    """Measure the bundle (see the module docstring) and return the figures as a JSON-ready dict.

    ``runs`` one-image predictions, throughput loops of ``batch`` images for ``seconds`` each,
    ``enroll_runs`` enrollments, and ``child_runs`` predictions in the fresh process; the encoder of
    ``precision`` on ``backend`` (or exactly ``providers``; TensorRT engines cached in ``engines``).
    """
    opened: dict[str, Any] = {  # FewShotModel.open's arguments, also sent to the fresh process
        "threads": threads,
        "providers": providers,
        "precision": precision,
        "backend": backend,
        "engines": engines,
    }
    with tempfile.TemporaryDirectory(prefix="fewshot-edge-bench-") as tmp:
        store = Path(tmp) / "bench.db"
        with FewShotModel.open(bundle, store=store, **opened) as model:
            spec = model.spec
            enroll_random(model, N_WAY, K_SHOT)
            images = source_images(spec, batch, seed=N_WAY + 1)
            one = images[:1]
            encoder_one = preprocess(one, spec)
            encoder_batch = preprocess(images, spec)
            report: dict[str, Any] = {
                "bundle": str(bundle),
                "model_id": model.bundle.model_id,
                "input": shape_text(spec),
                "source_image": f"{SOURCE_SIZE}x{SOURCE_SIZE} uint8",
                "machine": machine(),
                "threads": threads,
                "precision": precision,
                "providers": model.engine.providers,
                "predict": time_calls(lambda: model.predict(one), runs),
                "encoder": time_calls(lambda: model.engine.embed(encoder_one), runs),
                "batch": batch,
                "encoder_images_per_s": rate(lambda: model.engine.embed(encoder_batch), batch, seconds),
                "end_to_end_images_per_s": rate(lambda: model.embed(images), batch, seconds),
                "enroll": _enroll_latency(bundle, Path(tmp) / "enroll.db", opened, enroll_runs),
            }
        report.update(_fresh_process(bundle, store, opened, child_runs))
    return report


def latency_by_classes(
    bundle: str | Path, mode: str, counts: Sequence[int] = CLASS_COUNTS, runs: int = 200, **opened: Any
) -> dict[str, Any]:
    """One-image prediction latency (p50/p99 ms) in adaptation mode ``mode`` with each of ``counts`` classes
    of ``K_SHOT`` random-stroke shots enrolled (a fresh store, grown class by class); ``opened`` are further
    ``FewShotModel.open`` arguments. A JSON-ready dict."""
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fewshot-edge-bench-") as tmp:
        with FewShotModel.open(bundle, store=Path(tmp) / "classes.db", adapt=mode, **opened) as model:
            one = source_images(model.spec, 1)
            enrolled = 0
            for n in sorted(counts):
                for c in range(enrolled, n):
                    model.enroll(f"class-{c}", source_images(model.spec, K_SHOT, seed=c + 1))
                enrolled = n
                rows[str(n)] = time_calls(partial(model.predict, one), runs)
    return {
        "bundle": str(bundle),
        "mode": mode,
        "machine": machine(),
        "threads": opened.get("threads"),
        "shots_per_class": K_SHOT,
        "classes": rows,
    }


def shape_text(spec: InputSpec) -> str:
    """ "CxHxW" of an input spec."""
    return "x".join(map(str, (spec.channels, spec.height, spec.width)))


def machine() -> dict[str, Any]:
    """CPU model, logical CPUs and library versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
    }


def _enroll_latency(bundle: str | Path, store: Path, opened: dict[str, Any], runs: int) -> dict[str, float]:
    """Latency of enrolling one class of ``K_SHOT`` decoded images into a fresh SQLite store; removed again
    (untimed) after each, so the store stays empty and a mode with a class limit (sequence) within it."""
    with FewShotModel.open(bundle, store=store, **opened) as model:
        shots = source_images(model.spec, K_SHOT, seed=N_WAY + 2)
        return time_calls(lambda: model.enroll("timed", shots), runs, undo=lambda: model.remove_class("timed"))


def _fresh_process(bundle: str | Path, store: Path, opened: dict[str, Any], runs: int) -> dict[str, Any]:
    """Cold start (process start to the first prediction) and peak RSS of a new interpreter that
    opens the bundle and store and then predicts one image ``runs`` times."""
    config = json.dumps({"bundle": str(bundle), "store": str(store), "opened": opened, "runs": runs})
    with tempfile.TemporaryFile(mode="w+") as err:  # a file, not a pipe: the child can never block on it
        start = time.perf_counter()
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from fewshot_edge.runtime.bench import _child; _child(sys.argv[1])",
                config,
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert child.stdout is not None
        first = child.stdout.readline()
        cold = time.perf_counter() - start
        out = child.stdout.read()  # the same buffered reader: communicate() would skip what readline buffered
        child.wait(timeout=600)
        err.seek(0)
        if child.returncode != 0 or first.strip() != "ready":
            raise RuntimeError(f"benchmark subprocess failed: {(err.read().strip().splitlines() or ['no output'])[-1]}")
    return {"cold_start_s": cold, **json.loads(out)}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB. On Linux from VmHWM: getrusage's ru_maxrss there
    carries the parent's peak over into a child started by fork or vfork and exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _child(config_json: str) -> None:
    """The fresh process of ``_fresh_process``: open, predict once, say "ready", predict, report RSS."""
    config = json.loads(config_json)
    with FewShotModel.open(config["bundle"], store=config["store"], **config["opened"]) as model:
        one = source_images(model.spec, 1, seed=N_WAY + 1)
        model.predict(one)
        print("ready", flush=True)
        for _ in range(config["runs"]):
            model.predict(one)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_predictions": config["runs"]}))
