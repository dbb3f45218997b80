r"""Ensembles of any posterior family, trained in one compiled program.

Given a family with approximate posterior :math:`q_\phi`, an ensemble of :math:`M` members
with independently initialised parameters :math:`\phi_1, \dots, \phi_M` is the uniform
mixture

.. math:: q(\theta) = \frac{1}{M}\sum_{m=1}^M q_{\phi_m}(\theta).

With the point family this is a deep ensemble; with SWAG, VI or Laplace it is the
"multi-mode" version of that family. Members are stacked on a leading axis and updated with
``jax.vmap`` (each member gets its own key, so dropout masks and transform noise are
independent); every member sees the same mini-batch.

References:
  Lakshminarayanan, Pritzel, Blundell. Simple and Scalable Predictive Uncertainty
  Estimation using Deep Ensembles. NeurIPS 2017.
  Wilson, Izmailov. Bayesian Deep Learning and a Probabilistic Perspective of
  Generalization. NeurIPS 2020 (MultiSWAG).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnn_flat.types import Batch, Info, Params, Posterior, PRNGKey

__all__ = ["EnsembleState", "build", "num_members", "member_model_states"]


class EnsembleState(NamedTuple):
    """Stacked member states.

    Attributes:
      members: the member family's state with a leading member axis on every leaf.

    The ``params``, ``model_state`` and ``step`` properties expose the stacked members'
    fields, so the ensemble satisfies the family-state contract.
    """

    members: Any

    @property
    def params(self) -> Params:
        return self.members.params

    @property
    def model_state(self) -> Any:
        return self.members.model_state

    @property
    def step(self) -> jax.Array:
        return self.members.step[0]


def num_members(state: EnsembleState) -> int:
    """Number of members (static: read from shapes)."""
    return jax.tree.leaves(state.members.step)[0].shape[0]


def build(family: Posterior, *, independent_batches: bool = False) -> Posterior:
    """Wraps a family into an ensemble whose members are updated under ``jax.vmap``.

    ``init(stacked_params, stacked_model_state)`` takes member parameters stacked on a leading
    axis (for example from :func:`bnn_flat.models.init_ensemble`). ``sample(key, state, n)``
    draws ``n`` samples from *each* member and returns them member-major, stacked to
    ``M * n``; with the point family and ``n = 1`` these are the members themselves.
    ``log_prob`` is the mixture density when the member family has one.

    Args:
      family: any posterior family.
      independent_batches: if true, ``update`` expects every batch leaf to carry a leading
        member axis (member ``m`` trains on ``batch[m]``), so members see the data in
        independent orders, as in the original deep ensembles; ``bnn_flat.training.fit``
        builds such batches with ``member_batches=M``. If false, all members share the
        batch.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`EnsembleState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> from bnn_flat.posteriors import point
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> deep_ensemble = build(point.build(loss_fn, optax.sgd(0.1)))
      >>> params = {"w": jax.random.normal(jax.random.key(0), (5, 3, 2))}  # 5 members
      >>> state = deep_ensemble.init(params, {})
      >>> samples = deep_ensemble.sample(jax.random.key(1), state, 1)
      >>> samples["w"].shape
      (5, 3, 2)
    """

    def init_fn(stacked_params: Params, stacked_model_state: Any = None) -> EnsembleState:
        sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked_params)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "ensemble init expects every parameter leaf to carry the same leading member "
                f"axis; got leading sizes {sorted(map(str, sizes))}."
            )
        if stacked_model_state is None or not jax.tree.leaves(stacked_model_state):
            members = jax.vmap(lambda p: family.init(p, stacked_model_state or {}))(stacked_params)
        else:
            members = jax.vmap(family.init)(stacked_params, stacked_model_state)
        return EnsembleState(members=members)

    def update_fn(key: PRNGKey, state: EnsembleState, batch: Batch) -> tuple[EnsembleState, Info]:
        keys = jax.random.split(key, num_members(state))
        batch_axis = 0 if independent_batches else None
        members, info = jax.vmap(family.update, in_axes=(0, 0, batch_axis))(
            keys, state.members, batch
        )
        return EnsembleState(members=members), info

    def sample_fn(key: PRNGKey, state: EnsembleState, num_samples: int) -> Params:
        keys = jax.random.split(key, num_members(state))
        samples = jax.vmap(family.sample, in_axes=(0, 0, None))(keys, state.members, num_samples)
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), samples)

    log_prob_fn = None
    if family.log_prob is not None:

        def log_prob_fn(state: EnsembleState, params: Params) -> jax.Array:
            per_member = jax.vmap(family.log_prob, in_axes=(0, None))(state.members, params)
            return jax.scipy.special.logsumexp(per_member) - math.log(per_member.shape[0])

    return Posterior(init=init_fn, update=update_fn, sample=sample_fn, log_prob=log_prob_fn)


def member_model_states(state: EnsembleState, samples_per_member: int) -> Any:
    """Model states aligned with ``sample(key, state, samples_per_member)``.

    Repeats each member's model state (BatchNorm statistics) for its samples, member-major.
    """
    return jax.tree.map(
        lambda x: jnp.repeat(x, samples_per_member, axis=0), state.members.model_state
    )
