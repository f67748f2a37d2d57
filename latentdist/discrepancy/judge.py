"""``Judge``: one discrepancy d_F(., reference) with everything that depends on data fixed once.

Judging many samples (every capacity and seed of a sweep, and the floor) against one reference
is only a comparison if the yardstick is the same for all of them. A ``Judge`` therefore fixes,
from the reference alone: the MMD kernel's bandwidth (median heuristic on the reference), the
feature space of ``fd``/``kid``, and the reference's own kernel terms (computed once). The held-out
critic is trained per judged sample, on fitting rows that the caller passes and that are
disjoint from the scored ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from latentdist.discrepancy.kernels import (
    MMD_SCALES,
    gaussian_gammas,
    gaussian_kernel,
    kernel_sum,
    median_bandwidth,
)
from latentdist.discrepancy.metrics import (
    FEATURE_METRICS,
    NEEDS_FIT,
    discrepancy,
    resolve_metric,
)
from latentdist.discrepancy.validate import as_rows
from latentdist.errors import UsageError

__all__ = ["Judge"]


class Judge:
    """``judge(sample, sample_fit=None) -> d_F(sample, reference)``.

    ``metric``: a name in ``METRICS``. ``reference``: the held-out reference rows.
    ``reference_fit``: reference rows for training (critic; disjoint from ``reference``).
    ``features``: a module applied before ``fd``/``kid`` (None: identity). ``settings`` go to
    the metric (e.g. ``scales`` for mmd, ``steps`` for the critic).
    """

    def __init__(
        self,
        metric: str,
        reference: Any,
        *,
        reference_fit: Any | None = None,
        features: Callable | None = None,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        resolve_metric(metric)
        if metric in NEEDS_FIT and reference_fit is None:
            raise UsageError(f"metric {metric!r} needs reference rows to train on")
        self.metric, self.seed, self.settings = metric, seed, dict(settings)
        self.reference = reference
        self.reference_fit = reference_fit
        self.kernel: dict[str, Any] = {}
        if metric == "mmd":
            ref = as_rows(reference, "reference")
            scales = tuple(self.settings.pop("scales", MMD_SCALES))
            sigma = float(self.settings.pop("bandwidth", None) or median_bandwidth(ref))
            self._k = gaussian_kernel(gaussian_gammas(sigma, scales))
            self._ref = ref
            m = len(ref)
            self._k_rr = kernel_sum(self._k, ref, ref, exclude_diag=True) / (m * (m - 1))
            self.kernel = {
                "kind": "sum of Gaussians exp(-|u-v|^2 / (2 (a sigma)^2)), averaged over a",
                "sigma": sigma,
                "scales": list(scales),
                "sigma_from": "median pairwise distance within the reference",
            }
        elif metric in FEATURE_METRICS:
            self.settings["features"] = features
            self.kernel = {"features": "identity" if features is None else "given module"}
            if metric == "kid":
                self.kernel["kind"] = "(<u,v>/dim + 1)^3 on the features"

    def __call__(self, sample: Any, sample_fit: Any | None = None) -> float:
        if self.metric == "mmd":
            x = as_rows(sample, "sample")
            if x.shape[1] != self._ref.shape[1]:
                raise UsageError(
                    f"sample dimension {x.shape[1]} differs from the reference's {self._ref.shape[1]}"
                )
            n, m = len(x), len(self._ref)
            if n < 2:
                raise UsageError("mmd: the sample needs at least 2 points")
            k_xx = kernel_sum(self._k, x, x, exclude_diag=True) / (n * (n - 1))
            k_xr = kernel_sum(self._k, x, self._ref, exclude_diag=False) / (n * m)
            return k_xx + self._k_rr - 2.0 * k_xr
        if self.metric in NEEDS_FIT:
            if sample_fit is None:
                raise UsageError(f"metric {self.metric!r} needs sample rows to train on")
            return discrepancy(
                self.metric,
                sample,
                self.reference,
                fit_x=sample_fit,
                fit_y=self.reference_fit,
                seed=self.seed,
                **self.settings,
            )
        settings = dict(self.settings)
        if "seed" in inspect.signature(resolve_metric(self.metric)).parameters:
            settings.setdefault("seed", self.seed)  # e.g. sliced: its projections, per split
        return discrepancy(self.metric, sample, self.reference, **settings)
