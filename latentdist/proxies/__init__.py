"""Generator-complexity proxies and latent geometry (SPEC section 2); see docs/proxies.md."""

from latentdist.proxies.complexity import generator_proxies, spectral_complexity
from latentdist.proxies.geometry import (
    codebook_usage,
    effective_rank,
    intrinsic_dimension,
    latent_geometry,
    nearest_codes,
    variance_spectrum,
)
from latentdist.proxies.lipschitz import jacobian_fro, lipschitz_lower, lipschitz_upper

__all__ = [
    "codebook_usage",
    "effective_rank",
    "generator_proxies",
    "intrinsic_dimension",
    "jacobian_fro",
    "latent_geometry",
    "lipschitz_lower",
    "lipschitz_upper",
    "nearest_codes",
    "spectral_complexity",
    "variance_spectrum",
]
