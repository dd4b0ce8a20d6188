"""ANIL with a Proto-MAML head: prototype init, the torch.func inner loop against plain autograd, first-
and second-order outer gradients, the numpy copy of the inner loop, training, export and the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_film import episode
from torch.nn import functional as F

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.export import export_bundle
from fewshot_edge.methods import ANIL, ProtoNet
from fewshot_edge.methods.anil import adapt_head, inner_loss, prototype_head
from fewshot_edge.methods.protonet import prototypes
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import FewShotModel, open_bundle
from fewshot_edge.runtime.finetune import finetune_head, schedule
from fewshot_edge.train import train


def embeddings(
    seed: int = 0, n_way: int = 5, k_shot: int = 3, dim: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support embeddings (n_way * k_shot, dim) around class centres, their labels, and queries."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.3 * torch.randn(n_way, dim, generator=g)  # overlapping classes: the support loss is far from 0
    y = torch.arange(n_way).repeat_interleave(k_shot)
    noise = 0.3 * torch.randn(len(y) + 2 * n_way, dim, generator=g)
    return centres[y] + noise[: len(y)], y, centres[torch.arange(n_way).repeat(2)] + noise[len(y) :]


def test_zero_steps_is_protonet_up_to_a_per_query_constant():
    torch.manual_seed(0)
    backbone = create_backbone("conv4", 1, 28)
    anil, proto = ANIL(backbone, inner_steps=0).eval(), ProtoNet(backbone).eval()
    ep = episode(5, 2)
    args = (ep.support, ep.support_labels, ep.query, ep.n_way)
    with torch.no_grad():
        diff = anil.logits(*args) - proto.logits(*args)  # 2c.q - |c|^2 = -|q - c|^2 + |q|^2
        q = anil.embed(ep.query)
    torch.testing.assert_close(diff, q.pow(2).sum(1, keepdim=True).expand_as(diff), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_inner_loop_and_second_order_gradients_match_plain_autograd(l2):
    x, y, q = embeddings()
    x.requires_grad_(True)
    lr_w = torch.tensor([[0.05], [0.02], [0.01]], requires_grad=True)
    lr_b = torch.tensor([0.1, 0.05, 0.02], requires_grad=True)
    qy = torch.arange(5).repeat(2)

    def by_autograd() -> torch.Tensor:
        start = prototype_head(prototypes(x, y, 5))
        head = start
        for t in range(3):
            gw, gb = torch.autograd.grad(
                inner_loss(head, start, x, y, l2), [head["weight"], head["bias"]], create_graph=True
            )
            head = {"weight": head["weight"] - lr_w[t] * gw, "bias": head["bias"] - lr_b[t] * gb}
        return F.cross_entropy(q @ head["weight"].T + head["bias"], qy)

    def by_func(first_order: bool) -> torch.Tensor:
        head = adapt_head(prototype_head(prototypes(x, y, 5)), x, y, lr_w, lr_b, l2, first_order)
        return F.cross_entropy(q @ head["weight"].T + head["bias"], qy)

    reference = torch.autograd.grad(by_autograd(), [x, lr_w, lr_b])
    second = torch.autograd.grad(by_func(False), [x, lr_w, lr_b])
    first = torch.autograd.grad(by_func(True), [x, lr_w, lr_b])
    for r, s in zip(reference, second, strict=True):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in first)  # step sizes learn first-order too
    assert not torch.allclose(first[1], second[1], rtol=1e-3)  # but the gradients differ


@pytest.mark.parametrize("per_parameter,l2", [(False, 0.0), (True, 0.1)])
def test_numpy_inner_loop_reproduces_pytorch(per_parameter, l2):
    x, y, q = embeddings(seed=3, dim=32)
    steps = 5
    g = torch.Generator().manual_seed(1)
    lr_w = 0.5 * torch.rand(steps, 32 if per_parameter else 1, generator=g)
    lr_b = 0.5 * torch.rand(steps, generator=g)
    protos = prototypes(x, y, 5)
    head = adapt_head(prototype_head(protos), x, y, lr_w, lr_b, l2)
    w, b = finetune_head(x.numpy(), y.numpy(), protos.numpy(), *schedule(lr_w.tolist(), lr_b.tolist()), l2)
    np.testing.assert_allclose(w, head["weight"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, head["bias"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.numpy() @ w.T + b, (q @ head["weight"].T + head["bias"]).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(w, 2 * protos.numpy(), atol=1e-3)  # the steps moved the head


def test_schedule_repeats_the_last_trained_step_and_checks_shapes():
    w, b = schedule([[0.1], [0.2]], [1.0, 2.0], steps=4)
    assert w.ravel().tolist() == [0.1, 0.2, 0.2, 0.2] and b.tolist() == [1.0, 2.0, 2.0, 2.0]
    assert schedule([[0.1], [0.2]], [1.0, 2.0], steps=1)[1].tolist() == [1.0]
    with pytest.raises(ValueError, match="one row per lr_bias"):
        schedule([[0.1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="no step size to repeat"):
        schedule(np.zeros((0, 1)), [], steps=2)


def test_anil_trains_exports_and_the_runtime_matches_pytorch(omniglot_small1, tmp_path):
    config = TrainConfig(
        sources=[str(omniglot_small1)],
        data_options={"rotations": True},
        holdout=1,
        method="anil",
        method_options={"inner_steps": 3, "step_size": 0.005, "per_parameter": True},
        n_way=5,
        k_shot=1,
        q_query=3,
        episodes=8,
        val_every=8,
        val_episodes=3,
        seed=0,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    train(config, progress_bar=False)
    method, _, spec, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert not torch.allclose(method.lr_weight, torch.full_like(method.lr_weight, 0.005))  # step sizes were learned
    export_bundle(tmp_path / "run" / "last.pt", tmp_path / "bundle", calibration_episodes=20)
    manifest = open_bundle(tmp_path / "bundle").manifest
    finetune = manifest.adaptation.modes["finetune"]
    assert manifest.adaptation.default == "finetune" and "prototype" in manifest.adaptation.modes
    assert finetune["steps"] == 3 and np.allclose(finetune["lr_weight"], method.lr_weight.detach().numpy())
    assert finetune["temperature"] > 0 and finetune["init"] == "prototype"

    validation = load_splits(config)[1]
    ep = EpisodeSampler(validation, 5, 2, 3, seed=7).sample()
    with torch.no_grad():
        expected = method.logits(ep.support, ep.support_labels, ep.query, 5).argmax(1).numpy()
    index = ep.index.numpy()
    raw = 255 - validation.images[:, 0] if spec.invert else validation.images[:, 0]  # the data set stores them inverted
    with FewShotModel.open(tmp_path / "bundle") as model:
        for c in range(5):
            model.enroll(f"c{c}", list(raw[index[c, :2]]))
        got = model.predict_proba(list(raw[index[:, 2:].ravel()])).argmax(1)
    np.testing.assert_array_equal(got, expected)
