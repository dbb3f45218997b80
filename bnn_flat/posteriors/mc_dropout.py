r"""MC dropout: dropout at test time as approximate Bayesian inference.

A network trained with dropout (rate :math:`p`) defines, through its Bernoulli masks
:math:`\xi`, the variational distribution (Gal & Ghahramani, 2016)

.. math:: q(\theta) = \sum_{\xi} \Big(\prod_i p^{1-\xi_i}(1-p)^{\xi_i}\Big)\,
          \delta\big(\theta - M\,\operatorname{diag}(\xi)/(1-p)\big),

over the weights :math:`\theta` obtained by masking the trained weights :math:`M`. The BMA
predictive :math:`\frac1S\sum_s p(y \mid x, \xi_s)` runs the model :math:`S` times with
dropout on. Training is the point family's: the loss runs the model in training mode, so
dropout is active and driven by the loss key. A sharpness-aware transform in the chain
gives F-MC-dropout (Nguyen et al., 2023); by default its perturbed pass draws a fresh mask,
as the reference code does.

A *sample* of this family is a dropout key, not a weight vector: ``sample`` returns
``num_samples`` stacked keys and :func:`predict_fn` turns a key into a forward pass, so BMA
is ``bma.predict(predict_fn(apply_fn, state), family.sample(key, state, S), inputs)``.

BatchNorm: MC dropout wants dropout on *and* BatchNorm in evaluation mode (running
statistics). The model contract ``apply(..., train=...)`` switches both together, so a
forward pass with dropout on would normalise with the statistics of the test batch.
:func:`predict_fn` therefore refuses models with a model state (BatchNorm statistics)
instead of silently doing that; models without BatchNorm (MLP, LeNet, ResNet with
``norm="group"``, ``"layer"`` or ``"none"``) are fully supported.

References:
  Gal, Ghahramani. Dropout as a Bayesian Approximation: Representing Model Uncertainty in
  Deep Learning. ICML 2016.
  Nguyen, Tran, Ta, Le, Doan, Phung, Tran. Flat Seeking Bayesian Neural Networks.
  NeurIPS 2023.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import optax

from bnn_flat.posteriors import point
from bnn_flat.posteriors.point import PointState
from bnn_flat.types import ApplyFn, LossFn, Posterior, PRNGKey

__all__ = ["PointState", "build", "sample", "predict_fn"]


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    """Builds the MC-dropout family: point training, dropout keys as samples.

    Args:
      loss_fn: per-datum objective of a model with dropout (training mode, so dropout is on).
      optimizer: any optax chain (a sharpness-aware transform gives F-MC-dropout).
      perturbed_dropout: ``"fresh"`` (default) or ``"same"`` dropout mask in the passes a
        transform makes through ``grad_fn``; see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`~bnn_flat.posteriors.point.PointState`
      whose ``sample`` returns dropout keys and whose ``log_prob`` is ``None``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import bma, models, objectives
      >>> module = models.mlp([8], num_outputs=2, dropout_rate=0.2)
      >>> params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 3)))
      >>> apply = models.make_apply(module)
      >>> family = build(objectives.classification_loss(apply, num_data=4), optax.sgd(0.1))
      >>> state = family.init(params, model_state)
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> state, _ = family.update(jax.random.key(1), state, batch)
      >>> keys = family.sample(jax.random.key(2), state, 10)
      >>> bma.predict(predict_fn(apply, state), keys, jnp.ones((5, 3))).shape
      (5, 2)
    """
    base = point.build(loss_fn, optimizer, perturbed_dropout=perturbed_dropout)
    return Posterior(init=base.init, update=base.update, sample=sample, log_prob=None)


def sample(key: PRNGKey, state: PointState, num_samples: int) -> jax.Array:
    """``num_samples`` independent dropout keys, stacked on a leading axis.

    Args:
      key: PRNG key.
      state: the family state (unused: the masks do not depend on it).
      num_samples: number of keys.

    Returns:
      A typed key array of shape ``(num_samples,)``.

    Example:
      >>> import jax
      >>> sample(jax.random.key(0), None, 3).shape
      (3,)
    """
    del state
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    return jax.random.split(key, int(num_samples))


def predict_fn(apply_fn: ApplyFn, state: Any) -> Callable[[PRNGKey, jax.Array], jax.Array]:
    """``predict_fn(key, inputs) -> outputs``: one forward pass with dropout on.

    Any state with ``params`` and ``model_state`` works, so SWA-dropout is
    ``predict_fn(apply_fn, swag_state._replace(params=swag.swa_params(swag_state)))``.

    Args:
      apply_fn: model in the bnn_flat contract; it runs with ``train=True`` (dropout on,
        driven by the key) and its returned model state is discarded.
      state: a state with ``params`` and ``model_state``; ``model_state`` must be empty.

    Returns:
      The prediction function for :func:`bnn_flat.bma.predict`.

    Raises:
      ValueError: if ``state.model_state`` is not empty (a BatchNorm model: the contract
        cannot run dropout on with BatchNorm in evaluation mode).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.posteriors import point
      >>> module = models.mlp([8], num_outputs=2, dropout_rate=0.5)
      >>> params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 3)))
      >>> state = point.PointState(
      ...     params=params, model_state=model_state, opt_state=None, step=jnp.zeros((), int))
      >>> fn = predict_fn(models.make_apply(module), state)
      >>> fn(jax.random.key(1), jnp.ones((4, 3))).shape
      (4, 2)
    """
    if jax.tree.leaves(state.model_state):
        raise ValueError(
            "MC dropout needs dropout on with BatchNorm in evaluation mode, which the model "
            "contract apply(..., train=...) cannot express (train=True would normalise with "
            "test-batch statistics). Use a model without BatchNorm (empty model_state), e.g. "
            "norm='group', 'layer' or 'none'."
        )
    params, model_state = state.params, state.model_state

    def predict(key: PRNGKey, inputs: jax.Array) -> jax.Array:
        return apply_fn(params, model_state, inputs, train=True, key=key)[0]

    return predict
