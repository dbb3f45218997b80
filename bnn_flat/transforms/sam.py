r"""Sharpness-aware gradient transforms: SAM, ASAM and Fisher-SAM.

Every rule here replaces the mini-batch gradient :math:`g = \nabla L(\theta)` by the
gradient at an ascent-perturbed point,

.. math::

    \epsilon = \rho\, d(g, \theta), \qquad
    \text{output} = \nabla L(\theta + \epsilon),

where the *direction* :math:`d` is the maximiser of the linearised loss
:math:`g^\top d` over the unit ball of a metric :math:`F`,
:math:`d = F^{-1} g / \sqrt{g^\top F^{-1} g}`:

* SAM: :math:`F = I`, so :math:`d = g / \lVert g \rVert` (global norm over all leaves).
* ASAM: :math:`F = \operatorname{diag}(T)^{-2}` with :math:`T = |\theta| + \eta`, so
  :math:`d = T^2 g / \lVert T g \rVert`.
* Fisher-SAM: :math:`F = \operatorname{diag}(1 + \eta g^2)`, so
  :math:`d = (g / f) / \sqrt{\sum g^2 / f}` with :math:`f = 1 + \eta g^2`.

Each rule is an :class:`optax.GradientTransformationExtraArgs` using the "opaque"
pattern: one ``update`` call per training step, with the caller passing
``grad_fn(params) -> grads`` (the gradient of the same objective on the same batch)
as a keyword argument. The transform evaluates ``grad_fn`` at
:math:`\theta + \epsilon` and returns that gradient, so::

    optax.chain(sam(rho=0.05), optax.sgd(0.1, momentum=0.9))

is a complete SAM optimizer. ``grad_fn`` must not update BatchNorm statistics (the
families in :mod:`bnn_flat.posteriors` guarantee this). Build it *inside* the jitted
step; passing a fresh closure as an argument to a jitted function recompiles it.

**m-sharpness.** With ``num_sub_batches=m`` the batch is split into ``m`` contiguous
sub-batches, each gets its own perturbation from its own gradient, and the output is the
mean over sub-batches of the perturbed sub-batch gradients (Foret et al., 2021; the
bayesian-sam recipe uses m = 8). The whole-batch ``grad_fn`` cannot do this, so the
caller passes a second extra argument::

    split_grad_fn(stacked_params) -> stacked_grads

where ``stacked_params`` has a leading axis of size ``m`` and entry ``j`` of the result
is the gradient of sub-batch ``j`` at ``stacked_params[j]``. The number of sub-batches
is read from the leading axis, so it is set in one place (the transform) and does not
depend on the number of devices. :func:`make_split_grad_fn` builds ``split_grad_fn``
from a per-sub-batch gradient function by reshaping the batch to ``(m, B/m, ...)`` and
vmapping. The m-sharpness path ignores the incoming whole-batch gradient and evaluates
two split gradients (at :math:`\theta` and at the perturbed points), so it costs one more
gradient evaluation than plain SAM when used inside a family that already computed the
whole-batch gradient.

**Multiple devices.** Under ``jax.jit`` with sharded batches nothing is needed (the loss
is the global-batch mean, so the perturbation is one per global batch; see
docs/multidevice.md). Inside an explicit ``shard_map`` pass ``axis_name``: the perturbed
gradient is then averaged over that axis. Whether the incoming gradient was averaged
before ``update`` decides whether the perturbation is global or per device. Use
``shard_map(..., check_vma=False)`` there: with JAX's default ``check_vma=True`` the
gradient of replicated parameters comes back already summed over the axis, so the
``pmean`` is a no-op on a gradient ``D`` times too large. With ``axis_name`` and
``num_sub_batches=m``, each device splits its *local* batch into ``m`` sub-batches
(``m * D`` in total).

References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021.
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks, ICML 2021.
    Kim et al., Fisher SAM: Information Geometry and Sharpness Aware Minimisation,
    ICML 2022.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from bnn_flat._random import standard_normal
from bnn_flat.types import Batch, Params, PRNGKey

__all__ = [
    "Direction",
    "SharpnessAwareState",
    "sharpness_aware",
    "sam",
    "asam",
    "fisher_sam",
    "sam_direction",
    "asam_direction",
    "fisher_sam_direction",
    "make_split_grad_fn",
    "normal_like",
]

_ASAM_FORMS = ("paper", "davda54")


class Direction(Protocol):
    """An ascent direction: ``direction(gradient, params, key) -> ascent``.

    ``ascent`` has the structure of ``params`` and unit length in the method's metric,
    so the perturbation is ``rho * ascent``. ``key`` is the ``key=`` extra argument of
    the ``update`` call (``None`` when the caller gave none); deterministic directions
    ignore it. A direction must be a pure function of its arguments (it is vmapped over
    sub-batches for m-sharpness).
    """

    def __call__(self, gradient: Params, params: Params, key: PRNGKey | None) -> Params: ...


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware` and its factories (stateless: no fields)."""


def sharpness_aware(
    rho: jax.typing.ArrayLike = 0.05,
    direction: Direction | None = None,
    *,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by the gradient at an ascent-perturbed point.

    .. math::

        \epsilon = \rho\, d(g, \theta), \qquad
        \text{updates} \leftarrow \nabla L(\theta + \epsilon).

    Args:
        rho: Perturbation radius (traceable, so it can be scheduled with
            :func:`optax.inject_hyperparams`; pass ``static_args="direction"`` there).
        direction: A :class:`Direction`; defaults to :func:`sam_direction` (SAM).
        axis_name: If set, average the perturbed gradient over this mapped axis
            (only for explicit ``shard_map``/``pmap`` code).
        num_sub_batches: ``None`` (default) for one perturbation per batch via
            ``grad_fn``. An integer ``m`` enables m-sharpness through the
            ``split_grad_fn`` extra argument (see the module docstring). ``m = 1``
            through ``split_grad_fn`` equals plain SAM.

    Returns:
        A transform whose ``update(updates, state, params, *, grad_fn, ...)`` needs
        ``params`` and ``grad_fn`` (and ``split_grad_fn`` when ``num_sub_batches`` is
        set, ``key`` when the direction is stochastic). Other extra arguments are ignored.

    Raises:
        ValueError: If ``rho`` is a negative number or ``num_sub_batches`` is not a
            positive integer.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from bnn_flat.transforms import sharpness_aware, sam_direction
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> tx = optax.chain(sharpness_aware(0.1, sam_direction()), optax.sgd(1.0))
        >>> w = jnp.array([3.0, 4.0])
        >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        >>> updates  # -(w + 0.1 * w / 5)
        Array([-3.06, -4.08], dtype=float32)
    """
    direction = sam_direction() if direction is None else direction
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "sharpness_aware")


def _sharpness_aware(
    rho: jax.typing.ArrayLike,
    direction: Direction,
    axis_name: str | None,
    num_sub_batches: int | None,
    name: str,
) -> optax.GradientTransformationExtraArgs:
    """:func:`sharpness_aware`, with the public factory's ``name`` in error messages."""
    _check_number("rho", rho, minimum=0.0)
    _check_num_sub_batches(num_sub_batches)

    def init_fn(params: Params) -> SharpnessAwareState:
        del params
        return SharpnessAwareState()

    def update_fn(
        updates: Params,
        state: SharpnessAwareState,
        params: Params | None = None,
        *,
        grad_fn: Callable[[Params], Params] | None = None,
        split_grad_fn: Callable[[Params], Params] | None = None,
        key: PRNGKey | None = None,
        **extra_args: Any,
    ) -> tuple[Params, SharpnessAwareState]:
        del extra_args
        _require_params(name, params)
        if num_sub_batches is None:
            _require_callable(name, "grad_fn", grad_fn)
            ascent = direction(updates, params, key)
            new_updates = grad_fn(_add_scaled(params, rho, ascent))
        else:
            _require_callable(name, "split_grad_fn", split_grad_fn)
            new_updates = _split_perturbed_gradient(
                params, rho, direction, key, split_grad_fn, num_sub_batches
            )
        if axis_name is not None:
            new_updates = jax.lax.pmean(new_updates, axis_name)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    rho: jax.typing.ArrayLike = 0.05,
    *,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization: the gradient at :math:`\theta + \rho g/\lVert g\rVert`.

    Precisely, the perturbation is :math:`\rho g / (\lVert g \rVert + \varepsilon)`.
    The norm is global over all leaves (davda54 and optax convention). A zero gradient
    gives a zero perturbation (no NaN). Chain with a base optimizer:
    ``optax.chain(sam(0.05), optax.sgd(0.1, momentum=0.9))``.

    Args:
        rho: Perturbation radius :math:`\rho \ge 0`.
        eps: Added to the gradient norm.
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).
        num_sub_batches: m-sharpness; see :func:`sharpness_aware`.

    Returns:
        A transform needing ``params`` and ``grad_fn`` in ``update``.

    Raises:
        ValueError: If ``rho`` is negative.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import sam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * w**2))
        >>> w = jnp.array([1.0, 0.0])
        >>> tx = sam(rho=0.5)
        >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        >>> updates  # A (w + 0.5 g/|g|) with g = (1, 0)
        Array([1.5, 0. ], dtype=float32)

    References:
        Foret et al., Sharpness-Aware Minimization for Efficiently Improving
        Generalization, ICLR 2021.
    """
    return _sharpness_aware(rho, sam_direction(eps), axis_name, num_sub_batches, "sam")


def asam(
    rho: jax.typing.ArrayLike = 0.5,
    eta: jax.typing.ArrayLike = 0.01,
    *,
    form: str = "paper",
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive SAM: a scale-invariant perturbation.

    ``form="paper"`` (Kwon et al. 2021) uses :math:`T = |\theta| + \eta` for every
    parameter and :math:`\epsilon = \rho\, T^2 g / \lVert T g \rVert`.
    ``form="davda54"`` reproduces the widely copied PyTorch implementation (used by the
    F-BNN and SA-BMA code): :math:`\epsilon = \rho\, \theta^2 g / \lVert \theta g \rVert`,
    with no :math:`\eta`. (The authors' own code also sets :math:`T = 1` for biases;
    neither form here does.)

    Args:
        rho: Perturbation radius (the paper's CIFAR recipe uses 0.5 to 2.0).
        eta: Offset :math:`\eta \ge 0` of the paper form; ignored by ``"davda54"``.
        form: ``"paper"`` or ``"davda54"``.
        eps: Added to the normaliser.
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).
        num_sub_batches: m-sharpness; see :func:`sharpness_aware`.

    Returns:
        A transform needing ``params`` and ``grad_fn`` in ``update``.

    Raises:
        ValueError: On a negative ``rho``/``eta`` or an unknown ``form``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import asam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.array([1.0, 2.0])
        >>> tx = asam(rho=0.1, form="davda54")
        >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        >>> updates.shape
        (2,)

    References:
        Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
        Learning of Deep Neural Networks, ICML 2021.
    """
    direction = asam_direction(eta, form=form, eps=eps)
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "asam")


def fisher_sam(
    rho: jax.typing.ArrayLike = 0.1,
    eta: jax.typing.ArrayLike = 1.0,
    *,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fisher-SAM: SAM in the metric of a damped diagonal empirical Fisher.

    .. math::

        f = 1 + \eta g^2, \qquad
        \epsilon = \rho \frac{g / f}{\sqrt{\sum g^2 / f}}.

    This is the published rule with a global normaliser. The SA-BMA repository's FSAM
    baseline (``g^2`` in the numerator, per-tensor norms) is a different, buggy rule and
    is deliberately not provided.

    Args:
        rho: Perturbation radius :math:`\gamma` of the paper (typical 0.1).
        eta: Fisher weight :math:`\eta \ge 0` (typical 1.0).
        eps: Added to the normaliser.
        axis_name: Average the perturbed gradient over this axis (``shard_map`` code).
        num_sub_batches: m-sharpness; see :func:`sharpness_aware`.

    Returns:
        A transform needing ``params`` and ``grad_fn`` in ``update``.

    Raises:
        ValueError: On a negative ``rho`` or ``eta``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import fisher_sam
        >>> grad_fn = jax.grad(lambda w: 0.5 * jnp.sum(w**2))
        >>> w = jnp.array([1.0, 2.0])
        >>> tx = fisher_sam(rho=0.1, eta=0.0)  # eta = 0 is plain SAM
        >>> updates, _ = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
        >>> bool(jnp.allclose(updates, w * (1 + 0.1 / jnp.sqrt(5.0))))
        True

    References:
        Kim et al., Fisher SAM: Information Geometry and Sharpness Aware
        Minimisation, ICML 2022.
    """
    direction = fisher_sam_direction(eta, eps=eps)
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "fisher_sam")


# Directions ---------------------------------------------------------------------------


def sam_direction(eps: jax.typing.ArrayLike = 1e-12) -> Direction:
    r"""The SAM direction :math:`g / (\lVert g \rVert + \varepsilon)`, global norm.

    Args:
        eps: Added to the norm so that a zero gradient gives a zero direction.

    Returns:
        A :class:`Direction`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from bnn_flat.transforms import sam_direction
        >>> sam_direction()({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, None, None)
        {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}
    """

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del params, key
        inverse_norm = 1.0 / (jnp.sqrt(_tree_sum_of_squares(gradient)) + eps)
        return _tree_scale(gradient, inverse_norm)

    return direction


def asam_direction(
    eta: jax.typing.ArrayLike = 0.01,
    *,
    form: str = "paper",
    eps: jax.typing.ArrayLike = 1e-12,
) -> Direction:
    r"""The ASAM direction :math:`T^2 g / (\lVert T g \rVert + \varepsilon)`.

    Args:
        eta: Offset in :math:`T = |\theta| + \eta` (``form="paper"``).
        form: ``"paper"`` or ``"davda54"`` (:math:`T = \theta`, no offset).
        eps: Added to the normaliser.

    Returns:
        A :class:`Direction`.

    Raises:
        ValueError: On a negative ``eta`` or an unknown ``form``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from bnn_flat.transforms import asam_direction
        >>> asam_direction(0.0)(jnp.array([1.0, 1.0]), jnp.array([0.0, 2.0]), None)
        Array([0., 2.], dtype=float32)
    """
    _check_number("eta", eta, minimum=0.0)
    if form not in _ASAM_FORMS:
        raise ValueError(f"asam: unknown form {form!r}; expected one of {_ASAM_FORMS}.")

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del key
        _require_params("asam_direction", params)
        if form == "paper":
            scale = jax.tree.map(lambda p: jnp.abs(p) + eta, params)
        else:
            scale = params
        scaled = jax.tree.map(lambda t, g: t * g, scale, gradient)
        inverse_norm = 1.0 / (jnp.sqrt(_tree_sum_of_squares(scaled)) + eps)
        return jax.tree.map(lambda t, tg: (t * tg * inverse_norm).astype(tg.dtype), scale, scaled)

    return direction


def fisher_sam_direction(
    eta: jax.typing.ArrayLike = 1.0, *, eps: jax.typing.ArrayLike = 1e-12
) -> Direction:
    r"""The Fisher-SAM direction :math:`(g/f) / \sqrt{\sum g^2/f}`, :math:`f = 1 + \eta g^2`.

    Args:
        eta: Fisher weight :math:`\eta \ge 0`.
        eps: Added to the normaliser.

    Returns:
        A :class:`Direction`.

    Raises:
        ValueError: On a negative ``eta``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from bnn_flat.transforms import fisher_sam_direction
        >>> fisher_sam_direction(0.0)(jnp.array([3.0, 4.0]), None, None)
        Array([0.6, 0.8], dtype=float32)
    """
    _check_number("eta", eta, minimum=0.0)

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del params, key
        preconditioned = jax.tree.map(lambda g: g / (1.0 + eta * g * g), gradient)
        # sum g^2 / f = sum g * (g / f): reuse the preconditioned gradient.
        squared = sum(
            jnp.sum(_as_float32_or_wider(g) * _as_float32_or_wider(h))
            for g, h in zip(jax.tree.leaves(gradient), jax.tree.leaves(preconditioned), strict=True)
        )
        return _tree_scale(preconditioned, 1.0 / (jnp.sqrt(squared) + eps))

    return direction


# m-sharpness ------------------------------------------------------------------------


def make_split_grad_fn(
    batch_grad_fn: Callable[[Params, Batch, jax.Array], Params], batch: Batch
) -> Callable[[Params], Params]:
    """Builds the ``split_grad_fn`` extra argument used by m-sharpness.

    The returned function takes parameters stacked along a new leading axis of size
    ``m``, splits every leaf of ``batch`` into ``m`` contiguous sub-batches of equal size
    (as the bayesian-sam code does) and returns, stacked, the gradient of sub-batch
    ``j`` at ``stacked_params[j]``, computed with :func:`jax.vmap`.

    Args:
        batch_grad_fn: ``batch_grad_fn(params, sub_batch, index) -> grads``: the
            gradient of the per-datum objective on ``sub_batch``. ``index`` (an int32
            scalar) is the sub-batch number, e.g. to fold into a dropout key.
        batch: The mini-batch (a pytree of arrays sharing their leading axis).

    Returns:
        ``split_grad_fn(stacked_params) -> stacked_grads``.

    Raises:
        ValueError: (when called) if the batch size is not divisible by ``m``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import make_split_grad_fn
        >>> batch = {"x": jnp.arange(4.0)}
        >>> loss = lambda w, b, i: jnp.mean((w - b["x"]) ** 2) / 2
        >>> split_grad_fn = make_split_grad_fn(jax.grad(loss), batch)
        >>> split_grad_fn(jnp.zeros(2))  # sub-batches [0, 1] and [2, 3]
        Array([-0.5, -2.5], dtype=float32)
    """

    def split_grad_fn(stacked_params: Params) -> Params:
        num_sub_batches = _leading_axis_size(stacked_params)

        def split(x: jax.Array) -> jax.Array:
            if x.shape[0] % num_sub_batches:
                raise ValueError(
                    f"m-sharpness: the batch size {x.shape[0]} is not divisible by the "
                    f"number of sub-batches {num_sub_batches}."
                )
            return x.reshape(num_sub_batches, x.shape[0] // num_sub_batches, *x.shape[1:])

        sub_batches = jax.tree.map(split, batch)
        indices = jnp.arange(num_sub_batches, dtype=jnp.int32)
        return jax.vmap(batch_grad_fn)(stacked_params, sub_batches, indices)

    return split_grad_fn


def _split_perturbed_gradient(
    params: Params,
    rho: jax.typing.ArrayLike,
    direction: Direction,
    key: PRNGKey | None,
    split_grad_fn: Callable[[Params], Params],
    num_sub_batches: int,
) -> Params:
    """m-sharpness: mean over sub-batches of the gradients at per-sub-batch perturbations."""
    stacked = _broadcast_leading(params, num_sub_batches)
    gradients = split_grad_fn(stacked)
    keys = None if key is None else jax.random.split(key, num_sub_batches)
    ascents = jax.vmap(direction, in_axes=(0, None, 0))(gradients, params, keys)
    perturbed_gradients = split_grad_fn(_add_scaled(stacked, rho, ascents))
    return jax.tree.map(lambda g: jnp.mean(g, axis=0).astype(g.dtype), perturbed_gradients)


def normal_like(key: PRNGKey, tree: Params) -> Params:
    """Standard normal noise shaped like ``tree``; the noise source of every transform here.

    All entries come from one :func:`jax.random.normal` draw of length ``D`` (the total
    size), in float32 or the widest float dtype of the leaves, split in leaf order
    (:func:`jax.tree.leaves`) and cast to each leaf's dtype. One draw compiles much
    faster than one per leaf, and a bfloat16 tree gets the float32 noise rounded.

    Args:
        key: PRNG key.
        tree: A pytree of arrays (only shapes and dtypes are used).

    Returns:
        A pytree like ``tree``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from bnn_flat.transforms import normal_like
        >>> noise = normal_like(jax.random.key(0), {"a": jnp.zeros(2), "b": jnp.zeros((1, 3))})
        >>> flat = jax.random.normal(jax.random.key(0), (5,))
        >>> bool(jnp.array_equal(noise["b"], flat[2:].reshape(1, 3)))
        True
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtype = functools.reduce(jnp.promote_types, [jnp.float32, *(x.dtype for x in leaves)])
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    flat = standard_normal(key, (sum(sizes),), dtype)
    offsets = itertools.accumulate(sizes, initial=0)
    noise = [
        flat[start : start + size].reshape(jnp.shape(x)).astype(x.dtype)
        for x, start, size in zip(leaves, offsets, sizes, strict=False)
    ]
    return jax.tree.unflatten(treedef, noise)


# Private helpers shared by the transforms package -------------------------------------


def _as_float32_or_wider(x: jax.Array) -> jax.Array:
    """Casts low-precision floats up to float32 for reductions."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tree_sum_of_squares(tree: Params) -> jax.Array:
    """Sum of squares over all leaves, accumulated in at least float32."""
    return sum(jnp.sum(jnp.square(_as_float32_or_wider(x))) for x in jax.tree.leaves(tree))


def _tree_scale(tree: Params, scalar: jax.typing.ArrayLike) -> Params:
    """Multiplies every leaf by a scalar, keeping the leaf dtypes."""
    return jax.tree.map(lambda x: (x * scalar).astype(x.dtype), tree)


def _add_scaled(params: Params, rho: jax.typing.ArrayLike, ascent: Params) -> Params:
    """``params + rho * ascent`` in the params' dtypes (broadcasts a stacked ascent)."""
    return jax.tree.map(lambda p, a: (p + rho * a).astype(p.dtype), params, ascent)


def _broadcast_leading(tree: Params, size: int) -> Params:
    """Stacks ``size`` copies of every leaf along a new leading axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (size, *jnp.shape(x))), tree)


def _leading_axis_size(tree: Params) -> int:
    """The (common) leading axis size of a stacked pytree."""
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"stacked pytree has inconsistent leading axes {sorted(sizes)}.")
    return sizes.pop()


def _tree_size(tree: Params) -> int:
    """Total number of scalar entries of a pytree (static)."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def _check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strictly_positive: bool = False,
    maximum: float | None = None,
) -> None:
    """Validates a hyper-parameter if it is a concrete Python number; traced values pass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    if strictly_positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")


def _check_num_sub_batches(num_sub_batches: Any) -> None:
    """``num_sub_batches`` is ``None`` or a positive Python int (it sets array shapes)."""
    if num_sub_batches is None:
        return
    if isinstance(num_sub_batches, bool) or not isinstance(num_sub_batches, int):
        raise ValueError(
            "num_sub_batches must be None or a positive Python int (it sets array shapes; "
            "with optax.inject_hyperparams pass static_args='num_sub_batches'), got "
            f"{num_sub_batches!r}."
        )
    if num_sub_batches < 1:
        raise ValueError(f"num_sub_batches must be >= 1, got {num_sub_batches}.")


def _require_params(name: str, params: Params | None) -> None:
    if params is None:
        raise ValueError(f"{name} needs `params` in update(updates, state, params, ...).")


def _require_callable(name: str, argument: str, value: Any) -> None:
    if value is None:
        raise ValueError(
            f"{name} needs the keyword argument `{argument}=` in update(); posterior "
            "families pass it automatically, plain optax loops must build it themselves."
        )
    if not callable(value):
        raise ValueError(f"{name}: `{argument}` must be callable, got {type(value).__name__}.")


def _require_key(name: str, key: PRNGKey | None) -> PRNGKey:
    if key is None:
        raise ValueError(
            f"{name} is stochastic and needs the keyword argument `key=` (a fresh "
            "jax.random.key per step) in update()."
        )
    return key
