"""Checkpoints: plain tensors, numbers and strings only, so they load with ``weights_only=True``."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fewshot_edge.config import TrainConfig
from fewshot_edge.methods import FewShotMethod, create_method
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec

FORMAT = "fewshot-edge-checkpoint"
VERSION = 1


def build_method(config: TrainConfig, spec: InputSpec, initialize: bool = False) -> FewShotMethod:
    """The method and backbone a config names, for inputs shaped by ``spec``; with ``initialize`` (a
    new run) the backbone starts from ``config.weights`` or its hub's weights (``config.pretrained``), or
    takes the weights of ``config.init_from``'s backbone, when the config names them."""
    start = {"weights": config.weights, "pretrained": config.pretrained} if initialize else {}
    backbone = create_backbone(config.backbone, spec.channels, spec.height, **start)
    method = create_method(config.method, backbone, **config.method_options)
    if initialize and config.init_from:
        source = load_checkpoint(config.init_from)[0].backbone
        try:
            backbone.load_state_dict(source.state_dict())
        except RuntimeError as exc:
            raise FewShotInputError(
                f"--init-from {config.init_from}: its backbone does not fit {config.backbone!r}"
                f" ({str(exc).splitlines()[0]})"
            ) from None
    return method


def save_checkpoint(path: Path, method: FewShotMethod, config: TrainConfig, spec: InputSpec, **extra: Any) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written checkpoint."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "spec": spec.to_dict(),
        "state": method.state_dict(),
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's payload, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise FewShotInputError(f"not a readable checkpoint: {path} ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FewShotInputError(f"not a fewshot-edge checkpoint: {path}")
    if payload.get("version") != VERSION:
        raise FewShotInputError(f"unsupported checkpoint version {payload.get('version')} in {path}")
    return payload


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", options: dict[str, Any] | None = None
) -> tuple[FewShotMethod, TrainConfig, InputSpec, dict[str, Any]]:
    """Rebuild the method from a checkpoint; returns (method in eval mode, config, spec, payload).
    ``options`` override method options that do not change its parameters (e.g. maml's test_adapt)."""
    payload = read_checkpoint(path, device)
    config = TrainConfig.from_dict(payload["config"])
    if options:
        config = replace(config, method_options={**config.method_options, **options})
    spec = InputSpec.from_dict(payload["spec"])
    method = build_method(config, spec).to(device)
    try:
        method.load_state_dict(payload["state"])
    except RuntimeError:
        if not options:
            raise
        raise FewShotInputError(
            f"method option(s) {', '.join(sorted(options))} change the trained parameters of {path}:"
            " only options that leave them as they are can change after training"
        ) from None
    method.eval()
    return method, config, spec, payload
