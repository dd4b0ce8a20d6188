"""The whole loop from the CLI for the FiLM and fine-tune modes: train -> export -> enroll -> predict,
on held-out Omniglot characters written as PNG files, plus method-option errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.methods import METHODS


def run(*args: object, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def character_files(run_dir: Path, out: Path, n_way: int = 4, k_shot: int = 3) -> tuple[Path, list[Path], list[str]]:
    """PNG files of held-out characters as a user has them (black strokes on white): a folder per class
    with ``k_shot`` images, and one more image per class as a query."""
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    validation = load_splits(config)[1]
    queries, labels = [], []
    for c in range(n_way):
        ids = np.flatnonzero(validation.labels == c)[: k_shot + 1]
        for i, image_id in enumerate(ids):
            folder = out / "queries" if i == k_shot else out / "shots" / f"char{c}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"char{c}_{i}.png"
            Image.fromarray(255 - validation.images[image_id, 0]).save(path)  # the data set stores them inverted
            if i == k_shot:
                queries.append(path)
                labels.append(f"char{c}")
    return out / "shots", queries, labels


def train_args(source: Path, out: Path, method: str, *options: str) -> list[object]:
    return [
        "train",
        "--source",
        source,
        "--holdout",
        "1",
        "--method",
        method,
        *options,
        "--way",
        "5",
        "--shot",
        "1",
        "--query",
        "3",
        "--episodes",
        "6",
        "--val-every",
        "6",
        "--val-episodes",
        "3",
        "--device",
        "cpu",
        "--out",
        out,
    ]


def eval_and_export(run_dir: Path, bundle: Path) -> dict:
    """``eval`` a trained run (an accuracy in [0, 1]) and ``export`` its last checkpoint to ``bundle``;
    returns the bundle's manifest."""
    evaluated = run("eval", run_dir / "last.pt", "--episodes", "5", "--query", "5", "--device", "cpu", "--json")
    assert 0.0 <= json.loads(evaluated.output)["accuracy"] <= 1.0
    run("export", run_dir / "last.pt", "--out", bundle, "--calibration-episodes", "20")
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize(
    "method,options,mode",
    [
        ("film", ["-O", "task_dim=16", "-O", "film_l2=0.01"], "film"),
        ("anil", ["--method-option", "inner_steps=2", "-O", "per_parameter=true"], "finetune"),
    ],
)
def test_train_export_enroll_predict(omniglot_small1, tmp_path, method, options, mode):
    run(*train_args(omniglot_small1, tmp_path / "run", method, *options))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["method_options"]
    assert {k: saved[k] for k in ("task_dim", "film_l2", "inner_steps", "per_parameter") if k in saved} == (
        {"task_dim": 16, "film_l2": 0.01} if method == "film" else {"inner_steps": 2, "per_parameter": True}
    )
    run("export", tmp_path / "run" / "last.pt", "--out", tmp_path / "bundle", "--calibration-episodes", "20")
    shots, queries, labels = character_files(tmp_path / "run", tmp_path / "files")
    store = tmp_path / "device.db"
    run("enroll", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", mode, shots)
    answers = json.loads(run("predict", "--bundle", tmp_path / "bundle", "--store", store, *queries, "--json").output)
    assert len(answers) == 4 and all(a["top_k"][0]["label"] in labels for a in answers)
    explicit = json.loads(
        run("predict", "--bundle", tmp_path / "bundle", "--store", store, "--adapt", mode, *queries, "--json").output
    )
    assert explicit == answers  # enroll --adapt made it the store's mode
    if mode == "finetune":
        more = json.loads(
            run(
                "predict", "--bundle", tmp_path / "bundle", "--store", store, "--steps", "20", *queries, "--json"
            ).output
        )
        assert [a["probability"] for a in more] != [a["probability"] for a in answers]
    else:
        bad = run("predict", "--bundle", tmp_path / "bundle", "--store", store, "--steps", "3", *queries, ok=False)
        assert bad.exit_code == 2 and "adaptation mode 'film' has no option 'steps'" in bad.output


@pytest.mark.parametrize(
    "options,message",
    [
        (
            ["--method", "anil", "-O", "inner_step=3"],
            "method 'anil' has no option 'inner_step' (it takes: inner_steps, step_size",
        ),
        (["--method", "anil", "--metric", "cosine"], "method 'anil' has no option 'metric'"),
        (["--method", "film", "-O", "task_dim"], "--method-option takes KEY=VALUE, got 'task_dim'"),
        (
            ["--method", "siamese"],
            "unknown method 'siamese'; choose from " + ", ".join(sorted(METHODS)),
        ),
        (
            ["--method", "film", "-O", "task_dim=wide"],
            "method 'film' option 'task_dim' takes a whole number, got 'wide'",
        ),
        (["--method", "anil", "-O", "first_order=1"], "method 'anil' option 'first_order' takes a true/false, got 1"),
        (["--method", "anil", "-O", "inner_steps=-1"], "inner_steps must be 0 or more, got -1"),
    ],
)
def test_bad_method_options_are_one_line_exit_2(omniglot_small1, tmp_path, options, message):
    result = run("train", "--source", omniglot_small1, "--holdout", "1", *options, "--out", tmp_path / "o", ok=False)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
