"""Data-parallel training on 2 gloo ranks (CPU): DDP's gradients are the mean of the ranks' episodes for
every method, a 2-rank run equals one process stepping on the mean loss of the same two episodes, only
rank 0 writes, its checkpoint evaluates, and runs resume on 1 rank from 2 and on 2 ranks from 1.

One ``torch.multiprocessing`` launch (module fixture) does all the 2-rank work; the tests check its results.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewshot_edge.checkpoint import build_method, load_checkpoint, read_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.distributed import World, launch, rank_device, rank_seed
from fewshot_edge.episodes import Episode, EpisodeSampler
from fewshot_edge.evaluate import evaluate
from fewshot_edge.methods import METHODS, create_method
from fewshot_edge.models import create_backbone
from fewshot_edge.pretrain import Batch, Classifier
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.train import learning_rate, train

RUNS = "runs"  # the runs' folder under the fixture's tmp folder; the audit hook watches it


def run_config(source: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(
        sources=[str(source)],
        holdout=1,
        n_way=5,
        k_shot=1,
        q_query=2,
        val_way=5,
        val_shot=1,
        val_query=2,
        episodes=4,
        val_every=2,
        val_episodes=5,
        amp=False,
        device="cpu",
        out=str(out),
    )
    return TrainConfig(**{**base, **kw})


def random_episode(seed: int, n: int = 3, k: int = 1, q: int = 2) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.randn(n * k, 1, 28, 28, generator=g),
        torch.arange(n).repeat_interleave(k),
        torch.randn(n * q, 1, 28, 28, generator=g),
        torch.arange(n).repeat_interleave(q),
        n,
        torch.arange(n),
        torch.zeros(n, k + q, dtype=torch.long),
    )


def objective_and_batch(name: str, rank: int) -> tuple[torch.nn.Module, Any]:
    """A method (or the pretrain classifier, "pretrain") on a tiny Conv-4, and this rank's own input."""
    torch.manual_seed(0)
    method = create_method("protonet" if name == "pretrain" else name, create_backbone("conv4", 1, 28))
    if name == "pretrain":
        g = torch.Generator().manual_seed(rank)
        return Classifier(method, 4), Batch(torch.randn(6, 1, 28, 28, generator=g), torch.randint(4, (6,), generator=g))
    return method, random_episode(rank)


def gradient_gaps(world: World, name: str) -> tuple[float, float, float]:
    """Over the trainable parameters: the largest |DDP gradient - mean of the ranks' own gradients|, the
    largest |rank 0's - rank 1's own gradient| (not zero: the ranks' inputs differ) and the largest
    |own gradient| (the scale)."""
    objective, batch = objective_and_batch(name, world.rank)
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    rng = torch.get_rng_state()  # a method's loss may draw (label slots): the same draws twice
    own = torch.autograd.grad(objective.loss(batch)[0], params, allow_unused=True)
    own_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, own, strict=True)]
    torch.set_rng_state(rng)
    step = world.wrap(objective)  # held: DDP's backward needs it alive
    step(batch)[0].backward()
    ranks: list[Any] = [None, None]
    dist.all_gather_object(ranks, own_grads)
    gap = spread = scale = 0.0
    for p, a, b in zip(params, *ranks, strict=True):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        gap = max(gap, (got - (a + b) / 2).abs().max().item())
        spread = max(spread, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item(), b.abs().max().item())
    return gap, spread, scale


def written_paths(watched: Path) -> tuple[list[str], Any]:
    """A list that an audit hook fills with the files created, opened for writing or renamed under ``watched``."""
    writes: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], str | Path):
            path, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event in ("os.rename", "os.mkdir", "os.remove"):
            path, writing = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if writing and str(path).startswith(str(watched)):
            writes.append(Path(path).name)

    return writes, hook


def worker(rank: int, port: int, tmp: Path, source: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    writes, hook = written_paths(tmp / RUNS)
    sys.addaudithook(hook)
    with launch(torch.device("cpu")) as world:  # train() runs in this group
        gaps = {name: gradient_gaps(world, name) for name in [*METHODS, "pretrain"]}
        fresh = train(run_config(source, tmp / RUNS / "two"), progress_bar=False)
        resumed = train(
            run_config(source, tmp / RUNS / "one_to_two"), resume=tmp / "one" / "last.pt", progress_bar=False
        )
        pretrain = run_config(source, tmp / RUNS / "pretrain", stage="pretrain", batch_size=8, episodes=2, lr=0.05)
        pretrained = train(pretrain, progress_bar=False)
    results = {"gaps": gaps, "writes": writes, "fresh": fresh, "resumed": resumed, "pretrained": pretrained}
    torch.save(results, tmp / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(omniglot_small1: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The fixture folder and each rank's results; first a 1-rank run of 2 steps to resume on 2 ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    train(run_config(omniglot_small1, tmp / "one", episodes=2), progress_bar=False)
    mp.spawn(worker, (free_port(), tmp, omniglot_small1), nprocs=2)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def omniglot_small1() -> Path:  # module scope for two_ranks (conftest's is per test)
    from conftest import require_data

    return require_data("omniglot/images_background_small1.zip")[0]


@pytest.mark.parametrize("name", [*METHODS, "pretrain"])
def test_ddp_gradient_is_the_mean_of_the_ranks_episodes(two_ranks, name):
    gap, spread, scale = two_ranks[1][0]["gaps"][name]
    assert spread > 1e-4  # the ranks' episodes differ, so their gradients do
    assert gap <= 1e-5 * max(scale, 1.0)


def advanced(sampler: EpisodeSampler, state: torch.Tensor, steps: int) -> torch.Tensor:
    """The generator state after ``steps`` episodes drawn from ``state``."""
    sampler.generator.set_state(state)
    for _ in range(steps):
        sampler.sample()
    return sampler.generator.get_state()


def test_two_ranks_step_as_one_process_on_the_mean_of_both_episodes(two_ranks, omniglot_small1):
    tmp, _ = two_ranks
    config = run_config(omniglot_small1, tmp / "reference")
    train_data, _ = load_splits(config)
    torch.manual_seed(config.seed)
    method = build_method(config, train_data.spec, initialize=True).to(memory_format=torch.channels_last)
    samplers = [EpisodeSampler(train_data, 5, 1, 2, seed, "cpu") for seed in (0, 1)]
    optimizer = torch.optim.Adam(method.parameters(), lr=config.lr)
    method.train()
    # one thread, as each rank ran: Adam divides by sqrt(v), so on a near-zero gradient a last-bit
    # difference from another summation order becomes a whole step of the learning rate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(config.episodes):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step / config.episodes)
            loss = sum(method.loss(s.sample())[0] for s in samplers) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    state = read_checkpoint(tmp / RUNS / "two" / "last.pt")["state"]
    for name, p in method.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), atol=1e-5, rtol=1e-4, msg=name)
    saved = read_checkpoint(tmp / RUNS / "two" / "last.pt")["generators"]
    assert all(torch.equal(s.generator.get_state(), g) for s, g in zip(samplers, saved, strict=True))


def test_only_rank_0_writes_and_its_checkpoint_evaluates(two_ranks, omniglot_small1):
    tmp, (rank0, rank1) = two_ranks
    assert rank1["writes"] == []
    assert {"config.json", "best.pt", "last.pt", "metrics.json"} <= set(rank0["writes"])
    assert rank0["fresh"]["ranks"] == 2 and [h["episode"] for h in rank0["fresh"]["history"]] == [2, 4]
    assert "history" not in rank1["fresh"] and rank1["fresh"]["episodes"] == 4
    method, config, _, _ = load_checkpoint(tmp / RUNS / "two" / "best.pt")
    result = evaluate(method, load_splits(config)[1], 5, 1, 2, episodes=5, seed=3)
    assert result.episodes == 5 and 0.0 <= result.accuracy <= 1.0


def test_a_two_rank_run_resumes_on_one_rank_from_the_same_step_and_schedule(two_ranks, omniglot_small1):
    tmp, _ = two_ranks
    two = read_checkpoint(tmp / RUNS / "two" / "last.pt")
    assert two["episode"] == 4 and len(two["generators"]) == 2
    longer = run_config(omniglot_small1, tmp / "resumed", episodes=6)
    metrics = train(longer, resume=tmp / RUNS / "two" / "last.pt", progress_bar=False)
    assert metrics["episodes"] == 6 and metrics["ranks"] == 1
    assert [h["episode"] for h in metrics["history"]] == [2, 4, 6]
    # by hand: the 2-rank state, Adam state and rank 0's sampler, two more steps on the 6-step schedule
    train_data, _ = load_splits(longer)
    method = build_method(longer, train_data.spec).to(memory_format=torch.channels_last)
    method.load_state_dict(two["state"])
    optimizer = torch.optim.Adam(method.parameters(), lr=longer.lr)
    optimizer.load_state_dict(two["optimizer"])
    sampler = EpisodeSampler(train_data, 5, 1, 2, 0, "cpu")
    sampler.generator.set_state(two["generators"][0])
    method.train()
    for step in (4, 5):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(longer, step / 6)
        optimizer.zero_grad()
        method.loss(sampler.sample())[0].backward()
        optimizer.step()
    last = read_checkpoint(tmp / "resumed" / "last.pt")
    for name, p in method.named_parameters():
        torch.testing.assert_close(last["state"][name], p.detach(), msg=name)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(longer, 5 / 6))
    assert all(int(s["step"]) == 6 for s in last["optimizer"]["state"].values())
    assert torch.equal(last["generators"][0], sampler.generator.get_state())


def test_a_one_rank_run_resumes_on_two_ranks_with_a_fresh_stream_for_rank_1(two_ranks, omniglot_small1):
    tmp, (rank0, _) = two_ranks
    assert [h["episode"] for h in rank0["resumed"]["history"]] == [2, 4]
    one = read_checkpoint(tmp / "one" / "last.pt")
    two = read_checkpoint(tmp / RUNS / "one_to_two" / "last.pt")
    sampler = EpisodeSampler(load_splits(run_config(omniglot_small1, tmp))[0], 5, 1, 2, 0, "cpu")
    assert torch.equal(two["generators"][0], advanced(sampler, one["generator"], 2))
    fresh = torch.Generator().manual_seed(rank_seed(0, 1, 2)).get_state()
    assert torch.equal(two["generators"][1], advanced(sampler, fresh, 2))


def test_the_pretrain_stage_trains_on_two_ranks(two_ranks):
    tmp, (rank0, _) = two_ranks
    assert rank0["pretrained"]["ranks"] == 2 and [h["episode"] for h in rank0["pretrained"]["history"]] == [2]
    last = read_checkpoint(tmp / RUNS / "pretrain" / "last.pt")
    assert "head.weight" in last["objective"] and len(last["generators"]) == 2
    assert not torch.equal(last["generators"][0], last["generators"][1])


def test_a_fixed_gpu_is_refused_under_torchrun_and_the_cpu_kept():
    with pytest.raises(FewShotInputError, match="under torchrun each rank trains on the GPU of its LOCAL_RANK"):
        rank_device(torch.device("cuda", 1), 0)
    assert rank_device(torch.device("cpu"), 3) == torch.device("cpu")


def test_rank_seeds_are_the_seed_plus_rank_at_the_start_and_fresh_later():
    assert [rank_seed(7, r, 0) for r in range(3)] == [7, 8, 9]
    later = {rank_seed(7, r, step) for r in range(3) for step in (1, 500)}
    assert len(later) == 6 and not later & {7, 8, 9} and rank_seed(7, 1, 500) == rank_seed(7, 1, 500)


def test_python_dash_m_runs_the_cli_for_torchrun():
    result = subprocess.run([sys.executable, "-m", "fewshot_edge.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("fewshot-edge, version")
