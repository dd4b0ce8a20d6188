"""The device runtime beside PyTorch eager on the same model, measured in one run on this machine.

For a checkpoint and its bundle: ``fewshot-edge bench``'s figures for the runtime (one-image predict
p50/p99 from a decoded image, encoder throughput on a batch, peak RSS of a fresh process that opens the
bundle and predicts) and the same for PyTorch eager on the checkpoint (fp32, ``torch.no_grad``, the
runtime's preprocessing, prototypes by squared distance, the same thread count), with the ratios.

    python benchmarks/runtime_vs_torch.py runs/mini/best.pt runs/mini-bundle --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.runtime.bench import K_SHOT, N_WAY, rate, run_benchmark, source_images, time_calls
from fewshot_edge.runtime.preprocess import preprocess

TORCH_CHILD = """
import json, sys
import torch
from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.runtime.bench import peak_rss_mb, source_images
from fewshot_edge.runtime.preprocess import preprocess
torch.set_num_threads(int(sys.argv[2]))
method, _, spec, _ = load_checkpoint(sys.argv[1])
x = torch.from_numpy(preprocess(source_images(spec, 1), spec))
with torch.no_grad():
    for _ in range(300):
        method.embed(x)
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def torch_figures(checkpoint: str, threads: int, runs: int, batch: int, seconds: float) -> dict[str, float]:
    """PyTorch eager: one-image predict against ``N_WAY`` prototypes of ``K_SHOT`` shots, batch throughput, RSS."""
    torch.set_num_threads(threads)
    method, _, spec, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        shots = [torch.from_numpy(preprocess(source_images(spec, K_SHOT, seed=c + 1), spec)) for c in range(N_WAY)]
        prototypes = torch.stack([method.embed(s).mean(0) for s in shots])
        images = source_images(spec, batch, seed=N_WAY + 1)
        one, many = images[:1], torch.from_numpy(preprocess(images, spec))

        def predict() -> int:
            query = method.embed(torch.from_numpy(preprocess(one, spec)))
            return int(torch.cdist(query, prototypes).argmin())

        figures = {
            "predict": time_calls(predict, runs),
            "encoder_images_per_s": rate(lambda: method.embed(many), batch, seconds),
        }
    child = subprocess.run(
        [sys.executable, "-c", TORCH_CHILD, checkpoint, str(threads)], capture_output=True, text=True, check=True
    )
    return {**figures, **json.loads(child.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    runtime = run_benchmark(args.bundle, threads=args.threads, runs=args.runs, batch=args.batch, seconds=args.seconds)
    eager = torch_figures(args.checkpoint, args.threads, args.runs, args.batch, args.seconds)
    rows = {
        "predict_p50_ms": (runtime["predict"]["p50_ms"], eager["predict"]["p50_ms"]),
        "predict_p99_ms": (runtime["predict"]["p99_ms"], eager["predict"]["p99_ms"]),
        "encoder_images_per_s": (runtime["encoder_images_per_s"], eager["encoder_images_per_s"]),
        "peak_rss_mb": (runtime["peak_rss_mb"], eager["peak_rss_mb"]),
    }
    report = {
        "bundle": args.bundle,
        "checkpoint": args.checkpoint,
        "input": runtime["input"],
        "machine": runtime["machine"],
        "threads": args.threads,
        "batch": args.batch,
        "torch": torch.__version__,
        "runtime_vs_torch": {k: {"runtime": r, "torch": t, "ratio": r / t} for k, (r, t) in rows.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
