"""The training loop, top to bottom: config -> data -> method -> steps -> checkpoints and metrics.

A step is an episode (the episodic stage) or a batch of augmented images classified over every training
class (the pretrain stage, ``fewshot_edge.pretrain``); both validate on held-out episodes. Under torchrun
a step is one episode (or batch) per rank with the gradients averaged (``fewshot_edge.distributed``);
rank 0 validates, writes the files and shows the progress bar.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot_edge.checkpoint import build_method, read_checkpoint, save_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.data.splits import load_splits
from fewshot_edge.distributed import World, launch, rank_seed
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.evaluate import EvalResult, evaluate_sampler
from fewshot_edge.methods import FewShotMethod
from fewshot_edge.pretrain import BatchSampler, Classifier
from fewshot_edge.runtime.preprocess import InputSpec

Sampler = EpisodeSampler | BatchSampler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_enabled(device: torch.device) -> bool:
    """bfloat16 autocast pays on CUDA and on CPUs with bf16 matrix units (AVX512-BF16 / AMX); else fp32."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def learning_rate(config: TrainConfig, progress: float) -> float:
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


LOG_EVERY = 50  # episodes per progress-bar update; each update syncs the device


class Meter:
    """Loss and accuracy summed on the device over a window of steps, and the run's steady throughput in
    episodes (``ranks`` per step) per second.

    Steady throughput counts from the end of the first window (so warm-up and compilation are left out)
    and leaves out the time spent validating.
    """

    def __init__(self, device: torch.device, ranks: int = 1) -> None:
        self.ranks = ranks
        self.loss = torch.zeros((), device=device)
        self.acc = torch.zeros((), device=device)
        self.window, self.window_t = 0, time.perf_counter()
        self.steady_from: tuple[int, float] | None = None  # (episode, time) at the end of the first window
        self.val_seconds = 0.0

    def add(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.acc += acc.detach()
        self.window += 1

    def report(self, bar: tqdm, episode: int, val: EvalResult | None) -> None:
        """Show the window's mean loss, accuracy and speed on ``bar`` (syncs the device); start a new window."""
        mean_loss, mean_acc = self.loss.item() / self.window, self.acc.item() / self.window
        now = time.perf_counter()
        bar.set_postfix(
            eps=f"{self.ranks * self.window / (now - self.window_t):.1f}/s",
            loss=f"{mean_loss:.3f}",
            acc=f"{mean_acc:.3f}",
            val=f"{val.accuracy:.4f}" if val else "-",
        )
        bar.update(self.window)
        self.loss.zero_()
        self.acc.zero_()
        self.window, self.window_t = 0, now
        self.steady_from = self.steady_from or (episode, now)

    def validated(self, seconds: float) -> None:
        if self.steady_from:
            self.val_seconds += seconds

    def steady_rate(self, episode: int, end: float) -> float | None:
        """Episodes per second in steady state up to step ``episode`` at time ``end``; None before it began."""
        if not self.steady_from or episode <= self.steady_from[0]:
            return None
        start_episode, start = self.steady_from
        return round(self.ranks * (episode - start_episode) / max(end - start - self.val_seconds, 1e-9), 2)


class Checkpoints:
    """A run's validation history and best result; best.pt keeps the best model, last.pt all to resume."""

    def __init__(self, out: Path, config: TrainConfig, spec: InputSpec) -> None:
        self.out, self.config, self.spec = out, config, spec
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"accuracy": -1.0}

    def record(
        self,
        result: EvalResult,
        episode: int,
        elapsed: float,
        method: FewShotMethod,
        optimizer: torch.optim.Optimizer,
        generators: list[torch.Tensor],
        objective: torch.nn.Module,
    ) -> None:
        """Add ``result`` to the history, save best.pt when it is the best so far, and always last.pt
        (with the objective's own state when it holds more than the method, e.g. a classifier head, and
        every rank's sampler state, ``generator`` being rank 0's)."""
        self.history.append({"episode": episode, "elapsed_s": round(elapsed, 1), **result.to_dict()})
        if result.accuracy > self.best["accuracy"]:
            self.best.update(result.to_dict(), episode=episode)
            save_checkpoint(self.out / "best.pt", method, self.config, self.spec, episode=episode, best=self.best)
        save_checkpoint(
            self.out / "last.pt",
            method,
            self.config,
            self.spec,
            episode=episode,
            elapsed=elapsed,
            optimizer=optimizer.state_dict(),
            generator=generators[0],
            generators=generators,
            history=self.history,
            best=self.best,
            **({"objective": objective.state_dict()} if objective is not method else {}),
        )


def validate(method: FewShotMethod, val_data: FewShotDataset, config: TrainConfig, device: torch.device) -> EvalResult:
    """Accuracy on ``config.val_episodes`` validation episodes, the same episodes every time."""
    sampler = EpisodeSampler(val_data, config.val_way, config.val_shot, config.val_query, config.seed + 1, device)
    return evaluate_sampler(method, sampler, config.val_episodes)


def stage(
    config: TrainConfig, method: FewShotMethod, train_data: FewShotDataset, device: torch.device, rank: int = 0
) -> tuple[torch.nn.Module, Sampler, torch.optim.Optimizer]:
    """What a step trains, what it draws and how it steps: the method on episodes with Adam, or in the
    pretrain stage a linear classifier over the training classes on augmented batches with SGD. Each
    rank's sampler is seeded ``config.seed + rank``, so ranks draw different episodes."""
    fused = device.type == "cuda"
    seed = rank_seed(config.seed, rank, 0)
    if config.stage == "pretrain":
        objective = Classifier(method, train_data.num_classes).to(device)
        sampler = BatchSampler(train_data, config.batch_size, seed, device, config.augment)
        return (
            objective,
            sampler,
            torch.optim.SGD(
                objective.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
            ),
        )
    sampler = EpisodeSampler(train_data, config.n_way, config.k_shot, config.q_query, seed, device)
    return (
        method,
        sampler,
        torch.optim.Adam(method.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused),
    )


def train(config: TrainConfig, resume: str | Path | None = None, progress_bar: bool | None = None) -> dict[str, Any]:
    """Meta-train ``config.method``; writes config.json, last.pt, best.pt and metrics.json to ``config.out``.

    Stops after ``config.episodes`` steps or ``config.time_limit`` minutes, whichever comes first;
    the learning-rate schedule follows whichever of the two is further along. A step is one episode, or
    one per rank under torchrun (``fewshot_edge.distributed``), where only rank 0 writes files and the
    other ranks return their metrics without ``best`` and ``history``.
    """
    with launch(resolve_device(config.device)) as world:
        return _train(config, world, resume, progress_bar)


def _train(config: TrainConfig, world: World, resume: str | Path | None, progress_bar: bool | None) -> dict[str, Any]:
    device = world.device
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, val_data = load_splits(config)
    # channels-last convolutions run about 2x faster in bf16 on CPU (oneDNN) and use tensor cores on GPU
    method = build_method(config, train_data.spec, initialize=resume is None).to(
        device, memory_format=torch.channels_last
    )
    if world.rank:  # the same weights on every rank, its own draws in a method's loss (e.g. label slots)
        torch.manual_seed(config.seed + world.rank)
    out = Path(config.out)  # written only once the data and the method are known to be good
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
    if config.compile:  # in place, so checkpoint keys stay the same; CUDA graphs cut launch overhead
        method.backbone.compile(mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    objective, sampler, optimizer = stage(config, method, train_data, device, world.rank)
    checkpoints = Checkpoints(out, config, train_data.spec)
    start_episode, elapsed_before = 0, 0.0
    if resume is not None:
        payload = read_checkpoint(resume, device)
        objective.load_state_dict(payload.get("objective", payload["state"]))
        optimizer.load_state_dict(payload["optimizer"])
        start_episode, elapsed_before = int(payload["episode"]), float(payload["elapsed"])
        world.restore_sampler(
            sampler.generator, payload.get("generators", [payload["generator"]]), config.seed, start_episode
        )
        checkpoints.history, checkpoints.best = payload["history"], payload["best"]

    def record(episode: int, elapsed: float) -> EvalResult | None:
        """Every rank's sampler state to rank 0 (all ranks call this), which validates and records the
        result; the other ranks return None."""
        generators = world.gather_states(sampler.generator)
        if not world.main:
            return None
        result = validate(method, val_data, config, device)
        checkpoints.record(result, episode, elapsed, method, optimizer, generators, objective)
        return result

    step = world.wrap(objective)
    amp = config.amp and autocast_enabled(device)
    limit_s = config.time_limit * 60 if config.time_limit else math.inf
    show = world.main and (sys.stderr.isatty() if progress_bar is None else progress_bar)
    bar = tqdm(total=config.episodes, initial=start_episode, disable=not show, dynamic_ncols=True)
    objective.train()
    t0 = time.perf_counter() - elapsed_before
    meter = Meter(device, world.size)
    episode = start_episode
    elapsed = elapsed_before
    val_result: EvalResult | None = None
    while episode < config.episodes:
        if not world.grouped or (math.isfinite(limit_s) and episode % LOG_EVERY == 0):
            elapsed = world.agree(time.perf_counter() - t0)  # ranks agree on the schedule and when to stop
        if elapsed >= limit_s:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, max(episode / config.episodes, elapsed / limit_s))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, acc = step(sampler.sample())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(loss, acc)
        episode += 1
        if world.main and (meter.window == LOG_EVERY or episode == config.episodes):
            meter.report(bar, episode, val_result)
        if episode % config.val_every == 0:
            v0 = time.perf_counter()
            val_result = record(episode, v0 - t0)
            meter.validated(time.perf_counter() - v0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_end = time.perf_counter()
    bar.update(meter.window)
    bar.close()

    elapsed = loop_end - t0
    # the last step was validated in the loop, or a resumed run took no step: its history ends there
    if episode % config.val_every if episode > start_episode else resume is None:
        record(episode, elapsed)
    drawn = (episode - start_episode) * world.size  # episodes (or batches) drawn by all ranks
    metrics = {
        "episodes": episode,
        "ranks": world.size,
        "elapsed_s": round(elapsed, 3),
        "episodes_per_s": round(drawn / max(elapsed - elapsed_before, 1e-9), 2),
        "steady_episodes_per_s": meter.steady_rate(episode, loop_end) if world.main else None,
        "device": str(device),
        "train_classes": train_data.num_classes,
        "val_classes": val_data.num_classes,
    }
    if not world.main:
        return metrics
    metrics = {**metrics, "best": checkpoints.best, "history": checkpoints.history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
