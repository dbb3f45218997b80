r"""Bayesian SAM (bSAM): SAM as an Adam-like natural-gradient update of a Gaussian posterior.

bSAM (Möllenhoff & Khan, 2023) fits :math:`q = N(w, \operatorname{diag}(1/(N s)))` with
mean :math:`w` (the parameters) and precision :math:`s` (in the optimizer state). One
step, following the reference JAX code ``team-approx-bayes/bayesian-sam : optim.py``
(``build_bsam_optimizer``), with :math:`\delta = \lambda / N` for prior precision
:math:`\lambda`:

.. math::

    \tilde\theta &= w + \sqrt{1/(N s)} \odot n, \quad n \sim N(0, I)
        &&\text{(noisy sample)} \\
    g &= \nabla \ell(\tilde\theta), \quad
    \epsilon = \rho\, g / s, \quad
    g_\epsilon = \nabla \ell(w + \epsilon), \quad
    g_s = \sqrt{s\, g^2} \\
    m &\leftarrow \beta_1 m + (1 - \beta_1)(g_\epsilon + \delta w) \\
    w &\leftarrow w - \alpha_t\, m / s \qquad \text{(old } s\text{)} \\
    s &\leftarrow \beta_2 s + (1 - \beta_2)(g_s + \text{damping} + \delta).

The perturbation is *not* normalised (penalty form). With m-sharpness the batch is split
into sub-batches, each with its own noise :math:`n_j` and perturbation, and :math:`g_s`
and :math:`g_\epsilon` are averaged over sub-batches.

Because :math:`g` is taken at the noisy sample rather than at :math:`w`, the incoming
``updates`` (the family's clean gradient at :math:`w`) are not used: a bSAM step calls
``grad_fn`` twice, on top of the family's own gradient evaluation.

The weight decay :math:`\delta w` is part of the rule, so the loss passed to the family
should be the likelihood term only (no prior), or the prior is counted twice.

Noise: :math:`n` is drawn with :func:`bnn_flat.transforms.normal_like` from the ``key`` extra
argument (with m-sharpness, from ``jax.random.split(key, m)[j]`` for sub-batch ``j``).

References:
    Möllenhoff and Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023;
    code: ``team-approx-bayes/bayesian-sam``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnn_flat.transforms.sam import (
    _broadcast_leading,
    _check_num_sub_batches,
    _check_number,
    _require_callable,
    _require_key,
    _require_params,
    normal_like,
)
from bnn_flat.types import Params, PRNGKey

__all__ = ["BSAMState", "bsam", "bsam_posterior_scale", "bsam_sample"]


class BSAMState(NamedTuple):
    """State of :func:`bsam`.

    Attributes:
        count: Number of updates taken (int32 scalar); drives learning-rate schedules.
        momentum: :math:`m` (``gm`` in the reference code), same tree as the parameters.
        precision: :math:`s`, same tree as the parameters; the posterior is
            :math:`N(w, \\operatorname{diag}(1/(N s)))`.
    """

    count: jax.Array
    momentum: Params
    precision: Params


def bsam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rho: jax.typing.ArrayLike,
    num_data: jax.typing.ArrayLike,
    prior_precision: jax.typing.ArrayLike,
    beta1: jax.typing.ArrayLike = 0.9,
    beta2: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 0.1,
    s_init: jax.typing.ArrayLike = 1.0,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The bSAM optimizer (reference algorithm; see the module docstring).

    This is a complete optimizer: it returns the parameter update
    :math:`-\alpha_t m / s`. Use it alone, or chained only with transforms that act on
    that update (clipping, masking); do not chain it with another optimizer.

    Args:
        learning_rate: :math:`\alpha` (a number or an optax schedule of the step count;
            the reference recipes use a warm-up followed by a cosine factor).
        rho: Perturbation size :math:`\rho` (reference CIFAR-10 recipe: 0.01).
        num_data: :math:`N`, the training-set size times the data-augmentation factor
            (``ndata * dafactor`` in the reference code).
        prior_precision: :math:`\lambda`; the weight decay is :math:`\delta = \lambda/N`.
        beta1: Momentum coefficient.
        beta2: Precision averaging coefficient.
        damping: Added to the precision estimate.
        s_init: Initial precision (``--custominit``).
        num_sub_batches: ``None`` (default) for one noise sample and perturbation per
            batch via ``grad_fn``; an integer ``m`` uses the ``split_grad_fn`` extra
            argument (see :mod:`bnn_flat.transforms.sam`), as the reference code's
            ``batchsplit`` (8 on CIFAR).

    Returns:
        A transform with state :class:`BSAMState`; ``update`` needs ``params``,
        ``grad_fn`` (or ``split_grad_fn``) and ``key``.

    Raises:
        ValueError: On negative or non-positive hyper-parameters, betas outside [0, 1),
            or a bad ``num_sub_batches``; at update time, on a missing ``key``/``grad_fn``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from bnn_flat.transforms import bsam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.array([1.0, -1.0])
        >>> tx = bsam(0.1, rho=0.01, num_data=100, prior_precision=1.0)
        >>> state = tx.init(w)
        >>> updates, state = tx.update(
        ...     grad_fn(w), state, w, grad_fn=grad_fn, key=jax.random.key(0)
        ... )
        >>> w = optax.apply_updates(w, updates)
        >>> int(state.count)
        1

    References:
        Möllenhoff and Khan, SAM as an Optimal Relaxation of Bayes, ICLR 2023.
    """
    if not callable(learning_rate):
        _check_number("learning_rate", learning_rate, minimum=0.0)
    _check_number("rho", rho, minimum=0.0)
    _check_number("num_data", num_data, strictly_positive=True)
    _check_number("prior_precision", prior_precision, minimum=0.0)
    _check_number("beta1", beta1, minimum=0.0, maximum=1.0)
    _check_number("beta2", beta2, minimum=0.0, maximum=1.0)
    _check_number("damping", damping, minimum=0.0)
    _check_number("s_init", s_init, strictly_positive=True)
    _check_num_sub_batches(num_sub_batches)
    name = "bsam"

    def init_fn(params: Params) -> BSAMState:
        return BSAMState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(jnp.zeros_like, params),
            precision=jax.tree.map(lambda p: jnp.full_like(p, s_init), params),
        )

    def update_fn(
        updates: Params,
        state: BSAMState,
        params: Params | None = None,
        *,
        grad_fn: Callable[[Params], Params] | None = None,
        split_grad_fn: Callable[[Params], Params] | None = None,
        key: PRNGKey | None = None,
        **extra_args: Any,
    ) -> tuple[Params, BSAMState]:
        del updates, extra_args  # g is taken at the noisy sample, not at w.
        _require_params(name, params)
        key = _require_key(name, key)
        precision = state.precision
        std = bsam_posterior_scale(state, num_data)

        if num_sub_batches is None:
            _require_callable(name, "grad_fn", grad_fn)
            noise = normal_like(key, params)
            gradient = grad_fn(_axpy(std, noise, params))
            ascent_scale = jax.tree.map(lambda s: rho / s, precision)
            perturbed_gradient = grad_fn(_axpy(ascent_scale, gradient, params))
            gradient_scale = jax.tree.map(lambda s, g: jnp.sqrt(s * g * g), precision, gradient)
        else:
            _require_callable(name, "split_grad_fn", split_grad_fn)
            keys = jax.random.split(key, num_sub_batches)
            noise = jax.vmap(normal_like, in_axes=(0, None))(keys, params)
            stacked = _broadcast_leading(params, num_sub_batches)
            gradients = split_grad_fn(_axpy(std, noise, stacked))
            ascent_scale = jax.tree.map(lambda s: rho / s, precision)
            perturbed = _axpy(ascent_scale, gradients, stacked)
            perturbed_gradient = _mean_leading(split_grad_fn(perturbed))
            gradient_scale = _mean_leading(
                jax.tree.map(lambda s, g: jnp.sqrt(s * g * g), precision, gradients)
            )

        decay = prior_precision / num_data
        momentum = jax.tree.map(
            lambda m, g, w: (beta1 * m + (1.0 - beta1) * (g + decay * w)).astype(m.dtype),
            state.momentum,
            perturbed_gradient,
            params,
        )
        step_size = learning_rate(state.count) if callable(learning_rate) else learning_rate
        new_updates = jax.tree.map(
            lambda m, s: (-step_size * m / s).astype(m.dtype), momentum, precision
        )
        new_precision = jax.tree.map(
            lambda s, gs: (beta2 * s + (1.0 - beta2) * (gs + damping + decay)).astype(s.dtype),
            precision,
            gradient_scale,
        )
        new_state = BSAMState(
            count=optax.safe_increment(state.count),
            momentum=momentum,
            precision=new_precision,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam_posterior_scale(state: Any, num_data: jax.typing.ArrayLike) -> Params:
    r"""Posterior standard deviations :math:`\sqrt{1/(N s)}` of a bSAM run.

    Args:
        state: A :class:`BSAMState`, or any optimizer state containing exactly one
            (e.g. the state of an ``optax.chain``), searched with :func:`optax.tree.get`.
        num_data: :math:`N` as passed to :func:`bsam`.

    Returns:
        A pytree like the parameters.

    Raises:
        ValueError: If ``state`` contains no :class:`BSAMState`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from bnn_flat.transforms import bsam, bsam_posterior_scale
        >>> state = bsam(0.1, rho=0.01, num_data=4, prior_precision=1.0).init(jnp.zeros(2))
        >>> bsam_posterior_scale(state, num_data=4)  # s_init = 1
        Array([0.5, 0.5], dtype=float32)
    """
    precision = _find_bsam_state(state).precision
    return jax.tree.map(lambda s: jnp.sqrt(1.0 / (num_data * s)).astype(s.dtype), precision)


def bsam_sample(
    key: PRNGKey,
    params: Params,
    state: Any,
    num_samples: int,
    num_data: jax.typing.ArrayLike,
) -> Params:
    r"""Draws posterior samples :math:`w + \sqrt{1/(N s)} \odot n` for Bayesian model averaging.

    Args:
        key: PRNG key; sample ``i`` uses ``jax.random.split(key, num_samples)[i]``.
        params: The mean :math:`w` (the trained parameters).
        state: A :class:`BSAMState` or an optimizer state containing exactly one.
        num_samples: Number of samples (static).
        num_data: :math:`N` as passed to :func:`bsam` (the reference test code uses
            ``ndata * dafactor``).

    Returns:
        A pytree like ``params`` with a new leading axis of size ``num_samples``.

    Raises:
        ValueError: If ``num_samples`` is not a positive int or ``state`` has no
            :class:`BSAMState`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import bsam, bsam_sample
        >>> w = jnp.zeros(3)
        >>> state = bsam(0.1, rho=0.01, num_data=10, prior_precision=1.0).init(w)
        >>> bsam_sample(jax.random.key(0), w, state, 8, num_data=10).shape
        (8, 3)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    std = bsam_posterior_scale(state, num_data)
    keys = jax.random.split(key, num_samples)

    def one_sample(sample_key: PRNGKey) -> Params:
        return _axpy(std, normal_like(sample_key, params), params)

    return jax.vmap(one_sample)(keys)


def _find_bsam_state(state: Any) -> BSAMState:
    if isinstance(state, BSAMState):
        return state
    found = optax.tree.get(state, "BSAMState")
    if found is None:
        raise ValueError("no BSAMState found in the given optimizer state.")
    return found


def _axpy(scale: Params, direction: Params, params: Params) -> Params:
    """``params + scale * direction`` leaf-wise in the params' dtypes (broadcasts stacks)."""
    return jax.tree.map(lambda a, x, p: (p + a * x).astype(p.dtype), scale, direction, params)


def _mean_leading(tree: Params) -> Params:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)
