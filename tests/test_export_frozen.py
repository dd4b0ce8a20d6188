"""From the command line: a bundle without meta-training (``export --backbone timm:NAME --weights FILE
--calibration-data DIR``) enrolls and predicts; a timm backbone trains and exports from its checkpoint."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from timm_support import CNN, SIZE, VIT, draw_shapes, save_weights

from fewshot_edge.cli import main


def run(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Drawn class-per-folder photos, and the CNN's and the ViT's weights saved as safetensors."""
    root = tmp_path_factory.mktemp("frozen")
    return {
        "data": draw_shapes(root / "photos"),
        "weights": save_weights(root / "saved.safetensors", CNN, seed=0),
        "vit": save_weights(root / "vit.safetensors", VIT, seed=0),
    }


def test_frozen_export_then_enroll_and_predict(photos, tmp_path):
    """Acceptance: export from a timm model's saved weights and a calibration folder, then serve it."""
    data, weights = photos["data"], photos["weights"]
    bundle = tmp_path / "bundle"
    exported = run(
        "export", "--backbone", f"timm:{CNN}", "--weights", weights, "--calibration-data", data,
        "--image-size", SIZE, "--calibration-episodes", 20, "--out", bundle,
    )  # fmt: skip
    assert "parity: max |onnx - torch|" in exported.output and "calibration: temperature" in exported.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["provenance"]["backbone"] == f"timm:{CNN}" and manifest["provenance"]["checkpoint"] is None
    assert manifest["input"]["height"] == SIZE and manifest["input"]["crop_mode"] == "center"
    assert manifest["calibration"]["open_set"]["fitted_on"].endswith("on 6 held-out classes")
    store = tmp_path / "store.db"
    shots = tmp_path / "shots"
    for c in range(3):
        (shots / f"class{c}").mkdir(parents=True)
        (shots / f"class{c}" / "a.png").write_bytes((data / f"class{c}" / "00.png").read_bytes())
    run("enroll", "--bundle", bundle, "--store", store, shots)
    queries = [data / f"class{c}" / "00.png" for c in range(3)]
    predicted = json.loads(run("predict", "--bundle", bundle, "--store", store, "--json", *queries).output)
    assert [p["top_k"][0]["label"] for p in predicted] == ["class0", "class1", "class2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a CHECKPOINT or a --backbone timm:NAME"),
        (["--backbone", f"timm:{CNN}"], "--backbone needs --calibration-data"),
        (["run.pt", "--weights", "{weights}"], "--weights go with --backbone"),
        (["--backbone", "conv4", "--weights", "{weights}", "--calibration-data", "{data}"], "needs a timm:NAME"),
        (["--backbone", f"timm:{CNN}", "--calibration-data", "{data}"], "give --weights FILE or --pretrained"),
        (
            ["--backbone", f"timm:{VIT}", "--weights", "{vit}", "--calibration-data", "{data}", "--image-size", "32"],
            "int8 is not offered for attention models",
        ),
    ],
)
def test_bad_frozen_exports_are_one_line_and_exit_2(photos, tmp_path, args, message):
    filled = [a.format(**photos) for a in args]
    result = run("export", *filled, "--int8", "--out", tmp_path / "b", code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_timm_backbone_trains_from_weights_and_exports(photos, tmp_path):
    """train --backbone timm:NAME --weights FILE on folders (the model's size, mean and std unless
    --image-size), then export the checkpoint; film over a timm backbone is refused in one line."""
    data, weights = photos["data"], photos["weights"]
    common = ["train", "--data", "folders", "--source", data, "--holdout", 4, "--backbone", f"timm:{CNN}"]
    refused = run(*common, "--method", "film", "--out", tmp_path / "film", code=2)
    assert "has no FiLM hooks" in refused.output
    episodes = ["--way", 2, "--shot", 1, "--query", 2, "--val-shot", 1, "--val-way", 2, "--val-query", 2]
    run(
        *common, "--weights", weights, "--image-size", SIZE, "--method", "anil", "--episodes", 2,
        "--val-every", 2, "--val-episodes", 2, *episodes, "--no-amp", "--out", tmp_path / "run",
    )  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["weights"] == str(weights) and config["data_options"]["mean"] == [0.5, 0.5, 0.5]
    run("export", tmp_path / "run" / "best.pt", "--calibration-episodes", 10, "--out", tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["weights"] == weights.name and manifest["input"]["mean"] == [0.5, 0.5, 0.5]
    assert set(manifest["adaptation"]["modes"]) == {"finetune", "prototype"}
