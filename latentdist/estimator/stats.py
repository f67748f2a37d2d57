"""Summaries over seeds: mean and a 95 % Student-t confidence interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "ci": [lo, hi], "per_seed"}``; the interval is mean ± t_{(1+level)/2, n-1} s/√n.

    With one seed there is no spread to estimate and ``ci`` is null.
    """
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        ci = None
    else:
        half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci": ci, "per_seed": [float(x) for x in v]}
