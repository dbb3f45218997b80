"""bnn_flat: flat-posterior Bayesian deep learning in JAX.

Three concepts: sharpness-aware and noise **transforms** (optax gradient transformations,
:mod:`bnn_flat.transforms`), **posterior families** (``Posterior(init, update, sample,
log_prob)``, :mod:`bnn_flat.posteriors`), and **BMA** (log-space averaging over posterior
samples, :mod:`bnn_flat.bma`). Models, data, metrics, objectives and the training loop are
the conventions around them.
"""

from bnn_flat import (
    bma,
    calibration,
    data,
    metrics,
    models,
    objectives,
    posteriors,
    sharding,
    sharpness,
    symmetry,
    training,
    transfer,
    transforms,
    types,
)
from bnn_flat.types import Info, LossAux, Posterior

__version__ = "0.1.0"

__all__ = [
    "bma",
    "calibration",
    "data",
    "metrics",
    "models",
    "objectives",
    "posteriors",
    "sharding",
    "sharpness",
    "symmetry",
    "training",
    "transfer",
    "transforms",
    "types",
    "Info",
    "LossAux",
    "Posterior",
]
