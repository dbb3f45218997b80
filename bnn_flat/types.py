"""Shared types and the contracts every part of bnn_flat relies on.

Three concepts make up the library:

* a **transform** is an :class:`optax.GradientTransformationExtraArgs`;
* a **posterior family** is a :class:`Posterior` of pure functions;
* **BMA** (:mod:`bnn_flat.bma`) maps a model over a stack of posterior samples.

Model contract
--------------
The core never imports Flax. A model is a pure function::

    apply(params, model_state, inputs, *, train, key) -> (outputs, new_model_state)

``model_state`` holds BatchNorm running statistics (an empty dict for models without
them); ``key`` drives dropout and may be ``None`` when ``train`` is false.
:func:`bnn_flat.models.make_apply` turns a Flax Linen module into this form.

Loss contract
-------------
A loss function (see :mod:`bnn_flat.objectives`) is::

    loss_fn(params, model_state, batch, key) -> (loss, LossAux(model_state, metrics))

and returns the *per-datum* objective: mean negative log-likelihood over the batch
plus (negative log prior) / N. It always runs the model in training mode.

Extra-args contract
-------------------
A family calls its optimizer as::

    optimizer.update(grads, opt_state, params, grad_fn=grad_fn, split_grad_fn=split_grad_fn,
                     value=loss, key=subkey)

* ``grad_fn(params) -> grads`` evaluates the gradient of the same objective on the same
  batch at other parameters. It never updates BatchNorm statistics. Dropout inside it
  uses a fresh mask unless the family was built with ``perturbed_dropout="same"``.
* ``split_grad_fn(stacked_params) -> stacked_grads`` (m-sharpness) splits the batch into
  ``m`` equal sub-batches, ``m`` being the leading axis of ``stacked_params``, and returns
  the gradient of sub-batch ``j`` at ``stacked_params[j]`` (vmapped).
* ``value`` is the current loss (for transforms such as ``reduce_on_plateau``).
* ``key`` is a fresh PRNG key for stochastic transforms. Transforms never keep keys in
  their state, so a vmapped ensemble of chains gets independent noise.

Plain optax transforms ignore all three; ``optax.chain`` forwards them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

__all__ = [
    "Params",
    "ModelState",
    "Batch",
    "PRNGKey",
    "ApplyFn",
    "LossFn",
    "LossAux",
    "Info",
    "Posterior",
]

Params = Any
"""Any pytree of arrays."""

ModelState = Any
"""Mutable model collections (e.g. ``{"batch_stats": ...}``), or an empty dict."""

Batch = dict[str, jax.Array]
"""A mini-batch: ``{"inputs": (B, ...), "labels": (B,) or (B, D)}``."""

PRNGKey = jax.Array
"""A typed PRNG key from :func:`jax.random.key`."""


class ApplyFn(Protocol):
    """A pure model forward pass."""

    def __call__(
        self,
        params: Params,
        model_state: ModelState,
        inputs: jax.Array,
        *,
        train: bool,
        key: PRNGKey | None,
    ) -> tuple[jax.Array, ModelState]: ...


class LossAux(NamedTuple):
    """Auxiliary output of a loss function.

    Attributes:
      model_state: The model state after the forward pass (new BatchNorm statistics).
      metrics: A small dict of scalars (e.g. ``{"nll": ..., "accuracy": ...}``).
    """

    model_state: ModelState
    metrics: dict[str, jax.Array]


class LossFn(Protocol):
    """A per-datum objective; see the module docstring."""

    def __call__(
        self, params: Params, model_state: ModelState, batch: Batch, key: PRNGKey
    ) -> tuple[jax.Array, LossAux]: ...


class Info(NamedTuple):
    """Per-step diagnostics returned by ``Posterior.update`` (never carried over).

    Attributes:
      loss: The per-datum objective at the start of the step.
      metrics: The loss function's metrics dict.
    """

    loss: jax.Array
    metrics: dict[str, jax.Array]


class Posterior(NamedTuple):
    """A posterior family: four pure functions made by a ``build`` factory.

    Attributes:
      init: ``init(params, model_state) -> state``. Deterministic. The state is a
        NamedTuple with at least ``params``, ``model_state`` and ``step``.
      update: ``update(key, state, batch) -> (state, Info)``, one inference step. The
        state's tree structure, shapes and dtypes never change.
      sample: ``sample(key, state, num_samples) -> params`` stacked along a new leading
        axis of size ``num_samples``.
      log_prob: ``log_prob(state, params) -> scalar`` or ``None`` for families without
        a density (point masses, sample banks).
    """

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Info]]
    sample: Callable[..., Params]
    log_prob: Callable[..., jax.Array] | None
