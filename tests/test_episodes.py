"""Episode sampler: shapes, distinct classes, no support/query overlap, determinism by seed."""

import numpy as np
import pytest
import torch

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.episodes import EpisodeSampler
from fewshot_edge.runtime.preprocess import InputSpec


def make_dataset(n_classes=12, per_class=(7, 9), size=8, seed=0) -> FewShotDataset:
    rng = np.random.default_rng(seed)
    counts = rng.integers(per_class[0], per_class[1] + 1, size=n_classes)
    labels = np.repeat(np.arange(n_classes), counts)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 1, size, size), dtype=np.uint8)
    spec = InputSpec(1, size, size, mean=(0.5,), std=(0.25,))
    return FewShotDataset(
        images, labels, [f"c{i}" for i in range(n_classes)], [f"g{i}" for i in range(n_classes)], spec
    )


def test_shapes_labels_and_normalisation():
    ds = make_dataset()
    ep = EpisodeSampler(ds, n_way=5, k_shot=2, q_query=3, seed=1).sample()
    assert ep.support.shape == (10, 1, 8, 8) and ep.query.shape == (15, 1, 8, 8)
    assert ep.support.dtype == torch.float32
    assert ep.support_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_labels.tolist() == [i for i in range(5) for _ in range(3)]
    idx = ep.index.numpy()
    # every image of way i belongs to data-set class classes[i], and is normalised (x/255 - 0.5) / 0.25
    assert (ds.labels[idx] == ep.classes.numpy()[:, None]).all()
    expected = (ds.images[idx[:, :2].reshape(-1)].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(ep.support.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_distinct_classes_and_no_overlap_over_many_episodes():
    ds = make_dataset()
    sampler = EpisodeSampler(ds, n_way=6, k_shot=3, q_query=4, seed=2)
    for _ in range(200):
        ep = sampler.sample()
        assert len(set(ep.classes.tolist())) == 6
        idx = ep.index.numpy()
        assert len(set(idx.reshape(-1).tolist())) == idx.size  # no image twice, so no support/query overlap
        assert set(idx[:, :3].reshape(-1)).isdisjoint(idx[:, 3:].reshape(-1))


def test_every_image_of_a_class_can_be_drawn():
    ds = make_dataset(n_classes=5, per_class=(7, 7))
    sampler = EpisodeSampler(ds, n_way=5, k_shot=1, q_query=1, seed=3)
    seen = set()
    for _ in range(300):
        seen.update(sampler.sample().index.reshape(-1).tolist())
    assert seen == set(range(len(ds)))


def test_determinism_by_seed():
    ds = make_dataset()
    s1, s2, s3 = (EpisodeSampler(ds, 5, 1, 2, seed=s) for s in (7, 7, 8))
    first = [s1.sample().index for _ in range(5)]
    again = [s2.sample().index for _ in range(5)]
    other = [s3.sample().index for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_too_few_classes_or_images_is_a_clear_error():
    ds = make_dataset(n_classes=4, per_class=(7, 7))
    with pytest.raises(ValueError, match="5-way episodes need 5 classes"):
        EpisodeSampler(ds, 5, 1, 1)
    with pytest.raises(ValueError, match="only 0 classes have the 8 images"):
        EpisodeSampler(ds, 2, 4, 4)
