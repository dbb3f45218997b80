"""Posterior families: one module per family, each with ``build`` returning a Posterior.

Every family works with any optax chain; its flat ("F-") version is the same family with a
sharpness-aware transform from :mod:`bnn_flat.transforms` in the chain.
"""

from bnn_flat.posteriors import (
    batchnorm,
    bsam,
    ensemble,
    laplace,
    low_rank_vi,
    mc_dropout,
    mean_field_vi,
    point,
    sgmcmc,
    swag,
)
from bnn_flat.posteriors.ensemble import EnsembleState

__all__ = [
    "point",
    "ensemble",
    "bsam",
    "swag",
    "mc_dropout",
    "mean_field_vi",
    "low_rank_vi",
    "laplace",
    "sgmcmc",
    "batchnorm",
    "EnsembleState",
]
