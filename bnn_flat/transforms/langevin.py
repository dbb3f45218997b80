r"""Stochastic-gradient MCMC as optax transforms: SGLD noise, SGHMC, cyclical schedules.

**Convention.** Every loss in bnn_flat is the *per-datum* objective
:math:`U(\theta) = \frac1B\sum_{i\in B} -\log p(y_i \mid x_i, \theta) - \frac1N \log
p(\theta)`, and the tempered posterior is

.. math::

    p_T(\theta \mid \mathcal D) \propto \exp\big(-N U(\theta) / T\big).

**SGLD.** Langevin dynamics for a density :math:`\exp(-E)` with step :math:`h` is
:math:`\theta \leftarrow \theta - h \nabla E + \sqrt{2h}\,\xi`. With
:math:`E = N U / T` and :math:`h = \alpha T / N` this becomes

.. math::

    \theta \leftarrow \theta - \alpha \nabla U(\theta) + \sqrt{2 \alpha T / N}\;\xi,
    \qquad \xi \sim N(0, I),

i.e. a plain SGD step with learning rate :math:`\alpha` on the per-datum loss plus
Gaussian noise of variance :math:`2\alpha T/N` per coordinate. So SGLD is
``optax.chain(optax.sgd(lr), langevin_noise(lr, num_data, temperature))``, with the
*same* ``lr`` (number or schedule) in both.

**SGHMC.** Chen et al. (2014) write, for potential :math:`\tilde U` and step
:math:`\eta`, :math:`\theta \leftarrow \theta + v`,
:math:`v \leftarrow (1-\alpha) v - \eta \nabla\tilde U + N(0, 2(\alpha-\hat\beta)\eta)`.
With :math:`\tilde U = N U / T`, :math:`\eta = \text{lr}\, T / N` and :math:`\hat\beta = 0`:

.. math::

    v \leftarrow (1 - \alpha) v - \text{lr}\, \nabla U(\theta)
        + \sqrt{2 \alpha\, \text{lr}\, T / N}\;\xi, \qquad \theta \leftarrow \theta + v,

where the friction :math:`\alpha = 1 - \text{momentum}`. With :math:`T = 0` this is SGD
with heavy-ball momentum :math:`1 - \alpha`.

**Cyclical SG-MCMC** (Zhang et al., 2020) uses a cosine step size restarted every
cycle; the first fraction :math:`\beta` of each cycle explores (no noise) and the rest
samples. :func:`cyclical_schedule` is that step size; :func:`is_sampling_phase` tells
the two parts apart, e.g. ``temperature=lambda t: T * is_sampling_phase(t, ...)``.

References:
    Welling and Teh, Bayesian Learning via Stochastic Gradient Langevin Dynamics,
    ICML 2011.
    Chen, Fox and Guestrin, Stochastic Gradient Hamiltonian Monte Carlo, ICML 2014.
    Zhang, Li, Zhang, Chen and Wilson, Cyclical Stochastic Gradient MCMC for Bayesian
    Deep Learning, ICLR 2020.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnn_flat.transforms.sam import _check_number, _require_key, normal_like
from bnn_flat.types import Params, PRNGKey

__all__ = [
    "LangevinNoiseState",
    "langevin_noise",
    "SGHMCState",
    "sghmc",
    "cyclical_schedule",
    "is_sampling_phase",
]


class LangevinNoiseState(NamedTuple):
    """State of :func:`langevin_noise`.

    Attributes:
        count: Number of updates taken (int32 scalar); drives the schedules.
    """

    count: jax.Array


def langevin_noise(
    learning_rate: optax.ScalarOrSchedule,
    num_data: jax.typing.ArrayLike,
    temperature: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds SGLD noise :math:`N(0, 2\,\text{lr}\,T/N)` to every coordinate of the updates.

    Chain it *after* the base optimizer's scaling, with the same learning rate::

        optax.chain(optax.sgd(lr), langevin_noise(lr, num_data, temperature))

    which is SGLD targeting :math:`\exp(-N U / T)` for the per-datum loss :math:`U` (see
    the module docstring for the derivation).

    Args:
        learning_rate: The base optimizer's learning rate (number or schedule of the step
            count; this transform keeps its own count, in step with the optimizer's).
        num_data: :math:`N`, the training-set size.
        temperature: :math:`T \ge 0` (number or schedule; ``0`` turns the noise off).

    Returns:
        A transform with state :class:`LangevinNoiseState` needing ``key`` in ``update``.

    Raises:
        ValueError: On a negative learning rate or temperature or non-positive
            ``num_data``; at update time, on a missing ``key``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from bnn_flat.transforms import langevin_noise
        >>> tx = optax.chain(optax.sgd(1e-2), langevin_noise(1e-2, num_data=100))
        >>> w = jnp.zeros(3)
        >>> updates, _ = tx.update(jnp.ones(3), tx.init(w), w, key=jax.random.key(0))
        >>> updates.shape
        (3,)

    References:
        Welling and Teh, Bayesian Learning via Stochastic Gradient Langevin Dynamics,
        ICML 2011.
    """
    _check_schedule_or_number("learning_rate", learning_rate)
    _check_schedule_or_number("temperature", temperature)
    _check_number("num_data", num_data, strictly_positive=True)

    def init_fn(params: Params) -> LangevinNoiseState:
        del params
        return LangevinNoiseState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Params,
        state: LangevinNoiseState,
        params: Params | None = None,
        *,
        key: PRNGKey | None = None,
        **extra_args: Any,
    ) -> tuple[Params, LangevinNoiseState]:
        del params, extra_args
        key = _require_key("langevin_noise", key)
        step_size = _evaluate(learning_rate, state.count)
        noise_std = jnp.sqrt(2.0 * step_size * _evaluate(temperature, state.count) / num_data)
        noise = normal_like(key, updates)
        new_updates = jax.tree.map(lambda u, n: (u + noise_std * n).astype(u.dtype), updates, noise)
        return new_updates, LangevinNoiseState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SGHMCState(NamedTuple):
    """State of :func:`sghmc`.

    Attributes:
        count: Number of updates taken (int32 scalar); drives the schedules.
        momentum: The velocity :math:`v` (in parameter units), same tree as the params.
    """

    count: jax.Array
    momentum: Params


def sghmc(
    learning_rate: optax.ScalarOrSchedule,
    num_data: jax.typing.ArrayLike,
    *,
    friction: jax.typing.ArrayLike = 0.1,
    temperature: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic-gradient Hamiltonian Monte Carlo as a complete optimizer.

    .. math::

        v \leftarrow (1 - \alpha) v - \text{lr}\,g + \sqrt{2\alpha\,\text{lr}\,T/N}\;\xi,
        \qquad \text{updates} = v,

    with :math:`g` the per-datum gradient (the incoming ``updates``) and
    :math:`\alpha` = ``friction`` :math:`= 1 - \text{momentum}`. This is Chen et al.'s
    SGHMC with :math:`\hat\beta = 0`, potential :math:`N U / T` and step
    :math:`\eta = \text{lr}\,T/N` (module docstring). It returns the parameter update,
    so use it alone (or after gradient transforms such as clipping).

    Args:
        learning_rate: lr (number or schedule of the step count).
        num_data: :math:`N`, the training-set size.
        friction: :math:`\alpha \in (0, 1]`; ``0.1`` is momentum 0.9.
        temperature: :math:`T \ge 0` (number or schedule).

    Returns:
        A transform with state :class:`SGHMCState` needing ``key`` in ``update``.

    Raises:
        ValueError: On a negative learning rate or temperature, non-positive
            ``num_data``, or ``friction`` outside (0, 1]; at update time, on a missing
            ``key``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import sghmc
        >>> tx = sghmc(1e-2, num_data=100, friction=0.1, temperature=0.0)
        >>> w = jnp.zeros(2)
        >>> updates, state = tx.update(jnp.ones(2), tx.init(w), w, key=jax.random.key(0))
        >>> updates  # T = 0: heavy-ball SGD, v = -lr g
        Array([-0.01, -0.01], dtype=float32)

    References:
        Chen, Fox and Guestrin, Stochastic Gradient Hamiltonian Monte Carlo, ICML 2014.
    """
    _check_schedule_or_number("learning_rate", learning_rate)
    _check_schedule_or_number("temperature", temperature)
    _check_number("num_data", num_data, strictly_positive=True)
    _check_number("friction", friction, strictly_positive=True, maximum=1.0)

    def init_fn(params: Params) -> SGHMCState:
        return SGHMCState(
            count=jnp.zeros([], jnp.int32), momentum=jax.tree.map(jnp.zeros_like, params)
        )

    def update_fn(
        updates: Params,
        state: SGHMCState,
        params: Params | None = None,
        *,
        key: PRNGKey | None = None,
        **extra_args: Any,
    ) -> tuple[Params, SGHMCState]:
        del params, extra_args
        key = _require_key("sghmc", key)
        step_size = _evaluate(learning_rate, state.count)
        variance = 2.0 * friction * step_size * _evaluate(temperature, state.count) / num_data
        noise_std = jnp.sqrt(variance)
        noise = normal_like(key, updates)
        momentum = jax.tree.map(
            lambda v, g, n: ((1.0 - friction) * v - step_size * g + noise_std * n).astype(v.dtype),
            state.momentum,
            updates,
            noise,
        )
        new_state = SGHMCState(count=optax.safe_increment(state.count), momentum=momentum)
        return momentum, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cyclical_schedule(
    init_value: float,
    num_steps: int,
    num_cycles: int,
    final_value: float = 0.0,
) -> optax.Schedule:
    r"""The cyclical cosine step size of cSG-MCMC (Zhang et al., 2020).

    With cycle length :math:`C = \lceil K / M \rceil` for :math:`K` steps and :math:`M`
    cycles, and :math:`r_t = (t \bmod C) / C`,

    .. math::

        \alpha_t = \alpha_{\text{final}}
            + \tfrac12 (\alpha_0 - \alpha_{\text{final}})\,(1 + \cos \pi r_t).

    (The paper's form is ``final_value = 0``.) Steps are counted from 0, so every cycle
    starts at ``init_value``.

    Args:
        init_value: :math:`\alpha_0`, the step size at the start of each cycle.
        num_steps: :math:`K`, the total number of steps.
        num_cycles: :math:`M`, the number of cycles.
        final_value: The value approached at the end of each cycle.

    Returns:
        An optax schedule ``step -> step size``.

    Raises:
        ValueError: If ``num_steps``/``num_cycles`` are not positive ints with
            ``num_cycles <= num_steps``, or a value is negative.

    Examples:
        >>> from bnn_flat.transforms import cyclical_schedule
        >>> schedule = cyclical_schedule(0.1, num_steps=100, num_cycles=4)
        >>> [round(float(schedule(t)), 4) for t in (0, 12, 24, 25)]
        [0.1, 0.0531, 0.0004, 0.1]

    References:
        Zhang et al., Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning,
        ICLR 2020, Eq. (1).
    """
    _check_number("init_value", init_value, minimum=0.0)
    _check_number("final_value", final_value, minimum=0.0)
    cycle_length = _cycle_length(num_steps, num_cycles)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        position = _cycle_position(step, cycle_length)
        return final_value + 0.5 * (init_value - final_value) * (1.0 + jnp.cos(jnp.pi * position))

    return schedule


def is_sampling_phase(
    step: jax.typing.ArrayLike,
    *,
    num_steps: int,
    num_cycles: int,
    exploration_fraction: float,
) -> jax.Array:
    r"""Whether ``step`` lies in the sampling part of its cSG-MCMC cycle.

    A step is in the sampling phase when :math:`r_t = (t \bmod C)/C \ge \beta`, with
    :math:`C` as in :func:`cyclical_schedule` and :math:`\beta` the exploration fraction.
    Typical use: noise only while sampling,
    ``langevin_noise(lr, N, temperature=lambda t: is_sampling_phase(t, ...) * 1.0)``,
    and collect samples only where this is true.

    Args:
        step: Step count(s), counted from 0 (traced values allowed).
        num_steps: Total number of steps.
        num_cycles: Number of cycles.
        exploration_fraction: :math:`\beta \in [0, 1]`.

    Returns:
        A boolean array shaped like ``step``.

    Raises:
        ValueError: On bad step/cycle counts or ``exploration_fraction`` outside [0, 1].

    Examples:
        >>> from bnn_flat.transforms import is_sampling_phase
        >>> [bool(is_sampling_phase(t, num_steps=20, num_cycles=2, exploration_fraction=0.8))
        ...  for t in (7, 8, 9, 10)]
        [False, True, True, False]
    """
    _check_number("exploration_fraction", exploration_fraction, minimum=0.0, maximum=1.0)
    cycle_length = _cycle_length(num_steps, num_cycles)
    return _cycle_position(step, cycle_length) >= exploration_fraction


def _cycle_length(num_steps: int, num_cycles: int) -> int:
    for name, value in (("num_steps", num_steps), ("num_cycles", num_cycles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if num_cycles > num_steps:
        raise ValueError(f"num_cycles ({num_cycles}) must not exceed num_steps ({num_steps}).")
    return math.ceil(num_steps / num_cycles)


def _cycle_position(step: jax.typing.ArrayLike, cycle_length: int) -> jax.Array:
    step = jnp.asarray(step)
    return jnp.mod(step, cycle_length).astype(jnp.float32) / cycle_length


def _evaluate(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
    return value(count) if callable(value) else value


def _check_schedule_or_number(name: str, value: Any) -> None:
    if not callable(value):
        _check_number(name, value, minimum=0.0)
