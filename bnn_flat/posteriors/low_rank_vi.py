r"""Diagonal-plus-low-rank Gaussian variational inference as a posterior family.

The family fits the Gaussian used by SA-BMA (a SWAG-shaped covariance with learned factors)

.. math::

    q_\phi(\theta) = \mathcal{N}\big(\mu,\; \Sigma\big), \qquad
    \Sigma = \operatorname{diag}(\sigma^2) + W^\top W, \qquad
    \sigma = \operatorname{softplus}(s),

with :math:`\phi = \{\mu, s, W\}` and a rank-:math:`K` factor :math:`W \in \mathbb{R}^{K
\times d}`. :math:`W` is stored as a pytree like the parameters with a leading axis of size
:math:`K` (state field ``factor``); row :math:`k` is the flattened leaf-``k`` slice of every
leaf. A reparameterised draw is

.. math:: \theta = \mu + \sigma \odot z_1 + W^\top z_2, \qquad
          z_1 \sim \mathcal{N}(0, I_d),\; z_2 \sim \mathcal{N}(0, I_K).

The sampler and every density use this one :math:`\Sigma`, with zero-mean :math:`z_2`
(the released SA-BMA code samples and scores different covariances and offsets
:math:`z_2`; see algorithms.md, pitfalls 5 and 6).

To start from a SWAG fit with deviation matrix :math:`C` (rank :math:`K`), diagonal variance
:math:`v` and sampling scale :math:`c` (SWAG's :math:`\Sigma = c\,(\operatorname{diag}(v) +
C^\top C/(K-1))`), set :math:`\sigma = \sqrt{c v}` (``raw_scale = inverse_softplus(σ)``) and
:math:`W = \sqrt{c/(K-1)}\, C`.

The objective is the per-datum negative ELBO of :mod:`bnn_flat.posteriors.mean_field_vi`,
:math:`\mathbb{E}_q[U_{\text{lik}}(\theta)] + (T/N)\,\mathrm{KL}(q \Vert
\mathcal{N}(0, \lambda^{-1} I))`, with a **likelihood-only** loss and the prior precision
:math:`\lambda` given to :func:`build`. Every density quantity is exact and costs
:math:`O(d K^2 + K^3)` through the :math:`K \times K` capacitance matrix
:math:`M = I_K + W D^{-1} W^\top` (:math:`D = \operatorname{diag}(\sigma^2)`):

.. math::

    \Sigma^{-1} = D^{-1} - D^{-1} W^\top M^{-1} W D^{-1} \quad\text{(Woodbury)}, \qquad
    \log\det\Sigma = \textstyle\sum_i \log \sigma_i^2 + \log\det M
    \quad\text{(determinant lemma)},

    \mathrm{KL}(q \Vert p) = \tfrac12\big(\lambda(\textstyle\sum_i \sigma_i^2
        + \lVert W \rVert_F^2 + \lVert \mu \rVert^2) - d - d \log\lambda - \log\det\Sigma\big).

For a Gaussian, the Fisher information of the mean is :math:`F_{\mu\mu} = \Sigma^{-1}`, so
the natural-gradient / SA-BMA direction :math:`F_{\mu\mu}^{-1} g = \Sigma g` is
:func:`covariance_vector_product`, :math:`O(dK)`.

The optimizer acts on ``{"mean", "raw_scale", "factor"}`` and receives ``grad_fn`` with the
same noise and batch, so a sharpness-aware transform perturbs all variational parameters;
:func:`bnn_flat.posteriors.mean_field_vi.mean_only` restricts it to the mean (F-BNN flat VI,
valid here too because :math:`\partial\theta/\partial\mu = I`).

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Transfer Learning. arXiv 2406.15664.
  Maddox, Garipov, Izmailov, Vetrov, Wilson. A Simple Baseline for Bayesian Uncertainty in
  Deep Learning (SWAG). NeurIPS 2019.
  Ong, Nott, Smith. Gaussian Variational Approximation With a Factor Covariance Structure.
  J. Comput. Graph. Stat. 2018.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bnn_flat._linalg import gram, small_matmul
from bnn_flat.posteriors._common import check_perturbed_dropout
from bnn_flat.posteriors.mean_field_vi import (
    _check_likelihood_only,
    _check_params,
    _check_positive_int,
    _check_positive_number,
    _check_same_structure,
    _draw_noise,
    _variational_step,
    inverse_softplus,
    standard_deviation,
)
from bnn_flat.types import Batch, Info, LossFn, ModelState, Params, Posterior, PRNGKey

__all__ = [
    "LowRankVIState",
    "build",
    "init",
    "update",
    "sample",
    "log_prob",
    "variational_parameters",
    "sample_variational",
    "log_density",
    "entropy",
    "kl_divergence",
    "kl_divergence_between",
    "covariance_vector_product",
    "fisher_inverse_vector_product",
    "covariance_matrix",
]

_LOG_2PI = math.log(2 * math.pi)


class LowRankVIState(NamedTuple):
    """State of the diagonal-plus-low-rank VI family.

    Attributes:
      params: the variational mean :math:`\\mu` (the point estimate).
      model_state: BatchNorm statistics or ``{}`` (mean over the Monte-Carlo samples).
      opt_state: optimizer state over ``{"mean", "raw_scale", "factor"}``.
      step: number of updates done (int32 scalar).
      raw_scale: unconstrained diagonal scales, :math:`\\sigma = \\operatorname{softplus}(s)`.
      factor: the low-rank factor :math:`W`, leaves of shape ``(rank, *leaf.shape)``.
    """

    params: Params
    model_state: ModelState
    opt_state: optax.OptState
    step: jax.Array
    raw_scale: Params
    factor: Params


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_data: int,
    prior_precision: float | None = None,
    rank: int,
    prior: dict[str, Params] | None = None,
    temperature: float = 1.0,
    init_std: float = 1e-3,
    init_factor_std: float | None = None,
    num_mc_samples: int = 1,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""Builds the diagonal-plus-low-rank Gaussian VI family.

    Args:
      loss_fn: *likelihood-only* per-datum objective (``prior_precision=0`` in
        :mod:`bnn_flat.objectives`).
      optimizer: any optax transformation over ``{"mean", "raw_scale", "factor"}``.
      num_data: training-set size :math:`N`.
      prior_precision: precision :math:`\lambda > 0` of the prior :math:`N(0, \lambda^{-1} I)`.
      rank: :math:`K`, the number of rows of the factor :math:`W`.
      prior: instead of ``prior_precision``, a diagonal-plus-low-rank Gaussian prior given
        by its variational parameters ``{"mean", "raw_scale", "factor"}`` (any rank; e.g.
        the SWAG fit of a pretrained network, :func:`bnn_flat.transfer.prior_from_swag`);
        the KL term is then :func:`kl_divergence_between` ``(q, prior)``. Exactly one of
        ``prior_precision`` and ``prior`` must be given.
      temperature: :math:`T \ge 0`; the KL weight is :math:`T/N` (``0`` drops the KL term:
        the expected-loss objective of SA-BMA's released code, whose ``kl_eta`` is 0).
      init_std: initial diagonal standard deviation :math:`\sigma` (> 0).
      init_factor_std: standard deviation of the initial factor entries, drawn from
        ``jax.random.key(0)`` (so ``init`` stays deterministic); ``None`` means
        ``init_std / sqrt(rank)``; ``0`` starts from the mean-field Gaussian (a stationary
        point of the factor's expected gradient, left only through Monte-Carlo noise).
      num_mc_samples: reparameterised draws per step (vmapped).
      perturbed_dropout: ``"fresh"`` or ``"same"`` dropout mask in ``grad_fn`` passes.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`LowRankVIState`.

    Raises:
      ValueError: on non-positive sizes or hyper-parameters, a negative
        ``init_factor_std``, an unknown ``perturbed_dropout``, or a loss made by
        :mod:`bnn_flat.objectives` with a nonzero prior.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> family = build(loss_fn, optax.adam(1e-2), num_data=4, prior_precision=1.0, rank=2)
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> state.factor["w"].shape
      (2, 3, 2)
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> state, info = family.update(jax.random.key(0), state, batch)
      >>> family.sample(jax.random.key(1), state, 5)["w"].shape
      (5, 3, 2)
    """
    _check_positive_int("num_data", num_data)
    if (prior_precision is None) == (prior is None):
        raise ValueError("give exactly one of prior_precision (isotropic prior) and prior.")
    if prior is None:
        _check_positive_number("prior_precision", prior_precision)
    else:
        _check_prior(prior)
    _check_positive_int("rank", rank)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}.")
    _check_positive_number("init_std", init_std)
    init_factor_std = _resolve_init_factor_std(init_factor_std, init_std, rank)
    _check_positive_int("num_mc_samples", num_mc_samples)
    check_perturbed_dropout(perturbed_dropout)
    _check_likelihood_only(loss_fn)
    kl_weight = temperature / num_data

    def init_fn(params: Params, model_state: ModelState | None = None) -> LowRankVIState:
        return init(
            params,
            model_state,
            optimizer,
            rank=rank,
            init_std=init_std,
            init_factor_std=init_factor_std,
        )

    def update_fn(key: PRNGKey, state: LowRankVIState, batch: Batch) -> tuple[LowRankVIState, Info]:
        return update(
            key,
            state,
            batch,
            loss_fn,
            optimizer,
            prior_precision=prior_precision if prior is None else prior,
            kl_weight=kl_weight,
            num_mc_samples=num_mc_samples,
            perturbed_dropout=perturbed_dropout,
        )

    return Posterior(init=init_fn, update=update_fn, sample=sample, log_prob=log_prob)


def init(
    params: Params,
    model_state: ModelState | None,
    optimizer: optax.GradientTransformation,
    *,
    rank: int,
    init_std: float = 1e-3,
    init_factor_std: float | None = None,
) -> LowRankVIState:
    """Initial state: mean ``params``, diagonal std ``init_std``, a small random factor.

    Args:
      params: initial mean (a pytree of floating arrays).
      model_state: BatchNorm statistics or ``None`` (stored as ``{}``).
      optimizer: the optimizer over ``{"mean", "raw_scale", "factor"}``.
      rank: number of factor rows :math:`K`.
      init_std: initial diagonal standard deviation (> 0).
      init_factor_std: std of the initial factor entries (drawn from ``jax.random.key(0)``);
        ``None`` means ``init_std / sqrt(rank)``.

    Returns:
      A :class:`LowRankVIState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), rank=3, init_factor_std=0.0)
      >>> state.factor["w"].shape, float(jnp.abs(state.factor["w"]).sum())
      ((3, 2), 0.0)
    """
    _check_params(params)
    _check_positive_int("rank", rank)
    _check_positive_number("init_std", init_std)
    init_factor_std = _resolve_init_factor_std(init_factor_std, init_std, rank)
    raw_scale = jax.tree.map(lambda x: jnp.full_like(x, inverse_softplus(init_std)), params)
    noise = _draw_noise(jax.random.key(0), params, rank)
    factor = jax.tree.map(lambda z: (init_factor_std * z).astype(z.dtype), noise)
    variational = {"mean": params, "raw_scale": raw_scale, "factor": factor}
    return LowRankVIState(
        params=params,
        model_state={} if model_state is None else model_state,
        opt_state=optimizer.init(variational),
        step=jnp.zeros((), jnp.int32),
        raw_scale=raw_scale,
        factor=factor,
    )


def update(
    key: PRNGKey,
    state: LowRankVIState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    prior_precision: float | dict[str, Params],
    kl_weight: float,
    num_mc_samples: int = 1,
    perturbed_dropout: str = "fresh",
) -> tuple[LowRankVIState, Info]:
    r"""One optimizer step on the per-datum negative ELBO.

    ``key`` is split as in :func:`bnn_flat.posteriors.mean_field_vi.update`; one
    ``normal_like`` draw from the noise key gives :math:`z_1` (stacked like the params) and
    :math:`z_2` (shape ``(num_mc_samples, rank)``).

    Args:
      key: PRNG key.
      state: current state.
      batch: mini-batch.
      loss_fn: likelihood-only per-datum objective.
      optimizer: optimizer over ``{"mean", "raw_scale", "factor"}``.
      prior_precision: prior precision :math:`\lambda`, or a Gaussian prior in variational
        form (see :func:`build`).
      kl_weight: :math:`T/N`.
      num_mc_samples: reparameterised draws.
      perturbed_dropout: ``"fresh"`` or ``"same"``.

    Returns:
      ``(new_state, info)``; ``info.metrics`` has the loss metrics averaged over samples
      and ``"kl"``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.regression_loss(apply, num_data=2)
      >>> state = init({"w": jnp.zeros((1, 1))}, None, optax.sgd(0.1), rank=1)
      >>> batch = {"inputs": jnp.ones((2, 1)), "labels": jnp.ones(2)}
      >>> state, info = update(jax.random.key(0), state, batch, loss_fn, optax.sgd(0.1),
      ...                      prior_precision=1.0, kl_weight=0.5)
      >>> int(state.step)
      1
    """
    rank = _rank(state.factor)

    def draw_noise(noise_key):
        return _draw_low_rank_noise(noise_key, state.params, rank, num_mc_samples)

    variational, opt_state, model_state, info = _variational_step(
        key,
        variational_parameters(state),
        state.opt_state,
        state.model_state,
        batch,
        loss_fn,
        optimizer,
        draw_noise=draw_noise,
        reparameterise=_reparameterise,
        kl_fn=(
            (lambda phi: kl_divergence_between(phi, prior_precision))
            if isinstance(prior_precision, dict)
            else (lambda phi: kl_divergence(phi, prior_precision))
        ),
        kl_weight=kl_weight,
        num_mc_samples=num_mc_samples,
        perturbed_dropout=perturbed_dropout,
    )
    new_state = LowRankVIState(
        params=variational["mean"],
        model_state=model_state,
        opt_state=opt_state,
        step=state.step + 1,
        raw_scale=variational["raw_scale"],
        factor=variational["factor"],
    )
    return new_state, info


def sample(key: PRNGKey, state: LowRankVIState, num_samples: int) -> Params:
    r"""``num_samples`` draws :math:`\mu + \sigma \odot z_1 + W^\top z_2`, stacked.

    Args:
      key: PRNG key.
      state: a :class:`LowRankVIState`.
      num_samples: number of draws (positive Python int).

    Returns:
      A pytree like ``state.params`` with a leading axis of size ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(3)}, None, optax.sgd(0.1), rank=2, init_std=1.0)
      >>> sample(jax.random.key(0), state, 4)["w"].shape
      (4, 3)
    """
    _check_positive_int("num_samples", num_samples)
    noise = _draw_low_rank_noise(key, state.params, _rank(state.factor), num_samples)
    return jax.vmap(_reparameterise, in_axes=(None, 0))(variational_parameters(state), noise)


def log_prob(state: LowRankVIState, params: Params) -> jax.Array:
    """Exact :math:`\\log q(\\theta)` (Woodbury and the determinant lemma).

    Args:
      state: a :class:`LowRankVIState`.
      params: a pytree with the structure of ``state.params``.

    Returns:
      Scalar log density.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(1)}, None, optax.sgd(0.1), rank=1, init_std=1.0,
      ...              init_factor_std=0.0)
      >>> round(float(log_prob(state, {"w": jnp.zeros(1)})), 4)  # N(0, 1) at 0
      -0.9189
    """
    return log_density(variational_parameters(state), params)


# Variational-parameter helpers ----------------------------------------------------------


def variational_parameters(state: LowRankVIState) -> dict[str, Params]:
    """The variational parameters ``{"mean", "raw_scale", "factor"}`` of a state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), rank=1)
      >>> sorted(variational_parameters(state))
      ['factor', 'mean', 'raw_scale']
    """
    return {"mean": state.params, "raw_scale": state.raw_scale, "factor": state.factor}


def sample_variational(
    key: PRNGKey, variational_params: dict[str, Params], num_samples: int
) -> Params:
    r"""``num_samples`` draws from :math:`q_\phi` given its variational parameters.

    Same as :func:`sample` for a dict ``{"mean", "raw_scale", "factor"}`` (for example a
    Gaussian prior stored in variational form), stacked on a leading axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0)),
      ...        "factor": jnp.zeros((1, 2))}
      >>> sample_variational(jax.random.key(0), phi, 3).shape
      (3, 2)
    """
    _check_positive_int("num_samples", num_samples)
    noise = _draw_low_rank_noise(
        key, variational_params["mean"], _rank(variational_params["factor"]), num_samples
    )
    return jax.vmap(_reparameterise, in_axes=(None, 0))(variational_params, noise)


def log_density(variational_params: dict[str, Params], params: Params) -> jax.Array:
    r""":math:`\log q_\phi(\theta)`, exact, in :math:`O(dK^2 + K^3)`.

    .. math:: -\tfrac12\big(d \log 2\pi + \log\det\Sigma + r^\top D^{-1} r
              - u^\top M^{-1} u\big), \quad r = \theta - \mu,\; u = W D^{-1} r.

    Args:
      variational_params: ``{"mean", "raw_scale", "factor"}``.
      params: the point :math:`\theta`, structured like the mean.

    Returns:
      Scalar log density.

    Raises:
      ValueError: if ``params`` does not have the structure of the mean.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(1.0)]),
      ...        "factor": jnp.ones((1, 1))}  # variance 1 + 1 = 2
      >>> round(float(log_density(phi, jnp.zeros(1))), 4)  # -log(4 pi) / 2
      -1.2655
    """
    mean = variational_params["mean"]
    _check_same_structure(mean, params)
    inverse_variance, cholesky, log_det = _capacitance(variational_params)
    residual = jax.tree.map(lambda x, m: _float(x) - _float(m), params, mean)
    scaled = jax.tree.map(jnp.multiply, residual, inverse_variance)
    quadratic = _tree_dot(residual, scaled)
    projected = _factor_matvec(variational_params["factor"], scaled)
    solved = jax.scipy.linalg.cho_solve((cholesky, True), projected)
    quadratic = quadratic - jnp.dot(projected, solved)
    dim = _size(mean)
    return -0.5 * (dim * _LOG_2PI + log_det + quadratic)


def entropy(variational_params: dict[str, Params]) -> jax.Array:
    r"""Exact entropy :math:`\tfrac12\big(d(1 + \log 2\pi) + \log\det\Sigma\big)`.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(1.0)]),
      ...        "factor": jnp.zeros((2, 1))}
      >>> round(float(entropy(phi)), 4)  # log(2 pi e) / 2
      1.4189
    """
    log_det = _log_det(variational_params)
    return 0.5 * (_size(variational_params["mean"]) * (1.0 + _LOG_2PI) + log_det)


def kl_divergence(
    variational_params: dict[str, Params], prior_precision: float | jax.Array
) -> jax.Array:
    r"""Closed-form :math:`\mathrm{KL}(q_\phi \Vert \mathcal{N}(0, \lambda^{-1} I))`.

    .. math:: \tfrac12\big(\lambda(\operatorname{tr}\Sigma + \lVert\mu\rVert^2) - d
              - d\log\lambda - \log\det\Sigma\big), \quad
              \operatorname{tr}\Sigma = \textstyle\sum_i \sigma_i^2 + \lVert W\rVert_F^2.

    Args:
      variational_params: ``{"mean", "raw_scale", "factor"}``.
      prior_precision: :math:`\lambda > 0`.

    Returns:
      Scalar KL divergence.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0)),
      ...        "factor": jnp.zeros((1, 2))}
      >>> round(float(kl_divergence(phi, 1.0)), 6)  # q equals the prior
      0.0
    """
    log_det = _log_det(variational_params)
    std = standard_deviation(variational_params)
    trace = _tree_dot(std, std) + _tree_dot(
        variational_params["factor"], variational_params["factor"]
    )
    mean = variational_params["mean"]
    dim = _size(mean)
    return 0.5 * (
        prior_precision * (trace + _tree_dot(mean, mean))
        - dim
        - dim * jnp.log(prior_precision)
        - log_det
    )


def kl_divergence_between(
    variational_params: dict[str, Params], prior: dict[str, Params]
) -> jax.Array:
    r"""Closed-form :math:`\mathrm{KL}(q \Vert p)` between two diagonal-plus-low-rank Gaussians.

    .. math:: \tfrac12\big(\operatorname{tr}(\Sigma_p^{-1}\Sigma_q) + (\mu_p - \mu_q)^\top
              \Sigma_p^{-1}(\mu_p - \mu_q) - d + \log\det\Sigma_p - \log\det\Sigma_q\big),

    with :math:`\Sigma_p^{-1} = D_p^{-1} - U U^\top` (Woodbury) so every term costs
    :math:`O(d (K_p + K_q)^2)`; the two ranks may differ.

    Args:
      variational_params: :math:`q`'s ``{"mean", "raw_scale", "factor"}``.
      prior: :math:`p`'s ``{"mean", "raw_scale", "factor"}`` with the same mean structure.

    Returns:
      Scalar KL divergence.

    Raises:
      ValueError: if the means are structured differently.

    Example:
      >>> import jax.numpy as jnp
      >>> q = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(1.0)]),
      ...      "factor": jnp.zeros((1, 1))}
      >>> p = {"mean": jnp.ones(1), "raw_scale": jnp.array([inverse_softplus(1.0)]),
      ...      "factor": jnp.ones((2, 1))}  # N(1, 3)
      >>> round(float(kl_divergence_between(q, p)), 5)  # (1/3 + 1/3 - 1 + log 3) / 2
      0.38264
    """
    _check_same_structure(prior["mean"], variational_params["mean"])
    q_std, _ = ravel_pytree(jax.tree.map(_float, standard_deviation(variational_params)))
    p_std, _ = ravel_pytree(jax.tree.map(_float, standard_deviation(prior)))
    q_factor = _factor_rows(variational_params["factor"])
    p_factor = _factor_rows(prior["factor"])
    p_inverse_variance = 1.0 / (p_std * p_std)
    _, p_cholesky, p_log_det = _capacitance(prior)
    q_log_det = _log_det(variational_params)
    # Sigma_p^-1 = D^-1 - U U^T with U = D^-1 W^T L^-T
    # (a K x K inverse then a product: XLA:CPU's triangular solve with d right-hand sides
    # is ~20x slower)
    inverse_cholesky = jax.scipy.linalg.solve_triangular(
        p_cholesky, jnp.eye(p_cholesky.shape[0], dtype=p_cholesky.dtype), lower=True
    )
    u = (inverse_cholesky @ (p_factor * p_inverse_variance[None, :])).T
    q_variance = q_std * q_std
    trace = (
        jnp.sum(q_variance * p_inverse_variance)
        + jnp.sum(q_factor * q_factor * p_inverse_variance[None, :])
        - jnp.sum(q_variance[:, None] * u * u)
        - jnp.sum((q_factor @ u) ** 2)
    )
    difference = (
        ravel_pytree(jax.tree.map(_float, prior["mean"]))[0]
        - ravel_pytree(jax.tree.map(_float, variational_params["mean"]))[0]
    )
    quadratic = jnp.sum(difference * difference * p_inverse_variance) - jnp.sum(
        (u.T @ difference) ** 2
    )
    dim = difference.shape[0]
    return 0.5 * (trace + quadratic - dim + p_log_det - q_log_det)


def covariance_vector_product(variational_params: dict[str, Params], vector: Params) -> Params:
    r""":math:`\Sigma v = \sigma^2 \odot v + W^\top (W v)` in :math:`O(dK)`.

    Args:
      variational_params: ``{"mean", "raw_scale", "factor"}``.
      vector: a pytree structured like the mean.

    Returns:
      :math:`\Sigma v`, structured like ``vector``.

    Raises:
      ValueError: if ``vector`` does not have the structure of the mean.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0)),
      ...        "factor": jnp.array([[1.0, 1.0]])}  # Sigma = I + 1 1^T
      >>> covariance_vector_product(phi, jnp.array([1.0, 0.0]))
      Array([2., 1.], dtype=float32)
    """
    _check_same_structure(variational_params["mean"], vector)
    std = standard_deviation(variational_params)
    factor = variational_params["factor"]
    coefficients = _factor_matvec(factor, jax.tree.map(_float, vector))
    low_rank = _factor_rmatvec(factor, coefficients)
    return jax.tree.map(lambda v, s, u: (s * s * v + u).astype(v.dtype), vector, std, low_rank)


def fisher_inverse_vector_product(variational_params: dict[str, Params], vector: Params) -> Params:
    r""":math:`F_{\mu\mu}^{-1} v`: the inverse Fisher of the mean times ``vector``.

    For a Gaussian :math:`q`, :math:`F_{\mu\mu} = \Sigma^{-1}`, so this is
    :func:`covariance_vector_product` (the SA-BMA mean perturbation :math:`\Sigma g_\mu`).

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(2.0)]),
      ...        "factor": jnp.zeros((1, 1))}
      >>> fisher_inverse_vector_product(phi, jnp.ones(1))
      Array([4.], dtype=float32)
    """
    return covariance_vector_product(variational_params, vector)


def covariance_matrix(variational_params: dict[str, Params]) -> jax.Array:
    r"""The dense :math:`d \times d` covariance, in :func:`ravel_pytree` order.

    Costs :math:`O(d^2)` memory: for small models, tests and diagnostics only.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0)),
      ...        "factor": jnp.array([[1.0, 2.0]])}
      >>> covariance_matrix(phi)
      Array([[2., 2.],
             [2., 5.]], dtype=float32)
    """
    std, _ = ravel_pytree(standard_deviation(variational_params))
    rows = jax.vmap(lambda row: ravel_pytree(row)[0])(variational_params["factor"])
    return jnp.diag(_float(std) ** 2) + _float(rows).T @ _float(rows)


# Private helpers ------------------------------------------------------------------------


def _reparameterise(variational: dict[str, Params], noise: tuple[Params, jax.Array]) -> Params:
    diagonal_noise, factor_noise = noise
    std = standard_deviation(variational)
    low_rank = _factor_rmatvec(variational["factor"], factor_noise)
    return jax.tree.map(
        lambda m, s, z, u: (m + s * z + u).astype(m.dtype),
        variational["mean"],
        std,
        diagonal_noise,
        low_rank,
    )


def _draw_low_rank_noise(
    key: PRNGKey, params: Params, rank: int, num_samples: int
) -> tuple[Params, jax.Array]:
    """``(z_1, z_2)`` with leading axes ``num_samples``, from one ``normal_like`` draw."""
    return _draw_noise(key, (params, jnp.zeros((rank,), jnp.float32)), num_samples)


def _capacitance(variational_params: dict[str, Params]) -> tuple[Params, jax.Array, jax.Array]:
    """``(D^{-1}, cholesky(M), log det Sigma)`` with ``M = I + W D^{-1} W^T``."""
    std = jax.tree.map(_float, standard_deviation(variational_params))
    inverse_variance, _, cholesky = _capacitance_parts(std, variational_params["factor"])
    return inverse_variance, cholesky, _log_det(variational_params)


def _log_det(variational_params: dict[str, Params]) -> jax.Array:
    """``log det Sigma`` of ``{"raw_scale", "factor"}``, with its closed-form derivative."""
    std = jax.tree.map(_float, standard_deviation(variational_params))
    return _log_det_covariance(std, variational_params["factor"])


def _capacitance_parts(std: Params, factor: Params) -> tuple[Params, Params, jax.Array]:
    """``(D^{-1}, W D^{-1}, cholesky(M))``, per leaf except the K x K Cholesky factor."""
    rank = _rank(factor)
    inverse_variance = jax.tree.map(lambda s: 1.0 / (s * s), std)
    scaled = jax.tree.map(lambda w, a: _float(w) * a[None], factor, inverse_variance)
    capacitance = jnp.eye(rank, dtype=jnp.result_type(float))
    for a, w in zip(jax.tree.leaves(scaled), jax.tree.leaves(factor), strict=True):
        capacitance = capacitance + gram(a.reshape(rank, -1), _float(w).reshape(rank, -1))
    return inverse_variance, scaled, jnp.linalg.cholesky(capacitance)


@jax.custom_jvp
def _log_det_covariance(std: Params, factor: Params) -> jax.Array:
    r""":math:`\log\det(\operatorname{diag}(\sigma^2) + W^\top W)` (determinant lemma).

    The derivative is given in closed form, :math:`d\log\det\Sigma =
    \operatorname{tr}(\Sigma^{-1} d\Sigma) = \sum_i 2\sigma_i (\Sigma^{-1})_{ii}\,
    d\sigma_i + 2\langle W\Sigma^{-1}, dW\rangle`, with :math:`W\Sigma^{-1} = M^{-1} W
    D^{-1}` (push-through identity) and :math:`\operatorname{diag}\Sigma^{-1} = D^{-1} -
    \operatorname{diag}(D^{-1}W^\top M^{-1} W D^{-1})`: a few fused passes over the
    factor, instead of differentiating through the Gram product and the Cholesky
    factorisation (whose transposes XLA:CPU runs as slow skinny matrix products).
    """
    _, _, cholesky = _capacitance_parts(std, factor)
    return _log_det_from(std, cholesky)


def _log_det_from(std: Params, cholesky: jax.Array) -> jax.Array:
    log_det = 2.0 * sum(jnp.sum(jnp.log(s)) for s in jax.tree.leaves(std))
    return log_det + 2.0 * jnp.sum(jnp.log(jnp.diagonal(cholesky)))


@_log_det_covariance.defjvp
def _log_det_covariance_jvp(primals, tangents):
    std, factor = primals
    std_tangent, factor_tangent = tangents
    rank = _rank(factor)
    inverse_variance, scaled, cholesky = _capacitance_parts(std, factor)
    inverse_cholesky = jax.scipy.linalg.solve_triangular(
        cholesky, jnp.eye(rank, dtype=cholesky.dtype), lower=True
    )
    capacitance_inverse = inverse_cholesky.T @ inverse_cholesky
    sigma_inverse_factor = jax.tree.map(  # W Sigma^-1 = M^-1 W D^-1, per leaf (K, ...)
        lambda a: small_matmul(capacitance_inverse, a), scaled
    )
    tangent = 0.0
    for s, ds, a, sc, b, dw in zip(
        jax.tree.leaves(std),
        jax.tree.leaves(std_tangent),
        jax.tree.leaves(inverse_variance),
        jax.tree.leaves(scaled),
        jax.tree.leaves(sigma_inverse_factor),
        jax.tree.leaves(factor_tangent),
        strict=True,
    ):
        inverse_diagonal = a - jnp.sum(sc * b, axis=0)
        tangent = tangent + 2.0 * jnp.sum(s * inverse_diagonal * _float(ds))
        tangent = tangent + 2.0 * jnp.sum(b * _float(dw))
    return _log_det_from(std, cholesky), tangent


def _factor_matvec(factor: Params, vector: Params) -> jax.Array:
    """``W v``: a length-``K`` vector."""
    rank = _rank(factor)
    return sum(
        _float(w).reshape(rank, -1) @ _float(v).reshape(-1)
        for w, v in zip(jax.tree.leaves(factor), jax.tree.leaves(vector), strict=True)
    )


def _factor_rmatvec(factor: Params, coefficients: jax.Array) -> Params:
    """``W^T c``: a pytree like the mean (float32 or wider)."""
    return jax.tree.map(lambda w: jnp.tensordot(coefficients, _float(w), axes=1), factor)


def _resolve_init_factor_std(init_factor_std: float | None, init_std: float, rank: int) -> float:
    if init_factor_std is None:
        return init_std / math.sqrt(rank)
    if isinstance(init_factor_std, bool) or not isinstance(init_factor_std, int | float):
        raise ValueError(f"init_factor_std must be a number >= 0, got {init_factor_std!r}.")
    if not init_factor_std >= 0 or not math.isfinite(init_factor_std):
        raise ValueError(f"init_factor_std must be a finite number >= 0, got {init_factor_std}.")
    return float(init_factor_std)


def _factor_rows(factor: Params) -> jax.Array:
    """The factor as a ``(K, d)`` matrix in :func:`ravel_pytree` order of the mean."""
    return jax.vmap(lambda row: ravel_pytree(jax.tree.map(_float, row))[0])(factor)


def _check_prior(prior: object) -> None:
    if not isinstance(prior, dict) or set(prior) != {"mean", "raw_scale", "factor"}:
        got = sorted(prior) if isinstance(prior, dict) else type(prior).__name__
        raise ValueError(
            'prior must be a dict {"mean", "raw_scale", "factor"} (variational form of a '
            f"diagonal-plus-low-rank Gaussian), got {got}."
        )
    _check_same_structure(prior["mean"], prior["raw_scale"])
    _rank(prior["factor"])


def _rank(factor: Params) -> int:
    ranks = {jnp.shape(x)[0] for x in jax.tree.leaves(factor)}
    if len(ranks) != 1:
        raise ValueError(f"factor leaves have inconsistent leading (rank) axes {sorted(ranks)}.")
    return ranks.pop()


def _size(tree: Params) -> int:
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def _tree_dot(left: Params, right: Params) -> jax.Array:
    return sum(
        jnp.sum(_float(a) * _float(b))
        for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True)
    )


def _float(x: jax.Array) -> jax.Array:
    """Casts low-precision floats up to float32 for the density algebra."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
