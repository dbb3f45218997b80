r"""Mean-field Gaussian variational inference (Bayes by backprop) as a posterior family.

The family fits a fully factorised Gaussian

.. math:: q_\phi(\theta) = \mathcal{N}\big(\mu, \operatorname{diag}(\sigma^2)\big), \qquad
          \sigma = \operatorname{softplus}(s), \qquad \phi = \{\mu, s\},

to the tempered posterior :math:`p_T(\theta \mid \mathcal{D}) \propto
\exp(-N U_{\text{lik}}(\theta)/T)\, p(\theta)^{1/T}` with the isotropic Gaussian prior
:math:`p = \mathcal{N}(0, \lambda^{-1} I)`, by minimising the per-datum negative ELBO

.. math::

    \mathcal{F}(\phi) = \mathbb{E}_{\xi \sim \mathcal{N}(0, I)}
        \big[U_{\text{lik}}(\mu + \sigma \odot \xi)\big]
        + \frac{T}{N}\, \mathrm{KL}\big(q_\phi \,\Vert\, p\big),

where :math:`U_{\text{lik}}` is the mean negative log-likelihood of the mini-batch. The
expectation is estimated with ``num_mc_samples`` reparameterised draws per step (vmapped);
the KL is in closed form,

.. math:: \mathrm{KL}(q \Vert p) = \tfrac12 \sum_i \big(\lambda \sigma_i^2 + \lambda \mu_i^2
          - 1 - \log(\lambda \sigma_i^2)\big).

**The loss must be likelihood-only.** Build ``loss_fn`` with ``prior_precision=0`` (the
default of :mod:`bnn_flat.objectives`) and give the prior precision :math:`\lambda` to
:func:`build`: the prior enters through the KL term, and a prior inside the loss would be
counted twice. :func:`build` raises a ``ValueError`` when it can see a nonzero prior in a
loss made by :mod:`bnn_flat.objectives`; it cannot inspect other loss functions.

**Scale parameterisation.** :math:`\sigma = \operatorname{softplus}(s)` with the raw scale
:math:`s` (state field ``raw_scale``) unconstrained; softplus keeps gradients bounded for
large scales, unlike :math:`\exp`. :func:`standard_deviation` returns :math:`\sigma`.

**The optimizer acts on** :math:`\phi` = ``{"mean": mu, "raw_scale": s}``. The family passes
``grad_fn(phi')``: the gradient of :math:`\mathcal{F}` at other variational parameters with
the *same* noise :math:`\xi` and batch. So ``optax.chain(transforms.sam(0.05), optax.adam(1e-3))``
is SAM in :math:`\phi` space (mean and raw scale perturbed together).

**Flat VI of F-BNN** (Nguyen et al. 2023) instead perturbs the *sampled weights*:
:math:`\theta = \mu + \sigma \odot \xi`, :math:`\theta' = \theta + \rho g_\theta/\lVert
g_\theta \rVert`, and back-propagates :math:`\nabla U(\theta')` to :math:`(\mu, s)` with the
perturbation held constant. Since :math:`\partial \theta / \partial \mu = I`, the gradient
with respect to the mean *is* the gradient with respect to the sampled weights, and moving
:math:`\theta` by :math:`\epsilon` is moving :math:`\mu` by :math:`\epsilon` with :math:`\xi`
fixed. Hence F-BNN flat VI is SAM applied to the mean only::

    optax.chain(mean_field_vi.mean_only(transforms.sam(0.05)), optax.adam(1e-3))

With one Monte-Carlo sample this is exactly "SAM at the sampled :math:`\theta`, chain rule to
:math:`(\mu, s)`", where the SAM step sees the per-sample objective including the
:math:`\mu`-gradient :math:`(T/N)\lambda\mu` of the KL term (as SAM on the point family sees
the prior inside the loss). F-BNN's paper keeps the KL outside the perturbation; the two
differ by terms of order :math:`\rho T \lambda / N` in the gradient
(``tests/test_posterior_vi.py`` checks the exact identity, and agreement with the paper's
form when :math:`T\lambda/N` is negligible). With several Monte-Carlo samples the
perturbation is shared by the samples (computed from their mean gradient).

References:
  Blundell, Cornebise, Kavukcuoglu, Wierstra. Weight Uncertainty in Neural Networks.
  ICML 2015.
  Nguyen, Vuong, Phan, Do, Phung, Le. Flat Seeking Bayesian Neural Networks. NeurIPS 2023.
  Ujváry, Telek, Kerekes, Mészáros, Huszár. Rethinking Sharpness-Aware Minimization as
  Variational Inference. 2022.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_flat._fusion import computed_once, fence
from bnn_flat._native.conv import calls_native_convolutions
from bnn_flat.posteriors._common import check_perturbed_dropout
from bnn_flat.transforms import make_split_grad_fn, normal_like
from bnn_flat.types import Batch, Info, LossFn, ModelState, Params, Posterior, PRNGKey

__all__ = [
    "MeanFieldVIState",
    "build",
    "init",
    "update",
    "sample",
    "log_prob",
    "variational_parameters",
    "standard_deviation",
    "log_density",
    "entropy",
    "kl_divergence",
    "mean_only",
    "inverse_softplus",
]

_LOG_2PI = math.log(2 * math.pi)


class MeanFieldVIState(NamedTuple):
    """State of the mean-field VI family.

    Attributes:
      params: the variational mean :math:`\\mu` (the point estimate).
      model_state: BatchNorm statistics or ``{}`` (mean over the Monte-Carlo samples of
        the states returned by the clean pass).
      opt_state: optimizer state over ``{"mean": params, "raw_scale": raw_scale}``.
      step: number of updates done (int32 scalar).
      raw_scale: unconstrained scales :math:`s`, :math:`\\sigma = \\operatorname{softplus}(s)`.
    """

    params: Params
    model_state: ModelState
    opt_state: optax.OptState
    step: jax.Array
    raw_scale: Params


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_data: int,
    prior_precision: float,
    temperature: float = 1.0,
    init_std: float = 1e-3,
    num_mc_samples: int = 1,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""Builds the mean-field Gaussian VI family.

    Args:
      loss_fn: *likelihood-only* per-datum objective (``prior_precision=0`` in
        :mod:`bnn_flat.objectives`).
      optimizer: any optax transformation over ``{"mean", "raw_scale"}``; sharpness-aware
        transforms receive ``grad_fn`` evaluating the negative ELBO with the same noise and
        batch. Wrap a transform in :func:`mean_only` to act on the mean alone.
      num_data: training-set size :math:`N`.
      prior_precision: precision :math:`\lambda > 0` of the prior :math:`N(0, \lambda^{-1} I)`.
      temperature: :math:`T > 0`; the KL weight is :math:`T/N`.
      init_std: initial :math:`\sigma` of every parameter (> 0).
      num_mc_samples: reparameterised draws per step (vmapped).
      perturbed_dropout: ``"fresh"`` or ``"same"`` dropout mask in ``grad_fn`` passes, as in
        :func:`bnn_flat.posteriors.point.build`.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`MeanFieldVIState`.

    Raises:
      ValueError: on a non-positive ``num_data``, ``prior_precision``, ``temperature``,
        ``init_std`` or ``num_mc_samples``, an unknown ``perturbed_dropout``, or a loss made
        by :mod:`bnn_flat.objectives` with a nonzero prior.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> family = build(loss_fn, optax.adam(1e-2), num_data=4, prior_precision=1.0)
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> state, info = family.update(jax.random.key(0), state, batch)
      >>> family.sample(jax.random.key(1), state, 5)["w"].shape
      (5, 3, 2)
    """
    _check_positive_int("num_data", num_data)
    _check_positive_number("prior_precision", prior_precision)
    _check_positive_number("temperature", temperature)
    _check_positive_number("init_std", init_std)
    _check_positive_int("num_mc_samples", num_mc_samples)
    check_perturbed_dropout(perturbed_dropout)
    _check_likelihood_only(loss_fn)
    kl_weight = temperature / num_data

    def init_fn(params: Params, model_state: ModelState | None = None) -> MeanFieldVIState:
        return init(params, model_state, optimizer, init_std=init_std)

    def update_fn(
        key: PRNGKey, state: MeanFieldVIState, batch: Batch
    ) -> tuple[MeanFieldVIState, Info]:
        return update(
            key,
            state,
            batch,
            loss_fn,
            optimizer,
            prior_precision=prior_precision,
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
    init_std: float = 1e-3,
) -> MeanFieldVIState:
    """Initial state: mean ``params``, every standard deviation ``init_std``.

    Args:
      params: initial mean (a pytree of floating arrays).
      model_state: BatchNorm statistics or ``None`` (stored as ``{}``).
      optimizer: the optimizer over ``{"mean", "raw_scale"}``.
      init_std: initial standard deviation (> 0).

    Returns:
      A :class:`MeanFieldVIState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), init_std=0.5)
      >>> [round(float(s), 5) for s in standard_deviation(variational_parameters(state))["w"]]
      [0.5, 0.5]
    """
    _check_params(params)
    _check_positive_number("init_std", init_std)
    raw_scale = jax.tree.map(lambda x: jnp.full_like(x, inverse_softplus(init_std)), params)
    variational = {"mean": params, "raw_scale": raw_scale}
    return MeanFieldVIState(
        params=params,
        model_state={} if model_state is None else model_state,
        opt_state=optimizer.init(variational),
        step=jnp.zeros((), jnp.int32),
        raw_scale=raw_scale,
    )


def update(
    key: PRNGKey,
    state: MeanFieldVIState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    prior_precision: float,
    kl_weight: float,
    num_mc_samples: int = 1,
    perturbed_dropout: str = "fresh",
) -> tuple[MeanFieldVIState, Info]:
    r"""One optimizer step on the per-datum negative ELBO :math:`\mathcal{F}(\phi)`.

    ``jax.random.split(key, 2 + num_mc_samples)`` gives the noise key, the transform key
    and one dropout key per Monte-Carlo sample; the noise :math:`\xi` is
    ``normal_like(noise_key, num_mc_samples stacked copies of params)``.

    Args:
      key: PRNG key.
      state: current state.
      batch: mini-batch.
      loss_fn: likelihood-only per-datum objective.
      optimizer: optimizer over ``{"mean", "raw_scale"}``.
      prior_precision: prior precision :math:`\lambda`.
      kl_weight: :math:`T/N`.
      num_mc_samples: reparameterised draws.
      perturbed_dropout: ``"fresh"`` or ``"same"``.

    Returns:
      ``(new_state, info)``; ``info.loss`` is :math:`\mathcal{F}` at the old parameters,
      ``info.metrics`` the loss metrics averaged over samples plus ``"kl"``
      (:math:`\mathrm{KL}(q \Vert p)`, not divided by :math:`N`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> from bnn_flat import objectives
      >>> loss_fn = objectives.regression_loss(apply, num_data=2)
      >>> state = init({"w": jnp.zeros((1, 1))}, None, optax.sgd(0.1))
      >>> batch = {"inputs": jnp.ones((2, 1)), "labels": jnp.ones(2)}
      >>> state, info = update(jax.random.key(0), state, batch, loss_fn, optax.sgd(0.1),
      ...                      prior_precision=1.0, kl_weight=0.5)
      >>> int(state.step)
      1
    """
    variational = variational_parameters(state)
    variational, opt_state, model_state, info = _variational_step(
        key,
        variational,
        state.opt_state,
        state.model_state,
        batch,
        loss_fn,
        optimizer,
        draw_noise=lambda noise_key: _draw_noise(noise_key, state.params, num_mc_samples),
        reparameterise=_reparameterise,
        kl_fn=lambda phi: kl_divergence(phi, prior_precision),
        kl_weight=kl_weight,
        num_mc_samples=num_mc_samples,
        perturbed_dropout=perturbed_dropout,
    )
    new_state = MeanFieldVIState(
        params=variational["mean"],
        model_state=model_state,
        opt_state=opt_state,
        step=state.step + 1,
        raw_scale=variational["raw_scale"],
    )
    return new_state, info


def sample(key: PRNGKey, state: MeanFieldVIState, num_samples: int) -> Params:
    r"""``num_samples`` draws :math:`\mu + \sigma \odot z`, stacked on a leading axis.

    Args:
      key: PRNG key.
      state: a :class:`MeanFieldVIState`.
      num_samples: number of draws (positive Python int).

    Returns:
      A pytree like ``state.params`` with a leading axis of size ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(3)}, None, optax.sgd(0.1), init_std=1.0)
      >>> sample(jax.random.key(0), state, 4)["w"].shape
      (4, 3)
    """
    _check_positive_int("num_samples", num_samples)
    noise = _draw_noise(key, state.params, num_samples)
    return jax.vmap(_reparameterise, in_axes=(None, 0))(variational_parameters(state), noise)


def log_prob(state: MeanFieldVIState, params: Params) -> jax.Array:
    """Log density :math:`\\log q(\\theta)` of the variational posterior at ``params``.

    Args:
      state: a :class:`MeanFieldVIState`.
      params: a pytree with the structure of ``state.params``.

    Returns:
      Scalar: the sum of the per-parameter Normal log densities.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(1)}, None, optax.sgd(0.1), init_std=1.0)
      >>> round(float(log_prob(state, {"w": jnp.zeros(1)})), 4)  # -log(2 pi) / 2
      -0.9189
    """
    return log_density(variational_parameters(state), params)


# Variational-parameter helpers ----------------------------------------------------------


def variational_parameters(state: MeanFieldVIState) -> dict[str, Params]:
    """The variational parameters :math:`\\phi` = ``{"mean", "raw_scale"}`` of a state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1))
      >>> sorted(variational_parameters(state))
      ['mean', 'raw_scale']
    """
    return {"mean": state.params, "raw_scale": state.raw_scale}


def standard_deviation(variational_params: dict[str, Params]) -> Params:
    """Per-parameter standard deviation :math:`\\sigma = \\operatorname{softplus}(s)`.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(0.3)])}
      >>> round(float(standard_deviation(phi)[0]), 6)
      0.3
    """
    return jax.tree.map(jax.nn.softplus, variational_params["raw_scale"])


def log_density(variational_params: dict[str, Params], params: Params) -> jax.Array:
    """:math:`\\log q_\\phi(\\theta)`: the sum of Normal log densities.

    Args:
      variational_params: ``{"mean", "raw_scale"}``.
      params: the point :math:`\\theta`, structured like the mean.

    Returns:
      Scalar log density.

    Raises:
      ValueError: if ``params`` does not have the structure of the mean.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(1.0)])}
      >>> round(float(log_density(phi, jnp.ones(1))), 4)  # -1/2 - log(2 pi)/2
      -1.4189
    """
    mean = variational_params["mean"]
    _check_same_structure(mean, params)
    std = standard_deviation(variational_params)
    terms = jax.tree.map(
        lambda x, m, s: jnp.sum(-0.5 * jnp.square((x - m) / s) - jnp.log(s) - 0.5 * _LOG_2PI),
        params,
        mean,
        std,
    )
    return sum(jax.tree.leaves(terms))


def entropy(variational_params: dict[str, Params]) -> jax.Array:
    r"""Entropy :math:`\sum_i \big(\log \sigma_i + \tfrac12 \log(2 \pi e)\big)`.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0))}
      >>> round(float(entropy(phi)), 4)  # log(2 pi e)
      2.8379
    """
    std = standard_deviation(variational_params)
    return sum(jnp.sum(jnp.log(s) + 0.5 * (_LOG_2PI + 1.0)) for s in jax.tree.leaves(std))


def kl_divergence(
    variational_params: dict[str, Params], prior_precision: float | jax.Array
) -> jax.Array:
    r"""Closed-form :math:`\mathrm{KL}(q_\phi \Vert \mathcal{N}(0, \lambda^{-1} I))`.

    .. math:: \tfrac12 \sum_i \big(\lambda \sigma_i^2 + \lambda \mu_i^2 - 1
              - \log(\lambda \sigma_i^2)\big)

    Args:
      variational_params: ``{"mean", "raw_scale"}``.
      prior_precision: :math:`\lambda > 0`.

    Returns:
      Scalar KL divergence.

    Example:
      >>> import jax.numpy as jnp
      >>> phi = {"mean": jnp.zeros(3), "raw_scale": jnp.full(3, inverse_softplus(1.0))}
      >>> round(float(kl_divergence(phi, 1.0)), 6)  # q equals the prior
      0.0
    """
    std = standard_deviation(variational_params)
    terms = jax.tree.map(
        lambda m, s: jnp.sum(
            prior_precision * (jnp.square(s) + jnp.square(m))
            - 1.0
            - jnp.log(prior_precision)
            - 2.0 * jnp.log(s)
        ),
        variational_params["mean"],
        std,
    )
    return 0.5 * sum(jax.tree.leaves(terms))


# The mean-only wrapper (F-BNN flat VI) --------------------------------------------------


def mean_only(
    transform: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    r"""Applies ``transform`` to the ``"mean"`` entry of the variational parameters only.

    The inner transform sees the mean, its gradient, and ``grad_fn`` / ``split_grad_fn``
    restricted to the mean (other entries held at their current values). The other
    entries of the output (``"raw_scale"``, ``"factor"``, ...) are the gradients from the
    inner transform's *last* ``grad_fn`` evaluation, i.e. at the perturbed mean for every
    sharpness-aware transform of :mod:`bnn_flat.transforms` (averaged over sub-batches for
    m-sharpness), so they follow the chain rule from the perturbed sampled weights. If the
    inner transform never calls ``grad_fn`` the other gradients pass through unchanged.

    With ``transform = transforms.sam(rho)`` inside a VI family this is the flat VI of
    F-BNN (see the module docstring). The inner transform must call ``grad_fn`` outside
    any ``jax.lax`` control flow of its own (true of every transform in bnn_flat).

    Args:
      transform: any optax transformation acting on a mean-shaped pytree.

    Returns:
      A transform over dicts with a ``"mean"`` key (the ``phi`` of a VI family).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import transforms
      >>> phi = {"mean": jnp.array([3.0, 4.0]), "raw_scale": jnp.zeros(2)}
      >>> grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(p["mean"] ** 2) + jnp.sum(p["raw_scale"]))
      >>> tx = mean_only(transforms.sam(0.5))
      >>> updates, _ = tx.update(grad_fn(phi), tx.init(phi), phi, grad_fn=grad_fn)
      >>> updates["mean"]  # the gradient at mean + 0.5 * mean / |mean|
      Array([3.3, 4.4], dtype=float32)
    """

    transform = optax.with_extra_args_support(transform)

    def init_fn(params: dict[str, Params]) -> optax.OptState:
        _check_has_mean(params)
        return transform.init(params["mean"])

    def update_fn(
        updates: dict[str, Params],
        state: optax.OptState,
        params: dict[str, Params] | None = None,
        *,
        grad_fn: Callable[[dict[str, Params]], dict[str, Params]] | None = None,
        split_grad_fn: Callable[[dict[str, Params]], dict[str, Params]] | None = None,
        **extra_args: Any,
    ) -> tuple[dict[str, Params], optax.OptState]:
        _check_has_mean(updates)
        captured: list[tuple[bool, dict[str, Params]]] = []
        inner_grad_fn = inner_split_grad_fn = None
        if params is not None and grad_fn is not None:

            def inner_grad_fn(mean: Params) -> Params:
                gradients = grad_fn({**params, "mean": mean})
                captured.append((False, gradients))
                return gradients["mean"]

        if params is not None and split_grad_fn is not None:

            def inner_split_grad_fn(stacked_mean: Params) -> Params:
                size = jax.tree.leaves(stacked_mean)[0].shape[0]
                stacked = {
                    name: jax.tree.map(lambda x: jnp.broadcast_to(x, (size, *x.shape)), value)
                    for name, value in params.items()
                    if name != "mean"
                }
                gradients = split_grad_fn({**stacked, "mean": stacked_mean})
                captured.append((True, gradients))
                return gradients["mean"]

        mean_updates, state = transform.update(
            updates["mean"],
            state,
            None if params is None else params["mean"],
            grad_fn=inner_grad_fn,
            split_grad_fn=inner_split_grad_fn,
            **extra_args,
        )
        new_updates = {**updates, "mean": mean_updates}
        if captured:
            is_split, gradients = captured[-1]
            for name in updates:
                if name == "mean":
                    continue
                value = gradients[name]
                if is_split:
                    value = jax.tree.map(lambda g: jnp.mean(g, axis=0).astype(g.dtype), value)
                new_updates[name] = value
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The variational step shared with low_rank_vi --------------------------------------------


def _variational_step(
    key: PRNGKey,
    variational: dict[str, Params],
    opt_state: optax.OptState,
    model_state: ModelState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    draw_noise: Callable[[PRNGKey], Any],
    reparameterise: Callable[[dict[str, Params], Any], Params],
    kl_fn: Callable[[dict[str, Params]], jax.Array],
    kl_weight: float | jax.Array,
    num_mc_samples: int,
    perturbed_dropout: str,
) -> tuple[dict[str, Params], optax.OptState, ModelState, Info]:
    r"""One optimizer step of a reparameterised Gaussian VI family (shared machinery).

    Minimises :math:`\mathbb{E}_{\xi}[U_{\text{lik}}(\theta(\phi, \xi))] + w\,
    \mathrm{KL}(q_\phi \Vert p)` with ``num_mc_samples`` draws of :math:`\xi` (vmapped), and
    calls the optimizer with ``grad_fn``/``split_grad_fn`` evaluating the same objective
    with the same :math:`\xi` and batch, and ``samples=`` (the clean pass's draws
    :math:`\theta(\phi, \xi)`, stacked; used by
    :func:`bnn_flat.transforms.sabma_released`). The clean pass's model states are averaged over
    the samples (floating leaves; other leaves are taken from the first sample); ``grad_fn``
    passes never update them.

    Args:
      key: PRNG key, split into the noise key, the transform key and one loss key per
        sample (``jax.random.split(key, 2 + num_mc_samples)``).
      variational: the variational parameters :math:`\phi` (a dict).
      opt_state: optimizer state over ``variational``.
      model_state: BatchNorm statistics or ``{}``.
      batch: mini-batch.
      loss_fn: likelihood-only per-datum objective.
      optimizer: optimizer over ``variational``.
      draw_noise: ``draw_noise(key) -> noise`` with a leading axis of ``num_mc_samples``.
      reparameterise: ``reparameterise(phi, one_noise) -> params``.
      kl_fn: ``kl_fn(phi) -> KL(q || p)``.
      kl_weight: :math:`w = T/N`.
      num_mc_samples: number of draws.
      perturbed_dropout: ``"fresh"`` or ``"same"``.

    Returns:
      ``(new_variational, new_opt_state, new_model_state, info)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p, s)
      >>> loss_fn = objectives.regression_loss(apply, num_data=2)
      >>> phi = {"mean": jnp.zeros((1, 1)), "raw_scale": jnp.zeros((1, 1))}
      >>> out = _variational_step(
      ...     jax.random.key(0), phi, optax.sgd(0.1).init(phi), {},
      ...     {"inputs": jnp.ones((2, 1)), "labels": jnp.ones(2)}, loss_fn, optax.sgd(0.1),
      ...     draw_noise=lambda k: jax.random.normal(k, (1, 1, 1)),
      ...     reparameterise=lambda p, z: p["mean"] + jax.nn.softplus(p["raw_scale"]) * z,
      ...     kl_fn=lambda p: kl_divergence(p, 1.0), kl_weight=0.5, num_mc_samples=1,
      ...     perturbed_dropout="fresh")
      >>> out[0]["mean"].shape
      (1, 1)
    """
    keys = jax.random.split(key, 2 + num_mc_samples)
    noise_key, transform_key, loss_keys = keys[0], keys[1], keys[2:]
    noise = draw_noise(noise_key)

    def losses_at(thetas, sub_batch, sample_keys):
        if num_mc_samples == 1:
            # no vmap for one draw: a vmapped network is much slower on XLA:CPU (its
            # convolutions and matmuls get a batch dimension), and the math is the same
            single_loss, single_aux = loss_fn(
                jax.tree.map(lambda t: t[0], thetas), model_state, sub_batch, sample_keys[0]
            )
            return single_loss[None], jax.tree.map(lambda x: jnp.asarray(x)[None], single_aux)
        return jax.vmap(loss_fn, in_axes=(0, None, None, 0))(
            thetas, model_state, sub_batch, sample_keys
        )

    def draws(phi):
        if num_mc_samples == 1:
            theta = reparameterise(phi, jax.tree.map(lambda z: z[0], noise))
            return jax.tree.map(lambda t: t[None], theta)
        return jax.vmap(reparameterise, in_axes=(None, 0))(phi, noise)

    def unstaged_value_and_grad(phi, sub_batch, sample_keys):
        def objective(p):
            losses, aux = losses_at(draws(p), sub_batch, sample_keys)
            kl = kl_fn(p)
            return jnp.mean(losses) + kl_weight * kl, (aux, kl)

        return jax.value_and_grad(objective, has_aux=True)(phi)

    def staged_value_and_grad(phi, sub_batch, sample_keys):
        # The chain rule in stages, each stored before the next starts: the draws, the
        # network's loss and its gradient with respect to the draws, then the pull-back to
        # the variational parameters. Otherwise XLA runs the per-parameter work of the
        # draws and the pull-back beside the network's layers, and when those are oneDNN
        # convolutions, whose OpenMP threads occupy every core, both slow down (LeNet
        # SA-BMA: 13% of the convolution time overlapped, each convolution 1.35x slower;
        # step 2.60x -> 2.36x an SGD step). Networks without them keep the fused form (an
        # MLP step is faster fused). The same gradients, up to rounding.
        thetas, pull_back = jax.vjp(draws, phi)
        thetas = computed_once(lambda t: t, thetas)

        def mean_loss(t):
            losses, aux = losses_at(t, sub_batch, sample_keys)
            return jnp.mean(losses), aux

        (loss, aux), theta_grads = jax.value_and_grad(mean_loss, has_aux=True)(thetas)
        theta_grads = computed_once(lambda g: g, theta_grads)
        kl, kl_grads = jax.value_and_grad(kl_fn)(phi)
        (grads,) = pull_back(theta_grads)
        grads = jax.tree.map(lambda g, k: g + kl_weight * k.astype(g.dtype), grads, kl_grads)
        return (loss + kl_weight * kl, (aux, kl)), grads

    staged = calls_native_convolutions(
        lambda t: losses_at(t, batch, loss_keys), jax.eval_shape(draws, variational)
    )
    value_and_grad = staged_value_and_grad if staged else unstaged_value_and_grad
    (loss, (aux, kl)), grads = value_and_grad(variational, batch, loss_keys)
    counters = {"whole": 0, "split": 0}

    def call_keys(kind):
        # dropout keys of a grad_fn / split_grad_fn call: the clean pass's, or fresh ones
        counters[kind] += 1
        return loss_keys if perturbed_dropout == "same" else _fold_in(loss_keys, counters[kind])

    def grad_fn(phi):
        sample_keys = call_keys("whole")
        # a transform's perturbed posterior (SA-BMA: phi + rho F^-1 g / |g|_F) is read by the
        # draws, the KL and the pull-back; stored once, rather than recomputed from phi and
        # the direction inside each of those passes (MLP SA-BMA step 29.2 -> 27.1 ms)
        return value_and_grad(fence(phi), batch, sample_keys)[1]

    def split_grad_fn(stacked_phi):
        sample_keys = call_keys("split")

        def batch_grad_fn(phi, sub_batch, index):
            sub_keys = _fold_in(sample_keys, index)
            return value_and_grad(phi, sub_batch, sub_keys)[1]

        return make_split_grad_fn(batch_grad_fn, batch)(stacked_phi)

    samples = jax.lax.stop_gradient(draws(variational))
    updates, opt_state = optimizer.update(
        grads,
        opt_state,
        variational,
        grad_fn=grad_fn,
        split_grad_fn=split_grad_fn,
        value=loss,
        key=transform_key,
        samples=samples,
    )
    variational = optax.apply_updates(variational, updates)
    new_model_state = jax.tree.map(_mean_over_samples, aux.model_state)
    metrics = {name: jnp.mean(value) for name, value in aux.metrics.items()}
    metrics["kl"] = kl
    return variational, opt_state, new_model_state, Info(loss=loss, metrics=metrics)


# Validation helpers shared with low_rank_vi ---------------------------------------------


def _check_likelihood_only(loss_fn: LossFn) -> None:
    """Raises if ``loss_fn`` visibly carries a Gaussian prior (a VI family adds its own).

    Only losses made by :func:`bnn_flat.objectives.make_loss` (and its wrappers) can be
    inspected; other callables pass unchecked.

    Example:
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p, s)
      >>> _check_likelihood_only(objectives.regression_loss(apply, num_data=3))  # fine
    """
    code = getattr(loss_fn, "__code__", None)
    closure = getattr(loss_fn, "__closure__", None)
    if code is None or closure is None or "prior_precision" not in code.co_freevars:
        return
    value = closure[code.co_freevars.index("prior_precision")].cell_contents
    if isinstance(value, numbers.Real) and float(value) != 0.0:
        raise ValueError(
            f"the loss function carries a Gaussian prior (prior_precision={value}); a VI "
            "family adds the prior through its KL term. Build the loss with "
            "prior_precision=0 and pass prior_precision to build()."
        )


def _check_params(params: Params) -> None:
    """Raises a ``ValueError`` on an empty pytree, non-float leaves or non-finite values.

    Example:
      >>> import jax.numpy as jnp
      >>> _check_params({"w": jnp.zeros(2)})
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params is an empty pytree; a VI family needs parameters.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise ValueError(f"params must be floating-point arrays, got dtype {leaf.dtype}.")
        if not isinstance(leaf, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError("params contain NaN or infinite values.")


def _check_same_structure(reference: Params, params: Params) -> None:
    """Raises a ``ValueError`` unless ``params`` has the tree structure and shapes of ``reference``.

    Example:
      >>> import jax.numpy as jnp
      >>> _check_same_structure({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
    """
    if jax.tree.structure(reference) != jax.tree.structure(params):
        raise ValueError(
            "params must have the structure of the posterior mean: "
            f"{jax.tree.structure(params)} vs {jax.tree.structure(reference)}."
        )
    for ref, leaf in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
        if jnp.shape(ref) != jnp.shape(leaf):
            raise ValueError(
                f"params leaf of shape {jnp.shape(leaf)} where the mean has {jnp.shape(ref)}."
            )


def inverse_softplus(value: float) -> float:
    r"""The raw scale :math:`s` with :math:`\operatorname{softplus}(s) = \sigma > 0`.

    Example:
      >>> round(inverse_softplus(math.log(2.0)), 6)
      0.0
    """
    _check_positive_number("value", value)
    value = float(value)
    return value + math.log(-math.expm1(-value))


# Private helpers ------------------------------------------------------------------------


def _reparameterise(variational: dict[str, Params], noise: Params) -> Params:
    std = standard_deviation(variational)
    return jax.tree.map(
        lambda m, s, z: (m + s * z).astype(m.dtype), variational["mean"], std, noise
    )


def _draw_noise(key: PRNGKey, params: Params, num_samples: int) -> Params:
    """Standard normal noise shaped like ``params`` with a leading axis of ``num_samples``."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples, *jnp.shape(x))), params)
    return normal_like(key, stacked)


def _fold_in(keys: PRNGKey, data: int | jax.Array) -> PRNGKey:
    """``fold_in`` of every key of a stack of keys."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def _mean_over_samples(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.mean(x, axis=0).astype(x.dtype)
    return x[0]


def _check_has_mean(tree: Any) -> None:
    if not isinstance(tree, dict) or "mean" not in tree:
        raise ValueError(
            "mean_only expects the variational parameters of a VI family: a dict with a "
            f"'mean' entry, got {type(tree).__name__}."
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, jax.Array | np.ndarray):
            return  # traced or array hyper-parameters are not checked
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
