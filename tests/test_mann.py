"""MANN: the least-recently-used access memory written out by hand, the paper's label offset, order."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fewshot_edge.methods import MANN, create_method
from fewshot_edge.models import create_backbone


def mann(**options: int) -> MANN:
    torch.manual_seed(0)
    method = create_method(
        "mann", create_backbone("conv4", 1, 28), max_way=4, memory_slots=5, memory_width=6, **options
    )
    assert isinstance(method, MANN)
    return method.eval()


def test_writes_go_to_the_least_used_row_by_hand():
    method = mann(controller=8)
    x = torch.randn(2, method.backbone.out_dim)
    with torch.no_grad():
        first, _ = method.write(method.initial_state(), x[:1], torch.tensor([2]))
        second, _ = method.write(first, x[1:], torch.tensor([0]))
        one, two = method.unpack(first), method.unpack(second)
        for before, after in ((method.unpack(method.initial_state()), one), (one, two)):
            key = torch.tanh(method.key(after["h"]))[0]
            alpha = torch.sigmoid(method.gate(after["h"]))[0]
            least_used = F.one_hot(before["usage"][0].argmin(), 5).float()
            write = alpha * before["read_weights"][0] + (1 - alpha) * least_used
            memory = before["memory"][0] * (1 - least_used[:, None]) + write[:, None] * key
            torch.testing.assert_close(after["memory"][0], memory)
            torch.testing.assert_close(after["usage"][0], 0.95 * before["usage"][0] + after["read_weights"][0] + write)
        # the first write fills row 0 alone (an empty memory is read uniformly: nothing to recall yet)
        assert one["memory"][0, 1:].abs().max() == 0 and one["memory"][0, 0].abs().max() > 0
        torch.testing.assert_close(one["read_weights"], torch.full((1, 5), 0.2))
        assert two["usage"][0].argmin() != 0
        assert one["label"][0].tolist() == [0, 0, 1, 0] and two["label"][0].tolist() == [1, 0, 0, 0]


def test_a_label_is_given_one_step_after_its_image():
    """Changing the last shot's label changes no step's prediction (it would come at the next step),
    but it changes the queries' answers: reading starts with the step that binds it."""
    method = mann()
    support, queries = torch.randn(3, method.backbone.out_dim), torch.randn(2, method.backbone.out_dim)
    with torch.no_grad():
        a, steps_a = method.write(method.initial_state(), support, torch.tensor([0, 1, 2]))
        b, steps_b = method.write(method.initial_state(), support, torch.tensor([0, 1, 3]))
        torch.testing.assert_close(steps_a, steps_b)
        assert not torch.allclose(method.read(a, queries), method.read(b, queries))


def test_without_the_delay_a_label_comes_with_its_image():
    """With ``label_delay`` false a step sees its own shot's label, and the queries read the state as the
    last shot left it (no binding step)."""
    method = mann(label_delay=False)
    support, queries = torch.randn(3, method.backbone.out_dim), torch.randn(2, method.backbone.out_dim)
    with torch.no_grad():
        a, steps_a = method.write(method.initial_state(), support, torch.tensor([0, 1, 2]))
        b, steps_b = method.write(method.initial_state(), support, torch.tensor([0, 1, 3]))
        torch.testing.assert_close(steps_a[:2], steps_b[:2])
        assert not torch.allclose(steps_a[2], steps_b[2])
        _, direct = method.step(a.expand(2, -1), queries, torch.zeros(2, 4), write=False)
        torch.testing.assert_close(method.read(a, queries), direct)


def test_the_order_of_the_shots_matters():
    method = mann()
    support, queries = torch.randn(4, method.backbone.out_dim), torch.randn(2, method.backbone.out_dim)
    labels, order = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        state, _ = method.write(method.initial_state(), support, labels)
        shuffled, _ = method.write(method.initial_state(), support[order], labels[order])
        assert not torch.allclose(method.read(state, queries), method.read(shuffled, queries), atol=1e-4)


def test_export_info_records_the_recurrent_form():
    method = mann()
    mode = method.export_info()["modes"]["sequence"]
    assert mode == {
        "form": "recurrent",
        "max_way": 4,
        "state_size": method.state_size,
        "write_role": "sequence_write",
        "read_role": "sequence",
    }
    assert method.state_size == 2 * 200 + 5 * 6 + 5 + 5 + 6 + 4
    assert [g.role for g in method.export_graphs()] == ["sequence_write", "sequence"]
