"""Training throughput: the project's loop vs a plain per-image DataLoader loop, side by side.

60-way 5-shot 5-query Conv-4 ProtoNet on 28x28 Omniglot (the background set, rotations as classes).
Both loops run the same method, optimizer and AMP setting; they differ only in how episodes reach the
model: the project draws them by index from a uint8 array resident on the training device, the
baseline assembles them image by image in a torch DataLoader and copies each batch to the device.

    python benchmarks/train_throughput.py [--source images_background.zip] [--episodes 300] [--device auto]
        [--loops project,dataloader[,compiled]]

Both loops are timed after a warm-up (the project loop's first 50 episodes, reported by ``train`` as
``steady_episodes_per_s``), so start-up costs (cuDNN autotuning, compiling) are left out of both.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fewshot_edge.checkpoint import build_method
from fewshot_edge.config import TrainConfig
from fewshot_edge.data import FewShotDataset, load_dataset
from fewshot_edge.train import autocast_enabled, resolve_device, train

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "images_background.zip"
WAY, SHOT, QUERY = 60, 5, 5


class PerImage(Dataset):
    """One normalised image per item, as a typical few-shot DataLoader pipeline serves them."""

    def __init__(self, data: FewShotDataset) -> None:
        self.images = data.images
        self.scale, self.shift = data.spec.scale_shift()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].astype(np.float32) * self.scale + self.shift)


class EpisodeBatches(Sampler):
    """Yields each episode's image indices (support then query per class), class-major."""

    def __init__(self, data: FewShotDataset, episodes: int, seed: int) -> None:
        self.by_class = [np.flatnonzero(data.labels == c) for c in range(data.num_classes)]
        self.episodes, self.rng = episodes, np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self):
        for _ in range(self.episodes):
            classes = self.rng.choice(len(self.by_class), WAY, replace=False)
            picks = [self.rng.choice(self.by_class[c], SHOT + QUERY, replace=False) for c in classes]
            yield np.concatenate([p[:SHOT] for p in picks] + [p[SHOT:] for p in picks]).tolist()


def dataloader_loop(config: TrainConfig, data: FewShotDataset, episodes: int, warmup: int, workers: int) -> float:
    """Episodes/s of a plain loop fed by a per-image DataLoader (timed after ``warmup`` episodes)."""
    device = resolve_device(config.device)
    method = build_method(config, data.spec).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(method.parameters(), lr=config.lr, fused=device.type == "cuda")
    loader = DataLoader(
        PerImage(data),
        batch_sampler=EpisodeBatches(data, episodes + warmup, config.seed),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    support_labels = torch.arange(WAY, device=device).repeat_interleave(SHOT)
    query_labels = torch.arange(WAY, device=device).repeat_interleave(QUERY)
    amp = config.amp and autocast_enabled(device)
    for i, batch in enumerate(loader):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = method.logits(batch[: WAY * SHOT], support_labels, batch[WAY * SHOT :], WAY)
            loss = torch.nn.functional.cross_entropy(logits.float(), query_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return episodes / (time.perf_counter() - t0)


def project_loop(config: TrainConfig, episodes: int) -> float:
    """Steady-state episodes/s of ``train`` over ``episodes`` episodes after its 50-episode warm-up."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**config.to_dict(), "episodes": episodes + 50, "out": out})
        return train(cfg, progress_bar=False)["steady_episodes_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--episodes", type=int, default=200, help="timed episodes per loop")
    parser.add_argument("--warmup", type=int, default=50, help="untimed first episodes of the DataLoader loop")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the baseline")
    parser.add_argument("--loops", default="project,dataloader", help="any of project, dataloader, compiled")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    loops = args.loops.split(",")
    device = resolve_device(args.device)
    config = TrainConfig(
        sources=[args.source],
        data_options={"rotations": True},
        n_way=WAY,
        k_shot=SHOT,
        q_query=QUERY,
        val_every=10**9,
        val_episodes=1,
        device=args.device,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": f"{device.type}: {name}",
        "torch_threads": torch.get_num_threads(),
        "task": f"{WAY}-way {SHOT}-shot {QUERY}-query Conv-4 ProtoNet, 28x28 Omniglot, bf16 autocast: "
        f"{config.amp and autocast_enabled(device)}",
    }
    if "project" in loops:
        result["project_loop_episodes_per_s"] = round(project_loop(config, args.episodes), 1)
    if "compiled" in loops:
        compiled = TrainConfig(**{**config.to_dict(), "compile": True})
        result["project_loop_compiled_episodes_per_s"] = round(project_loop(compiled, args.episodes), 1)
    if "dataloader" in loops:
        data = load_dataset("omniglot", [args.source], rotations=True)
        baseline = dataloader_loop(config, data, args.episodes, args.warmup, args.workers)
        result["dataloader_loop_episodes_per_s"] = round(baseline, 1)
        for key in ("project_loop_episodes_per_s", "project_loop_compiled_episodes_per_s"):
            if key in result:
                result[key.replace("episodes_per_s", "ratio")] = round(result[key] / baseline, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
