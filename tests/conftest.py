"""Shared fixtures. Data tests skip without ../shared/data, and fail instead when
FEWSHOT_EDGE_REQUIRE_DATA=1 (set by .ci/run), so CI always runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FEWSHOT_EDGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def require_data(*relative: str) -> list[Path]:
    """Paths under the shared data folder; skip (or fail in CI) when any is missing."""
    paths = [SHARED_DATA / r for r in relative]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        reason = f"shared data not found: {', '.join(missing)} (set FEWSHOT_EDGE_DATA to its folder)"
        if os.environ.get("FEWSHOT_EDGE_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return paths


@pytest.fixture
def omniglot_small1() -> Path:
    return require_data("omniglot/images_background_small1.zip")[0]


@pytest.fixture
def omniglot_background() -> Path:
    return require_data("omniglot/images_background.zip")[0]


@pytest.fixture
def miniimagenet_val() -> Path:
    return require_data("miniimagenet/val.zip")[0]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Conv-4 ProtoNet trained for a few episodes on Omniglot small1, so BatchNorm has real statistics
    (shared by the export and precision-variant tests; trained once per session)."""
    from fewshot_edge.config import TrainConfig
    from fewshot_edge.train import train

    source = require_data("omniglot/images_background_small1.zip")[0]
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        sources=[str(source)],
        data_options={"rotations": True},
        holdout=1,
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=4,
        val_every=4,
        val_episodes=5,
        seed=0,
        device="cpu",
        out=str(out),
    )
    train(config, progress_bar=False)
    return out / "best.pt"
