"""The functional bridge between Flax Linen modules and the rest of bnn_flat.

The core of the library never imports Flax: it sees a model as the pure function::

    apply(params, model_state, inputs, *, train, key) -> (outputs, new_model_state)

where ``params`` is the ``"params"`` collection of a Linen module and ``model_state`` is a dict
of its other collections (``{"batch_stats": ...}`` for BatchNorm models, ``{}`` otherwise).
This module builds that function (:func:`make_apply`), initialises parameters (:func:`init`,
:func:`init_ensemble`) and answers the two questions the core asks about a parameter tree
(:func:`num_params`, :func:`has_conv`).

Any Linen module whose ``__call__`` has the signature ``(inputs, *, train)`` works; a module
may also define ``validate_inputs(params, inputs)`` to report incompatible inputs early.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_flat.types import ApplyFn, ModelState, Params, PRNGKey

__all__ = ["init", "make_apply", "init_ensemble", "num_params", "has_conv"]


def init(module: nn.Module, key: PRNGKey, sample_inputs: jax.Array) -> tuple[Params, ModelState]:
    """Initialises a module's parameters and model state.

    Runs ``module.init`` in evaluation mode (``train=False``) under ``jax.jit``, with the RNG
    streams ``"params"`` and ``"dropout"`` both derived from ``key``. The compiled program is
    reused for equal modules and input shapes; on CPU it is compiled without XLA's backend
    optimisation, which cuts the compile time of a ResNet-20 init about tenfold.

    Args:
      module: A Flax Linen module whose ``__call__`` takes ``(inputs, *, train)``.
      key: A PRNG key.
      sample_inputs: A batch of inputs with the shape (except the batch size) and dtype the
        model will see; only its shape and dtype matter.

    Returns:
      ``(params, model_state)``: the ``"params"`` collection and a dict of all other
      collections (e.g. ``{"batch_stats": ...}``), empty for models without state.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> params, model_state = models.init(
      ...     models.mlp([8], num_outputs=2), jax.random.key(0), jnp.zeros((1, 3)))
      >>> params["hidden_0"]["kernel"].shape, model_state
      ((3, 8), {})
    """
    _check_module(module)
    sample_inputs = _check_sample_inputs(sample_inputs)
    return _split_variables(_run_init(_init_variables, module, key, sample_inputs))


def make_apply(module: nn.Module) -> ApplyFn:
    """Turns a Flax Linen module into the library's pure ``apply`` function.

    The returned function is::

        apply(params, model_state, inputs, *, train, key=None) -> (outputs, new_model_state)

    * ``train=True``: BatchNorm uses batch statistics and the mutable collections in
      ``model_state`` are updated and returned; dropout is active and draws its masks from
      ``key`` (a missing key raises ``ValueError`` if the model has dropout).
    * ``train=False``: BatchNorm uses its running statistics, dropout is off, and
      ``model_state`` is returned unchanged. ``key`` may be ``None``.

    ``apply`` is pure and works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``; ``train``
    must be a Python bool (static under ``jit``). Incompatible inputs (wrong rank, number of
    features or channels) and parameter trees that do not match the module raise
    ``ValueError`` while tracing.

    Args:
      module: A Flax Linen module whose ``__call__`` takes ``(inputs, *, train)``.

    Returns:
      The ``apply`` function described above.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.resnet20(num_classes=10, width=4)
      >>> params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
      >>> apply = jax.jit(models.make_apply(module), static_argnames="train")
      >>> logits, new_state = apply(params, model_state, jnp.ones((2, 8, 8, 3)), train=True)
      >>> logits.shape, sorted(new_state)
      ((2, 10), ['batch_stats'])
    """
    _check_module(module)
    validate_inputs: Callable[[Params, jax.Array], None] | None = getattr(
        module, "validate_inputs", None
    )

    def apply(
        params: Params,
        model_state: ModelState,
        inputs: jax.Array,
        *,
        train: bool,
        key: PRNGKey | None = None,
    ) -> tuple[jax.Array, ModelState]:
        if not isinstance(train, bool | np.bool_):
            raise ValueError(
                f"train must be a Python bool (mark it static under jit), got {type(train)}"
            )
        train = bool(train)
        if model_state is None:
            model_state = {}
        if not isinstance(model_state, Mapping):
            raise ValueError(
                f"model_state must be a dict of collections (e.g. {{'batch_stats': ...}} or "
                f"{{}}), got {type(model_state)}"
            )
        if "params" in model_state:
            raise ValueError("model_state must not contain the 'params' collection")
        inputs = jnp.asarray(inputs)
        if validate_inputs is not None:
            validate_inputs(params, inputs)
        variables = {"params": params, **model_state}
        rngs = {} if key is None else {"dropout": key}
        try:
            if train and model_state:
                outputs, new_state = module.apply(
                    variables, inputs, train=True, rngs=rngs, mutable=list(model_state)
                )
                return outputs, {
                    name: new_state.get(name, model_state[name]) for name in model_state
                }
            return module.apply(variables, inputs, train=train, rngs=rngs), model_state
        except flax.errors.InvalidRngError as error:
            raise ValueError(
                f"{type(module).__name__} uses dropout in training mode: pass key= to apply"
            ) from error
        except flax.errors.ScopeParamShapeError as error:
            raise ValueError(
                f"inputs of shape {inputs.shape} do not fit the parameters of "
                f"{type(module).__name__}: {error}"
            ) from error
        except (
            flax.errors.ScopeCollectionNotFound,
            flax.errors.ScopeParamNotFoundError,
            flax.errors.ScopeVariableNotFoundError,
        ) as error:
            raise ValueError(
                f"params and model_state do not match {type(module).__name__} (use the pair "
                f"returned by init): {error}"
            ) from error

    return apply


def init_ensemble(
    module: nn.Module, key: PRNGKey, sample_inputs: jax.Array, num_members: int
) -> tuple[Params, ModelState]:
    """Initialises ``num_members`` independent copies of a module in one compiled program.

    Member ``i`` equals ``init(module, jax.random.split(key, num_members)[i], sample_inputs)``.

    Args:
      module: A Flax Linen module whose ``__call__`` takes ``(inputs, *, train)``.
      key: A PRNG key.
      sample_inputs: A batch of example inputs (only shape and dtype matter).
      num_members: Number of members, at least 1.

    Returns:
      ``(stacked_params, stacked_model_state)``: like :func:`init`, with a new leading axis of
      size ``num_members`` on every leaf.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> params, _ = models.init_ensemble(
      ...     models.mlp([8], num_outputs=2), jax.random.key(0), jnp.zeros((1, 3)), 5)
      >>> params["hidden_0"]["kernel"].shape
      (5, 3, 8)
    """
    _check_module(module)
    sample_inputs = _check_sample_inputs(sample_inputs)
    if (
        isinstance(num_members, bool)
        or not isinstance(num_members, numbers.Integral)
        or num_members < 1
    ):
        raise ValueError(f"num_members must be a positive integer, got {num_members}")
    keys = jax.random.split(key, int(num_members))
    return _split_variables(_run_init(_init_ensemble_variables, module, keys, sample_inputs))


def num_params(params: Params) -> int:
    """Counts the scalars in a parameter tree.

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape``). A stacked
    tree (ensemble, samples) counts every member.

    Args:
      params: A pytree of arrays.

    Returns:
      The total number of elements of all leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import models
      >>> models.num_params({"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)})
      16
    """
    return sum(math.prod(_shape(leaf)) for leaf in jax.tree.leaves(params))


def has_conv(params: Params, *, num_leading_axes: int = 0) -> bool:
    """Whether a parameter tree contains a convolution kernel (a leaf of rank 4).

    BMA uses this to choose between ``vmap`` over samples (fast for dense networks) and a loop
    (``vmap`` over convolution weights is slow on XLA:CPU).

    Args:
      params: A pytree of arrays (or ``jax.ShapeDtypeStruct``).
      num_leading_axes: Number of stacking axes in front of every leaf (1 for a stack of
        samples or ensemble members, 0 for a single network).

    Returns:
      True if some leaf has rank ``4 + num_leading_axes``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat import models
      >>> models.has_conv({"kernel": jnp.zeros((3, 3, 1, 8))})
      True
      >>> models.has_conv({"kernel": jnp.zeros((5, 3, 8))}, num_leading_axes=1)
      False
    """
    if (
        isinstance(num_leading_axes, bool)
        or not isinstance(num_leading_axes, numbers.Integral)
        or num_leading_axes < 0
    ):
        raise ValueError(f"num_leading_axes must be a non-negative integer, got {num_leading_axes}")
    rank = 4 + int(num_leading_axes)
    return any(len(_shape(leaf)) == rank for leaf in jax.tree.leaves(params))


def _init_variables(module: nn.Module, key: PRNGKey, inputs: jax.Array) -> dict[str, Any]:
    params_key, dropout_key = jax.random.split(key)
    return module.init({"params": params_key, "dropout": dropout_key}, inputs, train=False)


def _init_ensemble_variables(module: nn.Module, keys: PRNGKey, inputs: jax.Array) -> dict[str, Any]:
    return jax.vmap(lambda key: _init_variables(module, key, inputs))(keys)


# Initialisation runs once, but its many random-number kernels make XLA:CPU spend tens of
# seconds optimising them (ResNet-20: ~20 s against ~2 s without backend optimisation, with
# results equal to float32 rounding). On CPU we therefore compile init without it.
_FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted(function: Callable[..., Any], fast_compile: bool) -> Callable[..., Any]:
    options = _FAST_COMPILE_OPTIONS if fast_compile else None
    return jax.jit(function, static_argnums=0, compiler_options=options)


def _run_init(
    function: Callable[..., Any], module: nn.Module, key: PRNGKey, inputs: jax.Array
) -> dict[str, Any]:
    """Runs an init function under jit, reusing the compiled program for equal modules."""
    if isinstance(key, jax.core.Tracer) or isinstance(inputs, jax.core.Tracer):
        return function(module, key, inputs)  # inside an outer trace, which compiles it
    options = _FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    try:
        hash(module)
    except TypeError:  # unhashable attributes (e.g. a list): compile a closure instead
        compiled = jax.jit(lambda k, x: function(module, k, x), compiler_options=options)
    else:
        compiled = functools.partial(_jitted(function, options is not None), module)
    try:
        return compiled(key, inputs)
    except ValueError as error:
        if "compiler_options" not in str(error):
            raise
        # Concrete arguments inside an outer trace: compiler options are not allowed there.
        return function(module, key, inputs)


def _split_variables(variables: Mapping[str, Any]) -> tuple[Params, ModelState]:
    params = variables.get("params", {})
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return params, model_state


def _check_module(module: Any) -> None:
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected a flax.linen.Module, got {type(module)}")


def _check_sample_inputs(sample_inputs: Any) -> jax.Array:
    sample_inputs = jnp.asarray(sample_inputs)
    if sample_inputs.ndim < 1 or sample_inputs.size == 0:
        raise ValueError(
            f"sample_inputs must be a non-empty batch of shape (batch, ...), got shape "
            f"{sample_inputs.shape}"
        )
    return sample_inputs


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(np.shape(leaf)) if shape is None else tuple(shape)
