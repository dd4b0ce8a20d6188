"""Evaluation that encodes each image once gives the same episodes and the same logits as encoding per episode."""

import numpy as np
import pytest
import torch

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.evaluate import encoded_once, evaluate_sampler
from fewshot_edge.methods import METHODS, create_method
from fewshot_edge.models import create_backbone
from fewshot_edge.runtime.preprocess import InputSpec

CACHED = sorted(name for name, cls in METHODS.items() if cls.image_encoder is not None)


def dataset(n_classes: int = 8, per_class: int = 6, size: int = 28) -> FewShotDataset:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = rng.integers(0, 256, size=(len(labels), 1, size, size), dtype=np.uint8)
    spec = InputSpec(1, size, size, mean=(0.5,), std=(0.25,))
    return FewShotDataset(
        images, labels, [f"c{i}" for i in range(n_classes)], [f"g{i}" for i in range(n_classes)], spec
    )


def test_the_methods_that_encode_each_image_once():
    assert {"protonet", "matching", "relation", "mann", "transformer"} <= set(CACHED)
    assert METHODS["film"].image_encoder is None  # the task's FiLM changes every embedding


@pytest.mark.parametrize("name", CACHED)
def test_encoded_once_gives_the_logits_of_encoding_per_episode(name):
    torch.manual_seed(0)
    method = create_method(name, create_backbone("conv4", 1, 28)).eval()
    sampler = EpisodeSampler(dataset(), n_way=4, k_shot=2, q_query=3, seed=5)
    with torch.no_grad():
        episodes = [sampler.sample() for _ in range(3)]
        direct = [method.logits(e.support, e.support_labels, e.query, e.n_way) for e in episodes]
        with encoded_once(method, sampler, batch=7) as encoded:  # a batch that does not divide the data set
            assert encoded is not None and len(encoded) == 48
            cached = [
                method.logits(encoded[e.index[:, :2].flatten()], e.support_labels, encoded[e.index[:, 2:].flatten()], 4)
                for e in episodes
            ]
    for a, b in zip(direct, cached, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # the encoder is the method's own again after the block
    assert getattr(method, method.image_encoder).__func__ is getattr(type(method), method.image_encoder)


def test_evaluation_accuracy_is_the_same_either_way():
    torch.manual_seed(0)
    method = create_method("protonet", create_backbone("conv4", 1, 28))
    data = dataset()
    cached = evaluate_sampler(method, EpisodeSampler(data, 4, 1, 3, seed=9), 20)
    method.image_encoder = None  # this instance encodes per episode
    direct = evaluate_sampler(method, EpisodeSampler(data, 4, 1, 3, seed=9), 20)
    assert cached.accuracy == pytest.approx(direct.accuracy, abs=1e-9) and cached.ci95 == pytest.approx(direct.ci95)
    assert method.training  # the train/eval mode is restored
