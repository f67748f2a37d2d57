"""The built-in data sets: shapes, value range, determinism."""

from __future__ import annotations

import numpy as np

from latentdist.data import BUILTIN, load_data
from latentdist.data.builtin import photo_crops


def test_photos32_shape_range_and_determinism():
    assert "photos32" in BUILTIN
    src = load_data("photos32")
    assert src.kind == "images" and src.sample_shape == (3, 32, 32) and len(src) == 5000
    assert src.labels is None
    x = src.take()
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.max() - x.min()) > 1.5  # real photographs span most of the range
    assert float(x.std(dim=(1, 2, 3)).median()) > 0.02  # crops are not all flat
    again = load_data("photos32").take()
    assert np.array_equal(x.numpy(), again.numpy())
    assert src.fingerprint() == load_data("photos32").fingerprint()


def test_photo_crops_seed_and_size():
    a = photo_crops(n=10, size=16, seed=1)
    assert a.shape == (10, 3, 16, 16) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 255.0
    assert np.array_equal(a, photo_crops(n=10, size=16, seed=1))
    assert not np.array_equal(a, photo_crops(n=10, size=16, seed=2))
    # crops alternate between the two photographs: the first two differ in colour statistics
    assert not np.allclose(a[0].mean(axis=(1, 2)), a[1].mean(axis=(1, 2)))
