"""MAML and Meta-SGD: second-order gradients against finite differences on a tiny float64 model, first-
versus second-order, learned step sizes, PyTorch's head-only adaptation against the numpy fine-tune
loop, and the CLI round trip train -> export -> enroll -> predict through the device's finetune mode."""

from __future__ import annotations

import json
from dataclasses import astuple

import numpy as np
import pytest
import torch
from test_cli_adaptation import character_files, eval_and_export, run, train_args
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import Episode
from fewshot_edge.methods import MAML, MetaSGD
from fewshot_edge.methods.anil import head_logits, prototype_head
from fewshot_edge.methods.maml import batch_statistics
from fewshot_edge.methods.protonet import prototypes
from fewshot_edge.models import Backbone
from fewshot_edge.runtime import Calibration
from fewshot_edge.runtime.finetune import finetune_head, schedule


class Tiny(Backbone):
    """Linear (no bias: BatchNorm removes it) -> BatchNorm -> tanh: smooth, so finite differences are exact."""

    def __init__(self, d_in: int = 6, d_out: int = 4) -> None:
        super().__init__()
        self.linear, self.bn, self.out_dim = nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.linear(x)))


def tiny_episode(n_way: int = 3, k_shot: int = 2, q_query: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_way, 6, generator=g, dtype=torch.float64)
    sy, qy = torch.arange(n_way).repeat_interleave(k_shot), torch.arange(n_way).repeat_interleave(q_query)
    s = means[sy] + 0.7 * torch.randn(len(sy), 6, generator=g, dtype=torch.float64)
    q = means[qy] + 0.7 * torch.randn(len(qy), 6, generator=g, dtype=torch.float64)
    return Episode(s, sy, q, qy, n_way, torch.arange(n_way), torch.zeros(n_way, k_shot + q_query, dtype=torch.long))


def loss64(method: MAML, ep: Episode) -> torch.Tensor:
    """The query cross-entropy in float64 (``FewShotMethod.loss`` computes it in float32)."""
    return F.cross_entropy(method.logits(ep.support, ep.support_labels, ep.query, ep.n_way), ep.query_labels)


def tiny(cls: type[MAML] = MAML, **options) -> MAML:
    torch.manual_seed(0)
    options = {"inner_steps": 2, "step_size": 0.3, "head_step_size": 0.2, "inner_l2": 0.1, **options}
    return cls(Tiny(), **options).double().train()


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_second_order_gradients_equal_finite_differences(cls):
    method, ep = tiny(cls), tiny_episode()
    learned = [p for p in method.parameters() if p.requires_grad]
    assert len(learned) == (3 if cls is MAML else 8)  # Meta-SGD: 3 backbone step sizes and 2 of the head
    grads = torch.autograd.grad(loss64(method, ep), learned)
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(learned, grads, strict=True):
            numeric = torch.empty_like(p)
            for i in range(p.numel()):
                flat = p.view(-1)
                flat[i] += eps
                up = loss64(method, ep)
                flat[i] -= 2 * eps
                down = loss64(method, ep)
                flat[i] += eps
                numeric.view(-1)[i] = (up - down) / (2 * eps)
            torch.testing.assert_close(g, numeric, rtol=1e-6, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads)


def test_first_order_drops_exactly_the_second_order_terms():
    ep = tiny_episode(seed=1)

    def gradients(first_order: bool, step: float) -> list[torch.Tensor]:
        method = tiny(first_order=first_order, step_size=step, head_step_size=step)
        return list(torch.autograd.grad(loss64(method, ep), list(method.backbone.parameters())))

    for second, first in zip(gradients(False, 0.0), gradients(True, 0.0), strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # no steps, no second-order terms
    moved = zip(gradients(False, 0.3), gradients(True, 0.3), strict=True)
    assert all(f.abs().sum() > 0 for _, f in moved)
    assert not all(
        torch.allclose(s, f, rtol=1e-3) for s, f in zip(gradients(False, 0.3), gradients(True, 0.3), strict=True)
    )


def test_full_adaptation_moves_every_layer_and_lowers_the_support_loss():
    method, ep = tiny(inner_l2=0.0), tiny_episode(seed=2)
    with torch.no_grad():
        params, head = method.adapted(ep.support, ep.support_labels, ep.n_way)
    assert all(not torch.equal(params[k], v) for k, v in method.backbone.named_parameters())

    def support_loss(p: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> float:
        with batch_statistics(method.backbone):
            emb = functional_call(method.backbone, p, (ep.support,))
        return F.cross_entropy(head_logits(h, emb), ep.support_labels).item()

    start = prototype_head(prototypes(method.embed(ep.support), ep.support_labels, ep.n_way))
    assert support_loss(params, head) < support_loss(dict(method.backbone.named_parameters()), start)


def test_only_the_training_prototype_forward_updates_batchnorm_running_statistics():
    method, ep = tiny(), tiny_episode(seed=5)
    bn = method.backbone.bn
    with torch.no_grad():
        batch_mean = method.backbone.linear(ep.support).mean(0)
        expected = 0.9 * bn.running_mean + 0.1 * batch_mean  # momentum 0.1: the support batch, once
        method.logits(ep.support, ep.support_labels, ep.query, ep.n_way)
        torch.testing.assert_close(bn.running_mean, expected)
        method.eval()
        full = method.logits(ep.support, ep.support_labels, ep.query, ep.n_way)
        torch.testing.assert_close(bn.running_mean, expected)  # eval mode updates nothing
        half = method.logits(ep.support, ep.support_labels, ep.query[::2], ep.n_way)
    assert not torch.allclose(full[::2], half)  # full adaptation normalises by the batch (transductive)


def test_metasgd_step_sizes_are_learned():
    method, ep = tiny(MetaSGD), tiny_episode(seed=3)
    assert [p.shape for p in method.backbone_lr] == [p.shape for p in method.backbone.parameters()]
    assert method.lr_weight.shape == (2, 4) and method.lr_bias.shape == (2,)
    before = [p.detach().clone() for p in (*method.backbone_lr, method.lr_weight, method.lr_bias)]
    optimizer = torch.optim.Adam(method.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss64(method, ep).backward()
        optimizer.step()
    after = (*method.backbone_lr, method.lr_weight, method.lr_bias)
    assert all(not torch.allclose(a, b) for a, b in zip(after, before, strict=True))
    assert MAML(Tiny()).lr_weight.requires_grad is False  # plain MAML keeps its step sizes


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_head_only_adaptation_is_the_numpy_finetune_loop(cls):
    method, ep = tiny(cls, inner_steps=3, test_adapt="head").float(), tiny_episode(seed=4, k_shot=3)
    ep = Episode(ep.support.float(), ep.support_labels, ep.query.float(), *astuple(ep)[3:])
    if cls is MetaSGD:
        with torch.no_grad():
            method.lr_weight.uniform_(0.05, 0.5)  # distinct per-dimension step sizes, as after training
    method.eval()
    with torch.no_grad():
        logits = method.logits(ep.support, ep.support_labels, ep.query, ep.n_way)
        x, q = method.embed(ep.support), method.embed(ep.query)
    finetune = method.export_info()["modes"]["finetune"]
    protos = prototypes(x, ep.support_labels, ep.n_way).numpy()
    steps = schedule(finetune["lr_weight"], finetune["lr_bias"])
    w, b = finetune_head(x.numpy(), ep.support_labels.numpy(), protos, *steps, finetune["l2"])
    np.testing.assert_allclose(q.numpy() @ w.T + b, logits.numpy(), rtol=1e-5, atol=1e-6)
    method.test_adapt = "full"
    with torch.no_grad():
        adapted_all = method.logits(ep.support, ep.support_labels, ep.query, ep.n_way)
    assert not torch.allclose(adapted_all, logits, atol=1e-3)  # full adaptation is another model


@pytest.mark.parametrize("method", ["maml", "metasgd"])
def test_cli_train_export_enroll_predict_equals_pytorch_head_only(omniglot_small1, tmp_path, method):
    options = ["-O", "inner_steps=2", "-O", "test_adapt=head"] + (
        ["-O", "first_order=true"] if method == "maml" else []
    )
    run(*train_args(omniglot_small1, tmp_path / "run", method, *options))
    manifest = eval_and_export(tmp_path / "run", tmp_path / "bundle")
    finetune = manifest["adaptation"]["modes"]["finetune"]
    shots, queries, labels = character_files(tmp_path / "run", tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", "finetune", shots)
    answers = json.loads(
        run("predict", "--bundle", tmp_path / "bundle", "--store", store, "--top-k", "4", *queries, "--json").output
    )

    model, config, spec, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert model.name == method and model.test_adapt == "head"
    validation = load_splits(TrainConfig.from_dict(config.to_dict()))[1]
    ids = np.stack([np.flatnonzero(validation.labels == c)[:4] for c in range(4)])  # as character_files picks
    scale, shift = (torch.from_numpy(a) for a in spec.scale_shift())
    images = torch.from_numpy(validation.images[ids.ravel()]).float() * scale + shift
    images = images.view(4, 4, *images.shape[1:])
    support, query = images[:, :3].reshape(12, *images.shape[2:]), images[:, 3]
    model.eval()
    with torch.no_grad():
        logits = model.logits(support, torch.arange(4).repeat_interleave(3), query, 4).double()
    head = Calibration(finetune["temperature"], temperatures_by_shots=finetune.get("temperatures_by_shots"))
    expected = torch.softmax(logits / head.temperature_for(3), 1).numpy()  # 3-shot classes
    got = np.array(
        [[{k["label"]: k["probability"] for k in a["top_k"]}[f"char{c}"] for c in range(4)] for a in answers]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert [a["top_k"][0]["label"] for a in answers] == [f"char{c}" for c in expected.argmax(1)]
    assert labels == [f"char{c}" for c in range(4)]


def test_bad_test_adapt_is_a_one_line_error(omniglot_small1, tmp_path):
    args = ["train", "--source", omniglot_small1, "--holdout", "1", "--method", "metasgd", "-O", "test_adapt=all"]
    result = run(*args, "--out", tmp_path / "o", ok=False)
    assert result.exit_code == 2 and result.output.strip() == "Error: test_adapt must be one of full, head, got 'all'"
    assert not (tmp_path / "o").exists()


def test_eval_changes_test_adapt_but_refuses_options_that_change_the_parameters(omniglot_small1, tmp_path):
    run(*train_args(omniglot_small1, tmp_path / "run", "metasgd", "-O", "inner_steps=1", "-O", "test_adapt=head"))
    ckpt = tmp_path / "run" / "last.pt"
    args = ("eval", ckpt, "--episodes", "4", "--query", "5", "--device", "cpu", "--json")
    assert load_checkpoint(ckpt)[0].test_adapt == "head"
    assert load_checkpoint(ckpt, options={"test_adapt": "full"})[0].test_adapt == "full"
    head, full = (json.loads(run(*args, *extra).output) for extra in ([], ["-O", "test_adapt=full"]))
    assert head["episodes"] == full["episodes"] == 4 and head["accuracy"] != full["accuracy"]
    bad = run(*args, "-O", "inner_steps=3", ok=False)  # Meta-SGD learns step sizes per step
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "method option(s) inner_steps change the trained parameters" in bad.output
    bad = run(*args, "-O", "test_adapt=all", ok=False)
    assert bad.exit_code == 2 and "test_adapt" in bad.output
