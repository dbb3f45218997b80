"""Posterior families: one module per family, each with ``build`` returning a Posterior.

Every family works with any optax chain; its flat ("F-") version is the same family with a
sharpness-aware transform from :mod:`bnn_flat.transforms` in the chain.
"""

from bnn_flat.posteriors import bsam, ensemble, point
from bnn_flat.posteriors.ensemble import EnsembleState

__all__ = ["point", "ensemble", "bsam", "EnsembleState"]
