"""A short CPU training run lifts held-out accuracy; resume continues; the CLI reports bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from fewshot_edge.checkpoint import load_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.data.splits import load_splits
from fewshot_edge.evaluate import evaluate
from fewshot_edge.train import build_method, train


def small_config(source, out, **kw) -> TrainConfig:
    base = dict(
        sources=[str(source)],
        data_options={"rotations": True},
        holdout=1,
        n_way=20,
        k_shot=5,
        q_query=5,
        episodes=150,
        val_every=75,
        val_episodes=100,
        seed=0,
        device="cpu",
        out=str(out),
    )
    return TrainConfig(**{**base, **kw})


def test_short_cpu_run_lifts_heldout_accuracy_from_chance(omniglot_small1, tmp_path):
    config = small_config(omniglot_small1, tmp_path / "run")
    _, held_out = load_splits(config)
    torch.manual_seed(config.seed)
    untrained = build_method(config, held_out.spec)
    before = evaluate(untrained, held_out, 5, 1, 15, episodes=300, seed=123)
    train(config, progress_bar=False)
    method, _, _, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    after = evaluate(method, held_out, 5, 1, 15, episodes=300, seed=123)
    assert after.accuracy >= 0.60
    assert after.accuracy > before.accuracy + 0.05, (before, after)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["episodes"] == 150 and [h["episode"] for h in saved["history"]] == [75, 150]


def test_resume_continues_from_last_checkpoint(omniglot_small1, tmp_path):
    config = small_config(omniglot_small1, tmp_path / "run", episodes=4, val_every=2, val_episodes=5)
    train(config, progress_bar=False)
    longer = TrainConfig(**{**config.to_dict(), "episodes": 6})
    metrics = train(longer, resume=tmp_path / "run" / "last.pt", progress_bar=False)
    assert metrics["episodes"] == 6
    assert [h["episode"] for h in metrics["history"]] == [2, 4, 6]


def test_cli_train_then_eval_json(omniglot_small1, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        main,
        [
            "train",
            "--source",
            str(omniglot_small1),
            "--holdout",
            "1",
            "--way",
            "10",
            "--episodes",
            "4",
            "--val-every",
            "2",
            "--val-episodes",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["episodes"] == 4
    result = runner.invoke(main, ["eval", str(out / "best.pt"), "--episodes", "20", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["episodes"] == 20 and report["n_way"] == 5 and 0.0 <= report["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--source", "{src}", "--holdout", "40", "--episodes", "1"], "can hold out 1 to 4 of 5 groups"),
        (["train", "--source", "{src}", "--way", "500", "--episodes", "1", "--holdout", "1"], "500-way episodes need"),
        (["eval", "{bad}"], "not a readable checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(omniglot_small1, tmp_path, args, message):
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    args = [a.format(src=omniglot_small1, bad=bad) for a in args] + (
        ["--out", str(tmp_path / "o")] if args[0] == "train" else []
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("backbone,size", [("conv4", 84), ("resnet12", 32)])
def test_trains_on_rgb_class_folders(miniimagenet_val, tmp_path, backbone, size):
    config = TrainConfig(
        data="folders",
        sources=[str(miniimagenet_val)],
        data_options={"size": size, "max_per_class": 10},
        holdout=4,
        backbone=backbone,
        n_way=5,
        k_shot=2,
        q_query=2,
        val_way=3,
        val_shot=1,
        val_query=2,
        episodes=3,
        val_every=3,
        val_episodes=3,
        device="cpu",
        out=str(tmp_path / backbone),
    )
    metrics = train(config, progress_bar=False)
    assert metrics["train_classes"] == 12 and metrics["val_classes"] == 4
    method, _, spec, _ = load_checkpoint(tmp_path / backbone / "best.pt")
    assert (spec.channels, spec.height) == (3, size)
    assert method.embed(torch.zeros(2, 3, size, size)).shape == (2, 1600 if backbone == "conv4" else 640)


def test_train_needs_a_source_unless_given_a_config(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: give the training data with --source (or a saved run's --config)"
    assert not (tmp_path / "o").exists()
