"""Meta-learner LSTM: the update rule against a coordinate-by-coordinate reference and hand-checked numbers,
PyTorch against the numpy device copy step by step, the SGD special case, meta-training, the
``learned-update`` mode on a tiny linear bundle (refit on enrollment, no torch), and the whole loop from the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import require_data
from runtime_support import BLOCK_TORCH, embed_by_hand, images, make_bundle, run_python, weight
from test_anil import embeddings
from test_cli_adaptation import character_files, run, train_args
from test_film import adam_losses, episode
from torch.nn import functional as F

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.methods import MetaLSTM
from fewshot_edge.methods.anil import adapt_head, prototype_head
from fewshot_edge.methods.metalstm import learned_update, preprocess
from fewshot_edge.methods.protonet import prototypes
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import Adaptation, FewShotInputError, FewShotModel, open_bundle
from fewshot_edge.runtime import learned_update as runtime_rule
from fewshot_edge.runtime.finetune import finetune_head, schedule
from fewshot_edge.runtime.learned_update import UpdateRule

Q = 1.0 / (1.0 + math.exp(4.0))  # 1 - sigmoid(4): the wrong-class probability of each shot in the tiny head below


def rule_by_hand(
    x: list[list[float]], y: list[int], n_way: int, gate_weight: list[list[float]], gate_bias: list[float], steps: int
) -> list[float]:
    """theta = (W flattened, b) after ``steps`` steps of the rule, written out one coordinate at a time with math."""
    n, dim, p = len(x), len(x[0]), 10.0
    centres = [[sum(x[i][d] for i in range(n) if y[i] == k) / y.count(k) for d in range(dim)] for k in range(n_way)]
    theta = [2 * centres[k][d] for k in range(n_way) for d in range(dim)] + [
        -sum(v * v for v in centres[k]) for k in range(n_way)
    ]
    previous = [[0.0, 0.0] for _ in theta]

    def pre(v: float) -> list[float]:
        return [math.log(max(abs(v), math.exp(-p))) / p, min(1.0, max(-1.0, math.exp(p) * v))]

    for _ in range(steps):
        grads, loss = [0.0] * len(theta), 0.0
        for xi, yi in zip(x, y, strict=True):
            logits = [
                sum(theta[k * dim + d] * xi[d] for d in range(dim)) + theta[n_way * dim + k] for k in range(n_way)
            ]
            e = [math.exp(v - max(logits)) for v in logits]
            probs = [v / sum(e) for v in e]
            loss -= math.log(probs[yi]) * n_way / n
            for k in range(n_way):
                r = (probs[k] - (k == yi)) * n_way / n
                grads[n_way * dim + k] += r
                for d in range(dim):
                    grads[k * dim + d] += r * xi[d]
        for j, (value, g) in enumerate(zip(theta, grads, strict=True)):
            features = [*pre(g), *pre(loss), *pre(value)]
            z = [
                sum(w * f for w, f in zip(gate_weight[k][:6], features, strict=True))
                + gate_weight[k][6] * previous[j][k]
                + gate_bias[k]
                for k in (0, 1)
            ]
            i_gate, f_gate = (1.0 / (1.0 + math.exp(-v)) for v in z)
            theta[j], previous[j] = f_gate * value - i_gate * g, [i_gate, f_gate]
    return theta


def tiny_head_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1-d classes, one shot each: x = 1 (class 0) and -1 (class 1). The start head is W = (2, -2),
    b = (-1, -1); each shot's logits are (1, -3) or (-3, 1), so the gradient is dW = (-2Q, 2Q), db = 0
    (Q = 1 - sigmoid(4)) and the loss 2 * -log(1 - Q)."""
    return torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1])


def torch_rule(x, y, n_way, gate_weight, gate_bias, steps) -> np.ndarray:
    head = learned_update(
        prototype_head(prototypes(x, y, n_way)), x, y, torch.tensor(gate_weight), torch.tensor(gate_bias), steps
    )
    return torch.cat([head["weight"].flatten(), head["bias"]]).detach().numpy()


def numpy_rule(x, y, n_way, gate_weight, gate_bias, steps) -> np.ndarray:
    protos = prototypes(x, y, n_way).numpy()
    w, b = runtime_rule.learned_update(
        x.numpy(), y.numpy(), protos, UpdateRule(steps, np.array(gate_weight), np.array(gate_bias))
    )
    return np.concatenate([w.ravel(), b])


def test_preprocessing_by_hand():
    v = [0.0, 1e-6, -1e-3, 2.0, -5.0]  # e^-10 = 4.54e-5: the first three are below it in size, or not
    expected = [
        [-1.0, 0.0],
        [-1.0, 1e-6 * math.exp(10)],
        [math.log(1e-3) / 10, -1.0],
        [math.log(2) / 10, 1.0],
        [math.log(5) / 10, -1.0],
    ]
    np.testing.assert_allclose(runtime_rule.preprocess(np.array(v)).T, expected, rtol=1e-12)
    np.testing.assert_allclose(preprocess(torch.tensor(v, dtype=torch.float64)).numpy(), expected, rtol=1e-12)


def test_one_step_with_zero_gate_weights_by_hand():
    x, y = tiny_head_data()
    # gates sigmoid(0) = 1/2 both: theta <- theta / 2 - g / 2
    expected = [1.0 + Q, -1.0 - Q, -0.5, -0.5]
    zeros = [[0.0] * 7, [0.0] * 7]
    for rule in (numpy_rule, torch_rule):
        np.testing.assert_allclose(rule(x, y, 2, zeros, [0.0, 0.0], 1), expected, rtol=1e-6)
    # forget gate 1 (sigmoid(40) rounds to 1) and input gate 0.5: one SGD step of size 0.5
    np.testing.assert_allclose(numpy_rule(x, y, 2, zeros, [0.0, 40.0], 1), [2.0 + Q, -2.0 - Q, -1.0, -1.0], rtol=1e-12)


def test_numpy_and_pytorch_equal_the_reference_step_by_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    gate_weight = (0.5 * torch.randn(2, 7, generator=g)).tolist()
    gate_bias = [-1.0, 2.0]
    for steps in (1, 2, 3):
        expected = rule_by_hand(x.double().tolist(), y.tolist(), 3, gate_weight, gate_bias, steps)
        np.testing.assert_allclose(numpy_rule(x, y, 3, gate_weight, gate_bias, steps), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(torch_rule(x, y, 3, gate_weight, gate_bias, steps), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, rule_by_hand(x.double().tolist(), y.tolist(), 3, gate_weight, gate_bias, 2))


def test_forget_gate_one_and_input_gate_lr_is_plain_sgd():
    x, y, _ = embeddings(seed=2, dim=8)
    lr, steps = 0.05, 4
    bias = [math.log(lr / (1 - lr)), 40.0]
    zeros = [[0.0] * 7, [0.0] * 7]
    protos = prototypes(x, y, 5)
    sgd = adapt_head(prototype_head(protos), x, y, torch.full((steps, 1), lr), torch.full((steps,), lr), 0.0)
    w, b = finetune_head(x.numpy(), y.numpy(), protos.numpy(), *schedule([[lr]] * steps, [lr] * steps))
    expected = np.concatenate([w.ravel(), b])
    np.testing.assert_allclose(np.concatenate([sgd["weight"].flatten(), sgd["bias"]]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy_rule(x, y, 5, zeros, bias, steps), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(torch_rule(x, y, 5, zeros, bias, steps), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, numpy_rule(x, y, 5, zeros, bias, 0))  # the steps moved the head


def test_meta_training_reaches_the_gates_and_reduces_the_loss():
    torch.manual_seed(0)
    method = MetaLSTM(create_backbone("conv4", 1, 28), inner_steps=2, step_size=0.01)
    ep = episode(5, 2, q_query=3)
    method.loss(ep)[0].backward()
    assert method.gate_weight.grad.abs().sum() > 0 and method.gate_bias.grad.abs().sum() > 0
    losses = adam_losses(method, ep, 6)
    assert losses[-1] < losses[0]
    with pytest.raises(FewShotInputError, match=r"step_size must be in \(0, 1\)"):
        MetaLSTM(create_backbone("conv4", 1, 28), step_size=1.5)


def test_first_order_drops_the_second_order_terms():
    x, y, q = embeddings(seed=4)
    x.requires_grad_(True)
    gate_weight = (0.3 * torch.randn(2, 7, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    gate_bias = torch.tensor([math.log(0.2 / 0.8), 3.0], requires_grad=True)
    grads = []
    for first_order in (False, True):
        head = learned_update(prototype_head(prototypes(x, y, 5)), x, y, gate_weight, gate_bias, 3, first_order)
        loss = F.cross_entropy(q @ head["weight"].T + head["bias"], torch.arange(5).repeat(2))
        grads.append(torch.autograd.grad(loss, [x, gate_weight, gate_bias]))
    assert all(g.abs().sum() > 0 for g in grads[1])  # the gates learn first-order too
    for second, first in zip(*grads, strict=True):
        assert not torch.allclose(second, first, rtol=1e-3)


GATES = {
    "steps": 3,
    "gate_weight": [[0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.5], [0.0, 0.1, -0.05, 0.02, 0.0, 0.1, 0.2]],
    "gate_bias": [-2.0, 3.0],
}


@pytest.fixture
def bundle(tmp_path):
    modes = {"learned-update": {**GATES, "preprocess_p": 10.0, "temperature": 2.0}, "prototype": {}}
    return make_bundle(tmp_path / "bundle", weight(0), adaptation=Adaptation("learned-update", modes)).path


def test_mode_predicts_with_the_rule_and_refits_on_enrollment(bundle, tmp_path):
    cat, dog, bird = images(1, 3, center=60), images(2, 2, center=190), images(3, 2, center=120)
    queries = images(4, 2, center=70) + images(5, 2, center=180)
    x = torch.from_numpy(embed_by_hand(cat + dog, weight(0)))
    theta = rule_by_hand(x.tolist(), [0, 0, 0, 1, 1], 2, GATES["gate_weight"], GATES["gate_bias"], 3)
    w, b = np.reshape(theta[:6], (2, 3)), np.array(theta[6:])
    logits = embed_by_hand(queries, weight(0)) @ w.T + b
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as model:
        model.enroll("cat", cat)
        model.enroll("dog", dog)
        probabilities = model.predict_proba(queries)
        e = np.exp(logits / 2.0 - (logits / 2.0).max(1, keepdims=True))
        np.testing.assert_allclose(probabilities, e / e.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
        assert not model.adapter.add("bird", embed_by_hand(bird, weight(0)), np.zeros((2, 1, 4, 4), np.uint8))
        model.enroll("bird", bird)  # the mode cannot take it in: the next prediction refits on all shots
        after = model.predict_proba(queries)
    with FewShotModel.open(bundle, store=tmp_path / "fresh.db") as fresh:
        fresh.enroll_many({"cat": cat, "dog": dog, "bird": bird})
        np.testing.assert_allclose(after, fresh.predict_proba(queries), rtol=1e-12)
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as model:  # the head kept in the store
        np.testing.assert_array_equal(model.predict_proba(queries), after)


def test_bad_rule_parameters_are_one_line_errors(tmp_path):
    for i, (params, message) in enumerate(
        (
            ({**GATES, "steps": -1}, "learned-update steps must be a whole number, 0 or more, got -1"),
            ({**GATES, "gate_weight": [[0.0] * 6] * 2}, r"gate_weight must be \(2, 7\)"),
            ({"steps": 1, "gate_bias": [0.0, 0.0]}, "bundle's learned-update parameters are unusable: KeyError"),
        )
    ):
        path = make_bundle(
            tmp_path / str(i), weight(0), adaptation=Adaptation("learned-update", {"learned-update": params})
        ).path
        with pytest.raises(FewShotInputError, match=message):
            FewShotModel.open(path)


def test_the_rule_runs_without_torch(bundle):
    x = [[0.5, -1.0, 2.0], [0.7, -0.8, 1.5], [-1.0, 0.3, 0.2]]
    code = (
        BLOCK_TORCH
        + """
import json, sys
import numpy as np
from fewshot_edge.runtime import open_bundle
from fewshot_edge.runtime.learned_update import UpdateRule, learned_update
rule = UpdateRule.from_params(open_bundle(sys.argv[1]).manifest.adaptation.modes["learned-update"])
x = np.array(json.loads(sys.argv[2]))
w, b = learned_update(x, np.array([0, 0, 1]), np.stack([x[:2].mean(0), x[2]]), rule)
print(json.dumps([*w.ravel(), *b]), "torch" in sys.modules)
"""
    )
    theta, imported = run_python(code, str(bundle), json.dumps(x)).split("] ")
    assert imported.strip() == "False"
    expected = rule_by_hand(x, [0, 0, 1], 2, GATES["gate_weight"], GATES["gate_bias"], GATES["steps"])
    np.testing.assert_allclose(json.loads(theta + "]"), expected, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("metalstm")
    source = require_data("omniglot/images_background_small1.zip")[0]
    run(*train_args(source, out / "run", "metalstm", "-O", "inner_steps=3", "-O", "step_size=0.01"))
    run("export", out / "run" / "last.pt", "--out", out / "bundle", "--calibration-episodes", "20")
    return out


def test_train_eval_export_enroll_predict_and_bench_from_the_cli(trained, tmp_path):
    run_dir, bundle = trained / "run", trained / "bundle"
    evaluated = run("eval", run_dir / "last.pt", "--episodes", "5", "--query", "5", "--device", "cpu", "--json")
    assert 0.0 <= json.loads(evaluated.output)["accuracy"] <= 1.0
    manifest = json.loads((bundle / "manifest.json").read_text())
    rule = manifest["adaptation"]["modes"]["learned-update"]
    method = load_checkpoint(run_dir / "last.pt")[0]
    assert manifest["adaptation"]["default"] == "learned-update" and rule["steps"] == 3
    assert (
        np.allclose(rule["gate_weight"], method.gate_weight.detach().numpy()) and rule["gate_weight"] != [[0.0] * 7] * 2
    )
    assert manifest["provenance"]["parity"]["passed"] and manifest["calibration"]["open_set"]["thresholds_by_shots"]
    shots, queries, labels = character_files(run_dir, tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", bundle, "--store", store, "--adapt", "prototype", shots)
    answers = json.loads(
        run("predict", "--bundle", bundle, "--store", store, "--adapt", "learned-update", *queries, "--json").output
    )
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    figures = json.loads(
        run("bench", bundle, "--adapt", "learned-update", "--quick", "--threads", "1", "--json").output
    )
    assert figures["adaptation"]["modes"]["learned-update"]["refit"]["p50_ms"] > 0


def test_runtime_predictions_equal_pytorch_on_held_out_episodes(trained, tmp_path):
    method, config, _, _ = load_checkpoint(trained / "run" / "last.pt")
    validation = load_splits(config)[1]
    raw = 255 - validation.images[:, 0]  # the data set stores them inverted
    temperature = open_bundle(trained / "bundle").manifest.calibration.temperature_for(2)  # the default mode's
    for seed in range(3):
        ep = EpisodeSampler(validation, 5, 2, 3, seed=seed).sample()
        with torch.no_grad():
            expected = method.logits(ep.support, ep.support_labels, ep.query, 5)
        index = ep.index.numpy()
        with FewShotModel.open(trained / "bundle", store=tmp_path / f"s{seed}.db", adapt="learned-update") as model:
            model.enroll_many({f"c{c}": list(raw[index[c, :2]]) for c in range(5)})
            got = model.predict_proba(list(raw[index[:, 2:].ravel()]))
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1).numpy())
        np.testing.assert_allclose(got, torch.softmax(expected.double() / temperature, 1).numpy(), atol=1e-4)
