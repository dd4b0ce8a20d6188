"""The supervised pretraining stage: augmentation on the device, batches, the classifier objective, and a
checkpoint that eval/export read as the method and that an episodic run continues with --init-from."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from fewshot_edge.checkpoint import load_checkpoint, read_checkpoint
from fewshot_edge.cli import main
from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.methods import ProtoNet
from fewshot_edge.pretrain import BatchSampler, augment
from fewshot_edge.runtime.preprocess import InputSpec


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmenting_a_flat_image_keeps_it_flat_and_in_range():
    pixels = torch.full((16, 3, 20, 20), 200, dtype=torch.uint8)
    pixels[8:] = torch.tensor([10, 120, 250], dtype=torch.uint8)[:, None, None]
    out = augment(pixels, generator())
    assert out.shape == (16, 3, 20, 20) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    flat = out.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-3)  # crops and flips add no structure
    assert not torch.allclose(out[:8], torch.full_like(out[:8], 200.0))  # but colours are jittered


def test_augmentation_flips_about_half_the_images_and_is_reproducible():
    ramp = torch.arange(32, dtype=torch.float32).mul(8).to(torch.uint8)  # dark on the left, light on the right
    pixels = ramp.expand(200, 1, 32, 32).contiguous()
    out = augment(pixels, generator(1))
    rising = (out[:, 0, :, -1].mean(1) > out[:, 0, :, 0].mean(1)).float().mean().item()
    assert 0.35 < rising < 0.65
    assert torch.equal(out, augment(pixels, generator(1)))
    assert not torch.equal(out, augment(pixels, generator(2)))


def test_batches_are_labelled_images_of_the_data_set():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 5)
    spec = InputSpec(1, 8, 8, mean=(0.5,), std=(0.25,))
    data = FewShotDataset(images, labels, [f"c{i}" for i in range(6)], [f"c{i}" for i in range(6)], spec)
    batch = BatchSampler(data, batch_size=40, seed=3, augment=False).sample()
    assert batch.images.shape == (40, 1, 8, 8)
    scale, shift = spec.scale_shift()
    pixels = np.rint((batch.images.numpy() - shift) / scale).astype(np.uint8)
    for image, label in zip(pixels, batch.labels.numpy(), strict=True):
        matches = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
        assert len(matches) == 1 and labels[matches[0]] == label


def run(*args: object) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_pretrain_then_meta_train_from_it(omniglot_small1, tmp_path):
    common = ["--source", omniglot_small1, "--holdout", "1", "--val-every", "4", "--val-episodes", "5"]
    common += ["--device", "cpu", "--json"]
    metrics = run(
        "train", "--stage", "pretrain", "--batch-size", "32", "--episodes", "4", *common, "--out", tmp_path / "pt"
    )
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert (config["stage"], config["lr"], config["weight_decay"]) == ("pretrain", 0.05, 5e-4)
    method, _, _, _ = load_checkpoint(tmp_path / "pt" / "last.pt")
    assert isinstance(method, ProtoNet)  # eval and export read the pretrained backbone as the method
    head = read_checkpoint(tmp_path / "pt" / "last.pt")["objective"]["head.weight"]
    assert head.shape == (metrics["train_classes"], method.backbone.out_dim)

    (tmp_path / "pt" / "config.json").write_text(json.dumps({**config, "episodes": 8}))
    resumed = run(
        "train", "--config", tmp_path / "pt" / "config.json", "--resume", tmp_path / "pt" / "last.pt", "--json"
    )
    assert resumed["episodes"] == 8 and [h["episode"] for h in resumed["history"]] == [4, 8]
    assert not torch.equal(read_checkpoint(tmp_path / "pt" / "last.pt")["objective"]["head.weight"], head)

    run(
        "train",
        "--init-from",
        tmp_path / "pt" / "last.pt",
        "--episodes",
        "1",
        "--way",
        "5",
        "--shot",
        "1",
        "--query",
        "1",
        *common,
        "--out",
        tmp_path / "meta",
    )
    config = json.loads((tmp_path / "meta" / "config.json").read_text())
    assert config["stage"] == "episodic" and config["lr"] == 1e-3 and config["init_from"].endswith("last.pt")
