"""``train`` and ``eval``: the desktop half (needs torch)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from fewshot_edge.config import STAGES
from fewshot_edge.runtime.bundle import METRICS

from .common import InputError, echo_err, emit_json, main, reports_input_errors, require_modules

EPISODIC_LR, PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY = 1e-3, 0.05, 5e-4


class RegistryChoice(click.Choice):
    """The names in a registry, read when first needed (so other commands never import torch) and on
    every use (so a method registered later is a choice too); an unknown name is one line, exit 2.
    With ``families``, any ``PREFIX:NAME`` of a family is accepted too (its builder checks NAME)."""

    def __init__(
        self, names: Callable[[], Iterable[str]], what: str, families: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self._names = names
        self._families = families
        self.what = what
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        prefix, sep, name = value.partition(":")
        if sep and name and self._families is not None and prefix in self._families():
            return value
        if value not in self.choices:
            raise InputError(f"unknown {self.what} {value!r}; choose from {', '.join(sorted(self.choices))}")
        return value


def _method_registry() -> dict[str, Any]:
    require_modules("torch")
    from fewshot_edge.methods import METHODS

    return METHODS


def _backbone_names() -> Iterable[str]:
    require_modules("torch")
    from fewshot_edge.models import backbone_names

    return backbone_names()


def _backbone_families() -> Iterable[str]:
    require_modules("torch")
    from fewshot_edge.models import FAMILIES

    return FAMILIES


def _data_kinds() -> Iterable[str]:
    from fewshot_edge.data import LOADERS

    return LOADERS


class TrainCommand(click.Command):
    """``train``: its help ends with every registered method and its ``-O`` options, read from the registry."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            methods = _method_registry()
        except click.ClickException:  # no torch: the command itself says which extra it needs
            return
        with formatter.section("Methods (--method) and their options (-O KEY=VALUE)"):
            for name, method in methods.items():
                formatter.write_text(f"{name}: {(method.__doc__ or '').strip().splitlines()[0]}")
                with formatter.indentation():
                    formatter.write_dl(
                        [(f"{o.name}={json.dumps(o.default)}", o.help) for o in method.declared_options()]
                    )
        super().format_epilog(ctx, formatter)


def data_options(
    image_size: int | None, channels: int | None, rotations: bool | None, max_per_class: int | None
) -> dict[str, Any]:
    """The loader options the user set (unset ones keep the loader's defaults)."""
    given = {"size": image_size, "channels": channels, "rotations": rotations, "max_per_class": max_per_class}
    return {k: v for k, v in given.items() if v is not None}


def backbone_data_options(backbone: str, data_kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over a timm backbone's input size, mean and std, resampling and crop (its pretrained
    config's) for the folders loader; unchanged for other backbones and data kinds."""
    from fewshot_edge.models import timm_input_spec, timm_model_name

    model = timm_model_name(backbone)
    if model is None or data_kind != "folders":
        return options
    spec = timm_input_spec(model, int(options.get("channels", 3)), options.get("size"))
    fitted = {"resize": spec.resize, "crop_mode": spec.crop_mode, "crop_pct": spec.crop_pct}
    return {"size": spec.height, "mean": list(spec.mean), "std": list(spec.std), **fitted, **options}


def method_options(method: str, metric: str | None, pairs: Sequence[str]) -> dict[str, Any]:
    """The options of ``method`` from --metric and KEY=VALUE pairs, checked against those it declares."""
    defaults = {option.name: option.default for option in _method_registry()[method].declared_options()}
    options: dict[str, Any] = {} if metric is None else {"metric": metric}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--method-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    for key, value in options.items():
        if key not in defaults:
            raise InputError(f"method {method!r} has no option {key!r} (it takes: {', '.join(defaults) or 'none'})")
        expected = _kind(defaults[key])
        if (
            expected is not None
            and _kind(value) != expected
            and not (expected == "number" and _kind(value) == "whole number")
        ):
            raise InputError(f"method {method!r} option {key!r} takes a {expected}, got {value!r}")
    return options


def _kind(value: Any) -> str | None:
    """What kind of value an option takes, judged by its default (None: any)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "whole number"
    if isinstance(value, float):
        return "number"
    return "text" if isinstance(value, str) else None


@main.command(cls=TrainCommand)
@click.option(
    "--data",
    "data_kind",
    type=RegistryChoice(_data_kinds, "data set kind"),
    default="omniglot",
    show_default=True,
    help="omniglot: the official zips or unpacked tree; folders: a folder or zip per set, a subfolder per class.",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Path(exists=True, dir_okay=True),
    help="Training data (repeat for several zips/folders, e.g. the three miniImageNet shards); required unless --config.",
)
@click.option(
    "--val-source",
    "val_sources",
    multiple=True,
    type=click.Path(exists=True),
    help="Validation data; without it, --holdout groups of the training data are held out.",
)
@click.option(
    "--holdout", default=5, show_default=True, help="Groups (Omniglot alphabets, or classes) held out for validation."
)
@click.option("--holdout-group", "holdout_groups", multiple=True, help="Hold out these groups by name instead.")
@click.option("--image-size", type=int, help="Resize to this square size [omniglot: 28, folders: 84].")
@click.option("--channels", type=click.Choice(["1", "3"]), help="folders only: 1 = grayscale, 3 = RGB [3].")
@click.option(
    "--rotations/--no-rotations", default=None, help="omniglot only: each 90-degree rotation is its own class."
)
@click.option("--max-per-class", type=int, help="folders only: use the first N images of each class.")
@click.option(
    "--backbone",
    type=RegistryChoice(_backbone_names, "backbone", _backbone_families),
    default="conv4",
    show_default=True,
    help="conv4, resnet12, or any timm model as timm:NAME (e.g. timm:resnet50); a timm model on folders "
    "data takes its pretrained config's size (unless --image-size), mean and std.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="Start a timm:NAME backbone from these weights: a safetensors file or torch state dict.",
)
@click.option("--pretrained", is_flag=True, help="Start a timm:NAME backbone from timm's hub weights (online).")
@click.option(
    "--method",
    type=RegistryChoice(_method_registry, "method"),
    default="protonet",
    show_default=True,
    help="Meta-learning method (see Methods below).",
)
@click.option("--metric", type=click.Choice(METRICS), help="Shorthand for -O metric=... (methods that take it).")
@click.option(
    "--method-option",
    "-O",
    "method_option_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method option, repeatable; VALUE is JSON (numbers, true/false) or else text (see Methods below).",
)
@click.option(
    "--init-from",
    type=click.Path(exists=True, dir_okay=False),
    help="Start the backbone from this checkpoint's (e.g. a trained ProtoNet for film).",
)
@click.option(
    "--stage",
    type=click.Choice(STAGES),
    default="episodic",
    show_default=True,
    help="pretrain: supervised classification of every training class on augmented batches (SGD), "
    "a checkpoint to continue episodically with --init-from.",
)
@click.option("--batch-size", default=128, show_default=True, help="pretrain: images per batch.")
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="pretrain: random resized crop, flip, colour jitter.",
)
@click.option("--way", default=60, show_default=True, help="Training episodes: classes per episode.")
@click.option("--shot", default=5, show_default=True, help="Training episodes: support images per class.")
@click.option("--query", default=5, show_default=True, help="Training episodes: query images per class.")
@click.option("--val-way", default=5, show_default=True)
@click.option("--val-shot", default=1, show_default=True)
@click.option("--val-query", default=15, show_default=True)
@click.option("--val-episodes", default=300, show_default=True)
@click.option("--val-every", default=500, show_default=True, help="Validate every N training episodes.")
@click.option(
    "--episodes", default=20000, show_default=True, help="Stop after this many episodes (pretrain: batches) ..."
)
@click.option("--time-limit", type=float, help="... or after this many minutes, whichever comes first.")
@click.option("--lr", type=float, help="Learning rate [episodic: 1e-3 (Adam); pretrain: 0.05 (SGD)].")
@click.option("--weight-decay", type=float, help="[episodic: 0; pretrain: 5e-4].")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option(
    "--amp/--no-amp",
    default=True,
    show_default=True,
    help="bfloat16 autocast on CUDA and on CPUs with bf16 units (AVX512-BF16/AMX).",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the backbone (CUDA graphs on GPU); costs a minute of compiling first.",
)
@click.option("--out", default="runs/protonet", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from a saved config.json; options given on the command line are ignored.",
)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="Continue from a run's last.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
@reports_input_errors
def train(
    data_kind: str,
    sources: tuple[str, ...],
    val_sources: tuple[str, ...],
    holdout: int,
    holdout_groups: tuple[str, ...],
    image_size: int | None,
    channels: str | None,
    rotations: bool | None,
    max_per_class: int | None,
    backbone: str,
    method: str,
    metric: str | None,
    method_option_args: tuple[str, ...],
    init_from: str | None,
    weights: str | None,
    pretrained: bool,
    stage: str,
    batch_size: int,
    augment: bool,
    way: int,
    shot: int,
    query: int,
    val_way: int,
    val_shot: int,
    val_query: int,
    val_episodes: int,
    val_every: int,
    episodes: int,
    time_limit: float | None,
    lr: float | None,
    weight_decay: float | None,
    schedule: str,
    seed: int,
    device: str,
    amp: bool,
    compile_model: bool,
    out: str,
    config_file: str | None,
    resume: str | None,
    as_json: bool,
) -> None:
    """Meta-train a few-shot model; validates on held-out classes with 95% CIs.

    \b
    Writes OUT/config.json, OUT/best.pt (best validation accuracy), OUT/last.pt (for --resume)
    and OUT/metrics.json.

    \b
    Example (Omniglot, 5 alphabets held out, 10 minutes on a CPU):
      fewshot-edge train --source images_background.zip --rotations --time-limit 10 --out runs/omniglot
    """
    require_modules("torch")
    from fewshot_edge.config import TrainConfig
    from fewshot_edge.train import train as run_training

    if config_file:
        config = TrainConfig.from_dict(json.loads(Path(config_file).read_text()))
    elif not sources:
        raise InputError("give the training data with --source (or a saved run's --config)")
    else:
        config = TrainConfig(
            data=data_kind,
            sources=[str(Path(s).resolve()) for s in sources],
            data_options=backbone_data_options(
                backbone,
                data_kind,
                data_options(image_size, int(channels) if channels else None, rotations, max_per_class),
            ),
            holdout=holdout,
            holdout_groups=list(holdout_groups),
            val_sources=[str(Path(s).resolve()) for s in val_sources],
            backbone=backbone,
            method=method,
            method_options=method_options(method, metric, method_option_args),
            init_from=str(Path(init_from).resolve()) if init_from else None,
            weights=str(Path(weights).resolve()) if weights else None,
            pretrained=pretrained,
            stage=stage,
            batch_size=batch_size,
            augment=augment,
            n_way=way,
            k_shot=shot,
            q_query=query,
            val_way=val_way,
            val_shot=val_shot,
            val_query=val_query,
            val_episodes=val_episodes,
            val_every=val_every,
            episodes=episodes,
            time_limit=time_limit,
            lr=lr if lr is not None else PRETRAIN_LR if stage == "pretrain" else EPISODIC_LR,
            weight_decay=weight_decay
            if weight_decay is not None
            else PRETRAIN_WEIGHT_DECAY
            if stage == "pretrain"
            else 0.0,
            schedule=schedule,
            amp=amp,
            compile=compile_model,
            seed=seed,
            device=device,
            out=out,
        )
    metrics = run_training(config, resume=resume)
    if "best" not in metrics:  # a rank other than 0 under torchrun: rank 0 reports
        return
    best = metrics["best"]
    if as_json:
        emit_json(metrics)
        return
    steps = f" steps x {metrics['ranks']} ranks" if metrics["ranks"] > 1 else " episodes"
    click.echo(
        f"trained {metrics['episodes']}{steps} in {metrics['elapsed_s']} s "
        f"({metrics['episodes_per_s']} episodes/s on {metrics['device']})"
    )
    click.echo(
        f"best validation {best['n_way']}-way {best['k_shot']}-shot: {100 * best['accuracy']:.2f}% "
        f"+- {100 * best['ci95']:.2f} at episode {best['episode']}"
    )
    click.echo(f"checkpoint: {Path(config.out) / 'best.pt'}")


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Path(exists=True),
    help="Evaluate on every class of these sources (e.g. images_evaluation.zip; Omniglot "
    "characters upright) instead of the run's held-out validation classes.",
)
@click.option("--way", default=5, show_default=True)
@click.option("--shot", default=1, show_default=True)
@click.option("--query", default=15, show_default=True)
@click.option("--episodes", default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the evaluation episodes.")
@click.option(
    "-O",
    "--method-option",
    "method_option_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Evaluate with this method option changed, one that leaves the trained parameters as they are"
    " (e.g. -O test_adapt=head for maml/metasgd: adapt only the head, as the device does).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@reports_input_errors
def evaluate(
    checkpoint: str,
    sources: tuple[str, ...],
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    method_option_args: tuple[str, ...],
    device: str,
    as_json: bool,
) -> None:
    """N-way K-shot accuracy with a 95% CI of a checkpoint.

    \b
    By default on the classes the run held out for validation (rebuilt from its config and seed).
    Example: fewshot-edge eval runs/omniglot/best.pt --way 20 --shot 1 --episodes 1000
    """
    require_modules("torch")
    from fewshot_edge.checkpoint import load_checkpoint, read_checkpoint
    from fewshot_edge.data import load_dataset
    from fewshot_edge.data.omniglot import upright
    from fewshot_edge.data.splits import load_splits
    from fewshot_edge.evaluate import evaluate as run_eval
    from fewshot_edge.train import resolve_device

    dev = resolve_device(device)
    overrides = None
    if method_option_args:
        overrides = method_options(read_checkpoint(checkpoint)["config"]["method"], None, method_option_args)
    method, config, _, _ = load_checkpoint(checkpoint, dev, overrides)
    if sources:
        data = upright(load_dataset(config.data, list(sources), **config.data_options))
    else:
        data = load_splits(config)[1]
    if not as_json:
        echo_err(f"evaluating on {data.num_classes} classes, {len(data)} images")
    result = run_eval(method, data, way, shot, query, episodes, seed=seed, device=dev, progress=not as_json)
    if as_json:
        emit_json({"checkpoint": checkpoint, "classes": data.num_classes, **result.to_dict()})
    else:
        click.echo(str(result))
