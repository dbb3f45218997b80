r"""Point posterior: MAP training as a posterior family.

The family approximates the posterior by a point mass at a mode,

.. math:: q(\theta) = \delta(\theta - \hat\theta), \qquad
          \hat\theta = \arg\min_\theta U(\theta),

with :math:`U` the per-datum objective of :mod:`bnn_flat.objectives`. Any optax chain drives
the optimisation, so a sharpness-aware transform in the chain gives the flat ("F-") version:
``point.build(loss_fn, optax.chain(transforms.sam(0.05), optax.sgd(0.1)))``.

Deep ensembles are this family under :func:`bnn_flat.posteriors.ensemble` (members trained
in one compiled program with ``jax.vmap``).

References:
  Lakshminarayanan, Pritzel, Blundell. Simple and Scalable Predictive Uncertainty
  Estimation using Deep Ensembles. NeurIPS 2017.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnn_flat.posteriors._common import (
    check_perturbed_dropout,
    make_grad_fn,
    make_split_grad_fn,
)
from bnn_flat.types import Batch, Info, LossFn, ModelState, Params, Posterior, PRNGKey

__all__ = ["PointState", "build", "init", "update", "sample"]


class PointState(NamedTuple):
    """State of the point family.

    Attributes:
      params: current parameters (the mode estimate).
      model_state: BatchNorm statistics or ``{}``.
      opt_state: optimizer state.
      step: number of updates done (int32 scalar).
    """

    params: Params
    model_state: ModelState
    opt_state: optax.OptState
    step: jax.Array


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    """Builds the point (MAP) family.

    Args:
      loss_fn: per-datum objective ``loss_fn(params, model_state, batch, key)``.
      optimizer: any optax transformation; sharpness-aware and noise transforms receive
        ``grad_fn``, ``value`` and ``key`` as extra arguments.
      perturbed_dropout: ``"fresh"`` (default) draws a new dropout mask whenever a transform
        evaluates ``grad_fn``; ``"same"`` reuses the mask of the clean pass.

    Returns:
      A :class:`bnn_flat.types.Posterior`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> family = build(loss_fn, optax.sgd(0.1))
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> state, info = family.update(jax.random.key(0), state, batch)
      >>> int(state.step)
      1
    """
    check_perturbed_dropout(perturbed_dropout)

    def init_fn(params: Params, model_state: ModelState | None = None) -> PointState:
        return init(params, model_state, optimizer)

    def update_fn(key: PRNGKey, state: PointState, batch: Batch) -> tuple[PointState, Info]:
        return update(key, state, batch, loss_fn, optimizer, perturbed_dropout=perturbed_dropout)

    return Posterior(init=init_fn, update=update_fn, sample=sample, log_prob=None)


def init(
    params: Params, model_state: ModelState | None, optimizer: optax.GradientTransformation
) -> PointState:
    """Initial state: the given parameters and a fresh optimizer state."""
    return PointState(
        params=params,
        model_state={} if model_state is None else model_state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
    )


def update(
    key: PRNGKey,
    state: PointState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    perturbed_dropout: str = "fresh",
) -> tuple[PointState, Info]:
    """One optimizer step on the per-datum objective.

    The clean pass updates the model state (BatchNorm statistics); passes made by
    transforms through ``grad_fn`` do not.
    """
    loss_key, transform_key = jax.random.split(key)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch, loss_key
    )
    grad_fn = make_grad_fn(loss_fn, state.model_state, batch, loss_key, perturbed_dropout)
    split_grad_fn = make_split_grad_fn(
        loss_fn, state.model_state, batch, loss_key, perturbed_dropout
    )
    updates, opt_state = optimizer.update(
        grads,
        state.opt_state,
        state.params,
        grad_fn=grad_fn,
        split_grad_fn=split_grad_fn,
        value=loss,
        key=transform_key,
    )
    params = optax.apply_updates(state.params, updates)
    new_state = PointState(
        params=params, model_state=aux.model_state, opt_state=opt_state, step=state.step + 1
    )
    return new_state, Info(loss=loss, metrics=aux.metrics)


def sample(key: PRNGKey, state: PointState, num_samples: int) -> Params:
    """``num_samples`` copies of the point estimate, stacked on a leading axis.

    ``key`` is unused (the distribution is a point mass) and accepted for the common
    signature.
    """
    del key
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples, *x.shape)), state.params)
