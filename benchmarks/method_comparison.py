"""Methods side by side at an equal training budget: each is meta-trained for the same number of episodes
(or, with --time-limit, the same wall-clock minutes) of the same shape, seed and learning-rate schedule,
then its last checkpoint is evaluated on the same held-out episodes (95% CIs). Omniglot: the background set minus 5 held-out alphabets (characters upright
at evaluation); miniImageNet: the training shards, evaluated on the 16 validation classes (so at most
16-way). Writes OUT/comparison.json after each method, so an interrupted run keeps what it finished
(--reuse then evaluates what it trained and trains the rest).

    python benchmarks/method_comparison.py --data omniglot --episodes 10000 --device cuda --out runs/compare-omniglot
    python benchmarks/method_comparison.py --data miniimagenet --source train-0.zip --source train-1.zip \\
        --source train-2.zip --val-source val.zip --max-per-class 100 --episodes 300 --out runs/compare-mini
    python benchmarks/method_comparison.py --data omniglot --methods protonet,matching,relation,mann,transformer \
        --way 20 --episodes 1000000 --time-limit 5 --tasks 5x1,20x1 --out runs/compare-families
    python benchmarks/method_comparison.py --data omniglot --methods protonet,maml,maml-head,fomaml,metasgd,metalstm,versa \
        --way 20 --shot 1 --episodes 1000000 --time-limit 5 --tasks 5x1,20x1 --out runs/compare-optimization
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.omniglot import upright
from fewshot_edge.data.splits import load_splits
from fewshot_edge.evaluate import evaluate
from fewshot_edge.train import resolve_device, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {"omniglot": [(5, 1), (5, 5), (20, 1), (20, 5)], "miniimagenet": [(5, 1), (5, 5), (16, 5)]}
EPISODE_SHAPE = {"omniglot": (60, 1, 5), "miniimagenet": (20, 5, 5)}  # training n_way, k_shot, q_query
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "protonet": {},
    "film": {},
    "anil": {"inner_steps": 5, "step_size": 0.001},
    "metalstm": {"inner_steps": 5, "step_size": 0.001},
    "maml": {"inner_steps": 5, "step_size": 0.01},
    "metasgd": {"inner_steps": 5, "step_size": 0.01},
    "matching": {},
    "relation": {},
    "mann": {"label_delay": False},  # with the paper's delay it stays at chance in short runs (docs/results.md)
    "transformer": {},
    "versa": {},
}
# Labels beyond the method names: a method trained with other options, or another label's checkpoint
# evaluated with options that leave its parameters as they are (listed after it in --methods).
TRAINED_AS: dict[str, tuple[str, dict[str, Any]]] = {"fomaml": ("maml", {"first_order": True})}
EVALUATED_AS: dict[str, tuple[str, dict[str, Any]]] = {"maml-head": ("maml", {"test_adapt": "head"})}


def base_config(args: argparse.Namespace) -> TrainConfig:
    n_way, k_shot, q_query = EPISODE_SHAPE[args.data]
    common = dict(
        n_way=args.way or n_way,
        k_shot=args.shot or k_shot,
        q_query=q_query,
        episodes=args.episodes,
        time_limit=args.time_limit,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
        lr=args.lr,
        val_every=args.episodes,
        val_episodes=100,
        seed=args.seed,
        device=args.device,
    )
    if args.data == "omniglot":
        return TrainConfig(
            sources=args.source or [str(DATA / "omniglot" / "images_background.zip")],
            data_options={"rotations": True},
            holdout=5,
            **common,
        )
    sources = args.source or [str(DATA / "miniimagenet" / f"train-{i}.zip") for i in range(3)]
    return TrainConfig(
        data="folders",
        sources=sources,
        val_sources=args.val_source or [str(DATA / "miniimagenet" / "val.zip")],
        data_options={"max_per_class": args.max_per_class} if args.max_per_class else {},
        **common,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(TASKS), default="omniglot")
    parser.add_argument("--source", action="append", help="training data (repeat) [the shared data set]")
    parser.add_argument("--val-source", action="append", help="miniimagenet: validation data [val.zip]")
    parser.add_argument("--max-per-class", type=int, help="miniimagenet: first N images per class")
    parser.add_argument("--methods", default="protonet,film,anil")
    parser.add_argument("--episodes", type=int, default=10000, help="training episodes, the same for every method")
    parser.add_argument("--time-limit", type=float, help="... or training minutes, the same for every method")
    parser.add_argument("--init-from", help="start every method's backbone from this checkpoint (e.g. pretrained)")
    parser.add_argument("--tasks", help="evaluation tasks as WAYxSHOT,... [all of the data set's]")
    parser.add_argument("--way", type=int, help="training way [60 omniglot, 20 miniimagenet]")
    parser.add_argument("--shot", type=int, help="training shot [1 omniglot, 5 miniimagenet]")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--reuse", action="store_true", help="evaluate methods already trained in OUT, train the rest")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/method-comparison")
    args = parser.parse_args()

    tasks = [tuple(map(int, t.split("x"))) for t in args.tasks.split(",")] if args.tasks else TASKS[args.data]
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = base_config(args)
    held_out = load_splits(config)[1]
    if args.data == "omniglot":
        held_out = upright(held_out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "data": args.data,
        "held_out_classes": held_out.num_classes,
        "training": {
            "episodes": args.episodes,
            "time_limit_min": args.time_limit,
            "init_from": config.init_from,
            "way": config.n_way,
            "shot": config.k_shot,
            "query": config.q_query,
            "lr": args.lr,
            "schedule": config.schedule,
            "seed": args.seed,
        },
        "eval_episodes": args.eval_episodes,
        "methods": {},
    }
    for label in args.methods.split(","):
        if label in EVALUATED_AS:
            source, eval_options = EVALUATED_AS[label]
            options = {**report["methods"][source]["options"], **eval_options}
            metrics = json.loads((out / source / "metrics.json").read_text())
        else:
            method, extra = TRAINED_AS.get(label, (label, {}))
            source, eval_options, options = label, {}, {**METHOD_OPTIONS[method], **extra}
            run = TrainConfig(
                **{**config.to_dict(), "method": method, "method_options": options, "out": str(out / label)}
            )
            finished = out / label / "metrics.json"
            if args.reuse and finished.exists():  # trained by an earlier run of this command: evaluate only
                metrics = json.loads(finished.read_text())
            else:
                metrics = train(run, progress_bar=False)
        trained, _, _, _ = load_checkpoint(out / source / "last.pt", device, eval_options)
        results = [
            evaluate(trained, held_out, n, k, 15, args.eval_episodes, seed=1000 + args.seed, device=device)
            for n, k in tasks
        ]
        report["methods"][label] = {
            "options": options,
            "elapsed_s": metrics["elapsed_s"],
            "episodes": metrics["episodes"],
            "episodes_per_s": metrics["episodes_per_s"],
            "results": {
                f"{r.n_way}-way {r.k_shot}-shot": [round(100 * r.accuracy, 2), round(100 * r.ci95, 2)] for r in results
            },
        }
        (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
        print(label, json.dumps(report["methods"][label]), flush=True)


if __name__ == "__main__":
    main()
