"""The demo's procedural symbols: deterministic, Omniglot-shaped, perturbations close to their symbol."""

from __future__ import annotations

import numpy as np

from fewshot_edge.glyphs import draw, perturb


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean distance from each ink pixel of one drawing to the nearest of the other's, in
    pixels of the drawings subsampled 2x (for speed)."""
    pa, pb = np.argwhere(a[::2, ::2] == 0).astype(np.float32), np.argwhere(b[::2, ::2] == 0).astype(np.float32)
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return float(d.min(1).mean() + d.min(0).mean()) / 2


def test_drawings_are_black_strokes_on_white_105px_and_deterministic():
    for seed in range(20):
        glyph = draw(seed)
        assert glyph.shape == (105, 105) and glyph.dtype == np.uint8
        assert set(np.unique(glyph)) == {0, 255}
        assert 0.02 < (glyph == 0).mean() < 0.3
        np.testing.assert_array_equal(draw(seed), glyph)
    assert draw(3, size=64).shape == (64, 64)
    assert not np.array_equal(draw(1), draw(2))


def test_perturbations_are_deterministic_binary_and_differ():
    glyph = draw(7)
    a, b = perturb(glyph, 1), perturb(glyph, 2)
    assert a.shape == glyph.shape and a.dtype == np.uint8 and set(np.unique(a)) == {0, 255}
    np.testing.assert_array_equal(perturb(glyph, 1), a)
    assert not np.array_equal(a, b) and not np.array_equal(a, glyph)
    np.testing.assert_array_equal(perturb(glyph, 1, strength=0.0), glyph)


def test_each_perturbation_is_nearest_to_its_own_symbol():
    symbols = [draw(seed) for seed in range(12)]
    for i, symbol in enumerate(symbols):
        for seed in range(3):
            distances = [chamfer(perturb(symbol, seed), other) for other in symbols]
            assert int(np.argmin(distances)) == i and distances[i] < 2.5, (i, seed)
