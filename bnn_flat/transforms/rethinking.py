r"""SAM as variational inference: RandomSAM, MixSAM and Variational SAM (VSAM).

Ujváry et al. (2022) observe that SAM and mean-field VI with the reparameterisation
trick both take the gradient at a perturbed copy of the mean,
:math:`\nabla L(\theta + \epsilon)`: SAM's :math:`\epsilon` is adversarial (norm
:math:`\rho` along the gradient), MFVI's is random. This module provides the rules
between the two, as sharpness-aware transforms (see :mod:`bnn_flat.transforms.sam` for
the ``grad_fn`` contract):

* RandomSAM: :math:`\epsilon = \rho\, \xi / \sqrt{D}`, :math:`\xi \sim N(0, I_D)`:
  isotropic Gaussian noise with standard deviation :math:`\rho/\sqrt{D}`, so
  :math:`\lVert\epsilon\rVert \approx \rho`.
* MixSAM: :math:`v = \sqrt{D}\, g/\lVert g\rVert + \kappa \xi`,
  :math:`u = \sqrt{D}\, v / \lVert v \rVert`, :math:`\epsilon = \rho u / \sqrt{D}`,
  so :math:`\lVert\epsilon\rVert = \rho` exactly; :math:`\kappa = 0` is SAM and
  :math:`\kappa \to \infty` a uniformly random direction on the :math:`\rho`-sphere.
* VSAM: ellipsoidal SAM with a learned per-parameter metric :math:`M`
  (the inverse standard deviation of :math:`q = N(\theta, \operatorname{diag} M^{-2})`),
  :math:`\epsilon = \rho\, g M^{-2} / \sqrt{\sum g^2 / M^2}`.

:math:`D` is the total number of parameters, computed from the parameter pytree (the
released code's ``num_params`` defaulted to 1e6). Mean-field VI itself is a posterior
family (:mod:`bnn_flat.posteriors`), not a transform.

References:
    Ujváry, Telek, Kerekes, Mészáros, Huszár, Rethinking Sharpness-Aware Minimization
    as Variational Inference, OPT workshop at NeurIPS 2022 (arXiv 2210.10452);
    code: ``zsiga007/Rethinking-SAM``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnn_flat.transforms.sam import (
    Direction,
    _add_scaled,
    _as_float32_or_wider,
    _check_number,
    _require_callable,
    _require_key,
    _require_params,
    _sharpness_aware,
    _tree_scale,
    _tree_size,
    _tree_sum_of_squares,
    normal_like,
)
from bnn_flat.types import Params, PRNGKey

__all__ = [
    "random_sam",
    "mix_sam",
    "random_sam_direction",
    "mix_sam_direction",
    "VSAMState",
    "vsam",
    "vsam_inverse_scale_gradient",
]

_RELEASED_PRIOR_VARIANCE = math.sqrt(2.0) / 5.0  # sigma_p default of the released VSAM


def random_sam(
    rho: jax.typing.ArrayLike = 0.05,
    *,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RandomSAM: the gradient at :math:`\theta + \rho \xi/\sqrt{D}`, :math:`\xi \sim N(0, I)`.

    The perturbation ignores the gradient; it is the reparameterisation-trick gradient of
    an isotropic Gaussian :math:`q = N(\theta, \rho^2 I / D)` with fixed variance.

    Args:
        rho: Perturbation scale (the expected norm of :math:`\epsilon` is about
            :math:`\rho`).
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).
        num_sub_batches: m-sharpness (independent noise per sub-batch); see
            :func:`bnn_flat.transforms.sharpness_aware`.

    Returns:
        A transform needing ``params``, ``grad_fn`` and ``key`` in ``update``.

    Raises:
        ValueError: If ``rho`` is negative; at update time, if ``key`` is missing.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import random_sam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.zeros(4)
        >>> tx = random_sam(rho=0.1)
        >>> updates, _ = tx.update(
        ...     grad_fn(w), tx.init(w), w, grad_fn=grad_fn, key=jax.random.key(0)
        ... )
        >>> updates.shape
        (4,)
    """
    direction = random_sam_direction()
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "random_sam")


def mix_sam(
    rho: jax.typing.ArrayLike = 0.05,
    kappa: jax.typing.ArrayLike = 1.0,
    *,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MixSAM: a perturbation of norm :math:`\rho` mixing the gradient and noise.

    .. math::

        v = \sqrt{D}\,\frac{g}{\lVert g \rVert} + \kappa\,\xi, \quad
        u = \sqrt{D}\,\frac{v}{\lVert v \rVert}, \quad
        \epsilon = \rho\, \frac{u}{\sqrt{D}},

    with :math:`\xi \sim N(0, I_D)`. :math:`\kappa = 0` equals SAM (up to rounding) and
    :math:`\lVert \epsilon \rVert = \rho` for every :math:`\kappa`.

    Args:
        rho: Perturbation radius.
        kappa: Noise weight :math:`\kappa \ge 0` (``kappa_scale`` in the released code).
        eps: Added to both norms.
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).
        num_sub_batches: m-sharpness; see :func:`bnn_flat.transforms.sharpness_aware`.

    Returns:
        A transform needing ``params``, ``grad_fn`` and ``key`` in ``update``.

    Raises:
        ValueError: On a negative ``rho`` or ``kappa``; at update time, if ``key`` is
            missing.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import mix_sam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.array([1.0, 2.0])
        >>> tx = mix_sam(rho=0.1, kappa=0.5)
        >>> updates, _ = tx.update(
        ...     grad_fn(w), tx.init(w), w, grad_fn=grad_fn, key=jax.random.key(0)
        ... )
        >>> bool(jnp.isclose(jnp.linalg.norm(updates - w), 0.1))  # here updates = w + eps
        True
    """
    direction = mix_sam_direction(kappa, eps=eps)
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "mix_sam")


def random_sam_direction() -> Direction:
    r"""The RandomSAM direction :math:`\xi / \sqrt{D}`, :math:`\xi \sim N(0, I_D)`.

    The noise is drawn with :func:`bnn_flat.transforms.normal_like` from the ``key`` argument.

    Returns:
        A :class:`bnn_flat.transforms.Direction` that requires a key.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import random_sam_direction
        >>> random_sam_direction()(jnp.zeros(3), jnp.zeros(3), jax.random.key(0)).shape
        (3,)
    """

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del params
        key = _require_key("random_sam", key)
        noise = normal_like(key, gradient)
        return _tree_scale(noise, 1.0 / math.sqrt(_tree_size(gradient)))

    return direction


def mix_sam_direction(
    kappa: jax.typing.ArrayLike = 1.0, *, eps: jax.typing.ArrayLike = 1e-12
) -> Direction:
    r"""The MixSAM direction :math:`v / \lVert v \rVert`.

    Here :math:`v = g/\lVert g\rVert + \kappa \xi/\sqrt{D}`, :math:`\xi \sim N(0, I_D)`.

    (Dividing :math:`v` of :func:`mix_sam` by :math:`\sqrt{D}` leaves
    :math:`v/\lVert v\rVert` unchanged.)

    Args:
        kappa: Noise weight :math:`\kappa \ge 0`.
        eps: Added to both norms.

    Returns:
        A :class:`bnn_flat.transforms.Direction` that requires a key.

    Raises:
        ValueError: On a negative ``kappa``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import mix_sam_direction
        >>> mix_sam_direction(0.0)(jnp.array([3.0, 4.0]), None, jax.random.key(0))
        Array([0.6, 0.8], dtype=float32)
    """
    _check_number("kappa", kappa, minimum=0.0)

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del params
        key = _require_key("mix_sam", key)
        noise = normal_like(key, gradient)
        gradient_scale = 1.0 / (jnp.sqrt(_tree_sum_of_squares(gradient)) + eps)
        noise_scale = kappa / math.sqrt(_tree_size(gradient))
        mixed = jax.tree.map(
            lambda g, n: (
                _as_float32_or_wider(g) * gradient_scale + noise_scale * _as_float32_or_wider(n)
            ),
            gradient,
            noise,
        )
        inverse_norm = 1.0 / (jnp.sqrt(_tree_sum_of_squares(mixed)) + eps)
        return jax.tree.map(lambda v, g: (v * inverse_norm).astype(g.dtype), mixed, gradient)

    return direction


# Variational SAM ----------------------------------------------------------------------


class VSAMState(NamedTuple):
    """State of :func:`vsam`.

    Attributes:
        inverse_scale: :math:`M`, the inverse standard deviation of the variational
            Gaussian :math:`q = N(\\theta, \\operatorname{diag} M^{-2})`; same tree as
            the parameters.
    """

    inverse_scale: Params


def vsam(
    rho: jax.typing.ArrayLike = 0.05,
    learning_rate_m: jax.typing.ArrayLike = 0.01,
    prior_variance: jax.typing.ArrayLike = _RELEASED_PRIOR_VARIANCE,
    *,
    num_data: jax.typing.ArrayLike,
    m_init: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Variational SAM: ellipsoidal SAM whose metric :math:`M` is learned.

    Each step, with the clean gradient :math:`g` (the incoming ``updates``), first takes
    one gradient step on :math:`M` (before perturbing, as the released code does):

    .. math::

        \mathcal{L}_M = \rho \sqrt{\textstyle\sum g^2 / M^2}
            + \frac{1}{2N}\Big(\sum \frac{M^{-2}}{\sigma_p} + \sum \log M^2\Big),
        \qquad M \leftarrow M - \eta_M \nabla_M \mathcal{L}_M,

    where the first term is the linearised sharpness (:math:`g` held fixed) and the second
    is :math:`\mathrm{KL}(N(\theta, M^{-2}) \,\|\, N(0, \sigma_p I))/N` up to constants and
    the :math:`\theta` part (its minimum over :math:`M` is at :math:`M^2 = 1/\sigma_p`).
    Then, with the updated :math:`M`,

    .. math::

        \epsilon = \rho\, \frac{g\, M^{-2}}{\sqrt{\sum g^2 / M^2}}, \qquad
        \text{updates} \leftarrow \nabla L(\theta + \epsilon),

    the maximiser of :math:`g^\top\epsilon` over :math:`\epsilon^\top
    \operatorname{diag}(M^2)\epsilon \le \rho^2`. With :math:`M = c\,\mathbf{1}` this is
    SAM with radius :math:`\rho / c`.

    Deviation from the released code: there :math:`M` sits in the base optimizer, so SGD
    momentum and weight decay also act on it. Here :math:`M` takes a plain gradient step
    with ``learning_rate_m`` (no momentum, no weight decay), independent of the optimizer
    chained after this transform. :math:`D` is computed from the parameter pytree.

    Args:
        rho: Radius :math:`\rho` in the :math:`M`-metric (the released CIFAR example uses
            1000 with :math:`M \approx 1`; it is not SAM's :math:`\rho`).
        learning_rate_m: Step size :math:`\eta_M` of the :math:`M` update.
        prior_variance: :math:`\sigma_p`, the prior *variance* (released default
            :math:`\sqrt 2 / 5`).
        num_data: :math:`N`, the training-set size.
        m_init: Initial value of every entry of :math:`M`. ``None`` uses
            :math:`\sqrt{D}/\rho` as the released code (so :math:`q` has radius about
            :math:`\rho`).
        eps: Added to the normalisers (a zero gradient gives no NaN).
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).

    Returns:
        A transform with state :class:`VSAMState`, needing ``params`` and ``grad_fn`` in
        ``update``.

    Raises:
        ValueError: On negative ``rho``/``learning_rate_m`` or non-positive
            ``prior_variance``/``num_data``/``m_init``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from bnn_flat.transforms import vsam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.array([1.0, 2.0])
        >>> tx = optax.chain(vsam(rho=0.1, num_data=100, m_init=1.0), optax.sgd(0.1))
        >>> state = tx.init(w)
        >>> updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        >>> state[0].inverse_scale.shape
        (2,)

    References:
        Ujváry et al., Rethinking Sharpness-Aware Minimization as Variational
        Inference, 2022, Section "Variational SAM".
    """
    _check_number("rho", rho, minimum=0.0)
    _check_number("learning_rate_m", learning_rate_m, minimum=0.0)
    _check_number("prior_variance", prior_variance, strictly_positive=True)
    _check_number("num_data", num_data, strictly_positive=True)
    if m_init is not None:
        _check_number("m_init", m_init, strictly_positive=True)

    def init_fn(params: Params) -> VSAMState:
        if m_init is None:  # jnp division: rho = 0 gives an infinite M, not an exception
            value = jnp.sqrt(jnp.float32(_tree_size(params))) / rho
        else:
            value = m_init
        return VSAMState(inverse_scale=jax.tree.map(lambda p: jnp.full_like(p, value), params))

    def update_fn(
        updates: Params,
        state: VSAMState,
        params: Params | None = None,
        *,
        grad_fn: Callable[[Params], Params] | None = None,
        **extra_args: Any,
    ) -> tuple[Params, VSAMState]:
        del extra_args
        _require_params("vsam", params)
        _require_callable("vsam", "grad_fn", grad_fn)
        m_gradient = vsam_inverse_scale_gradient(
            updates,
            state.inverse_scale,
            rho=rho,
            prior_variance=prior_variance,
            num_data=num_data,
            eps=eps,
        )
        inverse_scale = jax.tree.map(
            lambda m, d: (m - learning_rate_m * d).astype(m.dtype),
            state.inverse_scale,
            m_gradient,
        )
        preconditioned = jax.tree.map(lambda g, m: g / (m * m), updates, inverse_scale)
        squared = sum(
            jnp.sum(_as_float32_or_wider(g) * _as_float32_or_wider(h))
            for g, h in zip(jax.tree.leaves(updates), jax.tree.leaves(preconditioned), strict=True)
        )
        ascent = _tree_scale(preconditioned, 1.0 / (jnp.sqrt(squared) + eps))
        new_updates = grad_fn(_add_scaled(params, rho, ascent))
        if axis_name is not None:
            new_updates = jax.lax.pmean(new_updates, axis_name)
        return new_updates, VSAMState(inverse_scale=inverse_scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vsam_inverse_scale_gradient(
    gradient: Params,
    inverse_scale: Params,
    *,
    rho: jax.typing.ArrayLike,
    prior_variance: jax.typing.ArrayLike,
    num_data: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-12,
) -> Params:
    r"""Closed-form :math:`\nabla_M` of VSAM's objective :math:`\mathcal{L}_M` (see :func:`vsam`).

    .. math::

        \nabla_M \mathcal{L}_M = -\rho \frac{g^2 M^{-3}}{\sqrt{\sum g^2/M^2}}
            + \frac{1}{N}\Big(\frac{1}{M} - \frac{M^{-3}}{\sigma_p}\Big).

    Args:
        gradient: The clean gradient :math:`g` (held fixed).
        inverse_scale: :math:`M`.
        rho: Radius :math:`\rho`.
        prior_variance: :math:`\sigma_p`.
        num_data: :math:`N`.
        eps: Added to :math:`\sqrt{\sum g^2/M^2}`.

    Returns:
        A pytree like ``inverse_scale``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from bnn_flat.transforms import vsam_inverse_scale_gradient
        >>> vsam_inverse_scale_gradient(
        ...     jnp.zeros(2), jnp.full(2, 2.0), rho=0.1, prior_variance=0.25, num_data=1
        ... )  # M^2 = 1/prior_variance and g = 0: stationary
        Array([0., 0.], dtype=float32)
    """
    squared = sum(
        jnp.sum(jnp.square(_as_float32_or_wider(g)) / jnp.square(_as_float32_or_wider(m)))
        for g, m in zip(jax.tree.leaves(gradient), jax.tree.leaves(inverse_scale), strict=True)
    )
    sharpness_scale = rho / (jnp.sqrt(squared) + eps)

    def leaf(g: jax.Array, m: jax.Array) -> jax.Array:
        inverse_cube = 1.0 / (m * m * m)
        sharpness_term = -sharpness_scale * g * g * inverse_cube
        penalty_term = (1.0 / m - inverse_cube / prior_variance) / num_data
        return (sharpness_term + penalty_term).astype(m.dtype)

    return jax.tree.map(leaf, gradient, inverse_scale)
