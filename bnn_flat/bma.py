r"""Bayesian model averaging over a stack of posterior samples.

For samples :math:`\theta_1, \dots, \theta_S` the BMA predictive is

.. math:: \bar p(y \mid x) = \frac{1}{S}\sum_{s=1}^S p(y \mid x, \theta_s),
          \qquad \log \bar p = \operatorname{logsumexp}_s \log p(y \mid x, \theta_s) - \log S,

computed in log space throughout. A *sample* is any pytree with a leading axis of size
``S``: stacked parameters, ``(params, model_state)`` pairs (ensembles, SWAG with
re-estimated BatchNorm statistics), or dropout keys (MC dropout). The caller supplies
``predict_fn(sample, inputs) -> outputs``; :func:`model_predict_fn` builds it from a model.

Strategies to map over samples:

* ``"vmap"``: all samples at once (fastest for dense models, memory ``S x``);
* ``"map"``: ``lax.map``, one sample at a time (bounded memory);
* ``"chunked"``: ``lax.map`` over chunks of ``chunk_size`` samples, ``vmap`` inside;
* ``"auto"``: ``"map"`` on CPU, ``"vmap"`` on accelerators. On XLA:CPU ``vmap`` over
  stacked weights turns matrix products into batched ones and convolutions into grouped
  ones, both slower than a sequence of ordinary calls: ``experiments/bench_bma.py`` (16
  samples, batch 256, 2 cores) measured vmap / ideal = 1.3-2.5 (MLP), 1.15 (LeNet) and 4.6
  (ResNet-20), against map / ideal = 0.7-1.05, where "ideal" is 16 separate jitted
  forward passes.

Several devices: pass ``mesh=`` (:func:`bnn_flat.sharding.make_mesh`). The sample axis is
split over the mesh's ``"members"`` axis and the inputs' example axis over its ``"data"``
axis (whichever of the two the mesh has); each device runs the chosen strategy on its own
samples and rows inside :func:`jax.shard_map`, and the average over samples is one
reduction across devices. Samples and inputs whose counts do not divide the axis sizes are
padded by repeating the last entry and the padding is dropped before averaging, so the
result equals the single-device one (up to float32 rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from bnn_flat import sharding
from bnn_flat.types import ApplyFn, ModelState, Posterior, PRNGKey

__all__ = [
    "STRATEGIES",
    "choose_strategy",
    "map_samples",
    "predict",
    "predict_regression",
    "model_predict_fn",
    "posterior_predictive",
]

STRATEGIES = ("auto", "vmap", "map", "chunked")


def choose_strategy(samples: Any, backend: str | None = None) -> str:
    """The ``"auto"`` choice: ``"map"`` on CPU, ``"vmap"`` on GPU and TPU.

    Args:
      samples: stacked samples (kept in the signature so the rule can depend on the model).
      backend: ``jax.default_backend()`` when ``None``.

    Returns:
      ``"vmap"`` or ``"map"``.

    Example:
      >>> import jax.numpy as jnp
      >>> choose_strategy({"w": jnp.zeros((8, 3, 3, 1, 4))}, backend="cpu")
      'map'
    """
    del samples
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" else "vmap"


def _num_samples(samples: Any) -> int:
    leaves = jax.tree.leaves(samples)
    if not leaves:
        raise ValueError("samples is empty: expected a pytree with a leading sample axis.")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every sample leaf needs the same leading sample axis; got sizes {sizes}."
        )
    (size,) = sizes
    if size == 0:
        raise ValueError("samples has zero samples.")
    return size


def map_samples(
    fn: Callable[[Any], Any],
    samples: Any,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Any:
    """Applies ``fn`` to every sample with the chosen strategy; outputs stacked on axis 0.

    Example:
      >>> import jax.numpy as jnp
      >>> map_samples(lambda w: 2 * w, jnp.arange(3.0), strategy="map")
      Array([0., 2., 4.], dtype=float32)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    num = _num_samples(samples)
    if strategy == "auto":
        strategy = choose_strategy(samples)
    if strategy == "vmap":
        return jax.vmap(fn)(samples)
    if strategy == "map":
        return jax.lax.map(fn, samples)
    if chunk_size is None or chunk_size < 1:
        raise ValueError(f"strategy 'chunked' needs chunk_size >= 1, got {chunk_size}.")
    return jax.lax.map(fn, samples, batch_size=min(chunk_size, num))


def _member_outputs(
    fn: Callable[[Any, jax.Array], Any],
    samples: Any,
    inputs: jax.Array,
    strategy: str,
    chunk_size: int | None,
    mesh: Mesh | None,
) -> Any:
    """``fn(sample, inputs)`` for every sample, stacked on axis 0; sharded with ``mesh``."""
    if mesh is None:
        return map_samples(
            lambda s: fn(s, inputs), samples, strategy=strategy, chunk_size=chunk_size
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    num = _num_samples(samples)
    if jnp.ndim(inputs) < 1 or jnp.shape(inputs)[0] == 0:
        raise ValueError(f"inputs need a non-empty leading example axis, got {jnp.shape(inputs)}.")
    num_inputs = jnp.shape(inputs)[0]
    member_axis = sharding.MEMBER_AXIS if sharding.MEMBER_AXIS in mesh.axis_names else None
    data_axis = sharding.DATA_AXIS if sharding.DATA_AXIS in mesh.axis_names else None

    def local(local_samples, local_inputs):
        return map_samples(
            lambda s: fn(s, local_inputs), local_samples, strategy=strategy, chunk_size=chunk_size
        )

    def compute(samples, inputs):
        samples = _pad_leading(samples, sharding.axis_size(mesh, sharding.MEMBER_AXIS))
        inputs = _pad_leading(inputs, sharding.axis_size(mesh, sharding.DATA_AXIS))
        outputs = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(member_axis), PartitionSpec(data_axis)),
            out_specs=PartitionSpec(member_axis, data_axis),
        )(samples, inputs)
        return jax.tree.map(lambda y: y[:num, :num_inputs], outputs)

    return jax.jit(compute)(samples, inputs)


def _pad_leading(tree: Any, multiple: int) -> Any:
    """Repeats the last entry of every leaf's leading axis up to a multiple of ``multiple``."""

    def pad(x):
        extra = -x.shape[0] % multiple
        if not extra:
            return x
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)


def predict(
    predict_fn: Callable[[Any, jax.Array], jax.Array],
    samples: Any,
    inputs: jax.Array,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
    return_members: bool = False,
    mesh: Mesh | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log of the BMA predictive for classification: ``logsumexp_s log_softmax - log S``.

    Args:
      predict_fn: ``(sample, inputs) -> logits`` of shape ``(N, C)``.
      samples: pytree with a leading axis of ``S`` samples.
      inputs: ``(N, ...)`` inputs.
      strategy: ``"auto"``, ``"vmap"``, ``"map"`` or ``"chunked"``.
      chunk_size: samples per chunk for ``"chunked"``.
      return_members: also return the per-sample log-probabilities ``(S, N, C)`` (for mutual
        information and disagreement).
      mesh: optional device mesh: samples split over ``"members"``, inputs over ``"data"``
        (module docstring); ``strategy`` then applies on each device.

    Returns:
      ``(N, C)`` log-probabilities of the averaged predictive (and the members if asked).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> fn = lambda w, x: x @ w
      >>> samples = jnp.stack([jnp.eye(2), jnp.eye(2)])   # two identical samples
      >>> log_p = predict(fn, samples, jnp.array([[1.0, 0.0]]))
      >>> bool(jnp.allclose(log_p, jax.nn.log_softmax(jnp.array([[1.0, 0.0]]))))
      True
    """
    num = _num_samples(samples)
    member_log_probs = _member_outputs(
        lambda s, x: jax.nn.log_softmax(predict_fn(s, x), axis=-1),
        samples,
        inputs,
        strategy,
        chunk_size,
        mesh,
    )
    log_probs = jax.scipy.special.logsumexp(member_log_probs, axis=0) - math.log(num)
    if return_members:
        return log_probs, member_log_probs
    return log_probs


def predict_regression(
    predict_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    samples: Any,
    inputs: jax.Array,
    targets: jax.Array | None = None,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    r"""BMA for Gaussian regression: an equal-weight mixture of per-sample Gaussians.

    Args:
      predict_fn: ``(sample, inputs) -> (mean, std)``, each ``(N, D)``.
      samples: pytree with a leading axis of ``S`` samples.
      inputs: ``(N, ...)`` inputs.
      targets: optional ``(N, D)`` targets for the log predictive density.
      strategy: see :func:`map_samples`.
      chunk_size: samples per chunk for ``"chunked"``.
      mesh: optional device mesh (see :func:`predict`).

    Returns:
      dict with the mixture ``mean`` and ``variance`` (law of total variance) and, when
      ``targets`` is given, ``log_density``: ``(N,)`` values of
      :math:`\log \tfrac1S\sum_s N(y; \mu_s, \sigma_s^2)` summed over output dimensions.

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda w, x: (x * w, jnp.ones_like(x))
      >>> out = predict_regression(fn, jnp.array([1.0, 3.0]), jnp.ones((1, 1)))
      >>> float(out["mean"][0, 0]), float(out["variance"][0, 0])
      (2.0, 2.0)
    """
    num = _num_samples(samples)
    means, stds = _member_outputs(predict_fn, samples, inputs, strategy, chunk_size, mesh)
    mean = means.mean(axis=0)
    variance = jnp.mean(stds**2, axis=0) + jnp.mean((means - mean) ** 2, axis=0)
    out = {"mean": mean, "variance": variance}
    if targets is not None:
        targets = targets.reshape(mean.shape)
        z = (targets - means) / stds
        log_n = -0.5 * z**2 - jnp.log(stds) - 0.5 * math.log(2 * math.pi)
        out["log_density"] = jax.scipy.special.logsumexp(log_n.sum(axis=-1), axis=0) - math.log(num)
    return out


def model_predict_fn(
    apply_fn: ApplyFn,
    model_state: ModelState | None = None,
    *,
    per_sample_state: bool = False,
) -> Callable[[Any, jax.Array], jax.Array]:
    """``predict_fn`` from a model in eval mode.

    Args:
      apply_fn: model in the bnn_flat contract.
      model_state: model state shared by all samples (ignored with ``per_sample_state``).
      per_sample_state: samples are ``(params, model_state)`` pairs.

    Returns:
      ``predict_fn(sample, inputs) -> outputs``.

    Example:
      >>> apply = lambda p, s, x, *, train, key: (x @ p, s)
      >>> fn = model_predict_fn(apply, {})
    """
    if per_sample_state:
        return lambda sample, x: apply_fn(sample[0], sample[1], x, train=False, key=None)[0]
    state = {} if model_state is None else model_state
    return lambda params, x: apply_fn(params, state, x, train=False, key=None)[0]


@functools.partial(
    jax.jit,
    static_argnames=("posterior", "apply_fn", "num_samples", "strategy", "chunk_size", "mesh"),
)
def posterior_predictive(
    key: PRNGKey,
    posterior: Posterior,
    state: Any,
    apply_fn: ApplyFn,
    inputs: jax.Array,
    *,
    num_samples: int,
    strategy: str = "auto",
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws samples inside jit and returns the BMA log-predictive and the members'.

    For an ensemble state (:class:`bnn_flat.posteriors.ensemble.EnsembleState`) each
    member's samples use that member's model state, and ``num_samples`` is per member.
    Otherwise every sample uses ``state.model_state``; for BatchNorm models whose samples
    need their own statistics (SWAG) use
    :func:`bnn_flat.posteriors.batchnorm.sample_with_batch_stats` and :func:`predict`.

    Args:
      key: PRNG key for sampling.
      posterior: the family (hashable NamedTuple of functions; static under jit).
      state: the family's state.
      apply_fn: model in the bnn_flat contract (static).
      inputs: ``(N, ...)`` inputs.
      num_samples: samples to draw (per member for ensembles).
      strategy: see :func:`map_samples`.
      chunk_size: for ``"chunked"``.
      mesh: optional device mesh (static; see :func:`predict`).

    Returns:
      ``(log_probs (N, C), member_log_probs (S, N, C))``.
    """
    from bnn_flat.posteriors import ensemble

    samples = posterior.sample(key, state, num_samples)
    if any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in jax.tree.leaves(samples)):
        raise ValueError(
            "this family's samples are PRNG keys (MC dropout); use "
            "bma.predict(mc_dropout.predict_fn(apply_fn, state), samples, inputs) instead."
        )
    if isinstance(state, ensemble.EnsembleState):
        stacked_states = ensemble.member_model_states(state, num_samples)
        fn = model_predict_fn(apply_fn, per_sample_state=True)
        return predict(
            fn,
            (samples, stacked_states),
            inputs,
            strategy=strategy,
            chunk_size=chunk_size,
            return_members=True,
            mesh=mesh,
        )
    fn = model_predict_fn(apply_fn, state.model_state)
    return predict(
        fn,
        samples,
        inputs,
        strategy=strategy,
        chunk_size=chunk_size,
        return_members=True,
        mesh=mesh,
    )
