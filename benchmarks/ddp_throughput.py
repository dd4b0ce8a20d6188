"""Data-parallel training throughput on Omniglot (Conv-4, rotations as classes): episodes/s for 1, 2, ...
ranks under torchrun with the scaling efficiency, and the single-process loop (no torchrun) for the
cost of DDP at one rank.

Each rank count is a real ``torchrun --standalone --nproc_per_node N -m fewshot_edge.cli train`` run
(gloo on CPUs, NCCL on GPUs: one GPU per rank); the rate is the run's ``steady_episodes_per_s`` (all
ranks' episodes, after the first 50 steps, validation left out), the fastest of ``--repeats`` runs
taken in turns. Efficiency at N ranks is rate(N) / (N x rate(1 rank)); the DDP overhead is
1 - rate(1 rank) / rate(single process).

    python benchmarks/ddp_throughput.py [--source images_background.zip] [--ranks 1,2] [--steps 200]
        [--device cpu|cuda] [--threads 1] [--repeats 1] [--method protonet] [--way 60 --shot 5 --query 5]
        [--json]

On CPUs each rank runs ``--threads`` threads, so N ranks need N x threads free cores to scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "images_background.zip"


def run(command: list[str], out: Path, threads: int) -> dict[str, Any]:
    """Run one training command to ``out`` and return its metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def measure(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The single-process run, then one torchrun run per rank count."""
    train = [
        "-m",
        "fewshot_edge.cli",
        "train",
        "--source",
        str(args.source),
        "--rotations",
        "--method",
        args.method,
        "--way",
        str(args.way),
        "--shot",
        str(args.shot),
        "--query",
        str(args.query),
        "--episodes",
        str(args.steps),
        "--val-every",
        str(args.steps),
        "--val-episodes",
        "10",
        "--device",
        args.device,
        "--seed",
        "0",
    ]
    best: dict[int, float] = {}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every count alike
        for ranks in [0, *args.ranks]:  # 0: the single-process loop
            out = folder / f"ranks{ranks}"
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else []
            metrics = run([sys.executable, *launcher, *train, "--out", str(out)], out, args.threads)
            rate = metrics["steady_episodes_per_s"]
            best[ranks] = max(best.get(ranks, 0.0), rate)
            print(f"{'single process' if ranks == 0 else f'{ranks} rank(s)'}: {rate} episodes/s", file=sys.stderr)
    rows = [{"ranks": n, "episodes_per_s": rate, "per_rank": round(rate / max(n, 1), 2)} for n, rate in best.items()]
    single, one = rows[0]["episodes_per_s"], next((r["episodes_per_s"] for r in rows if r["ranks"] == 1), None)
    for row in rows[1:]:
        row["efficiency"] = round(row["episodes_per_s"] / (row["ranks"] * one), 3) if one else None
    if one:
        rows[0]["ddp_overhead_at_1_rank"] = round(1 - one / single, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (the first 50 are warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--method", default="protonet")
    parser.add_argument("--way", type=int, default=60)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each count, the fastest kept")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    args.ranks = [int(n) for n in args.ranks.split(",")]
    if args.steps <= 50:
        parser.error("--steps must exceed the 50 warm-up steps")
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(args, Path(folder))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.way}-way {args.shot}-shot {args.query}-query Conv-4 {args.method}, {args.device}, {args.steps} steps")
    print(f"{'ranks':>14} {'episodes/s':>11} {'per rank':>9} {'efficiency':>11}")
    for row in rows:
        name = "single process" if row["ranks"] == 0 else str(row["ranks"])
        efficiency = row.get("efficiency")
        print(
            f"{name:>14} {row['episodes_per_s']:>11} {row['per_rank']:>9} {'' if efficiency is None else efficiency:>11}"
        )
    if "ddp_overhead_at_1_rank" in rows[0]:
        print(f"DDP overhead at 1 rank: {100 * rows[0]['ddp_overhead_at_1_rank']:.1f}%")


if __name__ == "__main__":
    main()
