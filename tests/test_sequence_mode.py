"""The sequence adaptation mode on tiny hand-made graphs checked against numpy, and the whole loop
(train -> export -> enroll -> predict) for the two methods that use it, mann and transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image
from runtime_support import BLOCK_TORCH, DIM, SPEC, _model, embed_by_hand, images, linear_encoder, run_python, weight

from fewshot_edge.cli import main
from fewshot_edge.runtime import Adaptation, Calibration, EmbeddingSpec, FewShotInputError, FewShotModel, write_bundle

CAT, DOG, BIRD = images(1, 3, center=60), images(2, 2, center=190), images(3, 2, center=120)
QUERIES = images(4, 2, center=70) + images(5, 2, center=180)
DECAY = 0.5


def slot_onehot(nodes: list, label: str, unsqueeze: list[int] | None) -> str:
    """Append nodes making ``onehot`` (float) of float slot(s) ``label`` against the constant ``slots`` (W,)."""
    source = label
    if unsqueeze is not None:
        nodes.append(helper.make_node("Unsqueeze", [label, "axis1"], ["label_col"]))
        source = "label_col"
    nodes += [
        helper.make_node("Cast", [source], ["label_int"], to=TensorProto.INT64),
        helper.make_node("Equal", ["label_int", "slots"], ["is_slot"]),
        helper.make_node("Cast", ["is_slot"], ["onehot"], to=TensorProto.FLOAT),
    ]
    return "onehot"


def recurrent_graphs(max_way: int) -> dict[str, bytes]:
    """write: next = DECAY * state + onehot(label) (x) embedding, flattened; read: queries @ state(W, D).T."""
    size = max_way * DIM
    consts = {"slots": np.arange(max_way, dtype=np.int64), "decay": np.array(DECAY, np.float32)}
    nodes: list = []
    slot_onehot(nodes, "label", None)
    nodes += [
        helper.make_node("Unsqueeze", ["onehot", "axis1"], ["column"]),
        helper.make_node("Unsqueeze", ["embedding", "axis0"], ["row"]),
        helper.make_node("Mul", ["column", "row"], ["outer"]),
        helper.make_node("Reshape", ["outer", "flat"], ["outer_flat"]),
        helper.make_node("Mul", ["state", "decay"], ["kept"]),
        helper.make_node("Add", ["kept", "outer_flat"], ["next_state"]),
    ]
    value = helper.make_tensor_value_info
    write = _model(
        nodes,
        "write",
        [
            value("state", TensorProto.FLOAT, [size]),
            value("embedding", TensorProto.FLOAT, [DIM]),
            value("label", TensorProto.FLOAT, []),
        ],
        [value("next_state", TensorProto.FLOAT, [size])],
        {
            **consts,
            "axis0": np.array([0], np.int64),
            "axis1": np.array([1], np.int64),
            "flat": np.array([-1], np.int64),
        },
    )
    read = _model(
        [
            helper.make_node("Reshape", ["state", "rows"], ["memory"]),
            helper.make_node("Transpose", ["memory"], ["columns"]),
            helper.make_node("MatMul", ["queries", "columns"], ["logits"]),
        ],
        "read",
        [value("state", TensorProto.FLOAT, [size]), value("queries", TensorProto.FLOAT, ["Q", DIM])],
        [value("logits", TensorProto.FLOAT, ["Q", max_way])],
        {"rows": np.array([max_way, DIM], np.int64)},
    )
    return {"sequence_write.onnx": write, "sequence.onnx": read}


def set_graph(max_way: int) -> dict[str, bytes]:
    """logits[q, w] = sum over the shots s in slot w of queries[q] . support[s]."""
    nodes: list = []
    slot_onehot(nodes, "labels", [1])
    nodes += [
        helper.make_node("Transpose", ["support"], ["support_t"]),
        helper.make_node("MatMul", ["queries", "support_t"], ["similarity"]),
        helper.make_node("MatMul", ["similarity", "onehot"], ["logits"]),
    ]
    value = helper.make_tensor_value_info
    read = _model(
        nodes,
        "set",
        [
            value("support", TensorProto.FLOAT, ["S", DIM]),
            value("labels", TensorProto.FLOAT, ["S"]),
            value("queries", TensorProto.FLOAT, ["Q", DIM]),
        ],
        [value("logits", TensorProto.FLOAT, ["Q", max_way])],
        {"slots": np.arange(max_way, dtype=np.int64), "axis1": np.array([1], np.int64)},
    )
    return {"sequence.onnx": read}


def make_sequence_bundle(path: Path, w: np.ndarray, form: str, max_way: int = 4, temperature: float = 1.0) -> Path:
    graphs = recurrent_graphs(max_way) if form == "recurrent" else set_graph(max_way)
    mode = {"form": form, "max_way": max_way, "read_role": "sequence"}
    if form == "recurrent":
        mode |= {"state_size": max_way * DIM, "write_role": "sequence_write"}
    write_bundle(
        path,
        {"encoder.onnx": linear_encoder(w), **graphs},
        input_spec=SPEC,
        embedding=EmbeddingSpec(DIM, "cosine", 1.0),
        adaptation=Adaptation("sequence", {"sequence": mode, "prototype": {}}),
        calibration=Calibration(temperature),
        provenance={"method": "test"},
    )
    return path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def by_hand(w: np.ndarray, form: str, shots: list[tuple[int, list[np.ndarray]]], max_way: int, classes: int):
    """(logits (Q, classes), nearest cosine distances, shots of the nearest class) in float64 numpy, for
    ``shots`` = (slot, images) in insertion order."""
    emb = [(slot, e) for slot, imgs in shots for e in embed_by_hand(imgs, w)]
    q = embed_by_hand(QUERIES, w)
    if form == "recurrent":
        state = np.zeros((max_way, DIM))
        for slot, e in emb:
            state = DECAY * state
            state[slot] += e
        logits = q @ state.T
    else:
        logits = np.zeros((len(q), max_way))
        for slot, e in emb:
            logits[:, slot] += q @ e
    means = np.stack([np.mean([e for s, e in emb if s == c], axis=0) for c in range(classes)])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d = 1.0 - unit(q) @ unit(means).T
    counts = np.bincount([s for s, _ in emb], minlength=classes)
    return logits[:, :classes], d.min(1), counts[d.argmin(1)]


@pytest.fixture
def w() -> np.ndarray:
    return weight(3)


@pytest.mark.parametrize("form", ["recurrent", "set"])
def test_predictions_match_numpy(tmp_path, w, form):
    bundle = make_sequence_bundle(tmp_path / "b", w, form, temperature=1.7)
    with FewShotModel.open(bundle) as model:
        assert model.adapter.name == "sequence"
        model.enroll("cat", CAT)
        model.enroll("dog", DOG)
        model.add_shots("cat", BIRD)  # stored after dog's: written after them
        logits, nearest, counts = by_hand(w, form, [(0, CAT), (1, DOG), (0, BIRD)], 4, 2)
        np.testing.assert_allclose(model.predict_proba(QUERIES), softmax(logits / 1.7), rtol=1e-4, atol=1e-6)
        predictions = model.predict(QUERIES)
        np.testing.assert_allclose([p.distance for p in predictions], nearest, rtol=1e-4, atol=1e-6)
        assert model.adapter.score(model.embed(QUERIES))[2].tolist() == counts.tolist()


def test_enrollment_order_matters_to_the_recurrent_form_only(tmp_path, w):
    probabilities = {}
    for form in ("recurrent", "set"):
        bundle = make_sequence_bundle(tmp_path / form, w, form)
        with FewShotModel.open(bundle) as first, FewShotModel.open(bundle) as second:
            first.enroll_many({"cat": CAT, "dog": DOG})
            second.enroll_many({"dog": DOG, "cat": CAT})
            assert first.labels == ["cat", "dog"] and second.labels == ["dog", "cat"]
            probabilities[form] = first.predict_proba(QUERIES), second.predict_proba(QUERIES)[:, ::-1]
        logits, _, _ = by_hand(w, form, [(0, DOG), (1, CAT)], 4, 2)
        np.testing.assert_allclose(probabilities[form][1], softmax(logits)[:, ::-1], rtol=1e-4, atol=1e-6)
    assert not np.allclose(*probabilities["recurrent"], atol=1e-3)  # dog's shots decayed once more
    np.testing.assert_allclose(*probabilities["set"], rtol=1e-5)


@pytest.mark.parametrize("form", ["recurrent", "set"])
def test_enrolling_adds_shots_without_a_refit_and_equals_one(tmp_path, w, form):
    bundle = make_sequence_bundle(tmp_path / "b", w, form)
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as model:
        model.enroll("cat", CAT)
        model.predict(QUERIES)  # fitted: later enrollments go through add
        fits = []
        fit = model.adapter.fit
        model.adapter.fit = lambda shots, state=None: fits.append(len(shots.ids)) or fit(shots, state)
        model.enroll("dog", DOG)
        model.add_shots("cat", BIRD)
        incremental = model.predict_proba(QUERIES)
        assert fits == []
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as refitted:
        np.testing.assert_allclose(refitted.predict_proba(QUERIES), incremental, rtol=1e-6)
        if form == "recurrent":
            np.testing.assert_allclose(refitted.adapter.memory, model.adapter.memory, rtol=1e-6)


@pytest.mark.parametrize("form", ["recurrent", "set"])
def test_more_classes_than_max_way_is_a_clear_error(tmp_path, w, form):
    bundle = make_sequence_bundle(tmp_path / "b", w, form, max_way=2)
    limit = "the sequence mode reads at most 2 classes (its model was trained with 2 label slots), not 3"
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as model:
        model.enroll_many({"cat": CAT, "dog": DOG})
        model.predict(QUERIES)
        with pytest.raises(FewShotInputError, match=limit.replace("(", r"\(").replace(")", r"\)")) as error:
            model.enroll("bird", BIRD)
        assert "\n" not in str(error.value)
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as reopened:  # the store took the class: predict says why
        with pytest.raises(FewShotInputError, match="at most 2 classes"):
            reopened.predict(QUERIES)
        reopened.remove_class("bird")
        assert len(reopened.predict(QUERIES)) == 4
    with FewShotModel.open(bundle, store=tmp_path / "s.db", adapt="prototype") as other:
        other.enroll("bird", BIRD)
        assert len(other.predict(QUERIES)) == 4  # another mode reads any number of classes


def test_the_cli_says_why_in_one_line(tmp_path, w):
    bundle = make_sequence_bundle(tmp_path / "b", w, "recurrent", max_way=2)
    store = tmp_path / "s.db"
    files = {}
    for name, imgs in (("cat", CAT), ("dog", DOG), ("bird", BIRD), ("query", QUERIES[:1])):
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray(imgs[0]).save(files[name])
    runner = CliRunner()
    for name in ("cat", "dog", "bird"):
        result = runner.invoke(
            main,
            [
                "enroll",
                "--bundle",
                str(bundle),
                "--store",
                str(store),
                "--adapt",
                "sequence",
                "--label",
                name,
                str(files[name]),
            ],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["predict", "--bundle", str(bundle), "--store", str(store), str(files["query"])])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "at most 2 classes (its model was trained with 2 label slots), not 3" in result.output


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"form": "tree"}, "bundle's sequence mode has form 'tree'; this runtime reads: recurrent, set"),
        ({"max_way": 0}, "bundle's sequence mode needs a positive whole number max_way, got 0"),
        ({"state_size": None}, "bundle's sequence mode needs a positive whole number state_size, got None"),
        ({"read_role": "sequence_write"}, "graph sequence_write.onnx must take state, queries"),
    ],
)
def test_bundle_mistakes_are_one_line_errors(tmp_path, w, edit, message):
    graphs = recurrent_graphs(4)
    mode = {"form": "recurrent", "max_way": 4, "state_size": 4 * DIM, **edit}
    write_bundle(
        tmp_path / "b",
        {"encoder.onnx": linear_encoder(w), **graphs},
        input_spec=SPEC,
        embedding=EmbeddingSpec(DIM, "cosine", 1.0),
        adaptation=Adaptation("sequence", {"sequence": mode}),
    )
    with pytest.raises(FewShotInputError, match=message.replace("(", r"\(")):
        FewShotModel.open(tmp_path / "b")


def test_runs_without_torch(tmp_path, w):
    bundle = make_sequence_bundle(tmp_path / "b", w, "recurrent")
    code = BLOCK_TORCH + (
        "import sys\nimport numpy as np\nfrom fewshot_edge.runtime import FewShotModel\n"
        "with FewShotModel.open(sys.argv[1]) as model:\n"
        "    model.enroll('a', [np.full((4, 4), 60, np.uint8)])\n"
        "    model.enroll('b', [np.full((4, 4), 190, np.uint8)])\n"
        "    print(model.predict([np.full((4, 4), 180, np.uint8)])[0].label)\n"
    )
    assert run_python(code, str(bundle)).strip() in ("a", "b")
