"""FiLM ProtoNet: identity at init, order-free context, shapes, penalty, training, checkpoints, freezing."""

import pytest
import torch

from fewshot_edge.checkpoint import build_method, load_checkpoint, save_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.episodes import Episode
from fewshot_edge.methods import FiLMProtoNet, ProtoNet, create_method
from fewshot_edge.methods.film import film_penalty
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec
from fewshot_edge.train import train


def episode(n_way: int, k_shot: int, q_query: int = 3, channels: int = 1, size: int = 28, seed: int = 0) -> Episode:
    """Synthetic classes: a per-class mean image plus noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_way, channels, size, size, generator=g)
    labels = torch.arange(n_way)

    def draw(per: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.repeat_interleave(per)
        return means[y] + 0.5 * torch.randn(len(y), channels, size, size, generator=g), y

    (s, sy), (q, qy) = draw(k_shot), draw(q_query)
    return Episode(s, sy, q, qy, n_way, labels, torch.zeros(n_way, k_shot + q_query, dtype=torch.long))


def nudge(method: FiLMProtoNet) -> None:
    with torch.no_grad():
        for generator in method.context.generators:
            generator[-1].bias.normal_(0, 0.1)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_identity_film_at_init_gives_protonet_logits(metric):
    torch.manual_seed(0)
    backbone = create_backbone("conv4", 1, 28)
    film, proto = FiLMProtoNet(backbone, metric=metric).eval(), ProtoNet(backbone, metric=metric).eval()
    ep = episode(5, 2)
    args = (ep.support, ep.support_labels, ep.query, ep.n_way)
    assert all(
        torch.equal(g, torch.ones_like(g)) and torch.equal(b, torch.zeros_like(b)) for g, b in film.context(ep.support)
    )
    assert torch.equal(film.logits(*args), proto.logits(*args))


@pytest.mark.parametrize("training", [False, True])
def test_context_is_invariant_to_support_order(training):
    torch.manual_seed(0)
    method = FiLMProtoNet(create_backbone("conv4", 1, 28)).train(training)
    nudge(method)
    with torch.no_grad():  # a nonzero first layer too, so the encoder features reach the output
        for generator in method.context.generators:
            generator[-1].weight.normal_(0, 0.1)
    support = episode(4, 3).support
    perm = torch.randperm(len(support))
    with torch.no_grad():
        torch.testing.assert_close(method.context.flat(support[perm]), method.context.flat(support), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name,channels,size,widths", [("conv4", 1, 28, [64] * 4), ("resnet12", 3, 16, [64, 160, 320, 640])]
)
def test_film_shapes_per_block_and_export_info(name, channels, size, widths):
    method = create_method("film", create_backbone(name, channels, size), task_dim=32).eval()
    ep = episode(3, 2, channels=channels, size=size)
    film = method.context(ep.support)
    assert [(g.shape, b.shape) for g, b in film] == [((c,), (c,)) for c in widths]
    assert method.context.flat(ep.support).shape == (2 * sum(widths),)
    assert method.logits(ep.support, ep.support_labels, ep.query, ep.n_way).shape == (3 * 3, 3)
    info = method.export_info()
    assert info["metric"] == "sqeuclidean" and info["scale"] == 1.0
    assert info["modes"]["film"]["blocks"] == widths and info["modes"]["film"]["task_dim"] == 32


@pytest.mark.parametrize("n_way,k_shot", [(1, 1), (2, 5), (7, 1)])
def test_any_way_and_shot(n_way, k_shot):
    method = FiLMProtoNet(create_backbone("conv4", 1, 28))
    nudge(method)
    loss, acc = method.loss(episode(n_way, k_shot))
    assert torch.isfinite(loss) and 0.0 <= acc.item() <= 1.0


def test_penalty_is_zero_at_init_and_positive_after_a_nudge():
    torch.manual_seed(0)
    method = FiLMProtoNet(create_backbone("conv4", 1, 28), film_l2=0.5).eval()
    ep = episode(3, 2)
    assert film_penalty(method.context(ep.support)).item() == 0.0
    nudge(method)
    penalty = film_penalty(method.context(ep.support))
    assert penalty.item() > 0
    plain, _ = ProtoNet.loss(method, ep)  # the query cross-entropy alone, under the same FiLM
    loss, _ = method.loss(ep)
    torch.testing.assert_close(loss, plain + 0.5 * penalty)


def adam_losses(method, ep, steps: int) -> list[float]:
    """The episode's loss before each of ``steps`` Adam steps (lr 1e-3) on ``method``."""
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss, _ = method.loss(ep)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_reduce_the_loss_and_train_the_context():
    torch.manual_seed(0)
    method = FiLMProtoNet(create_backbone("conv4", 1, 28))
    ep = episode(5, 3, q_query=4)
    losses = adam_losses(method, ep, 5)
    assert losses[-1] < losses[0]
    assert film_penalty(method.context(ep.support)).item() > 0  # the generators moved off identity


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    config = TrainConfig(method="film", method_options={"metric": "cosine", "task_dim": 16, "film_l2": 0.01})
    spec = InputSpec(1, 28, 28)
    torch.manual_seed(0)
    method = build_method(config, spec)
    nudge(method)
    ep = episode(3, 2)
    method.loss(ep)  # a training-mode pass moves the BatchNorm running stats
    method.eval()
    save_checkpoint(tmp_path / "f.pt", method, config, spec)
    loaded, cfg2, _, _ = load_checkpoint(tmp_path / "f.pt")
    assert isinstance(loaded, FiLMProtoNet) and cfg2 == config and loaded.options["task_dim"] == 16
    args = (ep.support, ep.support_labels, ep.query, ep.n_way)
    assert torch.equal(loaded.logits(*args), method.logits(*args))


def test_freeze_backbone_trains_only_the_context():
    method = FiLMProtoNet(create_backbone("conv4", 1, 28), freeze_backbone=True).train()
    assert not method.backbone.training and method.context.training
    nudge(method)
    loss, _ = method.loss(episode(3, 2))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.backbone.parameters())
    assert all(p.grad is not None for p in method.context.generators.parameters())


def test_starts_from_a_protonet_checkpoint(tmp_path):
    config, spec = TrainConfig(), InputSpec(1, 28, 28)
    torch.manual_seed(0)
    proto = build_method(config, spec)
    proto.embed(torch.randn(8, 1, 28, 28))  # moves the BatchNorm running stats off their defaults
    save_checkpoint(tmp_path / "p.pt", proto, config, spec)
    proto.eval()
    ep = episode(4, 2)
    args = (ep.support, ep.support_labels, ep.query, ep.n_way)
    film_config = TrainConfig(method="film", method_options={"film_l2": 0.0}, init_from=str(tmp_path / "p.pt"))
    film = build_method(film_config, spec, initialize=True)
    assert torch.equal(film.eval().logits(*args), proto.logits(*args))
    (tmp_path / "p.pt").unlink()  # rebuilding a trained run (its state loads over it) never reads init_from
    assert not torch.equal(build_method(film_config, spec).eval().logits(*args), proto.logits(*args))


def test_init_from_a_checkpoint_of_another_backbone_is_one_line(tmp_path):
    config, spec = TrainConfig(backbone="resnet12"), InputSpec(1, 28, 28)
    save_checkpoint(tmp_path / "r.pt", build_method(config, spec), config, spec)
    with pytest.raises(FewShotInputError, match=r"--init-from .*r\.pt: its backbone does not fit 'conv4'"):
        build_method(TrainConfig(method="film", init_from=str(tmp_path / "r.pt")), spec, initialize=True)


def test_a_config_with_the_old_film_init_from_option_loads():
    config = TrainConfig.from_dict({"method": "film", "method_options": {"init_from": "p.pt", "task_dim": 8}})
    assert config.init_from == "p.pt" and config.method_options == {"task_dim": 8}


def test_short_training_run_end_to_end(omniglot_small1, tmp_path):
    config = TrainConfig(
        sources=[str(omniglot_small1)],
        data_options={"rotations": True},
        holdout=1,
        method="film",
        method_options={"task_dim": 32},
        n_way=10,
        k_shot=2,
        q_query=2,
        episodes=4,
        val_every=2,
        val_episodes=3,
        seed=0,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    metrics = train(config, progress_bar=False)
    assert metrics["episodes"] == 4 and [h["episode"] for h in metrics["history"]] == [2, 4]
    method, _, _, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert isinstance(method, FiLMProtoNet) and method.export_info()["modes"]["film"]["task_dim"] == 32
