"""The sequence adaptation mode on tiny hand-made graphs checked against numpy, and the whole loop
(train -> export -> enroll -> predict) for the two methods that use it, mann and transformer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image
from runtime_support import BLOCK_TORCH, DIM, SPEC, _model, embed_by_hand, images, linear_encoder, run_python, weight

from fewshot_edge.checkpoint import build_method, load_checkpoint, save_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.episodes import Episode
from fewshot_edge.export.bundle import export_draft
from fewshot_edge.methods import MANN, create_method
from fewshot_edge.methods.sequence import SequenceMethod
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime import (
    Adaptation,
    Calibration,
    EmbeddingSpec,
    FewShotInputError,
    FewShotModel,
    InputSpec,
    SequenceAdapter,
    open_bundle,
    preprocess,
    write_bundle,
)
from fewshot_edge.runtime import bench as runtime_bench
from fewshot_edge.runtime.store import Shots

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
@pytest.mark.parametrize("fitted", [False, True])
def test_more_classes_than_max_way_are_refused_before_anything_is_stored(tmp_path, w, form, fitted):
    bundle = make_sequence_bundle(tmp_path / "b", w, form, max_way=2)
    limit = "the sequence mode reads at most 2 classes (its model was trained with 2 label slots), not 3"
    with FewShotModel.open(bundle, store=tmp_path / "s.db") as model:
        model.enroll_many({"cat": CAT, "dog": DOG})
        if fitted:
            model.predict(QUERIES)
        with pytest.raises(FewShotInputError, match=limit.replace("(", r"\(").replace(")", r"\)")) as error:
            model.enroll("bird", BIRD)
        assert "\n" not in str(error.value)
        with pytest.raises(FewShotInputError, match="not 4"):
            model.enroll_many({"bird": BIRD, "fish": BIRD})
        model.add_shots("cat", DOG[:1])  # more shots of an enrolled class are fine
        assert model.classes() == [("cat", len(CAT) + 1), ("dog", len(DOG))]
        assert len(model.predict(QUERIES)) == 4
    with FewShotModel.open(bundle, store=tmp_path / "s.db", adapt="prototype") as other:
        other.enroll("bird", BIRD)
        assert len(other.predict(QUERIES)) == 4  # another mode reads any number of classes


def test_the_cli_says_why_in_one_line_and_keeps_the_store(tmp_path, w):
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
        assert result.exit_code == (2 if name == "bird" else 0), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "at most 2 classes (its model was trained with 2 label slots), not 3" in result.output
    listed = runner.invoke(main, ["classes", "list", "--bundle", str(bundle), "--store", str(store)])
    assert "cat" in listed.output and "dog" in listed.output and "bird" not in listed.output
    result = runner.invoke(main, ["predict", "--bundle", str(bundle), "--store", str(store), str(files["query"])])
    assert result.exit_code == 0, result.output


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


# --- the methods behind the mode: mann and transformer ---------------------------------------------------

TINY = {
    "mann": {"controller": 16, "memory_slots": 8, "memory_width": 8},
    "transformer": {"width": 16, "depth": 1, "heads": 2},
}


def tiny(name: str, max_way: int = 5, **options: object) -> SequenceMethod:
    torch.manual_seed(0)
    method = create_method(name, create_backbone("conv4", 1, 28), max_way=max_way, **TINY[name], **options)
    assert isinstance(method, SequenceMethod)
    return method


def episode(n_way: int, k_shot: int, q_query: int = 3, seed: int = 0) -> Episode:
    """Synthetic classes: a per-class mean image plus noise, class-major."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_way, 1, 28, 28, generator=g)

    def draw(per: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n_way).repeat_interleave(per)
        return means[y] + 0.5 * torch.randn(len(y), 1, 28, 28, generator=g), y

    (s, sy), (q, qy) = draw(k_shot), draw(q_query)
    return Episode(s, sy, q, qy, n_way, torch.arange(n_way), torch.zeros(n_way, k_shot + q_query, dtype=torch.long))


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_logits_any_way_up_to_max_way_and_refused_beyond(name):
    method = tiny(name, max_way=5).eval()
    for n_way, k_shot in ((1, 1), (2, 3), (5, 1)):
        ep = episode(n_way, k_shot)
        logits = method.logits(ep.support, ep.support_labels, ep.query, n_way)
        assert logits.shape == (3 * n_way, n_way) and torch.isfinite(logits).all()
    ep = episode(6, 1)
    with pytest.raises(FewShotInputError, match=r"reads at most 5 classes \(its label slots, option max_way\), got 6"):
        method.logits(ep.support, ep.support_labels, ep.query, 6)
    with pytest.raises(FewShotInputError, match="got 6"):
        method.loss(ep)


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_queries_are_answered_independently(name):
    method = tiny(name).eval()
    ep = episode(3, 2)
    with torch.no_grad():
        together = method.logits(ep.support, ep.support_labels, ep.query, 3)
        alone = torch.cat([method.logits(ep.support, ep.support_labels, q[None], 3) for q in ep.query])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_a_few_steps_reduce_the_loss(name):
    method = tiny(name).train()
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    ep = episode(4, 2)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # the same slots and support order each step: one fixed objective
        loss, acc = method.loss(ep)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert 0.0 <= acc.item() <= 1.0
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_training_permutes_the_label_slots(name):
    method = tiny(name, max_way=20)
    seen = {tuple(method.random_slots(5, torch.device("cpu")).tolist()) for _ in range(5)}
    assert len(seen) > 1 and all(len(set(s)) == 5 and max(s) < 20 for s in seen)
    assert any(max(s) >= 5 for s in seen)  # slots beyond the first n_way are trained too


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, name):
    config, spec = TrainConfig(method=name, method_options={"max_way": 6, **TINY[name]}), InputSpec(1, 28, 28)
    torch.manual_seed(0)
    method = build_method(config, spec).eval()
    save_checkpoint(tmp_path / "m.pt", method, config, spec)
    loaded, _, _, _ = load_checkpoint(tmp_path / "m.pt")
    ep = episode(3, 2)
    args = (ep.support, ep.support_labels, ep.query, 3)
    assert loaded.options["max_way"] == 6
    with torch.no_grad():
        assert torch.equal(loaded.logits(*args), method.logits(*args))


@pytest.mark.parametrize("name,options", [("mann", {}), ("mann", {"label_delay": False}), ("transformer", {})])
def test_graphs_take_any_number_of_shots_and_queries(tmp_path, name, options):
    """The exported graphs, traced on 2 images, run on other sizes as PyTorch does, through the mode."""
    method = tiny(name, **options).eval()
    export_draft(method, InputSpec(1, 28, 28), tmp_path)
    adapter = FewShotModel.open(tmp_path / "draft").adapter
    assert isinstance(adapter, SequenceAdapter)
    for shots, queries in ((1, 4), (7, 2), (12, 1)):
        emb = torch.randn(shots + queries, method.backbone.out_dim)
        slots = torch.arange(shots) % 3
        adapter.fit(
            Shots(np.arange(shots), ["a", "b", "c"][: min(shots, 3)], slots.numpy(), emb[:shots].numpy(), None, 0)
        )
        with torch.no_grad():
            if isinstance(method, MANN):
                state, _ = method.write(method.initial_state(), emb[:shots], slots)
                expected = method.read(state, emb[shots:])
            else:
                expected = method.read(emb[:shots], slots, emb[shots:])
        got = adapter.score(emb[shots:].numpy())[0]
        np.testing.assert_allclose(got, expected[:, : min(shots, 3)].numpy(), atol=1e-5)


def character_files(run_dir: Path, out: Path, n_way: int, k_shot: int) -> tuple[list[Path], list[Path], list[str]]:
    """PNG files of held-out characters as a user has them (black strokes on white): a folder per class of
    ``k_shot`` images, and one more image per class as a query."""
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    validation = load_splits(config)[1]
    folders, queries, labels = [], [], []
    for c in range(n_way):
        ids = np.flatnonzero(validation.labels == c)[: k_shot + 1]
        folders.append(out / f"char{c}")
        for i, image_id in enumerate(ids):
            path = (out / "queries" if i == k_shot else folders[-1]) / f"char{c}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - validation.images[image_id, 0]).save(path)  # the data set stores them inverted
        queries.append(path)
        labels.append(f"char{c}")
    return folders, queries, labels


def cli(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", ["mann", "transformer"])
def test_train_eval_export_enroll_predict_bench(omniglot_small1, tmp_path, name):
    options = [arg for key, value in TINY[name].items() for arg in ("-O", f"{key}={value}")]
    cli(
        "train", "--source", omniglot_small1, "--holdout", "1", "--method", name, *options,
        "--way", "5", "--shot", "1", "--query", "3", "--episodes", "6", "--val-every", "6", "--val-episodes", "3",
        "--device", "cpu", "--out", tmp_path / "run",
    )  # fmt: skip
    assert "5-way 1-shot" in cli("eval", tmp_path / "run" / "last.pt", "--episodes", "5", "--way", "5", "--shot", "1")
    cli("export", tmp_path / "run" / "last.pt", "--out", tmp_path / "bundle", "--calibration-episodes", "20")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    mode = manifest["adaptation"]["modes"]["sequence"]
    assert manifest["adaptation"]["default"] == "sequence" and mode["max_way"] == 20
    roles = {entry["role"] for entry in manifest["files"].values()}
    assert roles == ({"encoder", "sequence", "sequence_write"} if name == "mann" else {"encoder", "sequence"})
    checks = manifest["provenance"]["parity"]["checks"]
    assert all(any(check.startswith(f"{role} on ") for check in checks) for role in roles - {"encoder"})
    assert max(checks.values()) <= 1e-4

    folders, queries, labels = character_files(tmp_path / "run", tmp_path / "files", n_way=4, k_shot=2)
    store = tmp_path / "device.db"
    for folder in folders:
        cli(
            "enroll",
            "--bundle",
            tmp_path / "bundle",
            "--store",
            store,
            "--adapt",
            "sequence",
            "--label",
            folder.name,
            folder,
        )
    answers = json.loads(cli("predict", "--bundle", tmp_path / "bundle", "--store", store, *queries, "--json"))
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    asked = cli("predict", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", "sequence", *queries, "--json")
    assert json.loads(asked) == answers  # enroll --adapt made it the store's mode

    # the device's probabilities are PyTorch's logits through the calibrated temperature
    method, _, spec, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    method.eval()
    load = lambda files: torch.from_numpy(preprocess([str(f) for f in files], spec))  # noqa: E731
    support = load([f for folder in folders for f in sorted(folder.iterdir())])
    with torch.no_grad():
        logits = method.logits(support, torch.arange(4).repeat_interleave(2), load(queries), 4).double().numpy()
    expected = softmax(logits / open_bundle(tmp_path / "bundle").manifest.calibration.temperature_for(2))
    np.testing.assert_allclose([a["probability"] for a in answers], expected.max(1), rtol=1e-4, atol=1e-6)
    assert [a["top_k"][0]["label"] for a in answers] == [labels[i] for i in expected.argmax(1)]

    report = json.loads(cli("bench", tmp_path / "bundle", "--adapt", "sequence", "--quick", "--json"))
    assert set(report["adaptation"]["modes"]) == {"prototype", "sequence"}
    # the plain bench enrolls more classes in all than the 20 the mode can hold, one at a time
    enroll = runtime_bench._enroll_latency(tmp_path / "bundle", tmp_path / "bench.db", {"adapt": "sequence"}, 25)
    assert enroll["runs"] == 25 and 0 < enroll["p50_ms"] <= enroll["p99_ms"]
