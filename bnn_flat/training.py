"""Training loop: jitted epochs, periodic evaluation, checkpoints and resume.

One epoch is one compiled call: the data are shuffled on device, split into batches and
scanned with ``lax.scan`` over ``posterior.update``; the state is donated; the only host
synchronisation is one scalar per epoch (the mean loss, for the progress bar and the
non-finite check). The epoch function compiles once per (family, batch size, data shape).

Determinism: epoch ``e`` uses ``jax.random.fold_in(key, e)``, so a run resumed from the
checkpoint written after epoch ``e`` continues with exactly the keys of an uninterrupted
run and ends in bit-identical parameters.

Several devices: ``fit(..., mesh=bnn_flat.sharding.make_mesh())`` splits every global
batch over the mesh's ``"data"`` axis and keeps the state replicated (or an ensemble's
members split over ``"members"``); see :mod:`bnn_flat.sharding` and ``docs/multidevice.md``.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from bnn_flat import objectives
  >>> from bnn_flat.posteriors import point
  >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
  >>> loss_fn = objectives.classification_loss(apply, num_data=64)
  >>> family = point.build(loss_fn, optax.sgd(0.5))
  >>> x = jax.random.normal(jax.random.key(0), (64, 3))
  >>> y = (x[:, 0] > 0).astype(jnp.int32)
  >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
  >>> result = fit(jax.random.key(1), family, state, (x, y), num_epochs=5, batch_size=16,
  ...              progress=False)
  >>> bool(result.history[-1]["loss"] < result.history[0]["loss"])
  True
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from bnn_flat import backend, sharding
from bnn_flat.data.batching import epoch_batches
from bnn_flat.types import Posterior, PRNGKey

__all__ = [
    "NonFiniteLossError",
    "FitResult",
    "make_epoch_fn",
    "fit",
    "Checkpointer",
]


class NonFiniteLossError(FloatingPointError):
    """Raised when an epoch's loss is NaN or infinite; the last good checkpoint is kept."""


class FitResult(NamedTuple):
    """Output of :func:`fit`.

    Attributes:
      state: the final family state.
      history: one dict per epoch (``epoch``, ``loss``, metrics, eval metrics, ``seconds``).
      resumed_from: the epoch a checkpoint was restored from (0 for a fresh run).
    """

    state: Any
    history: list[dict[str, float]]
    resumed_from: int


def make_epoch_fn(
    posterior: Posterior,
    batch_size: int,
    member_batches: int | None = None,
    *,
    mesh: Mesh | None = None,
    state_sharding: Any = None,
) -> Callable:
    """A jitted ``epoch(state, key, inputs, labels) -> (state, metrics)``.

    Shuffles with ``key`` (dropping the last ``N mod batch_size`` examples of the
    permutation, a different subset each epoch), scans ``posterior.update`` over the
    batches, and returns the mean of the per-step loss and metrics. The state argument is
    donated.

    With ``mesh``, the epoch runs data-parallel: every step's batch is split over the
    ``"data"`` mesh axis (and, with ``member_batches``, its member axis over ``"members"``),
    the state keeps ``state_sharding`` on input and output (so repeated calls never
    recompile), and the metrics are replicated. The loss is still the mean over the global
    batch, so sharpness-aware transforms perturb once per global batch. ``inputs`` and
    ``labels`` may be replicated or sharded over ``"data"`` (see :mod:`bnn_flat.sharding`).

    Args:
      posterior: the family to train.
      batch_size: examples per step (the global batch, over all devices).
      member_batches: if given, shuffle independently for this many ensemble members and
        give every batch leaf a leading member axis (for
        ``ensemble.build(..., independent_batches=True)``).
      mesh: optional device mesh (:func:`bnn_flat.sharding.make_mesh`).
      state_sharding: shardings of the state (a pytree or prefix of
        :class:`~jax.sharding.NamedSharding`, e.g. from
        :func:`bnn_flat.sharding.state_sharding`); replicated when ``None``. Only used with
        ``mesh``.

    Returns:
      The jitted epoch function.

    Raises:
      ValueError: if ``batch_size < 1`` or, with ``mesh``, ``batch_size`` is not divisible
        by the ``"data"`` axis size or ``member_batches`` by the ``"members"`` axis size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    batches_sharding = None
    jit_options: dict[str, Any] = {}
    if mesh is not None:
        sharding.check_batch_size(batch_size, mesh)
        members = sharding.axis_size(mesh, sharding.MEMBER_AXIS)
        if member_batches is not None and member_batches % members:
            raise ValueError(
                f"member_batches {member_batches} is not divisible by the "
                f"'{sharding.MEMBER_AXIS}' mesh axis of size {members}."
            )
        batches_sharding = NamedSharding(
            mesh,
            sharding.batch_spec(mesh, member_axis=member_batches is not None, stacked=True),
        )
        replicated = sharding.replicated(mesh)
        if state_sharding is None:
            state_sharding = replicated
        jit_options = {
            "in_shardings": (state_sharding, replicated, None, None),
            "out_shardings": (state_sharding, replicated),
        }

    # Top-level program: it can carry the CPU compiler options itself when the process-wide
    # XLA flags of bnn_flat.backend could not be set in time (empty otherwise).
    options = backend.compiler_options()
    if options:
        jit_options["compiler_options"] = options

    @functools.partial(jax.jit, donate_argnums=(0,), **jit_options)
    def epoch(state, key, inputs, labels):
        shuffle_key, step_key = jax.random.split(key)
        if member_batches is None:
            batches = epoch_batches(shuffle_key, inputs, labels, batch_size)
        else:
            member_keys = jax.random.split(shuffle_key, member_batches)
            batches = jax.vmap(lambda k: epoch_batches(k, inputs, labels, batch_size))(member_keys)
            batches = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batches)
        if batches_sharding is not None:
            batches = jax.lax.with_sharding_constraint(batches, batches_sharding)
        num_batches = batches["labels"].shape[0]
        keys = jax.random.split(step_key, num_batches)

        def body(carry, xs):
            batch, step_key = xs
            carry, info = posterior.update(step_key, carry, batch)
            return carry, {"loss": info.loss, **info.metrics}

        state, per_step = jax.lax.scan(body, state, (batches, keys))
        return state, jax.tree.map(jnp.mean, per_step)

    return epoch


class Checkpointer:
    """Orbax checkpoints of ``(state, epoch, history)`` in ``directory``.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
        )

    def latest_epoch(self) -> int | None:
        """Epoch of the newest checkpoint, or ``None``."""
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, history: list[dict]) -> None:
        """Writes a checkpoint and waits until it is on disk."""
        ocp = self._ocp
        self.manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"history": history})
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, list[dict], int]:
        """Restores ``(state, history, epoch)`` into the structure of ``template``."""
        ocp = self._ocp
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, list(restored.meta["history"]), epoch

    def close(self) -> None:
        self.manager.close()


def _check_data(inputs, labels, batch_size):
    if inputs.shape[0] == 0:
        raise ValueError("training data is empty.")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"inputs and labels disagree on the number of examples: {inputs.shape[0]} vs "
            f"{labels.shape[0]}."
        )
    if batch_size > inputs.shape[0]:
        raise ValueError(
            f"batch_size {batch_size} exceeds the number of training examples {inputs.shape[0]}."
        )
    if jnp.issubdtype(inputs.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(inputs))):
        raise ValueError("training inputs contain NaN or infinite values.")


def fit(
    key: PRNGKey,
    posterior: Posterior,
    state: Any,
    data: tuple[Any, Any],
    *,
    num_epochs: int,
    batch_size: int,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 1,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    description: str = "train",
    stop_after: int | None = None,
    member_batches: int | None = None,
    mesh: Mesh | None = None,
    shard_dataset: bool = False,
) -> FitResult:
    """Trains a family for ``num_epochs`` epochs, resuming from ``checkpoint_dir`` if present.

    Args:
      key: PRNG key of the run; epoch ``e`` uses ``fold_in(key, e)``.
      posterior: the family.
      state: initial state (also the template for restoring a checkpoint).
      data: ``(inputs, labels)`` arrays (moved to the device once).
      num_epochs: total epochs of the run.
      batch_size: examples per step.
      eval_fn: optional ``state -> dict`` evaluated every ``eval_every`` epochs and at the end.
      eval_every: evaluation period in epochs.
      checkpoint_dir: where to save/resume; ``None`` disables checkpoints.
      checkpoint_every: checkpoint period in epochs (the last epoch is always saved).
      log_fn: called with each epoch's record (e.g. to append to ``metrics.jsonl``).
      progress: show a tqdm progress bar with the loss.
      description: progress-bar label.
      stop_after: stop (as if killed) after this epoch; for crash/resume tests.
      member_batches: number of ensemble members that each get their own data order (see
        :func:`make_epoch_fn`); ``None`` shares batches.
      mesh: optional device mesh (:func:`bnn_flat.sharding.make_mesh`) for data-parallel
        training: every step's global batch of ``batch_size`` examples is split over the
        ``"data"`` axis, the state is placed with :func:`bnn_flat.sharding.state_sharding`
        (replicated, or an ensemble's members split over ``"members"``) and keeps that
        placement. The loss, and hence every sharpness-aware perturbation, is over the
        global batch, as on one device. The returned state stays on the mesh.
      shard_dataset: with ``mesh``, keep one slice of the training set per ``"data"``
        device instead of a full copy on every device (saves memory; the shuffle then
        gathers across devices). Arrays that already live on ``mesh`` (e.g. from
        :func:`bnn_flat.sharding.global_batch_from_local` on several hosts) are used as
        they are.

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteLossError: when an epoch's mean loss is not finite. The checkpoint of the
        last good epoch (if any) is kept, and the message names it.
      ValueError: for bad data or, with ``mesh``, a ``batch_size`` not divisible by the
        ``"data"`` axis size (or a member count not divisible by the ``"members"`` size).
    """
    if num_epochs < 0:
        raise ValueError(f"num_epochs must be >= 0, got {num_epochs}.")
    inputs, labels = (jnp.asarray(a) for a in data)
    _check_data(inputs, labels, batch_size)
    if mesh is not None:
        sharding.check_batch_size(batch_size, mesh)
        sharding.state_sharding(state, mesh)  # validates the member count before any work
        inputs, labels = (_place_dataset(a, mesh, shard_dataset) for a in (inputs, labels))

    checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    history: list[dict[str, float]] = []
    start = 0
    if checkpointer is not None and checkpointer.latest_epoch() is not None:
        state, history, start = checkpointer.restore(state)

    state_sharding = None
    if mesh is not None:
        state_sharding = sharding.state_sharding(state, mesh)
        state = jax.device_put(state, state_sharding)
    # The epoch function donates its state; copy once so the caller's arrays stay valid.
    state = jax.tree.map(jnp.copy, state)
    epoch_fn = make_epoch_fn(
        posterior, batch_size, member_batches, mesh=mesh, state_sharding=state_sharding
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_epochs, initial=start, desc=description, leave=False)
    last_good = start if checkpointer is not None and start > 0 else None
    try:
        for epoch in range(start + 1, num_epochs + 1):
            begin = time.perf_counter()
            state, metrics = epoch_fn(state, jax.random.fold_in(key, epoch), inputs, labels)
            record = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
            if not math.isfinite(record["loss"]):
                where = (
                    f"the last good checkpoint (epoch {last_good}) is kept in "
                    f"{checkpointer.directory}"
                    if last_good is not None
                    else "no checkpoint was written before it"
                )
                raise NonFiniteLossError(
                    f"loss became {record['loss']} in epoch {epoch}; {where}. Lower the learning "
                    "rate or the perturbation radius, or check the data for extreme values."
                )
            if eval_fn is not None and (epoch % eval_every == 0 or epoch == num_epochs):
                record.update({f"eval_{k}": float(v) for k, v in eval_fn(state).items()})
            record["seconds"] = time.perf_counter() - begin
            history.append(record)
            if log_fn is not None:
                log_fn(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if checkpointer is not None and (epoch % checkpoint_every == 0 or epoch == num_epochs):
                checkpointer.save(epoch, state, history)
                last_good = epoch
            if stop_after is not None and epoch >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.close()
    return FitResult(state=state, history=history, resumed_from=start)


def _place_dataset(array: jax.Array, mesh: Mesh, shard: bool) -> jax.Array:
    """The training set on ``mesh``: replicated, or split over ``"data"`` when ``shard``."""
    if isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh:
        return array
    if not shard:
        return sharding.replicate(array, mesh)
    size = sharding.axis_size(mesh, sharding.DATA_AXIS)
    if array.shape[0] % size:
        raise ValueError(
            f"shard_dataset needs the number of training examples ({array.shape[0]}) to be "
            f"divisible by the '{sharding.DATA_AXIS}' mesh axis of size {size}; drop a few "
            "examples or use shard_dataset=False."
        )
    return sharding.shard_batch(array, mesh)


def data_to_device(data: Any) -> Any:
    """Moves a pytree of host arrays to the default device once."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), data)
