r"""bSAM posterior: the Gaussian learned by Bayesian SAM, as a posterior family.

bSAM (Möllenhoff & Khan, 2023) learns a diagonal Gaussian

.. math:: q(\theta) = \mathcal{N}\big(w, \operatorname{diag}(1 / (N s))\big)

whose mean ``w`` is the optimised parameters and whose precision ``N s`` comes from the
optimizer's second-moment state (see :func:`bnn_flat.transforms.bsam` for the update). This
family is the point family driven by a bSAM optimizer, with ``sample`` and ``log_prob`` of
that Gaussian, so BMA works on it like on every other family.

The objective must be the *likelihood-only* per-datum loss (``prior_precision=0`` in
:mod:`bnn_flat.objectives`): bSAM adds the prior itself as the decay
:math:`\delta = \lambda / N`, and a prior inside the loss would be counted twice.

References:
  Möllenhoff, Khan. SAM as an Optimal Relaxation of Bayes. ICLR 2023.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bnn_flat.posteriors import point
from bnn_flat.transforms import bsam_posterior_scale, bsam_sample
from bnn_flat.types import LossFn, Params, Posterior, PRNGKey

__all__ = ["build", "posterior_std"]


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_data: int,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    """Builds the bSAM family.

    Args:
      loss_fn: likelihood-only per-datum objective.
      optimizer: :func:`bnn_flat.transforms.bsam`, alone or inside a chain (e.g. with
        clipping); its state must contain exactly one ``BSAMState``.
      num_data: :math:`N` as given to the bSAM optimizer.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`~bnn_flat.posteriors.point.PointState`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import objectives, transforms
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> tx = transforms.bsam(0.1, rho=0.01, num_data=4, prior_precision=1.0)
      >>> family = build(loss_fn, tx, num_data=4)
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> family.sample(jax.random.key(0), state, 5)["w"].shape
      (5, 3, 2)
    """
    base = point.build(loss_fn, optimizer, perturbed_dropout=perturbed_dropout)

    def sample(key: PRNGKey, state: point.PointState, num_samples: int) -> Params:
        return bsam_sample(key, state.params, state.opt_state, num_samples, num_data)

    def log_prob(state: point.PointState, params: Params) -> jax.Array:
        std = posterior_std(state, num_data)
        terms = jax.tree.map(
            lambda x, m, s: jnp.sum(
                -0.5 * ((x - m) / s) ** 2 - jnp.log(s) - 0.5 * math.log(2 * math.pi)
            ),
            params,
            state.params,
            std,
        )
        return sum(jax.tree.leaves(terms))

    return Posterior(init=base.init, update=base.update, sample=sample, log_prob=log_prob)


def posterior_std(state: point.PointState, num_data: int) -> Params:
    """Per-parameter standard deviation :math:`1/\\sqrt{N s}` of the bSAM posterior."""
    return bsam_posterior_scale(state.opt_state, num_data)
