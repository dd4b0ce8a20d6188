"""The generic extra-graph mechanism: a method declares graphs (``export_graphs``), export writes each as
``<role>.onnx`` with its role, parity checks every output of every graph through the runtime's runner, and
bad declarations are refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fewshot_edge.export import ParityError, check_parity, export_draft
from fewshot_edge.export.onnx import graph_roles
from fewshot_edge.methods import ProtoNet, create_method
from fewshot_edge.methods.base import ExportGraph
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import FewShotInputError, InputSpec
from fewshot_edge.runtime.graph import GraphEngine

SPEC = InputSpec(1, 28, 28, mean=(0.5,), std=(0.25,))


class Scored(ProtoNet):
    """A ProtoNet that also ships a two-input, two-output "scorer": (queries (Q, D), keys (S, D)) ->
    (queries @ keys.T (Q, S), 2 * queries + bias (Q, D)), the bias a parameter of the method."""

    name = "scored"

    def __init__(self, backbone, roles=("scorer",)):
        super().__init__(backbone)
        self.roles = roles
        self.bias = torch.nn.Parameter(torch.linspace(-1, 1, backbone.out_dim))

    def score(self, queries, keys):
        return queries @ keys.T, 2 * queries + self.bias

    def export_graphs(self):
        def inputs(images):
            emb = self.embed(images)
            return emb, emb.flip(0)

        axes = {
            "queries": {0: "queries"},
            "keys": {0: "keys"},
            "scores": {0: "queries", 1: "keys"},
            "moved": {0: "queries"},
        }
        return [
            ExportGraph(role, self.score, inputs, ("queries", "keys"), ("scores", "moved"), axes) for role in self.roles
        ]


def scored(roles=("scorer",)) -> Scored:
    torch.manual_seed(0)
    return Scored(create_backbone("conv4", 1, 28), roles).eval()


def test_declared_graph_is_written_with_its_role_names_and_dynamic_axes(tmp_path):
    adapter = export_draft(scored(), SPEC, tmp_path)
    manifest = adapter.bundle.manifest
    assert {name: entry.role for name, entry in manifest.files.items()} == {
        "encoder.onnx": "encoder",
        "scorer.onnx": "scorer",
    }
    model = onnx.load(str(adapter.bundle.file("scorer")))
    assert [i.name for i in model.graph.input] == ["queries", "keys"]
    assert [o.name for o in model.graph.output] == ["scores", "moved"]
    engine = GraphEngine(adapter.bundle.file("scorer"), input_names=["queries", "keys"])
    q, k = np.ones((3, 64), np.float32), np.full((5, 64), 0.5, np.float32)
    scores, moved = engine.run(q, k)
    np.testing.assert_allclose(scores, np.full((3, 5), 32.0), rtol=1e-6)  # 64 * 1 * 0.5
    np.testing.assert_allclose(moved[0], 2.0 + np.linspace(-1, 1, 64), rtol=1e-6)


def test_parity_checks_every_declared_graph_on_random_and_real_inputs(tmp_path):
    method = scored()
    real = np.random.default_rng(1).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    report = check_parity(method, export_draft(method, SPEC, tmp_path), SPEC, real, batch_sizes=(1, 3))
    batches = ("random batch of 1", "random batch of 3", "6 real images")
    assert set(report.checks) == {*batches, *(f"scorer on {b}" for b in batches)}
    assert report.passed and report.max_abs_diff <= 1e-4


def test_parity_fails_when_a_declared_graph_drifts(tmp_path, monkeypatch):
    method = scored()
    adapter = export_draft(method, SPEC, tmp_path)
    run = GraphEngine.run
    monkeypatch.setattr(GraphEngine, "run", lambda self, *x: (run(self, *x)[0], run(self, *x)[1] + np.float32(1e-3)))
    report = check_parity(method, adapter, SPEC, batch_sizes=(2,))
    assert not report.passed and report.checks["scorer on random batch of 2"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ParityError, match="on scorer on random batch of 2"):
        raise ParityError(report)


@pytest.mark.parametrize("roles", [("encoder",), ("encoder.fp16",), ("a", "a"), ("bad/role",), ("",)])
def test_unusable_or_repeated_roles_are_refused(roles):
    with pytest.raises(FewShotInputError, match="graph role"):
        graph_roles(scored(roles))


def test_a_method_without_extra_graphs_exports_only_its_encoder(tmp_path):
    method = create_method("protonet", create_backbone("conv4", 1, 28)).eval()
    assert method.export_graphs() == []
    assert list(export_draft(method, SPEC, tmp_path).bundle.manifest.files) == ["encoder.onnx"]
