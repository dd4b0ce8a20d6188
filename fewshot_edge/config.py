"""The training configuration: one dataclass, saved as JSON beside every run and in checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fewshot_edge.runtime.errors import FewShotInputError

STAGES = ("episodic", "pretrain")


@dataclass
class TrainConfig:
    """Everything a run depends on; ``episodes`` and ``time_limit`` (minutes) both bound it.

    ``stage`` "episodic" meta-trains ``method`` on episodes; "pretrain" trains its backbone with a linear
    layer over every training class (cross-entropy on ``batch_size`` images, ``augment``ed; SGD with
    Nesterov momentum), a step being a batch instead of an episode, and checkpoints the method as it is
    (e.g. a ProtoNet on the pretrained backbone) for ``eval``, ``export`` and a later ``init_from``.
    """

    data: str = "omniglot"
    sources: list[str] = field(default_factory=list)
    data_options: dict[str, Any] = field(default_factory=dict)
    holdout: int = 5
    holdout_groups: list[str] = field(default_factory=list)
    val_sources: list[str] = field(default_factory=list)
    backbone: str = "conv4"
    method: str = "protonet"
    method_options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint whose backbone weights a new run starts from
    weights: str | None = None  # a timm backbone's starting weights: safetensors or a torch state dict
    pretrained: bool = False  # a timm backbone starts from its hub's pretrained weights (online)
    stage: str = "episodic"
    batch_size: int = 128  # pretrain stage
    augment: bool = True  # pretrain stage: random resized crop, horizontal flip, colour jitter
    n_way: int = 60
    k_shot: int = 5
    q_query: int = 5
    val_way: int = 5
    val_shot: int = 1
    val_query: int = 15
    val_episodes: int = 300
    val_every: int = 500
    episodes: int = 20000
    time_limit: float | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    amp: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    out: str = "runs/protonet"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise FewShotInputError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.stage not in STAGES:
            raise FewShotInputError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in (
            "n_way",
            "k_shot",
            "q_query",
            "val_way",
            "val_shot",
            "val_query",
            "val_episodes",
            "val_every",
            "episodes",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise FewShotInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.init_from and (self.weights or self.pretrained):
            raise FewShotInputError("start the backbone from --init-from or from --weights/--pretrained, not both")
        if self.time_limit is not None and self.time_limit <= 0:
            raise FewShotInputError(f"time_limit must be positive minutes, got {self.time_limit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Parse a saved config; a FiLM ``init_from`` method option (before 0.2) becomes ``init_from``."""
        options = d.get("method_options") or {}
        if "init_from" in options:
            d = {
                **d,
                "init_from": options["init_from"],
                "method_options": {k: v for k, v in options.items() if k != "init_from"},
            }
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FewShotInputError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
