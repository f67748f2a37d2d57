"""The versions a result was computed with, recorded in every report (measure.json, run.json)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

__all__ = ["__version__", "versions"]

try:
    __version__ = version("latentdist")
except PackageNotFoundError:  # a source tree on the path, not installed
    __version__ = "0.1.0"


def versions() -> dict[str, str]:
    """latentdist, Python, the numerical libraries and the platform, by name."""
    import ot
    import scipy
    import sklearn

    return {
        "latentdist": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pot": ot.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }
