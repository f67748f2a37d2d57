"""latentdist: how well does a latent space serve generation?

>>> import latentdist as ld
>>> data = ld.load_data("digits")
>>> z = ld.load_encoder("encoder.pt").encode(data)
>>> result = ld.measure(z, data, generator="mlp", capacities=(8, 16, 32))
>>> result.to_frame(); result.plot()
"""

from latentdist.data import DataSource, load_data
from latentdist.data.encoders import Encoder, load_encoder
from latentdist.estimator import MeasureConfig, MeasureResult, measure
from latentdist.evaluation.distance import DistanceResult, sample_distance
from latentdist.evaluation.metric import LatentSignalsMetric, SampleDistanceMetric
from latentdist.versions import __version__

__all__ = [
    "DataSource",
    "DistanceResult",
    "Encoder",
    "LatentSignalsMetric",
    "MeasureConfig",
    "MeasureResult",
    "SampleDistanceMetric",
    "__version__",
    "load_data",
    "load_encoder",
    "measure",
    "sample_distance",
]
