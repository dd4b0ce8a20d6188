"""Methods and backbones come from registries that the CLI reads: a method registered in a test is
trainable with ``train --method NAME`` and listed with its options in ``train --help``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.methods import METHODS, ProtoNet, register_method
from fewshot_edge.models import BACKBONES, register_backbone
from fewshot_edge.models.backbones import conv4


class Toy(ProtoNet):
    """Toy: ProtoNet logits divided by a fixed temperature."""

    name = "toy"
    option_help = {"temperature": "what the logits are divided by"}

    def __init__(self, backbone, temperature: float = 2.0) -> None:
        super().__init__(backbone, temperature=temperature)
        self.temperature = temperature

    def logits(self, support, support_labels, query, n_way):
        return super().logits(support, support_labels, query, n_way) / self.temperature


@pytest.fixture
def toy():
    register_method(Toy)
    yield Toy
    del METHODS["toy"]


def test_a_registered_method_trains_from_the_cli_and_is_listed_with_its_options(toy, omniglot_small1, tmp_path):
    helped = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert helped.exit_code == 0
    assert f"[{'|'.join(METHODS)}]" in helped.output and list(METHODS)[-1] == "toy"
    assert "Toy: ProtoNet logits divided by a fixed temperature." in helped.output
    assert "temperature=2.0  what the logits are divided by" in helped.output
    args = [
        "train",
        "--source",
        omniglot_small1,
        "--holdout",
        "1",
        "--method",
        "toy",
        "-O",
        "temperature=4",
        "--way",
        "5",
        "--shot",
        "1",
        "--query",
        "2",
        "--episodes",
        "2",
        "--val-every",
        "2",
        "--val-episodes",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    method, config, _, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert isinstance(method, Toy) and method.temperature == 4 and config.method_options == {"temperature": 4}
    bad = CliRunner().invoke(main, [str(a) for a in [*args[:-1], tmp_path / "o", "-O", "temp=1"]])
    assert bad.exit_code == 2 and "method 'toy' has no option 'temp' (it takes: temperature)" in bad.output


def test_a_registered_backbone_is_a_choice(tmp_path):
    @register_backbone
    def tiny(in_channels: int, image_size: int):
        return conv4(in_channels, image_size, width=8)

    try:
        helped = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
        assert "[conv4|resnet12|tiny|timm:NAME]" in helped.output
    finally:
        del BACKBONES["tiny"]
    result = CliRunner().invoke(main, ["train", "--source", str(tmp_path), "--backbone", "tiny"])
    assert (
        result.exit_code == 2
        and result.output.strip() == "Error: unknown backbone 'tiny'; choose from conv4, resnet12, timm:NAME"
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_documents_each_option(name):
    options = METHODS[name].declared_options()
    assert options and all(option.help for option in options), [o.name for o in options if not o.help]
    json.dumps({o.name: o.default for o in options})  # defaults show in --help as JSON


def test_declared_options_are_the_constructors_keywords_with_their_defaults():
    from fewshot_edge.methods import ANIL

    declared = {o.name: o.default for o in ANIL.declared_options()}
    assert declared == {
        "inner_steps": 5,
        "step_size": 0.001,
        "per_parameter": False,
        "first_order": False,
        "inner_l2": 0.0,
        "learn_step_sizes": True,
    }
    assert torch.is_tensor(ANIL(BACKBONES["conv4"](1, 28), **declared).lr_weight)
