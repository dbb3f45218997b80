r"""Data-parallel and member-parallel placement on a device mesh.

Training and BMA run on several devices through ``jax.jit`` with
:class:`jax.sharding.NamedSharding` over a mesh with up to two named axes:

* ``"data"`` (:data:`DATA_AXIS`): the example axis of every mini-batch (and, in BMA, of the
  test inputs) is split across it. Parameters and optimizer states are replicated along it.
* ``"members"`` (:data:`MEMBER_AXIS`): the leading member axis of an
  :class:`~bnn_flat.posteriors.ensemble.EnsembleState` (deep-ensemble members, SG-MCMC
  chains, multi-SWAG members) and, in BMA, the sample axis are split across it.

**Global-batch semantics.** The per-datum loss is the mean over the *global* batch of
``batch_size`` examples, however many devices hold pieces of it: XLA inserts the
all-reduce of the gradient, so a sharpness-aware transform sees the global gradient and
makes one perturbation per global batch, exactly as on one device. m-sharpness is set by the
transform's ``num_sub_batches`` (``m`` contiguous sub-batches of the global batch), never by
the device count. The results of a run on ``D`` devices equal those on one device up to the
summation order of the reductions over the batch (float32 differences of order
:math:`10^{-7}` per step).

**Explicit** ``shard_map`` **code** (a custom step written per device): with
``check_vma=False`` the gradient is per device; average it with ``lax.pmean`` and pass
``axis_name=`` to the sharpness-aware transforms so the perturbed gradient is averaged too.
With ``check_vma=True`` (JAX's default) the gradient of replicated parameters is already
*summed* over the axis and ``axis_name`` changes nothing. The library's own paths use
``jax.jit`` with shardings and need no axis names.

**Multi-host.** Call :func:`jax.distributed.initialize` first on every host; then
:func:`make_mesh` spans the devices of all hosts. Either give every host the whole training
set (it is placed replicated or sharded by :func:`shard_batch` / :func:`replicate`), or
build one global array from the per-host pieces with :func:`global_batch_from_local`
(a wrapper of :func:`jax.make_array_from_process_local_data`). See ``docs/multidevice.md``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> mesh = make_mesh(1)
  >>> x = shard_batch(jnp.arange(8.0).reshape(4, 2), mesh)
  >>> tuple(x.sharding.spec)
  ('data',)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "MEMBER_AXIS",
    "make_mesh",
    "axis_size",
    "replicated",
    "replicate",
    "shard_batch",
    "shard_members",
    "state_sharding",
    "place_state",
    "batch_spec",
    "check_batch_size",
    "global_batch_from_local",
]

DATA_AXIS = "data"
"""Mesh axis that splits the example axis of batches and inputs."""

MEMBER_AXIS = "members"
"""Mesh axis that splits ensemble members, SG-MCMC chains and BMA samples."""


def make_mesh(
    num_devices: int | None = None,
    axis_names: Sequence[str] = (DATA_AXIS,),
    axis_sizes: Sequence[int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A device mesh with named axes (``Auto`` axis types, i.e. GSPMD propagation).

    Args:
      num_devices: devices to use (the first ``num_devices`` of ``devices``); all of them
        when ``None``.
      axis_names: mesh axis names, e.g. ``("data",)`` or ``("members", "data")``.
      axis_sizes: size of each axis; one entry may be ``-1`` (the remaining devices). When
        ``None``, a 1-D mesh takes all devices and a multi-axis mesh puts them all on the
        last axis.
      devices: devices to build the mesh from; ``jax.devices()`` (all hosts) when ``None``.

    Returns:
      A :class:`jax.sharding.Mesh`.

    Raises:
      ValueError: for an empty or repeated axis name, sizes that do not multiply to the
        number of devices, or more devices than available.

    Example:
      >>> mesh = make_mesh(1, ("members", "data"))
      >>> dict(mesh.shape)
      {'members': 1, 'data': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_names = tuple(axis_names)
    if not axis_names or len(set(axis_names)) != len(axis_names):
        raise ValueError(f"axis_names must be non-empty and distinct, got {axis_names}.")
    if any(not isinstance(name, str) or not name for name in axis_names):
        raise ValueError(f"axis_names must be non-empty strings, got {axis_names}.")
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}.")
    if num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist.")
    if axis_sizes is None:
        axis_sizes = (1,) * (len(axis_names) - 1) + (-1,)
    sizes = [int(s) for s in axis_sizes]
    if len(sizes) != len(axis_names):
        raise ValueError(f"axis_sizes {tuple(sizes)} and axis_names {axis_names} differ in length.")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"axis_sizes must be positive, with at most one -1; got {sizes}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"cannot fill axis_sizes {tuple(sizes)} with {num_devices} devices.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"axis_sizes {tuple(sizes)} multiply to {math.prod(sizes)}, not num_devices="
            f"{num_devices}."
        )
    grid = np.asarray(devices[:num_devices], dtype=object).reshape(sizes)
    return Mesh(grid, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of mesh axis ``name``, or 1 when the mesh has no such axis.

    Example:
      >>> axis_size(make_mesh(1), "members")
      1
    """
    return int(dict(mesh.shape).get(name, 1))


def _axis(mesh: Mesh, name: str) -> str | None:
    return name if name in mesh.axis_names else None


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``.

    Example:
      >>> tuple(replicated(make_mesh(1)).spec)
      ()
    """
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (a full copy each).

    Example:
      >>> import jax.numpy as jnp
      >>> tuple(replicate({"w": jnp.ones(3)}, make_mesh(1))["w"].sharding.spec)
      ()
    """
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh, *, axis: int = 0) -> Any:
    """Splits axis ``axis`` (the example axis) of every leaf over the ``"data"`` mesh axis.

    Args:
      tree: pytree of arrays sharing the example axis.
      mesh: the mesh; without a ``"data"`` axis the leaves are replicated.
      axis: the example axis (e.g. 1 for stacked batches ``(num_batches, B, ...)``).

    Returns:
      The tree placed with :class:`~jax.sharding.NamedSharding`.

    Raises:
      ValueError: when the example axis is not divisible by the ``"data"`` axis size.

    Example:
      >>> import jax.numpy as jnp
      >>> tuple(shard_batch(jnp.zeros((2, 4)), make_mesh(1), axis=1).sharding.spec)
      (None, 'data')
    """
    size = axis_size(mesh, DATA_AXIS)

    def place(x):
        x = jax.numpy.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim <= axis:
            raise ValueError(f"cannot shard axis {axis} of an array of shape {x.shape}.")
        if x.shape[axis] % size:
            raise ValueError(
                f"axis {axis} of size {x.shape[axis]} is not divisible by the '{DATA_AXIS}' "
                f"mesh axis of size {size}."
            )
        spec = PartitionSpec(*([None] * axis), _axis(mesh, DATA_AXIS))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def shard_members(tree: Any, mesh: Mesh) -> Any:
    """Splits the leading (member, chain or sample) axis of every leaf over ``"members"``.

    Raises:
      ValueError: when the leading axis is not divisible by the ``"members"`` axis size.

    Example:
      >>> import jax.numpy as jnp
      >>> mesh = make_mesh(1, ("members", "data"))
      >>> tuple(shard_members(jnp.zeros((3, 2)), mesh).sharding.spec)
      ('members',)
    """
    return jax.device_put(tree, _member_shardings(tree, mesh))


def _member_shardings(tree: Any, mesh: Mesh) -> Any:
    size = axis_size(mesh, MEMBER_AXIS)
    spec = PartitionSpec(_axis(mesh, MEMBER_AXIS))

    def sharding(x):
        shape = np.shape(x)
        if not shape:
            raise ValueError("a member-sharded leaf needs a leading member axis; got a scalar.")
        if shape[0] % size:
            raise ValueError(
                f"the number of members/chains/samples {shape[0]} is not divisible by the "
                f"'{MEMBER_AXIS}' mesh axis of size {size}."
            )
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, tree)


def state_sharding(state: Any, mesh: Mesh) -> Any:
    """Shardings for a family state: members over ``"members"``, everything else replicated.

    An :class:`~bnn_flat.posteriors.ensemble.EnsembleState` (ensembles of any family,
    multi-chain SG-MCMC) gets its leading member axis split over the ``"members"`` mesh axis
    when the mesh has one; all other states, and all states on meshes without that axis, are
    replicated. Parameters are always replicated over ``"data"``.

    Args:
      state: a family state (arrays or ``jax.ShapeDtypeStruct`` leaves).
      mesh: the mesh.

    Returns:
      A pytree of :class:`~jax.sharding.NamedSharding` with the structure of ``state``.

    Raises:
      ValueError: when the number of members is not divisible by the ``"members"`` axis.

    Example:
      >>> import jax.numpy as jnp
      >>> tuple(state_sharding({"w": jnp.ones(2)}, make_mesh(1))["w"].spec)
      ()
    """
    from bnn_flat.posteriors import ensemble

    if isinstance(state, ensemble.EnsembleState) and MEMBER_AXIS in mesh.axis_names:
        return ensemble.EnsembleState(members=_member_shardings(state.members, mesh))
    return jax.tree.map(lambda _: replicated(mesh), state)


def place_state(state: Any, mesh: Mesh) -> Any:
    """Places a family state with :func:`state_sharding`.

    Example:
      >>> import jax.numpy as jnp
      >>> tuple(place_state({"w": jnp.ones(2)}, make_mesh(1))["w"].sharding.spec)
      ()
    """
    return jax.device_put(state, state_sharding(state, mesh))


def batch_spec(mesh: Mesh, *, member_axis: bool = False, stacked: bool = False) -> PartitionSpec:
    """The partition spec of a mini-batch leaf (trailing feature axes replicated).

    Args:
      mesh: the mesh.
      member_axis: the batch carries a leading member axis (independent batches per
        ensemble member), split over ``"members"``.
      stacked: the batch carries a leading axis of steps (an epoch of batches), kept whole.

    Returns:
      A :class:`~jax.sharding.PartitionSpec`.

    Example:
      >>> tuple(batch_spec(make_mesh(1, ("members", "data")), member_axis=True, stacked=True))
      (None, 'members', 'data')
    """
    parts: list[str | None] = [None] if stacked else []
    if member_axis:
        parts.append(_axis(mesh, MEMBER_AXIS))
    parts.append(_axis(mesh, DATA_AXIS))
    return PartitionSpec(*parts)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a ValueError unless ``batch_size`` is divisible by the ``"data"`` axis size.

    Example:
      >>> check_batch_size(32, make_mesh(1))
    """
    size = axis_size(mesh, DATA_AXIS)
    if batch_size % size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the '{DATA_AXIS}' mesh axis of size "
            f"{size}; use a multiple of {size} (the global batch is split evenly across "
            "devices)."
        )


def global_batch_from_local(local_data: Any, mesh: Mesh) -> Any:
    """One global array per leaf from this host's rows, split over ``"data"``.

    Multi-host input pipelines load a different slice of the data on every host; this
    stitches the slices (in process order) into global :class:`jax.Array`\\ s whose example
    axis is sharded over ``"data"`` (a thin wrapper of
    :func:`jax.make_array_from_process_local_data`). With one process it equals
    :func:`shard_batch`.

    Args:
      local_data: pytree of host arrays holding this process's examples.
      mesh: a mesh spanning all processes.

    Returns:
      The pytree of global arrays.

    Example:
      >>> import numpy as np
      >>> x = global_batch_from_local(np.arange(4.0), make_mesh(1))
      >>> x.shape, tuple(x.sharding.spec)
      ((4,), ('data',))
    """
    sharding = NamedSharding(mesh, PartitionSpec(_axis(mesh, DATA_AXIS)))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_data
    )
