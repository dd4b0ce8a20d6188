"""Quality: Conv-4 ProtoNet trained on the Omniglot background set minus held-out alphabets, for a fixed
wall-clock budget, then evaluated on the held-out alphabets (upright characters) with 95% CIs.

The report uses the run's last checkpoint, not the one picked by validation on the same alphabets,
and evaluation episodes drawn with a seed other than validation's, so the figures carry no selection bias.

    python benchmarks/omniglot_quality.py --minutes 15 --device cpu --out runs/omniglot-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.evaluate import evaluate
from fewshot_edge.train import resolve_device, train

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "images_background.zip"
TASKS = [(5, 1), (5, 5), (20, 1), (20, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    parser.add_argument("--way", type=int, default=60)
    parser.add_argument("--shot", type=int, default=1, help="training shots (Snell et al.: match the test shot)")
    parser.add_argument("--query", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--holdout", type=int, default=5, help="alphabets held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=1000, help="validate every N episodes (costs budget)")
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/omniglot-quality")
    args = parser.parse_args()

    config = TrainConfig(
        sources=[args.source],
        data_options={"rotations": True},
        holdout=args.holdout,
        n_way=args.way,
        k_shot=args.shot,
        q_query=args.query,
        episodes=10**7,
        time_limit=args.minutes,
        lr=args.lr,
        val_every=args.val_every,
        val_episodes=200,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )
    metrics = train(config)
    device = resolve_device(args.device)
    method, _, _, _ = load_checkpoint(Path(args.out) / "last.pt", device)
    _, held_out = load_splits(config)
    results = [
        evaluate(method, held_out, n, k, 15, args.eval_episodes, seed=1000 + args.seed, device=device) for n, k in TASKS
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": f"{device.type}: {name}",
        "torch_threads": torch.get_num_threads(),
        "training": {
            "minutes": args.minutes,
            "episodes": metrics["episodes"],
            "elapsed_s": metrics["elapsed_s"],
            "episodes_per_s": metrics["episodes_per_s"],
            "way": args.way,
            "shot": args.shot,
            "query": args.query,
            "lr": args.lr,
            "seed": args.seed,
            "train_classes": metrics["train_classes"],
        },
        "held_out": {"alphabets": sorted(set(held_out.groups)), "characters": held_out.num_classes},
        "results": {f"{r.n_way}-way {r.k_shot}-shot": f"{100 * r.accuracy:.2f} +- {100 * r.ci95:.2f}" for r in results},
    }
    (Path(args.out) / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
