"""ProtoNet logits against hand-computed values; backbone shapes; checkpoint round-trip."""

import pytest
import torch

from fewshot_edge.checkpoint import build_method, load_checkpoint, save_checkpoint
from fewshot_edge.config import TrainConfig
from fewshot_edge.methods import ProtoNet, create_method
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime.preprocess import InputSpec


class Identity(torch.nn.Module):
    def forward(self, x, film=None):
        return x


def test_protonet_logits_on_a_hand_made_episode():
    # 2-way 2-shot in 2-D: prototypes are (1, 0) and (0, 3)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    net = ProtoNet(Identity())
    logits = net.logits(support, labels, query, n_way=2)
    # query (1,1): |(0,1)|^2 = 1, |(1,-2)|^2 = 5;  query (0,3): |(-1,3)|^2 = 10, 0
    assert torch.equal(logits, torch.tensor([[-1.0, -5.0], [-10.0, -0.0]]))


def test_cosine_protonet_logits_use_the_learnable_scale():
    support = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 1.0]])
    net = ProtoNet(Identity(), metric="cosine")
    with torch.no_grad():
        net.scale.fill_(4.0)
    logits = net.logits(support, torch.tensor([0, 1]), query, n_way=2)
    expected = 4.0 / 2**0.5
    torch.testing.assert_close(logits, torch.tensor([[expected, expected]]))
    assert net.export_info()["scale"] == 4.0


def test_loss_is_cross_entropy_of_the_logits():
    from fewshot_edge.episodes import Episode

    support = torch.tensor([[0.0], [4.0]])
    query = torch.tensor([[1.0]])
    ep = Episode(support, torch.tensor([0, 1]), query, torch.tensor([0]), 2, torch.tensor([0, 1]), torch.zeros(2, 2))
    loss, acc = ProtoNet(Identity()).loss(ep)
    # logits (-1, -9): CE = log(1 + e^-8)
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-8.0))).item(), rel=1e-4)
    assert acc.item() == 1.0


@pytest.mark.parametrize(
    "name,channels,size,dim",
    [("conv4", 1, 28, 64), ("conv4", 3, 84, 1600), ("resnet12", 3, 84, 640), ("resnet12", 1, 28, 640)],
)
def test_backbone_output_dims(name, channels, size, dim):
    net = create_backbone(name, channels, size).eval()
    assert net(torch.zeros(2, channels, size, size)).shape == (2, dim)
    assert net.out_dim == dim


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        create_backbone("vgg", 1, 28)
    with pytest.raises(ValueError, match="unknown method 'maml2'"):
        create_method("maml2", create_backbone("conv4", 1, 28))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    config = TrainConfig(method_options={"metric": "cosine"})
    spec = InputSpec(1, 28, 28)
    torch.manual_seed(0)
    method = build_method(config, spec)
    method.train()
    method.embed(torch.randn(8, 1, 28, 28))  # a training-mode pass moves the BatchNorm running stats
    method.eval()
    x = torch.randn(5, 1, 28, 28)
    save_checkpoint(tmp_path / "m.pt", method, config, spec, episode=3)
    loaded, cfg2, spec2, payload = load_checkpoint(tmp_path / "m.pt")
    assert cfg2 == config and spec2 == spec and payload["episode"] == 3
    assert torch.equal(loaded.embed(x), method.embed(x))
    assert torch.equal(loaded.scale, method.scale)


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad)
