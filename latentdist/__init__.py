"""latentdist: how well does a latent space serve generation?

>>> import latentdist as ld
>>> data = ld.load_data("digits")
>>> z = ld.load_encoder("encoder.pt").encode(data)
>>> result = ld.measure(z, data, generator="mlp", capacities=(8, 16, 32))
>>> result.to_frame(); result.plot()
"""

__version__ = "0.1.0"

from latentdist.data import DataSource, load_data  # noqa: E402
from latentdist.data.encoders import Encoder, load_encoder  # noqa: E402
from latentdist.estimator import MeasureConfig, MeasureResult, measure  # noqa: E402
from latentdist.evaluation.distance import DistanceResult, sample_distance  # noqa: E402

__all__ = [
    "DataSource",
    "DistanceResult",
    "Encoder",
    "MeasureConfig",
    "MeasureResult",
    "__version__",
    "load_data",
    "load_encoder",
    "measure",
    "sample_distance",
]
