"""bnn_flat: flat-posterior Bayesian deep learning in JAX.

Three concepts: sharpness-aware and noise **transforms** (optax gradient transformations),
**posterior families** (``Posterior(init, update, sample, log_prob)``), and **BMA**
(log-space averaging over posterior samples).
"""

from bnn_flat import bma, objectives, posteriors, training, types
from bnn_flat.types import Info, LossAux, Posterior

__version__ = "0.1.0"

__all__ = [
    "bma",
    "objectives",
    "posteriors",
    "training",
    "types",
    "Info",
    "LossAux",
    "Posterior",
]
