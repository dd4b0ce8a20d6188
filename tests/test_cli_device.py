"""The device commands (enroll, predict, classes, bench, demo) on tiny linear bundles, without torch."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_support import BLOCK_TORCH, images, make_bundle, weight, write_manifest

from fewshot_edge.cli import main
from fewshot_edge.cli.bench import format_bench, pytorch_figures
from fewshot_edge.runtime import FewShotInputError, FewShotModel, InputSpec
from fewshot_edge.runtime.bench import run_benchmark

DARK, LIGHT, MID = (
    images(1, 3, center=30, spread=5),
    images(2, 2, center=225, spread=5),
    images(3, 2, center=128, spread=5),
)


def save(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)
    return folder / name


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def env(tmp_path):
    """A bundle, a store path, a class-per-folder tree (dark, light) and loose images."""
    make_bundle(tmp_path / "bundle", weight(0))
    shots = tmp_path / "shots"
    for i, image in enumerate(DARK):
        save(shots / "dark", f"{i}.png", image)
    for i, image in enumerate(LIGHT):
        save(shots / "light", f"{i}.png", image)
    mid = [save(tmp_path / "mid", f"{i}.png", image) for i, image in enumerate(MID)]
    queries = [
        save(tmp_path / "queries", name, image)
        for name, image in (
            ("a_dark.png", images(4, 1, center=35, spread=5)[0]),
            ("b_light.png", images(5, 1, center=215, spread=5)[0]),
        )
    ]
    return {
        "tmp": tmp_path,
        "bundle": tmp_path / "bundle",
        "store": tmp_path / "device.db",
        "shots": shots,
        "mid": mid,
        "queries": queries,
        "opts": ["--bundle", tmp_path / "bundle", "--store", tmp_path / "device.db"],
    }


def classes_of(env) -> list[dict]:
    return json.loads(run("classes", "list", *env["opts"], "--json").stdout)


def test_enroll_predict_classes_round_trip(env):
    opts = env["opts"]
    out = run("enroll", *opts, env["shots"]).stdout
    assert "enrolled 'dark': 3 shots" in out and "enrolled 'light': 2 shots" in out and "2 classes, 5 shots" in out
    run("enroll", *opts, "--label", "mid", env["mid"][0])
    assert "added 1 to 'mid': 2 shots" in run("enroll", *opts, "--label", "mid", "--add", env["mid"][1]).stdout
    assert classes_of(env) == [
        {"label": "dark", "shots": 3},
        {"label": "light", "shots": 2},
        {"label": "mid", "shots": 2},
    ]
    assert "3 classes, 7 shots" in run("classes", "list", *opts).stdout

    predictions = json.loads(run("predict", *opts, env["tmp"] / "queries", "--top-k", "2", "--json").stdout)
    assert [(Path(p["image"]).name, p["label"], p["unknown"]) for p in predictions] == [
        ("a_dark.png", "dark", False),
        ("b_light.png", "light", False),
    ]
    for p in predictions:
        assert len(p["top_k"]) == 2 and p["top_k"][0] == {"label": p["label"], "probability": p["probability"]}
        assert 0 < p["probability"] <= 1 and p["distance"] >= 0
    with FewShotModel.open(env["bundle"], store=env["store"]) as model:
        np.testing.assert_allclose(
            [p["probability"] for p in predictions], [p.probability for p in model.predict(env["queries"])], rtol=1e-6
        )
    lines = run("predict", *opts, *env["queries"]).stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["dark", "light"] and "p=" in lines[0] and "d=" in lines[0]

    assert "renamed 'dark' to 'night'" in run("classes", "rename", *opts, "dark", "night").stdout
    assert "removed 'light' (2 shots)" in run("classes", "remove", *opts, "light").stdout
    assert classes_of(env) == [{"label": "night", "shots": 3}, {"label": "mid", "shots": 2}]
    assert run("predict", *opts, env["queries"][0]).stdout.split()[1] == "night"


def test_predict_answers_unknown_beyond_the_threshold(env):
    make_bundle(env["tmp"] / "strict", weight(0), threshold=1e-6)
    opts = ["--bundle", env["tmp"] / "strict", "--store", env["store"]]
    run("enroll", *opts, env["shots"])
    out = run("predict", *opts, env["queries"][0]).stdout
    assert out.split()[1] == "unknown" and "(nearest: dark)" in out


def test_reembed_keeps_classes_after_a_model_update(env):
    run("enroll", *env["opts"], env["shots"])
    make_bundle(env["tmp"] / "v2", weight(1))
    opts = ["--bundle", env["tmp"] / "v2", "--store", env["store"]]
    refused = run("classes", "list", *opts, ok=False)
    assert refused.exit_code == 2 and "is bound to model" in refused.stderr and "pass --reembed" in refused.stderr
    assert "2 classes, 5 shots" in run("classes", "list", *opts, "--reembed").stdout
    assert run("predict", *opts, env["queries"][1]).stdout.split()[1] == "light"


def corrupt_png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return path


def tamper_onnx(bundle: Path) -> None:
    data = bytearray((bundle / "encoder.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "encoder.onnx").write_bytes(bytes(data))


def edit_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    write_manifest(bundle, manifest)


BAD_ENROLLMENTS = {
    "missing image": (lambda e: ["--label", "x", e["tmp"] / "nope.png"], "image file not found"),
    "corrupt image": (lambda e: ["--label", "x", corrupt_png(e["tmp"] / "bad.png")], "not a readable image"),
    "non-image file": (lambda e: ["--label", "x", e["tmp"] / "notes.txt"], "not a readable image"),
    "empty label": (lambda e: ["--label", "  ", e["mid"][0]], "label is empty"),
    "long label": (lambda e: ["--label", "x" * 65, e["mid"][0]], "longer than 64"),
    "slash in label": (lambda e: ["--label", "a/b", e["mid"][0]], "must not contain '/'"),
    "backslash in label": (lambda e: ["--label", "a\\b", e["mid"][0]], "must not contain"),
    "quote in label": (lambda e: ["--label", 'say "hi"', e["mid"][0]], "must not contain"),
    "apostrophe in label": (lambda e: ["--label", "it's", e["mid"][0]], "must not contain"),
    "reserved label": (lambda e: ["--label", "Unknown", e["mid"][0]], "reserved"),
    "existing class": (lambda e: ["--label", "dark", e["mid"][0]], "already enrolled; use --add"),
    "add to missing class": (lambda e: ["--label", "mid", "--add", e["mid"][0]], "no class 'mid' enrolled"),
    "file without label": (lambda e: [e["mid"][0]], "is not a folder; give --label"),
    "empty folder": (lambda e: ["--label", "x", (e["tmp"] / "empty").mkdir() or e["tmp"] / "empty"], "no image files"),
    "bad image in a class folder": (
        lambda e: [corrupt_png(e["shots"] / "zebra" / "0.png").parent.parent],
        "not a readable image",
    ),
    "bad label from a folder name": (lambda e: [(e["shots"] / "it's").mkdir() or e["shots"]], "must not contain"),
}


@pytest.mark.parametrize("case", BAD_ENROLLMENTS)
def test_bad_enrollment_is_one_line_exit_2_and_changes_nothing(env, case):
    (env["tmp"] / "notes.txt").write_text("not an image")
    (env["shots"] / "zebra").mkdir()
    run("enroll", *env["opts"], "--label", "dark", *env["shots"].glob("dark/*.png"))
    before = env["store"].read_bytes()
    args, message = BAD_ENROLLMENTS[case]
    result = run("enroll", *env["opts"], *args(env), ok=False)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.output.strip().splitlines()) == 1 and result.stdout == ""
    assert classes_of(env) == [{"label": "dark", "shots": 3}]
    assert env["store"].read_bytes() == before


BAD_BUNDLES = {
    "tampered onnx": (tamper_onnx, "encoder.onnx does not match its sha256"),
    "unknown manifest version": (
        lambda b: edit_manifest(b, format_version=99),
        "format_version 99 is not supported (this runtime reads 1 to 2)",
    ),
    "missing model file": (lambda b: (b / "encoder.onnx").unlink(), "encoder.onnx listed in the manifest is missing"),
    "missing manifest": (lambda b: (b / "manifest.json").unlink(), "manifest.json not found"),
}


@pytest.mark.parametrize("case", BAD_BUNDLES)
@pytest.mark.parametrize("command", ["enroll", "predict"])
def test_bad_bundle_is_refused_before_touching_the_store(env, case, command):
    spoil, message = BAD_BUNDLES[case]
    spoil(env["bundle"])
    args = ["--label", "x", env["mid"][0]] if command == "enroll" else [env["mid"][0]]
    if command == "predict":
        make_bundle(env["tmp"] / "good", weight(0))
        run("enroll", "--bundle", env["tmp"] / "good", "--store", env["store"], "--label", "x", env["mid"][0])
    before = env["store"].read_bytes() if env["store"].exists() else None
    result = run(command, *env["opts"], *args, ok=False)
    assert result.exit_code == 2 and message in result.stderr and len(result.output.strip().splitlines()) == 1
    assert (env["store"].read_bytes() if env["store"].exists() else None) == before


def test_predict_and_classes_need_an_enrolled_store(env):
    for args in (
        ["predict", *env["opts"], env["mid"][0]],
        ["classes", "list", *env["opts"]],
        ["classes", "rename", *env["opts"], "a", "b"],
    ):
        result = run(*args, ok=False)
        assert result.exit_code == 2 and "no enrollment store at" in result.stderr
    assert not env["store"].exists()
    run("enroll", *env["opts"], "--label", "x", env["mid"][0])
    run("classes", "remove", *env["opts"], "x")
    result = run("predict", *env["opts"], env["mid"][0], ok=False)
    assert result.exit_code == 2 and "no classes enrolled" in result.stderr
    for args, message in (
        (["remove", "nope"], "no class 'nope' enrolled"),
        (["rename", "nope", "b"], "no class 'nope'"),
    ):
        result = run("classes", args[0], *env["opts"], *args[1:], ok=False)
        assert result.exit_code == 2 and message in result.stderr


NO_TORCH_CLI = (
    BLOCK_TORCH
    + """
from fewshot_edge.cli import main

main(sys.argv[1:], prog_name="fewshot-edge")
"""
)


def cli_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH_CLI, *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_device_commands_run_without_torch_and_fail_in_one_line(env):
    assert cli_without_torch("enroll", *env["opts"], env["shots"]).returncode == 0
    done = cli_without_torch("predict", *env["opts"], *env["queries"])
    assert done.returncode == 0 and [line.split()[1] for line in done.stdout.splitlines()] == ["dark", "light"]
    done = cli_without_torch("enroll", *env["opts"], "--label", "a/b", env["mid"][0])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["Error: label must not contain '/': 'a/b'"]


def test_benchmark_report_has_every_figure(env):
    report = run_benchmark(env["bundle"], threads=1, runs=5, batch=8, seconds=0.01, enroll_runs=3, child_runs=3)
    assert report["input"] == "1x4x4" and report["threads"] == 1 and report["batch"] == 8
    for key in ("predict", "encoder", "enroll"):
        assert set(report[key]) == {"p50_ms", "p99_ms", "runs"} and 0 < report[key]["p50_ms"] <= report[key]["p99_ms"]
    for key in ("encoder_images_per_s", "end_to_end_images_per_s", "cold_start_s", "peak_rss_mb"):
        assert report[key] > 0, key
    report["pytorch"] = pytorch_figures("no --checkpoint", report)
    text = format_bench(report)
    assert "predict, one 105x105 uint8 image" in text and "pytorch" in text and "skipped (no --checkpoint)" in text
    assert len(text.splitlines()) == 10


def test_benchmark_runs_on_a_colour_bundle(tmp_path):
    spec = InputSpec(3, 4, 4)
    make_bundle(tmp_path / "rgb", weight(0, spec), spec=spec)
    report = run_benchmark(tmp_path / "rgb", threads=1, runs=3, batch=4, seconds=0.01, enroll_runs=2, child_runs=2)
    assert report["input"] == "3x4x4" and report["encoder_images_per_s"] > 0 and report["peak_rss_mb"] > 0


def test_bench_times_pytorch_eager_with_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from fewshot_edge.checkpoint import build_method, save_checkpoint
    from fewshot_edge.config import TrainConfig

    spec = InputSpec(1, 16, 16)
    make_bundle(tmp_path / "b", weight(0, spec), spec=spec)
    torch.manual_seed(0)
    config = TrainConfig(backbone="conv4", method="protonet")
    save_checkpoint(tmp_path / "m.pt", build_method(config, spec), config, spec)
    result = run("bench", tmp_path / "b", "--checkpoint", tmp_path / "m.pt", "--threads", "1", "--quick", "--json")
    figures = json.loads(result.stdout)["pytorch"]
    assert figures["encoder"]["p50_ms"] > 0 and figures["times_encoder"] > 0 and figures["times_predict"] > 0
    assert figures["encoder_images_per_s"] > 0 and figures["throughput_vs_runtime"] > 0
    assert figures["peak_rss_mb"] > 100 and figures["rss_vs_runtime"] > 1  # torch alone is larger than the runtime
    text = run("bench", tmp_path / "b", "--checkpoint", tmp_path / "m.pt", "--threads", "1", "--quick").stdout
    assert "pytorch eager, batches of 128" in text and "x the runtime's" in text
    other = InputSpec(1, 20, 20)
    save_checkpoint(tmp_path / "other.pt", build_method(config, other), config, other)
    result = run("bench", tmp_path / "b", "--checkpoint", tmp_path / "other.pt", "--quick", ok=False)
    assert result.exit_code == 2 and "checkpoint takes 1x20x20 inputs but the bundle takes 1x16x16" in result.stderr


def test_demo_draws_enrolls_classifies_and_prints_commands_that_work(env):
    out = env["tmp"] / "demo"
    text = run("demo", "--bundle", env["bundle"], "--ways", "3", "--queries", "2", "--out", out).stdout
    assert "new drawings:" in text and "/6 correct" in text and "unseen symbol:" in text and "ms per image" in text
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        [f"shots/symbol-{i}/1.png" for i in (1, 2, 3)]
        + [f"queries/symbol-{i}-{j}.png" for i in (1, 2, 3) for j in (1, 2)]
        + ["queries/unseen.png"]
    )
    commands = [shlex.split(line.strip())[1:] for line in text.splitlines() if line.startswith("  fewshot-edge ")]
    assert [c[0] for c in commands] == ["enroll", "predict", "classes"]
    for command in commands:
        run(*command)
    assert classes_of({"opts": ["--bundle", env["bundle"], "--store", out / "store.db"]}) == [
        {"label": f"symbol-{i}", "shots": 1} for i in (1, 2, 3)
    ]


def test_demo_runs_omniglot_episodes(env, omniglot_small1):
    text = run("demo", "--bundle", env["bundle"], "--data", omniglot_small1, "--episodes", "3", "--queries", "2").stdout
    assert "5-way 1-shot on" in text and "95% CI, 3 episodes" in text and "answered unknown:" in text


def test_example_app_enrolls_and_classifies(env):
    example = Path(__file__).resolve().parents[1] / "examples" / "embed_in_app.py"
    done = subprocess.run(
        [
            sys.executable,
            str(example),
            "--bundle",
            str(env["bundle"]),
            "--enroll",
            str(env["shots"]),
            "--classify",
            str(env["tmp"] / "queries"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["enrolled dark from 3 images", "enrolled light from 2 images"]
    assert [line.split()[:2] for line in done.stdout.splitlines()[2:]] == [
        ["a_dark.png:", "dark"],
        ["b_light.png:", "light"],
    ]


def test_default_bundle_is_found_or_named_missing(monkeypatch):
    import fewshot_edge.runtime.pretrained as pretrained

    assert pretrained.default_bundle() == pretrained.shipped_bundle("omniglot-conv4")
    monkeypatch.setattr(pretrained, "DEFAULT_BUNDLE", "no-such-bundle")
    with pytest.raises(
        FewShotInputError, match=r"no bundle folder or shipped bundle named 'no-such-bundle' \(shipped: "
    ):
        pretrained.default_bundle()


def test_a_shipped_bundle_opens_by_name_from_python_and_the_cli(tmp_path):
    with FewShotModel.open("omniglot-conv4") as model:
        assert model.bundle.path.name == "omniglot-conv4" and model.spec.height == 28
    result = run("info", "omniglot-conv4")
    assert "omniglot-conv4" in result.stdout
    shots = tmp_path / "shots" / "ring"
    shots.mkdir(parents=True)
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(shots / "1.png")
    run("enroll", "--bundle", "omniglot-conv4", "--store", tmp_path / "s.db", tmp_path / "shots")
    assert "ring" in run("classes", "list", "--bundle", "omniglot-conv4", "--store", tmp_path / "s.db").stdout
    for args in (
        ["info", "mini-nothing"],
        ["classes", "list", "--bundle", "mini-nothing", "--store", tmp_path / "t.db"],
    ):
        bad = run(*args, ok=False)
        assert bad.exit_code == 2 and "no bundle folder or shipped bundle named 'mini-nothing'" in bad.stderr
    assert not (tmp_path / "t.db").exists()
    with pytest.raises(FewShotInputError, match="no bundle folder or shipped bundle named 'mini-nothing'"):
        FewShotModel.open("mini-nothing")
    with pytest.raises(FewShotInputError, match="manifest.json not found"):
        FewShotModel.open(tmp_path / "missing")  # a path is never taken for a name


def test_desktop_commands_without_torch_say_which_extra_they_need(tmp_path):
    done = cli_without_torch("train", "--source", str(tmp_path), "--out", str(tmp_path / "run"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["Error: this command needs torch: pip install 'fewshot-edge[train]'"]


def test_the_shipped_photo_bundle_enrolls_class_folders_of_photos_and_answers(tmp_path):
    """mini-conv4 (RGB 84x84, cosine prototypes): phone-shaped JPEG photos in class folders enroll from the
    CLI, and each class's own photo is answered with that class."""
    with FewShotModel.open("mini-conv4") as model:
        assert (model.spec.channels, model.spec.height, model.spec.width) == (3, 84, 84)
        assert model.bundle.manifest.embedding.metric == "cosine"
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    for name, colour in (("red mug", (200, 30, 30)), ("green plant", (30, 160, 40)), ("blue book", (30, 40, 200))):
        (photos / name).mkdir(parents=True)
        for i in range(2):  # 4:3 photos with texture, as a phone gives
            noise = rng.integers(-60, 60, (96, 128, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(photos / name / f"{i}.jpg")
    store = tmp_path / "shop.db"
    run("enroll", "--bundle", "mini-conv4", "--store", store, photos)
    listed = run("classes", "list", "--bundle", "mini-conv4", "--store", store, "--json").stdout
    assert sorted(c["label"] for c in json.loads(listed)) == ["blue book", "green plant", "red mug"]
    with FewShotModel.open("mini-conv4", store=store) as model:
        for name in ("red mug", "green plant", "blue book"):
            (answer,) = model.predict([photos / name / "0.jpg"], top_k=3)
            assert answer.top_k[0][0] == name
