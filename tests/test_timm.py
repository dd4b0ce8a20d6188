"""timm backbones (``timm:NAME``): built by name, weights from a file, the input spec of the pretrained config,
a CNN and a ViT exported with parity and served, and the precision policy (no int8 for attention models)."""

from __future__ import annotations

import onnx
import pytest
import torch
from timm_support import CNN, SIZE, VIT, draw_shapes, save_weights, timm

from fewshot_edge.config import TrainConfig
from fewshot_edge.data import load_dataset
from fewshot_edge.export import (
    FrozenBackbone,
    VariantRefused,
    attention_softmaxes,
    check_precisions,
    episode_sizes,
    export_bundle,
    export_onnx,
)
from fewshot_edge.methods import create_method
from fewshot_edge.models import TimmBackbone, create_backbone, timm_input_spec
from fewshot_edge.runtime import FewShotInputError, FewShotModel


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize(("model", "size"), [(CNN, 96), (VIT, 64)])
def test_timm_names_build_pooled_pre_logits_backbones(model, size):
    backbone = create_backbone(f"timm:{model}", 3, SIZE)
    assert isinstance(backbone, TimmBackbone) and backbone.out_dim == size
    assert backbone.eval()(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, size)
    assert create_backbone(f"timm:{model}", 1, SIZE).eval()(torch.zeros(1, 1, SIZE, SIZE)).shape == (1, size)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: create_backbone("timm:no_such_model", 3, SIZE), "unknown timm model 'no_such_model'"),
        (lambda: create_backbone("vgg", 3, SIZE), "choose from conv4, resnet12, timm:NAME"),
        (lambda: create_backbone("conv4", 3, SIZE, pretrained=True), "--weights and --pretrained are for timm"),
        (lambda: create_method("film", create_backbone(f"timm:{CNN}", 3, SIZE)), "has no FiLM hooks"),
        (lambda: TrainConfig(init_from="a.pt", pretrained=True), "not both"),
    ],
)
def test_bad_requests_are_one_line_input_errors(build, message):
    with pytest.raises(FewShotInputError, match=message) as caught:
        build()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_embeddings_follow_the_weights_file(tmp_path, suffix):
    """The backbone built from a saved state dict (with its classifier head) embeds as the saved model's
    pooled pre-logits features; another file gives other embeddings."""
    first = save_weights(tmp_path / f"first{suffix}", CNN, seed=1)
    second = save_weights(tmp_path / f"second{suffix}", CNN, seed=2)
    images = torch.randn(4, 3, SIZE, SIZE)
    torch.manual_seed(1)
    saved = timm.create_model(CNN).eval()
    with torch.no_grad():
        expected = saved.forward_head(saved.forward_features(images), pre_logits=True)
        loaded = create_backbone(f"timm:{CNN}", 3, SIZE, weights=first).eval()(images)
        other = create_backbone(f"timm:{CNN}", 3, SIZE, weights=second).eval()(images)
    torch.testing.assert_close(loaded, expected)
    assert (loaded - other).abs().max() > 1e-2


def test_vit_weights_load_at_another_input_size(tmp_path):
    """A ViT's weights for 160 px load into the ViT built for 32 px: timm resamples the position embeddings."""
    weights = save_weights(tmp_path / "vit.safetensors", VIT, seed=3)
    torch.manual_seed(3)
    saved = timm.create_model(VIT)
    backbone = create_backbone(f"timm:{VIT}", 3, SIZE, weights=weights)
    assert backbone.model.pos_embed.shape[1] < saved.pos_embed.shape[1]
    torch.testing.assert_close(backbone.model.blocks[0].attn.qkv.weight, saved.blocks[0].attn.qkv.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    vit = save_weights(tmp_path / "vit.safetensors", VIT, seed=0)
    with pytest.raises(FewShotInputError, match=r"lacks \d+ of timm:test_resnet's \d+ tensors"):
        create_backbone(f"timm:{CNN}", 3, SIZE, weights=vit)
    state = timm.create_model(CNN).state_dict()
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(1, 1, 1, 1)}, tmp_path / "wrong.pt")
    with pytest.raises(FewShotInputError, match="does not fit timm:test_resnet"):
        create_backbone(f"timm:{CNN}", 3, SIZE, weights=tmp_path / "wrong.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(FewShotInputError, match="not a safetensors file or torch state dict"):
        create_backbone(f"timm:{CNN}", 3, SIZE, weights=tmp_path / "junk.safetensors")


def test_input_spec_comes_from_the_pretrained_config():
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(VIT).to_dict())
    spec = timm_input_spec(VIT)
    assert (spec.channels, spec.height, spec.width) == config["input_size"]
    assert (spec.mean, spec.std) == (config["mean"], config["std"])
    assert (spec.resize, spec.crop_mode, spec.crop_pct) == ("bicubic", "center", config["crop_pct"])
    gray = timm_input_spec(CNN, channels=1, image_size=48)
    assert (gray.channels, gray.height, gray.width, gray.resize) == (1, 48, 48, "bilinear")
    assert gray.mean == (sum(config["mean"]) / 3,)


@pytest.mark.parametrize("model", [CNN, VIT])
def test_cnn_and_vit_export_with_parity_and_serve(model, shapes, tmp_path):
    """Acceptance: a timm CNN and a timm ViT, from saved weights, export with fp32 parity <= 1e-4 at
    every batch size (the batch axis is dynamic) and enroll and predict through the runtime."""
    weights = save_weights(tmp_path / "w.safetensors", model, seed=0)
    source = FrozenBackbone(f"timm:{model}", shapes, weights=weights, image_size=SIZE)
    bundle = export_bundle(source, tmp_path / "bundle", calibration_episodes=20)
    manifest = bundle.manifest
    parity = manifest.provenance["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    assert {"random batch of 1", "random batch of 7", "random batch of 32"} <= set(parity["checks"])
    assert manifest.input_spec == timm_input_spec(model, image_size=SIZE)
    assert (manifest.provenance["backbone"], manifest.provenance["weights"]) == (f"timm:{model}", "w.safetensors")
    shots = {f"class{c}": shapes / f"class{c}" / "00.png" for c in range(4)}
    with FewShotModel.open(bundle.path, store=tmp_path / "store.db") as device:
        for label, image in shots.items():
            device.enroll(label, [image])
        answers = device.predict(list(shots.values()))
    assert [a.top_k[0][0] for a in answers] == list(shots)
    assert max(a.distance for a in answers) < 1e-4  # each query is its own class's one shot


def test_int8_is_refused_for_attention_models_unless_forced(shapes, tmp_path):
    """Precision policy: int8 stays for CNNs; a ViT's export --int8 is refused in one line, before any
    parity or calibration work, and fp16 is offered."""
    vit = create_method("protonet", create_backbone(f"timm:{VIT}", 3, SIZE))
    cnn = create_method("protonet", create_backbone(f"timm:{CNN}", 3, SIZE))
    spec = timm_input_spec(VIT, image_size=SIZE)
    assert len(attention_softmaxes(export_onnx(vit, spec, tmp_path / "vit.onnx"))) == len(vit.backbone.model.blocks)
    assert attention_softmaxes(export_onnx(cnn, spec, tmp_path / "cnn.onnx")) == []
    check_precisions(tmp_path / "cnn.onnx", ["int8"])  # int8 stays offered for CNNs
    weights = save_weights(tmp_path / "w.safetensors", VIT, seed=0)
    source = FrozenBackbone(f"timm:{VIT}", shapes, weights=weights, image_size=SIZE)
    with pytest.raises(VariantRefused, match=r"int8 is not offered for attention models .*TensorRT#4273") as caught:
        export_bundle(source, tmp_path / "int8", precisions=("int8",))
    assert "\n" not in str(caught.value) and "--fp16" in str(caught.value)
    bundle = export_bundle(
        source, tmp_path / "fp16", calibration_episodes=20, precisions=("fp16",), variant_episodes=20
    )
    assert bundle.manifest.variants["fp16"]["parity"]["max_rel_diff"] < 0.01
    assert onnx.load(str(bundle.path / "encoder.fp16.onnx")).graph.node


def test_pretrained_without_the_hub_is_one_line(monkeypatch, tmp_path):
    """--pretrained loads through timm's hub; offline with an empty cache (nothing is downloaded here) it
    fails in one line that points at --weights."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FewShotInputError, match="no pretrained weights from timm's hub .*give --weights FILE"):
        create_backbone(f"timm:{CNN}", 3, SIZE, pretrained=True)


def test_a_calibration_set_too_small_is_refused(tmp_path):
    """Calibration draws two disjoint episodes of at least 2 classes each: 3 classes are refused in one
    line before any export work; 6 classes of 16 give 3-way episodes."""
    weights = save_weights(tmp_path / "w.safetensors", CNN, seed=0)
    few = draw_shapes(tmp_path / "few", classes=3, per_class=4)
    with pytest.raises(FewShotInputError, match="calibration needs at least 4 classes .*got 3 classes"):
        export_bundle(FrozenBackbone(f"timm:{CNN}", few, weights=weights, image_size=SIZE), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert episode_sizes(load_dataset("folders", draw_shapes(tmp_path / "six"), size=SIZE)) == (3, 5, 5)
