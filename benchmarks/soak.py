"""Soak: N single-image predictions in one process, on the device runtime only (no torch). Reports the
resident memory growth after warm-up (target < 5 MB) and the latency drift: the median latency of the
first 10% of the calls against the last 10%.

    OMP_NUM_THREADS=1 python benchmarks/soak.py                       # 1,000,000 predictions, shipped bundle
    OMP_NUM_THREADS=1 python benchmarks/soak.py -n 200000 --json soak.json

Five classes of five synthetic shots are enrolled in an in-memory store (or --store FILE), then every
call predicts one of eight query images. RSS is read from /proc/self/statm every N/100 calls; the
latency buffers are allocated and touched before the warm-up ends, so they do not count as growth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

from fewshot_edge.runtime import FewShotModel

TARGET_MB = 5.0


def rss_mb() -> float:
    """Resident set size now, in MB (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(rng: np.random.Generator, level: int, n: int, size: int = 64) -> list[np.ndarray]:
    """n gray uint8 images: a blob at a class-specific place on noise."""
    out = []
    for _ in range(n):
        image = rng.integers(0, 40, (size, size), dtype=np.uint8)
        y, x = divmod(level * 7, size - 16)
        image[y : y + 16, x : x + 16] = 255
        out.append(image)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--predictions", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=2000, help="predictions before the RSS baseline")
    parser.add_argument("--bundle", default="omniglot-conv4", help="bundle folder or shipped name")
    parser.add_argument("--store", default=None, help="store file [in memory]")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = parser.parse_args()
    n = args.predictions
    if n < 10 or args.warmup >= n:
        parser.error("need at least 10 predictions and more than --warmup")

    rng = np.random.default_rng(0)
    model = FewShotModel.open(args.bundle, store=args.store, threads=args.threads)
    for k in range(5):
        model.enroll(f"class{k}", synthetic(rng, k, 5))
    queries = [synthetic(rng, k % 5, 1)[0] for k in range(8)]

    tenth = max(1, n // 10)
    first = np.full(tenth, np.nan)  # allocated and touched now, before the baseline
    last = np.full(tenth, np.nan)
    every = max(1, n // 100)
    samples: list[tuple[int, float]] = []
    baseline = None
    clock = time.perf_counter
    started = clock()
    for i in range(n):
        t0 = clock()
        model.predict([queries[i % 8]])
        dt = clock() - t0
        if i < tenth:
            first[i] = dt
        if i >= n - tenth:
            last[i - (n - tenth)] = dt
        if i + 1 == args.warmup:
            baseline = rss_mb()
            samples.append((i + 1, baseline))
        elif baseline is not None and (i + 1) % every == 0:
            samples.append((i + 1, rss_mb()))
    wall = clock() - started
    end = rss_mb()
    assert baseline is not None
    p50_first, p50_last = float(np.median(first)) * 1e6, float(np.median(last)) * 1e6
    figures = {
        "predictions": n,
        "warmup": args.warmup,
        "bundle": str(args.bundle),
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "rss_after_warmup_mb": round(baseline, 2),
        "rss_end_mb": round(end, 2),
        "rss_growth_mb": round(end - baseline, 2),
        "rss_max_after_warmup_mb": round(max(r for _, r in samples), 2),
        "p50_first_10pct_us": round(p50_first, 1),
        "p50_last_10pct_us": round(p50_last, 1),
        "latency_drift_pct": round(100 * (p50_last - p50_first) / p50_first, 1),
        "target_rss_growth_mb": TARGET_MB,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, Python {sys.version.split()[0]}".replace(
            "  ", " "
        ),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    figures["rss_within_target"] = figures["rss_growth_mb"] < TARGET_MB
    for key, value in figures.items():
        print(f"{key:>26}: {value}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**figures, "rss_samples": samples}, f, indent=1)
    model.close()


if __name__ == "__main__":
    main()
