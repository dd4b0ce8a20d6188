"""``export``: checkpoint, or a pretrained timm backbone and calibration images -> verified, calibrated bundle
for the device (needs torch and onnx)."""

from __future__ import annotations

from pathlib import Path

import click

from fewshot_edge.runtime.bundle import METRICS

from .common import InputError, emit_json, main, reports_input_errors, require_modules


@main.command(name="export")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option(
    "--backbone",
    metavar="timm:NAME",
    help="Instead of a checkpoint: prototypes over this pretrained timm model's embeddings (no meta-training).",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="--backbone: its weights, a safetensors file or torch state dict.",
)
@click.option("--pretrained", is_flag=True, help="--backbone: its weights from timm's hub (online).")
@click.option(
    "--calibration-data",
    multiple=True,
    type=click.Path(exists=True),
    help="--backbone: class-per-folder images (folders or zips) to calibrate on, at least 4 classes.",
)
@click.option("--image-size", type=int, help="--backbone: input size [the model's pretrained config's].")
@click.option("--metric", type=click.Choice(METRICS), help="--backbone: distance to the prototypes [sqeuclidean].")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option(
    "--calibration-episodes",
    default=500,
    show_default=True,
    help="Validation episode pairs the temperature and open-set threshold are fitted on.",
)
@click.option(
    "--target-false-reject",
    default=0.05,
    show_default=True,
    help="Open-set threshold: share of known-class queries allowed to be answered 'unknown'.",
)
@click.option(
    "--tolerance", default=1e-4, show_default=True, help="Largest |ONNX - PyTorch| embedding difference accepted."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the parity inputs and calibration episodes.")
@click.option("--fp16", is_flag=True, help="Add a float16 encoder (float32 inputs and outputs).")
@click.option("--int8", is_flag=True, help="Add a static-QDQ int8 encoder calibrated on training images.")
@click.option(
    "--variant-episodes",
    default=1000,
    show_default=True,
    help="5-way 1-shot validation episodes each variant's accuracy is compared with fp32's on.",
)
@click.option(
    "--force-variant",
    is_flag=True,
    help="Keep a variant that loses more than 1 point of accuracy or exceeds its parity tolerance.",
)
@click.option(
    "--sign",
    metavar="KEY",
    type=click.Path(exists=True, dir_okay=False),
    help="Sign the manifest with this Ed25519 private key (PEM; fewshot-edge keygen); needs fewshot-edge[sign].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the bundle's manifest as JSON.")
@reports_input_errors
def export(
    checkpoint: str | None,
    out: str,
    backbone: str | None,
    weights: str | None,
    pretrained: bool,
    calibration_data: tuple[str, ...],
    image_size: int | None,
    metric: str | None,
    overwrite: bool,
    calibration_episodes: int,
    target_false_reject: float,
    tolerance: float,
    seed: int,
    fp16: bool,
    int8: bool,
    variant_episodes: int,
    force_variant: bool,
    sign: str | None,
    as_json: bool,
) -> None:
    """Export a checkpoint, or a pretrained timm backbone, as a bundle: ONNX encoder, parity check,
    calibration, manifest.

    \b
    A checkpoint calibrates on its run's held-out validation classes, so the training data must be at hand.
    A --backbone timm:NAME (with --weights or --pretrained) needs no training: prototypes over its
    embeddings, calibrated on --calibration-data; its input size, mean/std, interpolation and crop come
    from the model's pretrained config. int8 is not offered for attention models (ViTs): use --fp16.
    Nothing is written when the ONNX encoder's embeddings differ from PyTorch's beyond --tolerance,
    or when a --fp16/--int8 variant loses more than 1 point of 5-way 1-shot accuracy (unless --force-variant).
    Examples:
      fewshot-edge export runs/omniglot/best.pt --out bundles/omniglot --int8
      fewshot-edge export --backbone timm:resnet50 --weights resnet50.safetensors --calibration-data photos/ --out bundles/photos
    """
    require_modules("torch", "onnx")
    from fewshot_edge.export import FrozenBackbone, ParityError, export_bundle

    frozen_options = {
        "--weights": weights,
        "--pretrained": pretrained,
        "--calibration-data": calibration_data,
        "--image-size": image_size,
        "--metric": metric,
    }
    if (checkpoint is None) == (backbone is None):
        raise InputError("give a CHECKPOINT or a --backbone timm:NAME, one of the two")
    if checkpoint is not None:
        given = [name for name, value in frozen_options.items() if value]
        if given:
            raise InputError(
                f"{', '.join(given)} go with --backbone; a checkpoint calibrates on its run's validation classes"
            )
    elif not calibration_data:
        raise InputError("--backbone needs --calibration-data DIR: class-per-folder images to calibrate on")
    source = checkpoint or FrozenBackbone(
        backbone,
        calibration_data,
        weights=weights,
        pretrained=pretrained,
        image_size=image_size,
        metric=metric or "sqeuclidean",
    )
    try:
        bundle = export_bundle(
            source,
            out,
            overwrite=overwrite,
            calibration_episodes=calibration_episodes,
            target_false_reject=target_false_reject,
            tolerance=tolerance,
            seed=seed,
            precisions=[p for p, wanted in (("fp16", fp16), ("int8", int8)) if wanted],
            variant_episodes=variant_episodes,
            force_variants=force_variant,
            sign=sign,
        )
    except ParityError as exc:
        raise click.ClickException(str(exc)) from None
    manifest = bundle.manifest
    if as_json:
        emit_json({"bundle": str(Path(out)), **manifest.to_dict()})
        return
    parity = manifest.provenance["parity"]
    open_set = manifest.calibration.open_set
    click.echo(f"parity: max |onnx - torch| = {parity['max_abs_diff']:.2g} (tolerance {parity['tolerance']:g})")
    click.echo(
        f"calibration: temperature {manifest.calibration.temperature:.4g}; open-set threshold "
        f"{open_set.threshold:.4g} pooled over shot counts (nearest distance): false reject {100 * open_set.false_reject:.1f}% "
        f"(target {100 * open_set.target_false_reject:.1f}%), false accept {100 * open_set.false_accept:.1f}%"
    )
    click.echo(
        "  thresholds by shots (used on the device): "
        + ", ".join(f"{k}: {t:.4g}" for k, t in open_set.thresholds_by_shots.items())
    )
    by_shots = manifest.calibration.temperatures_by_shots
    if by_shots:
        click.echo(
            "  temperatures by shots (used on the device): " + ", ".join(f"{k}: {t:.4g}" for k, t in by_shots.items())
        )
    click.echo(f"  fitted on {open_set.fitted_on}")
    for precision, v in manifest.variants.items():
        figures = f"{precision}: accuracy {100 * v['accuracy']:.2f}% +- {100 * v['ci95']:.2f}"
        if "delta" in v:
            figures += (
                f", {100 * v['delta']:+.2f} points vs fp32 (+- {100 * v['delta_ci95']:.2f}),"
                f" max embedding difference {100 * v['parity']['max_rel_diff']:.2g}%"
            )
        click.echo(f"variant {figures}")
    if manifest.variants:
        click.echo(f"  on {manifest.variants['fp32']['episodes']}")
    click.echo(f"bundle: {out}")
    click.echo(f"model id: {bundle.model_id}")
    if bundle.signed_by:
        click.echo(f"signed by key: {bundle.signed_by}")


@main.command()
@click.argument("name", type=click.Path(dir_okay=False))
@reports_input_errors
def keygen(name: str) -> None:
    """Make an Ed25519 key pair for signing bundles: NAME.key (private, mode 600) and NAME.pub (public).

    \b
    Keep NAME.key where bundles are exported (never on a device); copy NAME.pub to the devices, which
    then run only bundles it signed (--trusted-key). See docs/deploy.md. Needs fewshot-edge[sign].
    Example:
      fewshot-edge keygen keys/release-2026 && fewshot-edge export run/best.pt --out b --sign keys/release-2026.key
    """
    from fewshot_edge.runtime.signing import generate_key_pair

    kid = generate_key_pair(f"{name}.key", f"{name}.pub")
    click.echo(f"private key: {name}.key (keep it off devices)")
    click.echo(f"public key: {name}.pub (give it to devices: --trusted-key {name}.pub)")
    click.echo(f"key id: {kid}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--key",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Ed25519 private key (PEM) to sign with.",
)
@reports_input_errors
def sign(bundle: str, key: str) -> None:
    """Sign an existing bundle's manifest (verified first; the files and model id stay as they are).

    \b
    Signs a bundle exported without --sign, or re-signs one with a new key (the old signature is replaced).
    Example:
      fewshot-edge sign bundles/omniglot --key keys/release-2026.key
    """
    from fewshot_edge.runtime.bundle import seal_bundle

    signed = seal_bundle(bundle, key)
    click.echo(f"signed {bundle} (model id {signed.model_id}) with key {signed.signed_by}")
