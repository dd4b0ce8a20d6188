"""Any timm model as a backbone, ``timm:NAME``: the pooled pre-logits features of the model built with
``num_classes=0``, from random weights, a local file (``weights``: safetensors or a torch state dict) or
timm's hub (``pretrained``, online). ``timm_input_spec`` gives the input spec of the model's pretrained
config: size, mean and std, interpolation and the centre crop of timm's evaluation transform.

timm is imported when a ``timm:`` backbone or spec is asked for, not with this module (it takes seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_edge.runtime.errors import FewShotInputError
from fewshot_edge.runtime.preprocess import InputSpec

from .backbones import Backbone, register_family

PREFIX = "timm"


class TimmBackbone(Backbone):
    """A timm model built with ``num_classes=0``, whose ``forward`` is the pooled pre-logits embedding."""

    def __init__(self, model: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.model = model
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def timm_model_name(backbone: str) -> str | None:
    """The timm model of a ``timm:NAME`` backbone name, else None."""
    prefix, sep, model = backbone.partition(":")
    return model if sep and prefix == PREFIX else None


def timm_input_spec(model: str, channels: int = 3, image_size: int | None = None) -> InputSpec:
    """The input spec of ``model``'s pretrained config (timm's defaults when it has none): its square
    size unless ``image_size``, mean and std, interpolation, crop mode and crop fraction."""
    import timm.data
    import timm.models

    _check_model(model)
    pretrained_cfg = timm.models.get_pretrained_cfg(model)
    config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    size = image_size or int(config["input_size"][-1])
    return InputSpec(
        channels=channels,
        height=size,
        width=size,
        mean=_per_channel(config["mean"], channels),
        std=_per_channel(config["std"], channels),
        resize=config["interpolation"],
        crop_mode=config["crop_mode"],
        crop_pct=config["crop_pct"],
    )


@register_family(PREFIX)
def timm_backbone(
    model: str, in_channels: int, image_size: int, *, weights: str | Path | None = None, pretrained: bool = False
) -> TimmBackbone:
    """``timm.create_model(model, num_classes=0)`` for ``in_channels`` x ``image_size`` inputs (a model of a
    fixed input size, e.g. a ViT, is built for that size), weights loaded by timm's pretrained loader
    (position embeddings resampled, input channels adapted, the classifier dropped) from ``weights`` or,
    with ``pretrained``, from timm's hub."""
    import timm

    _check_model(model)
    if weights is not None and pretrained:
        raise FewShotInputError("give --weights FILE or --pretrained, not both")
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
    pretrained_cfg = timm.models.get_pretrained_cfg(model)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size and pretrained_cfg.input_size[-1] != image_size:
        kwargs["img_size"] = image_size
    if weights is not None:
        net = _with_weights(model, Path(weights), kwargs)
    elif pretrained:
        net = _from_hub(model, kwargs)
    else:
        net = timm.create_model(model, **kwargs)
    return TimmBackbone(net, _embedding_size(net, model, in_channels, image_size))


def _with_weights(model: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """The model built by timm's pretrained loader from the file ``path``, refused in one line when the
    file does not load or lacks any of the model's tensors (timm loads non-strictly once the classifier
    is dropped)."""
    import timm

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as exc:  # safetensors and torch.load raise many types for foreign or corrupt files
        raise FewShotInputError(
            f"--weights {path}: not a safetensors file or torch state dict ({exc.__class__.__name__})"
        ) from None
    try:
        net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except RuntimeError as exc:
        raise FewShotInputError(f"--weights {path} does not fit timm:{model} ({_first_line(exc)})") from None
    missing = [key for key in net.state_dict() if key not in state]
    if missing:
        raise FewShotInputError(
            f"--weights {path} lacks {len(missing)} of timm:{model}'s {len(net.state_dict())} tensors"
            f" (e.g. {missing[0]!r}): not a {model} state dict"
        )
    return net


def _from_hub(model: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model with timm's pretrained weights (from its cache, or downloaded), or a one-line error."""
    import timm

    try:
        return timm.create_model(model, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as exc:  # offline and not cached, or no pretrained weights for the model
        raise FewShotInputError(
            f"timm:{model}: no pretrained weights from timm's hub ({_first_line(exc)}); give --weights FILE instead"
        ) from None


@torch.no_grad()
def _embedding_size(net: nn.Module, model: str, channels: int, size: int) -> int:
    """The embedding size, from one zero image through the model in eval mode (which also proves the
    model takes ``size`` x ``size`` inputs); the model's mode is restored."""
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros(1, channels, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise FewShotInputError(f"timm:{model} cannot take {size}x{size} images ({_first_line(exc)})") from None
    finally:
        net.train(was_training)
    if out.ndim != 2:
        raise FewShotInputError(f"timm:{model} gives features shaped {tuple(out.shape)[1:]}, not pooled vectors")
    return int(out.shape[1])


def _check_model(model: str) -> None:
    import timm

    if not timm.is_model(model):
        raise FewShotInputError(f"unknown timm model {model!r} (timm.list_models() lists them)")


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """RGB constants for an RGB model, their mean for a grayscale one (timm adapts the stem by summing)."""
    return tuple(values) if channels == len(values) else (sum(values) / len(values),)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
