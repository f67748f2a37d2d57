"""Discrepancies d_F between two samples: the metric side of D_c(P_z; P_x) (SPEC section 1).

The public face of the metric layer; the parts (formulas, units, sources: docs/metrics.md):

* ``metrics``   the discrepancies (w1, w2, sinkhorn, sliced, mmd, kid, fd, critic), ``METRICS``,
                ``discrepancy(name, x, y)`` and ``resolve_metric(name)``
* ``kernels``   squared distances, Gaussian/polynomial kernels, the unbiased MMD^2, the median
                bandwidth and ``MMD_SCALES`` (also the MMD fit's kernel)
* ``frechet``   the Frechet distance between Gaussian fits
* ``features``  the feature spaces of fd/kid (``FeatureNet``, extractors, ``resolve_features``)
* ``judge``     ``Judge``: one metric against one reference, with the yardstick fixed once
* ``critic``    the held-out neural-net distance
* ``validate``  ``as_rows``, the one check of sample inputs
"""

from latentdist.discrepancy._sinkhorn import sinkhorn_divergence
from latentdist.discrepancy.features import (
    FEATURE_KINDS,
    FeatureNet,
    extract_features,
    load_feature_extractor,
    resolve_features,
    train_feature_net,
)
from latentdist.discrepancy.frechet import frechet_distance, frechet_distance_gaussians
from latentdist.discrepancy.judge import Judge
from latentdist.discrepancy.kernels import MMD_SCALES, median_bandwidth
from latentdist.discrepancy.metrics import (
    FEATURE_METRICS,
    METRICS,
    NEEDS_FIT,
    UNBIASED,
    below_floor_cause,
    critic,
    default_blur,
    discrepancy,
    fd,
    kid,
    mmd,
    resolve_metric,
    sinkhorn,
    sliced,
    w1,
    w2,
)
from latentdist.discrepancy.validate import as_rows

__all__ = [
    "FEATURE_KINDS",
    "FEATURE_METRICS",
    "METRICS",
    "MMD_SCALES",
    "NEEDS_FIT",
    "UNBIASED",
    "FeatureNet",
    "Judge",
    "as_rows",
    "below_floor_cause",
    "critic",
    "default_blur",
    "discrepancy",
    "extract_features",
    "fd",
    "frechet_distance",
    "frechet_distance_gaussians",
    "kid",
    "load_feature_extractor",
    "median_bandwidth",
    "mmd",
    "resolve_features",
    "resolve_metric",
    "sinkhorn",
    "sinkhorn_divergence",
    "sliced",
    "train_feature_net",
    "w1",
    "w2",
]
