"""The set-Transformer: order-free support, label codes, option errors."""

from __future__ import annotations

import pytest
import torch

from fewshot_edge.methods import SetTransformer, create_method
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime.errors import FewShotInputError


def transformer(**options: object) -> SetTransformer:
    torch.manual_seed(0)
    method = create_method("transformer", create_backbone("conv4", 1, 28), **{"width": 16, "heads": 2, **options})
    assert isinstance(method, SetTransformer)
    return method.eval()


def test_the_support_is_a_set():
    method = transformer(max_way=5)
    support, queries = torch.randn(6, method.backbone.out_dim), torch.randn(3, method.backbone.out_dim)
    labels, order = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([3, 5, 0, 2, 4, 1])
    with torch.no_grad():
        logits = method.read(support, labels, queries)
        torch.testing.assert_close(method.read(support[order], labels[order], queries), logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(method.read(support, labels.flip(0), queries), logits, atol=1e-4)


def test_fixed_label_codes_are_orthogonal_and_not_trained():
    method = transformer(max_way=5, label_codes="fixed")
    assert "codes" not in dict(method.named_parameters()) and "codes" in dict(method.named_buffers())
    torch.testing.assert_close(method.codes @ method.codes.T, 16 * torch.eye(6), rtol=1e-5, atol=1e-4)
    assert isinstance(transformer(max_way=5).codes, torch.nn.Parameter)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"label_codes": "onehot"}, "label_codes must be one of learned, fixed, got 'onehot'"),
        ({"label_codes": "fixed", "max_way": 16}, "fixed label codes need width > max_way, got width 16, max_way 16"),
        ({"heads": 3}, "width must be a multiple of heads, got width 16, heads 3"),
        ({"max_way": 1}, "max_way must be at least 2, got 1"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(FewShotInputError, match=message):
        transformer(**options)


def test_export_info_records_the_set_form():
    method = transformer(max_way=7)
    info = method.export_info()
    assert info["metric"] == "cosine" and info["modes"] == {
        "sequence": {"form": "set", "max_way": 7, "read_role": "sequence"},
        "prototype": {},
    }
    assert [g.role for g in method.export_graphs()] == ["sequence"]
