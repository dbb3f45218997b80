r"""SG-MCMC sample banks: SGLD, SGHMC and cyclical SG-MCMC as a posterior family.

A stochastic-gradient MCMC chain targets the tempered posterior of the per-datum objective
:math:`U` (see :mod:`bnn_flat.objectives` and ``docs/scaling.md``),

.. math:: p_T(\theta \mid \mathcal D) \propto \exp\big(-N\, U(\theta) / T\big),

and the family approximates it by the empirical distribution of the chain positions it has
collected,

.. math:: q(\theta) = \frac1S \sum_{s=1}^{S} \delta(\theta - \theta_{t_s}).

**The sampler is the optimizer.** The family runs ``optimizer`` like
:func:`bnn_flat.posteriors.point.update` does, and the optax chain decides which sampler
it is (:mod:`bnn_flat.transforms.langevin` has the update rules):

* SGLD: ``optax.chain(optax.sgd(lr), transforms.langevin_noise(lr, N, T))``, i.e.
  :math:`\theta \leftarrow \theta - \alpha \nabla U(\theta) + \sqrt{2\alpha T/N}\,\xi`;
* SGHMC: ``transforms.sghmc(lr, N, friction=..., temperature=T)``;
* cyclical SG-MCMC (Zhang et al., 2020): either, with ``transforms.cyclical_schedule`` as
  the learning rate, noise only in the sampling phase and ``collect_when`` set to
  ``transforms.is_sampling_phase``;
* F-SGLD (Nguyen et al., 2023): SGLD on the sharpness-aware energy
  :math:`U^{\mathrm{SA}}(\theta) = \max_{\lVert\epsilon\rVert\le\rho} U(\theta+\epsilon)`,
  ``optax.chain(transforms.sam(rho), optax.sgd(lr), transforms.langevin_noise(lr, N, T))``.
  The order matters: ``sam`` replaces the gradient by
  :math:`\nabla U(\theta + \rho g/\lVert g\rVert)` (the SAM gradient of
  :math:`U^{\mathrm{SA}}`, with :math:`\epsilon` held fixed), ``sgd`` scales it by
  :math:`-\alpha`, and the noise of variance :math:`2\alpha T/N` is added last, so

  .. math:: \theta \leftarrow \theta - \alpha \nabla U(\theta + \epsilon_t)
            + \sqrt{2\alpha T/N}\;\xi, \qquad
            \epsilon_t = \rho\, \nabla U(\theta) / \lVert \nabla U(\theta) \rVert,

  which is SGLD for :math:`\exp(-N U^{\mathrm{SA}} / T)`. Noise before ``sgd`` would be
  multiplied by :math:`-\alpha`; ``sam`` after ``sgd`` would discard the learning rate.
  ``optax.chain(transforms.sam(rho), transforms.sghmc(...))`` is the flat SGHMC.

**Collection.** Update number :math:`t` (``state.step`` before the update, counted from 0)
moves the chain to :math:`\theta_{t+1}`; that position is stored when

.. math:: t \ge \text{burn\_in}, \quad (t - \text{burn\_in}) \bmod \text{thin} = 0,
          \quad \text{collect\_when}(t),

so the first ``burn_in`` updates are discarded and then every ``thin``-th position is
kept. The bank is a preallocated ring buffer of ``num_samples_max`` slots: when it is
full, a new sample overwrites the oldest one. The model state produced by the same
update (BatchNorm statistics) is stored alongside each sample.

**Multiple chains**: ``bnn_flat.posteriors.ensemble.build(family)`` runs independent chains
under ``jax.vmap`` (each chain gets its own key, hence its own noise).

Differences from the research code (``algorithms.md`` §1.5, §3.2, pitfall 17): the
official F-SGLD uses SGD with momentum 0.9 and a noise scale
:math:`5\cdot10^{-4}\,\epsilon_t` unrelated to the learning rate; here the noise is the
textbook :math:`\sqrt{2\alpha T/N}` tied to the learning rate, so the chain targets
:math:`p_T` (start from a trained checkpoint by passing its parameters to ``init``). Our
:math:`U` contains the prior, so SAM perturbs the prior term too; with a Gaussian prior of
precision :math:`\lambda` this changes the gradient by at most :math:`\lambda\rho/N`.

References:
  Welling, Teh. Bayesian Learning via Stochastic Gradient Langevin Dynamics. ICML 2011.
  Chen, Fox, Guestrin. Stochastic Gradient Hamiltonian Monte Carlo. ICML 2014.
  Zhang, Li, Zhang, Chen, Wilson. Cyclical Stochastic Gradient MCMC for Bayesian Deep
  Learning. ICLR 2020.
  Nguyen, Vuong, Phan, Do, Phung, Le. Flat Seeking Bayesian Neural Networks. NeurIPS 2023.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_flat import transforms
from bnn_flat.posteriors import point
from bnn_flat.posteriors._common import check_perturbed_dropout
from bnn_flat.types import Batch, Info, LossFn, ModelState, Params, Posterior, PRNGKey

__all__ = [
    "SGMCMCState",
    "build",
    "sgld",
    "sghmc",
    "cyclical_sgld",
    "cyclical_sghmc",
    "init",
    "update",
    "sample",
    "sample_with_model_states",
    "collected",
]

CollectWhen = Callable[[jax.Array], jax.Array]
"""``collect_when(step) -> bool`` scalar, evaluated on the (traced) update index."""


class SGMCMCState(NamedTuple):
    """State of the SG-MCMC family.

    Attributes:
      params: current chain position.
      model_state: BatchNorm statistics or ``{}``.
      opt_state: state of the sampler (the optimizer chain).
      step: number of updates done (int32 scalar).
      samples: the sample bank, every leaf of ``params`` with a leading axis of
        ``num_samples_max`` (a ring buffer; slots not yet written hold the initial params).
      sample_model_states: the model state stored with each sample, same layout.
      num_collected: number of filled slots, ``min(collections so far, num_samples_max)``
        (int32 scalar).
      write_index: the slot the next sample goes to; once the bank is full this is the
        oldest sample (int32 scalar).
    """

    params: Params
    model_state: ModelState
    opt_state: optax.OptState
    step: jax.Array
    samples: Params
    sample_model_states: ModelState
    num_collected: jax.Array
    write_index: jax.Array


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_samples_max: int,
    burn_in: int = 0,
    thin: int = 1,
    collect_when: CollectWhen | None = None,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""Builds an SG-MCMC sample-bank family driven by ``optimizer``.

    Args:
      loss_fn: per-datum objective ``loss_fn(params, model_state, batch, key)``.
      optimizer: the sampler as an optax chain (SGLD, SGHMC, cyclical, flat; see the
        module docstring). It receives ``grad_fn``, ``split_grad_fn``, ``value`` and
        ``key`` as extra arguments.
      num_samples_max: :math:`S`, the number of slots of the sample bank. The bank is
        preallocated: it holds :math:`S` copies of the parameters and of the model state.
      burn_in: number of initial updates whose positions are never collected.
      thin: collect every ``thin``-th position after burn-in.
      collect_when: optional ``step -> bool`` (scalar, traceable) further restricting
        collection, e.g. ``functools.partial(transforms.is_sampling_phase, num_steps=...,
        num_cycles=..., exploration_fraction=...)`` for cyclical SG-MCMC.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`SGMCMCState` with ``log_prob``
      ``None`` (a sample bank has no density).

    Raises:
      ValueError: if ``num_samples_max`` or ``thin`` is not a positive int, ``burn_in`` is
        negative, ``collect_when`` is not callable, or ``perturbed_dropout`` is unknown.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives, transforms
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4, prior_precision=1.0)
      >>> tx = optax.chain(optax.sgd(0.1), transforms.langevin_noise(0.1, num_data=4))
      >>> family = build(loss_fn, tx, num_samples_max=8, burn_in=2, thin=2)
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> step = jax.jit(family.update)
      >>> for i in range(6):
      ...     state, info = step(jax.random.key(i), state, batch)
      >>> int(state.num_collected)  # updates 2 and 4
      2
      >>> family.sample(jax.random.key(9), state, 5)["w"].shape
      (5, 3, 2)
    """
    _check_int("num_samples_max", num_samples_max, minimum=1)
    _check_int("burn_in", burn_in, minimum=0)
    _check_int("thin", thin, minimum=1)
    if collect_when is not None and not callable(collect_when):
        raise ValueError(f"collect_when must be a callable step -> bool, got {collect_when!r}.")
    check_perturbed_dropout(perturbed_dropout)

    def init_fn(params: Params, model_state: ModelState | None = None) -> SGMCMCState:
        return init(params, model_state, optimizer, num_samples_max=num_samples_max)

    def update_fn(key: PRNGKey, state: SGMCMCState, batch: Batch) -> tuple[SGMCMCState, Info]:
        return update(
            key,
            state,
            batch,
            loss_fn,
            optimizer,
            burn_in=burn_in,
            thin=thin,
            collect_when=collect_when,
            perturbed_dropout=perturbed_dropout,
        )

    return Posterior(init=init_fn, update=update_fn, sample=sample, log_prob=None)


def sgld(
    loss_fn: LossFn,
    *,
    learning_rate: optax.ScalarOrSchedule,
    num_data: int,
    temperature: optax.ScalarOrSchedule = 1.0,
    num_samples_max: int,
    burn_in: int = 0,
    thin: int = 1,
    collect_when: CollectWhen | None = None,
    perturbation: optax.GradientTransformation | None = None,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""SGLD: :math:`\theta \leftarrow \theta - \alpha\nabla U + \sqrt{2\alpha T/N}\,\xi`.

    The optimizer is ``optax.chain(optax.sgd(lr), transforms.langevin_noise(lr, N, T))``;
    with ``perturbation`` (e.g. ``transforms.sam(0.05)``) it is put first in the chain,
    which gives F-SGLD (module docstring).

    Args:
      loss_fn: per-datum objective.
      learning_rate: :math:`\alpha` (number or schedule of the step count).
      num_data: :math:`N`, the training-set size.
      temperature: :math:`T` (number or schedule).
      num_samples_max: size of the sample bank.
      burn_in: see :func:`build`.
      thin: see :func:`build`.
      collect_when: see :func:`build`.
      perturbation: optional sharpness-aware transform applied to the gradient first.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      The family (see :func:`build`).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import objectives, transforms
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=100, prior_precision=1.0)
      >>> f_sgld = sgld(loss_fn, learning_rate=1e-2, num_data=100, num_samples_max=50,
      ...               burn_in=1000, thin=10, perturbation=transforms.sam(0.05))
      >>> state = f_sgld.init({"w": jnp.zeros((3, 2))})
      >>> state.samples["w"].shape
      (50, 3, 2)
    """
    optimizer = _with_perturbation(
        perturbation,
        optax.sgd(learning_rate),
        transforms.langevin_noise(learning_rate, num_data, temperature),
    )
    return build(
        loss_fn,
        optimizer,
        num_samples_max=num_samples_max,
        burn_in=burn_in,
        thin=thin,
        collect_when=collect_when,
        perturbed_dropout=perturbed_dropout,
    )


def sghmc(
    loss_fn: LossFn,
    *,
    learning_rate: optax.ScalarOrSchedule,
    num_data: int,
    friction: float = 0.1,
    temperature: optax.ScalarOrSchedule = 1.0,
    num_samples_max: int,
    burn_in: int = 0,
    thin: int = 1,
    collect_when: CollectWhen | None = None,
    perturbation: optax.GradientTransformation | None = None,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""SGHMC: :math:`v \leftarrow (1-\alpha)v - \text{lr}\,\nabla U + \sqrt{2\alpha\,
    \text{lr}\,T/N}\,\xi`, :math:`\theta \leftarrow \theta + v`.

    The optimizer is ``transforms.sghmc(lr, N, friction=friction, temperature=T)``, with
    ``perturbation`` first in the chain when given (flat SGHMC).

    Args:
      loss_fn: per-datum objective.
      learning_rate: lr (number or schedule).
      num_data: :math:`N`.
      friction: :math:`\alpha \in (0, 1]` (``1 - momentum``).
      temperature: :math:`T` (number or schedule).
      num_samples_max: size of the sample bank.
      burn_in: see :func:`build`.
      thin: see :func:`build`.
      collect_when: see :func:`build`.
      perturbation: optional sharpness-aware transform applied to the gradient first.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      The family (see :func:`build`).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=100, prior_precision=1.0)
      >>> family = sghmc(loss_fn, learning_rate=1e-2, num_data=100, friction=0.1,
      ...                num_samples_max=20)
      >>> int(family.init({"w": jnp.zeros((3, 2))}).num_collected)
      0
    """
    optimizer = _with_perturbation(
        perturbation,
        transforms.sghmc(learning_rate, num_data, friction=friction, temperature=temperature),
    )
    return build(
        loss_fn,
        optimizer,
        num_samples_max=num_samples_max,
        burn_in=burn_in,
        thin=thin,
        collect_when=collect_when,
        perturbed_dropout=perturbed_dropout,
    )


def cyclical_sgld(
    loss_fn: LossFn,
    *,
    init_learning_rate: float,
    num_data: int,
    num_steps: int,
    num_cycles: int,
    exploration_fraction: float = 0.8,
    temperature: float = 1.0,
    num_samples_max: int,
    burn_in: int = 0,
    thin: int = 1,
    final_learning_rate: float = 0.0,
    perturbation: optax.GradientTransformation | None = None,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""Cyclical SGLD (cSGLD, Zhang et al., 2020).

    The learning rate is :func:`bnn_flat.transforms.cyclical_schedule` (cosine, restarted
    every :math:`C = \lceil K/M \rceil` steps). In the first ``exploration_fraction`` of
    each cycle the step is plain SGD (temperature 0, nothing collected); in the rest it is
    SGLD at ``temperature`` and every ``thin``-th position (counted from ``burn_in``) is
    collected.

    Args:
      loss_fn: per-datum objective.
      init_learning_rate: :math:`\alpha_0`, the step size at the start of each cycle.
      num_data: :math:`N`.
      num_steps: :math:`K`, the total number of updates the run will make.
      num_cycles: :math:`M`.
      exploration_fraction: :math:`\beta \in [0, 1]`.
      temperature: :math:`T` in the sampling phase.
      num_samples_max: size of the sample bank.
      burn_in: see :func:`build`.
      thin: see :func:`build`.
      final_learning_rate: the value the schedule approaches at the end of a cycle.
      perturbation: optional sharpness-aware transform applied to the gradient first.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      The family (see :func:`build`).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=100, prior_precision=1.0)
      >>> family = cyclical_sgld(loss_fn, init_learning_rate=0.1, num_data=100,
      ...                        num_steps=1000, num_cycles=4, num_samples_max=40, thin=5)
      >>> family.init({"w": jnp.zeros((3, 2))}).samples["w"].shape
      (40, 3, 2)
    """
    learning_rate, temperature_schedule, collect_when = _cyclical_parts(
        init_learning_rate,
        final_learning_rate,
        num_steps,
        num_cycles,
        exploration_fraction,
        temperature,
    )
    return sgld(
        loss_fn,
        learning_rate=learning_rate,
        num_data=num_data,
        temperature=temperature_schedule,
        num_samples_max=num_samples_max,
        burn_in=burn_in,
        thin=thin,
        collect_when=collect_when,
        perturbation=perturbation,
        perturbed_dropout=perturbed_dropout,
    )


def cyclical_sghmc(
    loss_fn: LossFn,
    *,
    init_learning_rate: float,
    num_data: int,
    num_steps: int,
    num_cycles: int,
    friction: float = 0.1,
    exploration_fraction: float = 0.8,
    temperature: float = 1.0,
    num_samples_max: int,
    burn_in: int = 0,
    thin: int = 1,
    final_learning_rate: float = 0.0,
    perturbation: optax.GradientTransformation | None = None,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    r"""Cyclical SGHMC (cSGHMC, Zhang et al., 2020): :func:`cyclical_sgld` with SGHMC steps.

    In the exploration phase the step is heavy-ball SGD (momentum ``1 - friction``, no
    noise); the momentum carries over between phases and cycles.

    Args:
      loss_fn: per-datum objective.
      init_learning_rate: lr at the start of each cycle.
      num_data: :math:`N`.
      num_steps: total number of updates.
      num_cycles: number of cycles.
      friction: :math:`\alpha \in (0, 1]`.
      exploration_fraction: :math:`\beta \in [0, 1]`.
      temperature: :math:`T` in the sampling phase.
      num_samples_max: size of the sample bank.
      burn_in: see :func:`build`.
      thin: see :func:`build`.
      final_learning_rate: the value the schedule approaches at the end of a cycle.
      perturbation: optional sharpness-aware transform applied to the gradient first.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      The family (see :func:`build`).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=100, prior_precision=1.0)
      >>> family = cyclical_sghmc(loss_fn, init_learning_rate=0.01, num_data=100,
      ...                         num_steps=1000, num_cycles=4, num_samples_max=40)
      >>> int(family.init({"w": jnp.zeros((3, 2))}).step)
      0
    """
    learning_rate, temperature_schedule, collect_when = _cyclical_parts(
        init_learning_rate,
        final_learning_rate,
        num_steps,
        num_cycles,
        exploration_fraction,
        temperature,
    )
    return sghmc(
        loss_fn,
        learning_rate=learning_rate,
        num_data=num_data,
        friction=friction,
        temperature=temperature_schedule,
        num_samples_max=num_samples_max,
        burn_in=burn_in,
        thin=thin,
        collect_when=collect_when,
        perturbation=perturbation,
        perturbed_dropout=perturbed_dropout,
    )


def init(
    params: Params,
    model_state: ModelState | None,
    optimizer: optax.GradientTransformation,
    *,
    num_samples_max: int,
) -> SGMCMCState:
    """Initial state: the chain at ``params`` and an empty bank of ``num_samples_max`` slots.

    Every slot is preallocated (filled with copies of ``params`` and ``model_state``), so the
    state's shapes never change.

    Args:
      params: initial chain position.
      model_state: BatchNorm statistics, or ``None`` for ``{}``.
      optimizer: the sampler.
      num_samples_max: bank size.

    Returns:
      The :class:`SGMCMCState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.ones(3)}, None, optax.sgd(0.1), num_samples_max=4)
      >>> state.samples["w"].shape, int(state.num_collected)
      ((4, 3), 0)
    """
    _check_int("num_samples_max", num_samples_max, minimum=1)
    model_state = {} if model_state is None else model_state
    return SGMCMCState(
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        samples=_bank(params, num_samples_max),
        sample_model_states=_bank(model_state, num_samples_max),
        num_collected=jnp.zeros((), jnp.int32),
        write_index=jnp.zeros((), jnp.int32),
    )


def update(
    key: PRNGKey,
    state: SGMCMCState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    burn_in: int = 0,
    thin: int = 1,
    collect_when: CollectWhen | None = None,
    perturbed_dropout: str = "fresh",
) -> tuple[SGMCMCState, Info]:
    """One sampler step, then (conditionally) one write into the sample bank.

    The step is :func:`bnn_flat.posteriors.point.update` (same extra arguments, BatchNorm
    statistics from the clean pass only). The new position and model state are written to
    slot ``write_index`` when update index ``state.step`` passes the collection rule of the
    module docstring; otherwise the bank is unchanged. The write is a single-slot
    ``dynamic_update_slice`` selected with ``jnp.where``, so there is no branching and the
    cost does not grow with the bank size.

    Args:
      key: PRNG key of the step.
      state: current state.
      batch: mini-batch.
      loss_fn: per-datum objective.
      optimizer: the sampler.
      burn_in: see :func:`build`.
      thin: see :func:`build`.
      collect_when: see :func:`build`.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      ``(new_state, Info)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat.types import LossAux
      >>> loss_fn = lambda p, s, b, k: (jnp.sum(p["w"] ** 2), LossAux(s, {}))
      >>> state = init({"w": jnp.ones(2)}, {}, optax.sgd(0.25), num_samples_max=2)
      >>> state, _ = update(jax.random.key(0), state, {}, loss_fn, optax.sgd(0.25))
      >>> state.samples["w"][0], int(state.num_collected)
      (Array([0.5, 0.5], dtype=float32), 1)
    """
    update_index = state.step
    point_state, info = point.update(
        key,
        point.PointState(
            params=state.params,
            model_state=state.model_state,
            opt_state=state.opt_state,
            step=state.step,
        ),
        batch,
        loss_fn,
        optimizer,
        perturbed_dropout=perturbed_dropout,
    )
    should_collect = _should_collect(update_index, burn_in, thin, collect_when)
    num_samples_max = _bank_size(state)
    slot = state.write_index
    samples = _write_slot(state.samples, point_state.params, slot, should_collect)
    sample_model_states = _write_slot(
        state.sample_model_states, point_state.model_state, slot, should_collect
    )
    new_state = SGMCMCState(
        params=point_state.params,
        model_state=point_state.model_state,
        opt_state=point_state.opt_state,
        step=point_state.step,
        samples=samples,
        sample_model_states=sample_model_states,
        num_collected=jnp.where(
            should_collect,
            jnp.minimum(state.num_collected + 1, num_samples_max),
            state.num_collected,
        ).astype(jnp.int32),
        write_index=jnp.where(should_collect, (slot + 1) % num_samples_max, slot).astype(jnp.int32),
    )
    return new_state, info


def sample(key: PRNGKey, state: SGMCMCState, num_samples: int) -> Params:
    """Draws ``num_samples`` samples uniformly, with replacement, from the filled bank.

    Works under ``jax.jit`` with a traced ``num_collected`` (``num_samples`` is static).
    Before the first collection it returns copies of the current chain position. For all
    collected samples in order (deterministic BMA), use :func:`collected`.

    Args:
      key: PRNG key.
      state: the family's state.
      num_samples: number of draws.

    Returns:
      Parameters stacked on a leading axis of size ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> state = init({"w": jnp.ones(3)}, None, optax.sgd(0.1), num_samples_max=4)
      >>> sample(jax.random.key(0), state, 2)["w"].shape
      (2, 3)
    """
    return _gather(state, state.samples, state.params, _draw_slots(key, state, num_samples))


def sample_with_model_states(
    key: PRNGKey, state: SGMCMCState, num_samples: int
) -> tuple[Params, ModelState]:
    """Like :func:`sample`, also returning the model state stored with each sample.

    The same ``key`` draws the same samples as :func:`sample`. The pair feeds
    ``bma.predict(bma.model_predict_fn(apply_fn, per_sample_state=True), pairs, inputs)``.

    Args:
      key: PRNG key.
      state: the family's state.
      num_samples: number of draws.

    Returns:
      ``(params, model_states)``, both stacked on a leading axis of size ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> state = init({"w": jnp.ones(3)}, {"mean": jnp.zeros(3)}, optax.sgd(0.1),
      ...              num_samples_max=4)
      >>> params, model_states = sample_with_model_states(jax.random.key(0), state, 2)
      >>> model_states["mean"].shape
      (2, 3)
    """
    slots = _draw_slots(key, state, num_samples)
    params = _gather(state, state.samples, state.params, slots)
    model_states = _gather(state, state.sample_model_states, state.model_state, slots)
    return params, model_states


def collected(state: Any, *, with_model_states: bool = False) -> Any:
    """All collected samples, oldest first (host-side slicing; not for use under jit).

    Accepts a single chain's state, a stacked state (leading chain axis) or an
    :class:`~bnn_flat.posteriors.ensemble.EnsembleState`; several chains are concatenated
    chain-major.

    Args:
      state: the family's state (or stacked / ensemble state).
      with_model_states: also return the stored model states.

    Returns:
      Parameters stacked on a leading axis of size ``num_collected`` (summed over chains),
      or ``(params, model_states)`` pairs with ``with_model_states``.

    Raises:
      ValueError: if no sample has been collected yet.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat.types import LossAux
      >>> loss_fn = lambda p, s, b, k: (jnp.sum(p["w"] ** 2), LossAux(s, {}))
      >>> state = init({"w": jnp.ones(2)}, {}, optax.sgd(0.25), num_samples_max=3)
      >>> for i in range(2):
      ...     state, _ = update(jax.random.key(i), state, {}, loss_fn, optax.sgd(0.25))
      >>> collected(state)["w"]
      Array([[0.5 , 0.5 ],
             [0.25, 0.25]], dtype=float32)
    """
    state = getattr(state, "members", state)
    num_collected = np.asarray(state.num_collected)
    write_index = np.asarray(state.write_index)
    if num_collected.ndim == 0:
        chains = [(slice(None), int(num_collected), int(write_index))]
    else:
        pairs = zip(num_collected.tolist(), write_index.tolist(), strict=True)
        chains = [(chain, count, write) for chain, (count, write) in enumerate(pairs)]
    if sum(n for _, n, _ in chains) == 0:
        raise ValueError("collected: no sample has been collected yet (num_collected is 0).")
    bank_size = jax.tree.leaves(state.samples)[0].shape[num_collected.ndim]

    def chronological(bank: Any) -> Any:
        parts = []
        for chain, count, write in chains:
            per_chain = jax.tree.map(lambda x, c=chain: x[c], bank)
            order = (write - count + np.arange(count)) % bank_size
            parts.append(jax.tree.map(lambda x, o=order: x[o], per_chain))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)

    params = chronological(state.samples)
    if not with_model_states:
        return params
    return params, chronological(state.sample_model_states)


# Helpers ------------------------------------------------------------------------------


def _cyclical_parts(
    init_learning_rate: float,
    final_learning_rate: float,
    num_steps: int,
    num_cycles: int,
    exploration_fraction: float,
    temperature: float,
) -> tuple[optax.Schedule, optax.Schedule, CollectWhen]:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not np.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    learning_rate = transforms.cyclical_schedule(
        init_learning_rate, num_steps, num_cycles, final_value=final_learning_rate
    )
    is_sampling = functools.partial(
        transforms.is_sampling_phase,
        num_steps=num_steps,
        num_cycles=num_cycles,
        exploration_fraction=exploration_fraction,
    )
    is_sampling(0)  # validates exploration_fraction eagerly

    def temperature_schedule(count: jax.Array) -> jax.Array:
        return jnp.where(is_sampling(count), temperature, 0.0)

    return learning_rate, temperature_schedule, is_sampling


def _with_perturbation(
    perturbation: optax.GradientTransformation | None, *steps: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    if perturbation is None:
        return optax.chain(*steps)
    if not isinstance(perturbation, optax.GradientTransformation):
        raise ValueError(
            f"perturbation must be an optax transformation (e.g. transforms.sam(0.05)), "
            f"got {perturbation!r}."
        )
    return optax.chain(perturbation, *steps)


def _should_collect(
    update_index: jax.Array, burn_in: int, thin: int, collect_when: CollectWhen | None
) -> jax.Array:
    after_burn_in = update_index >= burn_in
    on_grid = jnp.mod(update_index - burn_in, thin) == 0
    result = after_burn_in & on_grid
    if collect_when is not None:
        extra = jnp.asarray(collect_when(update_index))
        if extra.shape != ():
            raise ValueError(f"collect_when must return a scalar boolean, got shape {extra.shape}.")
        result = result & extra.astype(bool)
    return result


def _bank(tree: Any, size: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (size, *jnp.shape(x))).copy(), tree)


def _bank_size(state: SGMCMCState) -> int:
    leaves = jax.tree.leaves(state.samples)
    if not leaves:
        raise ValueError("the sample bank is empty: params must have at least one array leaf.")
    return leaves[0].shape[0]


def _write_slot(bank: Any, value: Any, slot: jax.Array, should_write: jax.Array) -> Any:
    def write(buffer: jax.Array, x: jax.Array) -> jax.Array:
        current = jax.lax.dynamic_index_in_dim(buffer, slot, axis=0, keepdims=False)
        new = jnp.where(should_write, jnp.asarray(x, buffer.dtype), current)
        return jax.lax.dynamic_update_index_in_dim(buffer, new, slot, axis=0)

    return jax.tree.map(write, bank, value)


def _draw_slots(key: PRNGKey, state: SGMCMCState, num_samples: int) -> jax.Array:
    _check_int("num_samples", num_samples, minimum=1)
    num_samples_max = _bank_size(state)
    available = jnp.maximum(state.num_collected, 1)
    positions = jax.random.randint(key, (num_samples,), 0, available)
    oldest = state.write_index - state.num_collected
    return jnp.mod(oldest + positions, num_samples_max)


def _gather(state: SGMCMCState, bank: Any, fallback: Any, slots: jax.Array) -> Any:
    has_samples = state.num_collected > 0
    num_samples = slots.shape[0]

    def take(buffer: jax.Array, current: jax.Array) -> jax.Array:
        drawn = jnp.take(buffer, slots, axis=0)
        copies = jnp.broadcast_to(current, (num_samples, *jnp.shape(current)))
        return jnp.where(has_samples, drawn, copies)

    return jax.tree.map(take, bank, fallback)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
