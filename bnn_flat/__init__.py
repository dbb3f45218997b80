"""bnn_flat: flat-posterior Bayesian deep learning in JAX.

Three concepts: sharpness-aware and noise **transforms** (optax gradient transformations,
:mod:`bnn_flat.transforms`), **posterior families** (``Posterior(init, update, sample,
log_prob)``, :mod:`bnn_flat.posteriors`), and **BMA** (log-space averaging over posterior
samples, :mod:`bnn_flat.bma`). Models, data, metrics, objectives and the training loop are
the conventions around them.

On import, :func:`bnn_flat.backend.tune_cpu` adds one XLA:CPU flag (convolutions and
reductions on XLA's own kernels instead of YNNPACK: CIFAR ResNet steps ~1.5x faster, low-rank
VI on dense layers ~2x) when JAX has not computed anything yet; ``BNN_FLAT_CPU_TUNING=0``
turns this off. See :mod:`bnn_flat.backend`.
"""

from bnn_flat import backend

backend.tune_cpu()

from bnn_flat import (  # noqa: E402  (the flag above must precede any computation)
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
from bnn_flat.types import Info, LossAux, Posterior  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "backend",
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
