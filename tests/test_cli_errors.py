"""How commands fail: bad input is one line and exit 2; an unexpected error is one line naming it and
exit 1, or its full traceback with --debug or FEWSHOT_EDGE_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import fewshot_edge.cli.deploy as deploy
from fewshot_edge.checkpoint import read_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.config import TrainConfig
from fewshot_edge.data import FewShotDataset, load_dataset, split_by_group
from fewshot_edge.runtime import FewShotInputError, InputSpec

# `info BUNDLE` with open_bundle raising what argv[1] names, in a fresh interpreter as a user runs it
SCRIPT = """
import sys
import fewshot_edge.cli.deploy as deploy
from fewshot_edge.cli import main

def broken(path):
    raise {"runtime": RuntimeError("something broke"), "key": KeyError("embedding")}[sys.argv[1]]

deploy.open_bundle = broken
main(sys.argv[2:], prog_name="fewshot-edge")
"""


def cli(error: str, *args: str, debug_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEWSHOT_EDGE_DEBUG"}
    if debug_env is not None:
        env["FEWSHOT_EDGE_DEBUG"] = debug_env
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, error, *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "error, line",
    [
        (
            "runtime",
            "Error: unexpected RuntimeError: something broke (run with --debug or FEWSHOT_EDGE_DEBUG=1 for the traceback)",
        ),
        ("key", "Error: unexpected KeyError: 'embedding' (run with --debug or FEWSHOT_EDGE_DEBUG=1 for the traceback)"),
    ],
)
def test_an_internal_error_is_one_line_exit_1(error, line):
    done = cli(error, "info", "./some-bundle")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [line]


@pytest.mark.parametrize("args, debug_env", [(["--debug"], None), ([], "1")])
def test_debug_flag_or_env_var_shows_the_traceback(args, debug_env):
    done = cli("runtime", *args, "info", "./some-bundle", debug_env=debug_env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: something broke"
    assert "in broken" in done.stderr


def test_debug_env_var_off_keeps_one_line():
    done = cli("runtime", "info", "./some-bundle", debug_env="0")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "error, code, message",
    [
        (
            FewShotInputError("manifest.json: embedding.dim must be positive"),
            2,
            "Error: manifest.json: embedding.dim must be positive",
        ),
        (FileNotFoundError("bundle not found: nowhere"), 2, "Error: bundle not found: nowhere"),
        (ValueError("math domain error"), 1, "Error: unexpected ValueError: math domain error"),
    ],
)
def test_only_input_errors_exit_2(monkeypatch, error, code, message):
    def broken(path):
        raise error

    monkeypatch.setattr(deploy, "open_bundle", broken)
    result = CliRunner().invoke(main, ["info", "./some-bundle"])
    assert result.exit_code == code and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message)


def test_usage_errors_exit_2():
    result = CliRunner().invoke(main, ["info", "--no-such-option"])
    assert result.exit_code == 2 and "No such option '--no-such-option'" in result.stderr


def test_training_side_input_errors_are_fewshot_input_errors(tmp_path):
    """What a user gets wrong in the training half is a FewShotInputError (a ValueError), so the CLI says exit 2."""
    (tmp_path / "bad.pt").write_text("nope")
    with pytest.raises(FewShotInputError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FewShotInputError, match="episodes must be at least 1"):
        TrainConfig(episodes=0)
    with pytest.raises(FewShotInputError, match="unknown config keys: wat"):
        TrainConfig.from_dict({"wat": 1})
    with pytest.raises(FewShotInputError, match="unknown data set kind 'mnist'"):
        load_dataset("mnist", [tmp_path])
    ds = FewShotDataset(
        np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]), ["a/x", "b/y"], ["a", "b"], InputSpec(1, 4, 4)
    )
    with pytest.raises(FewShotInputError, match="can hold out 1 to 1 of 2 groups, not 2"):
        split_by_group(ds, 2)
