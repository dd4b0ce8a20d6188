"""Helpers the device and the desktop share: the 95% CI (numpy only), the one image decoder, and the
run's data splits, which load without the training loop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from runtime_support import BLOCK_TORCH, run_python

from fewshot_edge.runtime import FewShotInputError
from fewshot_edge.runtime.preprocess import decode_image
from fewshot_edge.runtime.stats import confidence_interval


def test_confidence_interval_is_mean_and_normal_half_width():
    accuracies = np.array([0.2, 0.6, 0.8, 1.0])
    mean, half_width = confidence_interval(accuracies)
    assert mean == pytest.approx(0.65)
    assert half_width == pytest.approx(1.96 * np.std(accuracies, ddof=1) / math.sqrt(4))
    assert confidence_interval(np.array([0.4])) == (pytest.approx(0.4), 0.0)


def test_stats_import_without_torch():
    code = (
        BLOCK_TORCH
        + """
import numpy as np
from fewshot_edge.runtime.stats import confidence_interval
print(confidence_interval(np.array([0.5, 1.0]))[0])
assert "torch" not in sys.modules
"""
    )
    assert run_python(code).strip() == "0.75"


def test_decode_image_reads_bytes_and_names_a_bad_source_in_one_line(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 5), 7, np.uint8)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), "in memory")
    assert image.size == (5, 3) and np.asarray(image).max() == 7
    with pytest.raises(FewShotInputError, match=r"^not a readable image: data.zip/a/b.png \(UnidentifiedImageError\)$"):
        decode_image(b"not a png", "data.zip/a/b.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(FewShotInputError, match="not a readable image: .*bad.png"):
        decode_image(tmp_path / "bad.png", tmp_path / "bad.png")


def test_splits_load_without_the_training_loop():
    code = """
import sys
from fewshot_edge.data.splits import load_splits
assert "fewshot_edge.train" not in sys.modules and "fewshot_edge.evaluate" not in sys.modules
print(load_splits.__module__)
"""
    assert run_python(code).strip() == "fewshot_edge.data.splits"
