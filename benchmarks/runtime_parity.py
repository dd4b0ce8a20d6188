"""Acceptance: the device runtime classifies as PyTorch does.

On the same seeded evaluation episodes (default 1,000 5-way 1-shot 15-query) of the checkpoint's
held-out classes, drawn once with ``EpisodeSampler``, the PyTorch method (its ``logits``: ProtoNet,
matching, relation, ...) and the runtime (``FewShotModel`` on the exported bundle: preprocessing,
engine, enrollment store, the adapter of the bundle's default mode or ``--adapt MODE``, with every
graph it runs) classify the exact same images. Reports both accuracies with 95% CIs, their difference in
percentage points (target <= 0.2) with the CI of the paired per-episode difference, how often the two
predictions agree, and the share of queries the runtime's open-set threshold answers "unknown".

    python benchmarks/runtime_parity.py runs/omniglot/best.pt [--bundle bundles/omniglot]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.evaluate import evaluate
from fewshot_edge.export import export_bundle
from fewshot_edge.runtime import FewShotModel, Frame, InputSpec
from fewshot_edge.runtime.stats import confidence_interval

TARGET_PP = 0.2


def as_drawn(pixels: np.ndarray, spec: InputSpec) -> np.ndarray | Frame:
    """A data-set image (uint8 (C, H, W) after ``to_pixels``) back as the device would receive it: a gray
    array, or an RGB ``Frame`` (a colour array must say its channel order)."""
    pixels = 255 - pixels if spec.invert else pixels
    return pixels[0] if spec.channels == 1 else Frame(pixels.transpose(1, 2, 0), "RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--bundle", help="the checkpoint's bundle (default: export one to a temporary folder)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the evaluation episodes")
    parser.add_argument("--adapt", help="the runtime's adaptation mode (default: the bundle's default mode)")
    args = parser.parse_args()

    method, config, spec, _ = load_checkpoint(args.checkpoint)
    held_out = load_splits(config)[1]
    reference = evaluate(method, held_out, args.way, args.shot, args.query, args.episodes, seed=args.seed)
    sampler = EpisodeSampler(held_out, args.way, args.shot, args.query, seed=args.seed)  # evaluate's episodes
    torch_acc, runtime_acc = np.empty(args.episodes), np.empty(args.episodes)
    agree = unknown = 0
    labels = [f"class {c}" for c in range(args.way)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or export_bundle(args.checkpoint, Path(tmp) / "bundle").path
        with FewShotModel.open(bundle, adapt=args.adapt) as model, torch.no_grad():
            t0 = time.perf_counter()
            for i in range(args.episodes):
                ep = sampler.sample()
                truth = ep.query_labels.numpy()
                torch_pred = method.logits(ep.support, ep.support_labels, ep.query, ep.n_way).argmax(-1).numpy()
                index = ep.index.numpy()
                for label, ids in zip(labels, index, strict=True):
                    model.enroll(label, [as_drawn(held_out.images[j], spec) for j in ids[: args.shot]])
                predictions = model.predict(
                    [as_drawn(held_out.images[j], spec) for j in index[:, args.shot :].flatten()]
                )
                runtime_pred = np.array([labels.index(p.top_k[0][0]) for p in predictions])
                unknown += sum(p.label == "unknown" for p in predictions)
                for label in labels:
                    model.remove_class(label)
                torch_acc[i], runtime_acc[i] = (torch_pred == truth).mean(), (runtime_pred == truth).mean()
                agree += int((torch_pred == runtime_pred).sum())
            runtime_s = time.perf_counter() - t0
            model_id, mode = model.bundle.model_id, model.adapter.name
    queries = args.episodes * args.way * args.query
    (t_mean, t_ci), (r_mean, r_ci) = confidence_interval(torch_acc), confidence_interval(runtime_acc)
    d_mean, d_ci = confidence_interval(runtime_acc - torch_acc)
    report = {
        "checkpoint": args.checkpoint,
        "model_id": model_id,
        "mode": mode,
        "task": f"{args.episodes} episodes of {args.way}-way {args.shot}-shot {args.query}-query, seed {args.seed}",
        "held_out_classes": held_out.num_classes,
        "same_episodes_as_evaluate": bool(np.isclose(t_mean, reference.accuracy, atol=1e-6)),
        "pytorch": {"accuracy_pct": round(100 * t_mean, 3), "ci95_pct": round(100 * t_ci, 3)},
        "runtime": {
            "accuracy_pct": round(100 * r_mean, 3),
            "ci95_pct": round(100 * r_ci, 3),
            "unknown_rate_pct": round(100 * unknown / queries, 3),
            "seconds": round(runtime_s, 2),
        },
        "difference_pp": round(100 * d_mean, 3),
        "difference_ci95_pp": round(100 * d_ci, 3),
        "prediction_agreement_pct": round(100 * agree / queries, 3),
        "target_pp": TARGET_PP,
        "within_target": bool(abs(100 * d_mean) <= TARGET_PP),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
