"""Generator families G_c with a capacity knob (see ``modules``) and their batched ensembles."""

from latentdist.generators.modules import (
    FAMILIES,
    SumOfPaths,
    count_params,
    make_generator,
)

__all__ = ["FAMILIES", "SumOfPaths", "count_params", "make_generator"]
