r"""Per-datum objectives: likelihoods, priors and the one scaling convention.

Every family in bnn_flat minimises the **per-datum negative log joint**

.. math::

    U(\theta) = -\frac{1}{B}\sum_{i \in \text{batch}} \log p(y_i \mid x_i, \theta)
                - \frac{1}{N}\log p(\theta),

an unbiased estimate of :math:`-\tfrac{1}{N}\log p(\theta, \mathcal{D})`, where :math:`N` is
the number of training examples. So ``loss * N`` on the full data set equals the negative log
joint up to the prior's normalising constant (which the loss drops), and the (tempered)
posterior targeted by sampling families is

.. math::

    p_T(\theta \mid \mathcal{D}) \propto \exp\!\big(-N\,U(\theta) / T\big).

The temperature ``T`` never enters the loss itself; it enters only where a family needs it:
the Langevin noise variance :math:`2\eta T/N`, the entropy/KL weight :math:`T/N` of
variational inference, and the Laplace precision :math:`N/T`. Weight decay ``wd`` in the
usual SGD sense corresponds to a Gaussian prior with precision ``wd * N``; see
``docs/scaling.md`` for the full table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bnn_flat.types import ApplyFn, Batch, LossAux, LossFn, ModelState, Params, PRNGKey

__all__ = [
    "categorical_log_likelihood",
    "gaussian_log_likelihood",
    "gaussian_log_prior",
    "make_loss",
    "classification_loss",
    "regression_loss",
    "weight_decay_to_prior_precision",
]


def categorical_log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Per-example log-likelihood :math:`\log \mathrm{softmax}(z)_y` of a categorical model.

    Args:
      logits: ``(..., C)`` unnormalised log-probabilities.
      labels: integer labels of shape ``logits.shape[:-1]``.

    Returns:
      Per-example log-likelihoods, shape ``logits.shape[:-1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(categorical_log_likelihood(jnp.zeros((1, 4)), jnp.array([2]))[0])  # log 1/4
      -1.386...
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def gaussian_log_likelihood(
    outputs: jax.Array, targets: jax.Array, noise_std: float | None = 1.0
) -> jax.Array:
    r"""Per-example Gaussian log-likelihood, summed over output dimensions.

    With ``noise_std`` given the model is homoscedastic: :math:`y \sim N(f(x), \sigma^2)`.
    With ``noise_std=None`` the model is heteroscedastic and ``outputs`` holds the mean and
    the log standard deviation concatenated on the last axis (``2 * D`` values).

    Args:
      outputs: ``(B, D)`` means, or ``(B, 2 D)`` means and log-stds.
      targets: ``(B, D)`` (or ``(B,)`` when ``D == 1``).
      noise_std: observation noise standard deviation, or ``None`` for learned noise.

    Returns:
      ``(B,)`` log-likelihoods.

    Example:
      >>> import jax.numpy as jnp
      >>> float(gaussian_log_likelihood(jnp.zeros((1, 1)), jnp.zeros((1,)), 1.0)[0])
      -0.918...
    """
    if noise_std is None:
        mean, log_std = jnp.split(outputs, 2, axis=-1)
    else:
        mean = outputs
        log_std = jnp.full_like(mean, jnp.log(noise_std))
    targets = targets.reshape(mean.shape)
    z = (targets - mean) * jnp.exp(-log_std)
    per_dim = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(axis=-1)


def gaussian_log_prior(params: Params, precision: float | jax.Array = 1.0) -> jax.Array:
    r"""Log density of an isotropic Gaussian prior :math:`N(0, \lambda^{-1} I)`, constants included.

    .. math:: \log p(\theta) = -\tfrac{\lambda}{2}\|\theta\|^2
              + \tfrac{D}{2}\log\lambda - \tfrac{D}{2}\log 2\pi

    Args:
      params: parameter pytree.
      precision: prior precision :math:`\lambda > 0` (scalar).

    Returns:
      Scalar log density.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(gaussian_log_prior({"w": jnp.zeros(2)}, 1.0)), 4)  # -log(2 pi)
      -1.8379
    """
    sq_norm = _sum_of_squares(params)
    dim = sum(x.size for x in jax.tree.leaves(params))
    precision = jnp.asarray(precision, jnp.float32)
    return -0.5 * precision * sq_norm + 0.5 * dim * (jnp.log(precision) - math.log(2 * math.pi))


def _sum_of_squares(params: Params) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def weight_decay_to_prior_precision(weight_decay: float, num_data: int) -> float:
    r"""Prior precision equivalent to SGD weight decay under the per-datum convention.

    Adding ``weight_decay * theta`` to the per-datum gradient is the gradient of
    :math:`-\log p(\theta)/N` with :math:`p = N(0, (\mathrm{wd}\,N)^{-1} I)`.

    Example:
      >>> weight_decay_to_prior_precision(5e-4, 50_000)
      25.0
    """
    return weight_decay * num_data


def make_loss(
    apply_fn: ApplyFn,
    log_likelihood: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    num_data: int,
    prior_precision: float = 0.0,
    metrics_fn: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None,
) -> LossFn:
    r"""Builds the per-datum objective :math:`-\overline{\log p(y|x,\theta)} - \log p(\theta)/N`.

    Args:
      apply_fn: model in the contract ``apply(params, model_state, inputs, *, train, key)``.
      log_likelihood: ``(outputs, labels) -> (B,)`` per-example log-likelihoods.
      num_data: training-set size :math:`N` (> 0).
      prior_precision: precision of the isotropic Gaussian prior; 0 gives a flat prior
        (no prior term).
      metrics_fn: optional ``(outputs, labels) -> dict`` of cheap batch metrics.

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (loss, LossAux)``; the model runs in
      training mode (BatchNorm batch statistics, dropout driven by ``key``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = make_loss(apply, categorical_log_likelihood, num_data=10)
      >>> batch = {"inputs": jnp.ones((2, 3)), "labels": jnp.array([0, 1])}
      >>> loss, aux = loss_fn({"w": jnp.zeros((3, 2))}, {}, batch, jax.random.key(0))
      >>> round(float(loss), 4)  # log 2
      0.6931
    """
    if not isinstance(num_data, int | jnp.integer) or int(num_data) <= 0:
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}.")
    if isinstance(prior_precision, int | float) and prior_precision < 0:
        raise ValueError(f"prior_precision must be >= 0, got {prior_precision}.")
    num_data = int(num_data)

    def loss_fn(
        params: Params, model_state: ModelState, batch: Batch, key: PRNGKey
    ) -> tuple[jax.Array, LossAux]:
        outputs, new_model_state = apply_fn(
            params, model_state, batch["inputs"], train=True, key=key
        )
        log_lik = log_likelihood(outputs, batch["labels"])
        nll = -jnp.mean(log_lik)
        loss = nll
        if prior_precision:
            # The normalising constant of the prior is dropped: it does not depend on the
            # parameters and would dominate the reported loss of large models.
            loss = loss + 0.5 * prior_precision * _sum_of_squares(params) / num_data
        metrics = {"nll": nll}
        if metrics_fn is not None:
            metrics.update(metrics_fn(outputs, batch["labels"]))
        return loss, LossAux(model_state=new_model_state, metrics=metrics)

    return loss_fn


def _classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    return {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}


def classification_loss(
    apply_fn: ApplyFn, *, num_data: int, prior_precision: float = 0.0
) -> LossFn:
    """Per-datum categorical objective with an isotropic Gaussian prior.

    Args:
      apply_fn: model in the bnn_flat contract.
      num_data: training-set size.
      prior_precision: Gaussian prior precision (``weight_decay * num_data``).

    Returns:
      A :class:`bnn_flat.types.LossFn` reporting ``nll`` and ``accuracy``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = classification_loss(apply, num_data=100, prior_precision=1.0)
    """
    return make_loss(
        apply_fn,
        categorical_log_likelihood,
        num_data=num_data,
        prior_precision=prior_precision,
        metrics_fn=_classification_metrics,
    )


def regression_loss(
    apply_fn: ApplyFn,
    *,
    num_data: int,
    prior_precision: float = 0.0,
    noise_std: float | None = 1.0,
) -> LossFn:
    """Per-datum Gaussian-likelihood objective (homoscedastic, or learned noise with ``None``).

    Args:
      apply_fn: model in the bnn_flat contract.
      num_data: training-set size.
      prior_precision: Gaussian prior precision.
      noise_std: observation noise std; ``None`` when the model outputs mean and log-std.

    Returns:
      A :class:`bnn_flat.types.LossFn` reporting ``nll`` and ``mse``.

    Example:
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = regression_loss(apply, num_data=100, noise_std=0.1)
    """
    if noise_std is not None and noise_std <= 0:
        raise ValueError(f"noise_std must be positive or None, got {noise_std}.")

    def metrics_fn(outputs, targets):
        mean = outputs if noise_std is not None else jnp.split(outputs, 2, axis=-1)[0]
        return {"mse": jnp.mean(jnp.square(mean - targets.reshape(mean.shape)))}

    return make_loss(
        apply_fn,
        lambda outputs, targets: gaussian_log_likelihood(outputs, targets, noise_std),
        num_data=num_data,
        prior_precision=prior_precision,
        metrics_fn=metrics_fn,
    )
