"""Data-parallel training across the processes ``torchrun`` starts: one rank per process, one episode
(or pretraining batch) per rank and step, gradients averaged by ``DistributedDataParallel``.

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) ``launch`` gives a single-process
``World`` and ``World.wrap`` returns the objective's own ``loss``: the plain loop, unchanged.

BatchNorm stays per rank (no SyncBatchNorm): each rank normalises its own episode with that episode's
statistics, exactly as the single-process loop normalises each episode, so N ranks compute the mean of
N single-process episode losses. The running statistics (used only at evaluation) are rank 0's,
broadcast to the other ranks at each step by DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fewshot_edge.runtime.errors import FewShotInputError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = timedelta(minutes=30)  # rank 0 validates and writes checkpoints while the others wait

Step = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def launched() -> bool:
    """Whether this process is a rank started by torchrun (or anything that sets its environment)."""
    return all(name in os.environ for name in ENV)


class LossStep(nn.Module):
    """``objective.loss`` as a ``forward``, so DDP sees the step's forward pass and syncs its backward."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.loss(batch)


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` ranks and the device it trains on."""

    device: torch.device
    rank: int = 0
    size: int = 1
    grouped: bool = False  # a process group is in use (even of one rank: DDP at one rank)

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, writes files and shows progress."""
        return self.rank == 0

    def wrap(self, objective: nn.Module) -> Step:
        """The training step's forward: ``objective.loss``, through DDP when grouped.

        ``static_graph`` lets DDP find parameters a method leaves unused (a frozen part, an option that
        turns a parameter off) in the first step instead of on every step; a method's set of used
        parameters must not change from step to step.
        """
        if not self.grouped:
            return objective.loss  # type: ignore[no-any-return]
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(LossStep(objective), device_ids=ids, static_graph=True)

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a collective: every rank calls it at the same step)."""
        if not self.grouped:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, 0)
        return float(shared.item())

    def gather_states(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Every rank's generator state in rank order (a collective)."""
        state = generator.get_state()
        if not self.grouped:
            return [state]
        states: list[Any] = [None] * self.size
        dist.all_gather_object(states, state)
        return states

    def restore_sampler(self, generator: torch.Generator, states: list[torch.Tensor], seed: int, step: int) -> None:
        """Continue this rank's draw from ``states`` (every saved rank's generator state, rank order); a
        rank the saved run did not have starts a fresh stream seeded by (seed, rank, step)."""
        if self.rank < len(states):
            generator.set_state(states[self.rank].cpu())
        else:
            generator.manual_seed(rank_seed(seed, self.rank, step))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A fresh sampler seed for ``rank`` joining a resumed run at ``step``: ``seed + rank`` at step 0
    (the seed a new run gives that rank), otherwise one derived from all three."""
    if step == 0:
        return seed + rank
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The GPU of this node's ``local_rank`` (CUDA), or the CPU; a fixed GPU index is refused."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != local_rank:
        raise FewShotInputError(
            f"under torchrun each rank trains on the GPU of its LOCAL_RANK; give --device cuda or auto, not {device}"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def launch(device: torch.device) -> Iterator[World]:
    """This process's ``World``: under torchrun a process group (NCCL on GPUs, gloo on CPUs) over the
    ranks, closed on exit if this call opened it; otherwise a single process on ``device``."""
    if not launched():
        yield World(device)
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(device, int(os.environ["LOCAL_RANK"]))
    opened = not dist.is_initialized()
    if opened:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=size, timeout=TIMEOUT, device_id=device if backend == "nccl" else None
        )
    try:
        yield World(device, rank, size, grouped=True)
    finally:
        if opened:
            dist.destroy_process_group()
