r"""Laplace approximation: a Gaussian at the MAP with the curvature of the log joint.

Laplace is post hoc. Train a MAP :math:`\theta^*` first (e.g. with
:mod:`bnn_flat.posteriors.point`, or its flat "F-" version with SAM in the chain), then fit
the curvature of the negative log joint at :math:`\theta^*` with this family and use the
Gaussian

.. math::

    q(\theta) = \mathcal{N}\big(\theta^*, \Lambda^{-1}\big), \qquad
    \Lambda = \frac{1}{T}\Big(\frac{N}{n}\sum_{i=1}^{n} C_i(\theta^*) + \lambda I\Big),

where the sum runs over the :math:`n` examples seen by :func:`update` so far (``num_seen``),
:math:`N` is ``num_data``, :math:`\lambda` the Gaussian prior precision and :math:`T` the
temperature. This is ``docs/scaling.md``'s Laplace precision :math:`(N/T)\,\nabla^2 U`,
i.e. (curvature of the summed NLL + prior precision) / T, with the sum over the data set
estimated from the examples seen; after one full pass over the training set
:math:`N / n = 1`. The per-example curvature :math:`C_i` is

* ``"ggn"`` (generalised Gauss-Newton): :math:`J_i^\top H_i J_i`, with :math:`J_i` the
  Jacobian of the model outputs with respect to the parameters and :math:`H_i` the Hessian
  of the per-example NLL with respect to the outputs (:math:`\operatorname{diag}(p) - pp^\top`
  for softmax classification, :math:`I/\sigma^2` for Gaussian regression);
* ``"empirical_fisher"``: :math:`g_i g_i^\top` with :math:`g_i` the per-example gradient of
  the NLL.

Both are computed exactly from vector-Jacobian products of the per-example model, in
evaluation mode (``train=False``: BatchNorm running statistics, no dropout). The GGN uses a
factor :math:`H_i = L_i L_i^\top` (softmax: column :math:`k` of :math:`L_i` is
:math:`\sqrt{p_k}(e_k - p)`; regression: :math:`L_i = I/\sigma`), so
:math:`C_i = \sum_k (J_i^\top L_{i,k})(J_i^\top L_{i,k})^\top`: one VJP per output
dimension, vectorised with ``vmap``.

Structures (``subset`` x ``covariance``):

* ``"all"`` x ``"diag"``: the diagonal of :math:`C` over every parameter;
* ``"all"`` x ``"full"``: the dense :math:`P \times P` curvature (small models only);
* ``"last_layer"`` x ``"diag" | "full" | "kron"``: the last dense layer only (kernel and
  bias; every other parameter stays at the MAP). ``"kron"`` is KFAC: with
  :math:`\bar a_i = [a_i; 1]` the layer's input augmented for the bias,
  :math:`\mathcal{A} = \sum_i \bar a_i \bar a_i^\top` and
  :math:`\mathcal{G} = \sum_i L_i L_i^\top` (:math:`= \sum_i H_i` for the GGN,
  :math:`\sum_i r_i r_i^\top` with :math:`r_i` the output gradient for the empirical
  Fisher),

  .. math:: \sum_i C_i \approx \tfrac{1}{n}\, \mathcal{A} \otimes \mathcal{G},

  exact for a single example (and for single-output Gaussian regression). KFAC assumes
  the layer computes ``a @ kernel + bias`` from one feature vector ``a`` per example (a
  Dense output layer); :func:`update` reads ``a`` off the kernel gradient. The prior is
  added **exactly** to the Kronecker product in the joint eigenbasis: with
  :math:`\mathcal{A} = U_A \operatorname{diag}(s_A) U_A^\top` and
  :math:`\mathcal{G} = U_G \operatorname{diag}(s_G) U_G^\top`,
  :math:`\Lambda = (U_A \otimes U_G)\operatorname{diag}\big((\tfrac{N}{n^2} s_A \otimes s_G
  + \lambda)/T\big)(U_A \otimes U_G)^\top` (as laplace-torch does; no split of the prior
  between the factors).

The last-layer vector is ordered "kernel entries row-major, then the bias"; under KFAC the
kernel-plus-bias matrix :math:`[W; b]` of shape ``(D + 1, C)`` is flattened row-major, so
:math:`\mathcal{A}` acts on the ``D + 1`` rows and :math:`\mathcal{G}` on the ``C``
columns. For ``subset="all"`` the full-covariance vector follows
:func:`jax.flatten_util.ravel_pytree`.

Every structure is handled through one eigen-representation :math:`\Lambda = Q
\operatorname{diag}(\omega) Q^\top` (:math:`Q = I` for diag, the curvature's eigenvectors for
full, :math:`U_A \otimes U_G` for KFAC), which gives sampling, the log density, the log
determinant, the linearised predictive and prior-precision tuning over a grid.

Workflow (``map_params`` from any MAP training)::

    family = laplace.build(apply_fn, num_data=N, subset="last_layer", covariance="kron")
    state = family.init(map_params, model_state)
    state = laplace.fit(key, state, apply_fn, train_inputs, train_labels, batch_size=256)
    state = laplace.tune_prior_precision(state)                 # evidence on a grid
    log_probs = laplace.glm_predictive(state, apply_fn, test_inputs)      # probit GLM
    samples = family.sample(key, state, 30)                     # or BMA over weights

The state carries its static :class:`LaplaceConfig` (a pytree node without leaves), so
:func:`fit`, :func:`glm_predictive` and :func:`tune_prior_precision` need only the state and
the model; a checkpoint restores into the template made by ``family.init``. Running the
family through :func:`bnn_flat.training.fit` for one epoch also works, but it shuffles and
drops the last partial batch (``N / n`` corrects the scale).

References:
  MacKay. A Practical Bayesian Framework for Backpropagation Networks. Neural Computation
  1992.
  Ritter, Botev, Barber. A Scalable Laplace Approximation for Neural Networks. ICLR 2018.
  Immer, Korzepa, Bauer. Improving predictions of Bayesian neural nets via local
  linearization. AISTATS 2021.
  Daxberger, Kristiadi, Immer, Eschenhagen, Bauer, Hennig. Laplace Redux -- Effortless
  Bayesian Deep Learning. NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bnn_flat._random import standard_normal
from bnn_flat.types import ApplyFn, Batch, Info, ModelState, Params, Posterior, PRNGKey

__all__ = [
    "LaplaceConfig",
    "LaplaceState",
    "build",
    "init",
    "update",
    "sample",
    "log_prob",
    "fit",
    "posterior_precision",
    "log_marginal_likelihood",
    "glm_predictive",
    "tune_prior_precision",
    "find_last_layer",
]

_LIKELIHOODS = ("classification", "regression")
_CURVATURES = ("ggn", "empirical_fisher")
_SUBSETS = ("all", "last_layer")
_COVARIANCES = ("diag", "full", "kron")
_LINK_APPROXIMATIONS = ("probit", "mc")
_TUNING_METHODS = ("marglik", "val_nll")
_OUTPUT_LAYER_NAMES = ("output", "head")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LaplaceConfig:
    """Static configuration of a Laplace state (a pytree node without leaves).

    Attributes:
      likelihood: ``"classification"`` (softmax over the outputs) or ``"regression"``
        (homoscedastic Gaussian).
      curvature: ``"ggn"`` or ``"empirical_fisher"``.
      subset: ``"all"`` or ``"last_layer"``.
      covariance: ``"diag"``, ``"full"`` or ``"kron"``.
      num_data: training-set size :math:`N`.
      temperature: posterior temperature :math:`T`.
      noise_std: observation noise :math:`\\sigma` (regression).
      last_layer_path: keys leading to the last dense layer's mapping (resolved by
        :func:`init`; ``None`` for ``subset="all"``).
      kernel_name: name of the last layer's kernel leaf (resolved by :func:`init`).
      bias_name: name of its bias leaf, or ``None`` for a layer without bias.
    """

    likelihood: str
    curvature: str
    subset: str
    covariance: str
    num_data: int
    temperature: float
    noise_std: float
    last_layer_path: tuple | None = None
    kernel_name: str | None = None
    bias_name: str | None = None


class LaplaceState(NamedTuple):
    """State of the Laplace family.

    Attributes:
      params: the MAP :math:`\\theta^*` (the mean of the Gaussian; never changed by
        :func:`update`).
      model_state: BatchNorm statistics or ``{}``.
      step: number of :func:`update` calls (int32 scalar).
      curvature: the curvature summed over the examples seen: a pytree shaped like the
        covariance subset (diag; the last layer as ``{"kernel", "bias"}``), a ``(P, P)``
        matrix (full) or the KFAC factor sums ``(A, G)`` (kron).
      num_seen: number of examples accumulated, :math:`n` (int32 scalar).
      log_likelihood: :math:`\\sum_i \\log p(y_i \\mid x_i, \\theta^*)` over the examples
        seen (float32 scalar; for the marginal likelihood).
      prior_precision: Gaussian prior precision :math:`\\lambda` (float32 scalar, so a
        tuned value is a new state and states can be vmapped over it).
      config: the static :class:`LaplaceConfig`.
    """

    params: Params
    model_state: ModelState
    step: jax.Array
    curvature: Any
    num_seen: jax.Array
    log_likelihood: jax.Array
    prior_precision: jax.Array
    config: LaplaceConfig


def build(
    apply_fn: ApplyFn,
    *,
    likelihood: str = "classification",
    num_data: int,
    prior_precision: float = 1.0,
    temperature: float = 1.0,
    curvature: str = "ggn",
    subset: str = "all",
    covariance: str = "diag",
    noise_std: float | None = 1.0,
    last_layer_path: tuple | None = None,
) -> Posterior:
    """Builds the Laplace family (curvature accumulated by ``update``; no optimizer).

    ``init(params, model_state)`` takes the MAP. Each ``update(key, state, batch)`` adds the
    batch's curvature (``key`` is unused: the curvature is exact and deterministic); see
    :func:`fit` for one compiled pass over a data set. The flat ("F-") version of Laplace
    is this family fitted at a MAP trained with a sharpness-aware transform; the family
    itself has no optimizer, so there is nothing to chain.

    The last layer, when ``last_layer_path`` is ``None``, is found by
    :func:`find_last_layer`: the unique *dense layer* (a mapping with a 2-D ``kernel`` and
    optionally a 1-D ``bias`` of matching width) in the tree, or else the unique dense
    layer named ``"output"`` or ``"head"`` (the output-layer names of
    :mod:`bnn_flat.models`). Otherwise give the path, e.g. ``("output",)``.

    Args:
      apply_fn: model in the bnn_flat contract, evaluated with ``train=False``.
      likelihood: ``"classification"`` (logits, integer labels) or ``"regression"``
        (homoscedastic Gaussian with ``noise_std``).
      num_data: training-set size :math:`N`.
      prior_precision: isotropic Gaussian prior precision :math:`\\lambda > 0` on the
        covered parameters (the initial value; see :func:`tune_prior_precision`).
      temperature: :math:`T > 0`; the precision is divided by it.
      curvature: ``"ggn"`` or ``"empirical_fisher"``.
      subset: ``"all"`` parameters or the ``"last_layer"``.
      covariance: ``"diag"``, ``"full"``, or ``"kron"`` (last layer only).
      noise_std: observation noise :math:`\\sigma > 0` for regression (learned noise,
        ``None``, is not supported).
      last_layer_path: keys of the last dense layer's mapping; ``None`` auto-detects.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`LaplaceState`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"] + p["bias"], s)
      >>> family = build(apply, num_data=4, prior_precision=1.0)
      >>> state = family.init({"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, {})
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> state, info = family.update(jax.random.key(0), state, batch)
      >>> state.curvature["kernel"].round(4)  # 4 examples x p(1 - p) = 4 x 0.25 per entry
      Array([[1., 1.],
             [1., 1.],
             [1., 1.]], dtype=float32)
      >>> family.sample(jax.random.key(1), state, 5)["kernel"].shape
      (5, 3, 2)
    """
    config = _make_config(
        likelihood=likelihood,
        curvature=curvature,
        subset=subset,
        covariance=covariance,
        num_data=num_data,
        temperature=temperature,
        noise_std=noise_std,
        last_layer_path=last_layer_path,
    )
    _check_positive("prior_precision", prior_precision)

    def init_fn(params: Params, model_state: ModelState | None = None) -> LaplaceState:
        return init(params, model_state, config, prior_precision=prior_precision)

    def update_fn(key: PRNGKey, state: LaplaceState, batch: Batch) -> tuple[LaplaceState, Info]:
        return update(key, state, batch, apply_fn)

    # Compiled here (and inlined when called inside another jit): the per-example
    # vector-Jacobian products are slow to run op by op.
    return Posterior(
        init=init_fn,
        update=jax.jit(update_fn),
        sample=jax.jit(sample, static_argnums=2),
        log_prob=jax.jit(log_prob),
    )


def init(
    params: Params,
    model_state: ModelState | None,
    config: LaplaceConfig,
    *,
    prior_precision: float = 1.0,
) -> LaplaceState:
    """Initial state: the MAP, zero curvature and nothing seen.

    Resolves the last layer (see :func:`find_last_layer`) and stores it in the state's
    config.

    Args:
      params: the MAP parameters.
      model_state: BatchNorm statistics or ``None``/``{}``.
      config: from :func:`build` (use the family's ``init`` rather than calling this).
      prior_precision: initial prior precision.

    Returns:
      A :class:`LaplaceState`.
    """
    _check_positive("prior_precision", prior_precision)
    if not jax.tree.leaves(params):
        raise ValueError("params is empty: Laplace needs the MAP parameters.")
    config = _resolve_last_layer(config, params)
    subset_params = _extract(config, params)
    dtype = jax.tree.leaves(subset_params)[0].dtype
    if config.covariance == "diag":
        curvature = jax.tree.map(jnp.zeros_like, subset_params)
    elif config.covariance == "full":
        size = _subset_size(subset_params)
        curvature = jnp.zeros((size, size), dtype)
    else:
        rows, columns = _kron_shape(subset_params)
        curvature = (jnp.zeros((rows, rows), dtype), jnp.zeros((columns, columns), dtype))
    return LaplaceState(
        params=params,
        model_state={} if model_state is None else model_state,
        step=jnp.zeros((), jnp.int32),
        curvature=curvature,
        num_seen=jnp.zeros((), jnp.int32),
        log_likelihood=jnp.zeros((), jnp.float32),
        prior_precision=jnp.asarray(prior_precision, jnp.float32),
        config=config,
    )


def update(
    key: PRNGKey, state: LaplaceState, batch: Batch, apply_fn: ApplyFn
) -> tuple[LaplaceState, Info]:
    """Adds the curvature of one batch (sums over its examples) to the state.

    Args:
      key: unused (the curvature is exact); accepted for the common signature.
      state: current state.
      batch: ``{"inputs": (B, ...), "labels": (B,) or (B, D)}``, optionally with a boolean
        ``"mask"`` ``(B,)``: examples with ``False`` are ignored (padding).
      apply_fn: the model (``train=False``).

    Returns:
      ``(state, Info)``; ``Info.loss`` is the per-datum objective at the MAP on this batch
      (mean NLL plus the covered parameters' prior term / N), with metrics ``nll`` and
      ``accuracy`` (classification) or ``mse`` (regression).
    """
    del key
    config = state.config
    inputs, labels, mask = _check_batch(batch)
    params, model_state = state.params, state.model_state
    subset_params = _extract(config, params)
    outputs, _ = apply_fn(params, model_state, inputs, train=False, key=None)
    _check_outputs(config, subset_params, outputs, labels)
    weights = mask.astype(outputs.dtype)
    log_likelihood = weights * _log_likelihood(config, outputs, labels)
    # (B, K, C); masked examples get zero factors, so they add nothing to the curvature
    cotangents = weights[:, None, None] * _output_factors(config, outputs, labels)

    def single_output(sub: Params, x: jax.Array) -> jax.Array:
        full = _insert(config, params, sub)
        return apply_fn(full, model_state, x[None], train=False, key=None)[0][0]

    if config.covariance == "kron":
        # f = a W + b, so the kernel gradient of the first output is outer(a, e_0).
        first_output = jnp.zeros((outputs.shape[-1],), outputs.dtype).at[0].set(1.0)

        def layer_input(x: jax.Array) -> jax.Array:
            _, vjp_fn = jax.vjp(lambda s: single_output(s, x), subset_params)
            return vjp_fn(first_output)[0]["kernel"][:, 0]

        activations = weights[:, None] * jax.vmap(layer_input)(inputs)
        if config.bias_name is not None:
            activations = jnp.concatenate([activations, weights[:, None]], axis=1)
        factor_a, factor_g = state.curvature
        curvature = (
            factor_a + activations.T @ activations,
            factor_g + jnp.einsum("bkc,bkd->cd", cotangents, cotangents),
        )
    else:

        def rows(x: jax.Array, factor: jax.Array) -> Params:
            _, vjp_fn = jax.vjp(lambda s: single_output(s, x), subset_params)
            return jax.vmap(lambda u: vjp_fn(u)[0])(factor)

        per_example = jax.vmap(rows)(inputs, cotangents)  # leaves (B, K, ...)
        if config.covariance == "diag":
            curvature = jax.tree.map(
                lambda c, r: c + jnp.sum(jnp.square(r), axis=(0, 1)), state.curvature, per_example
            )
        else:
            flat = jax.vmap(jax.vmap(lambda r: _flatten(config, r)))(per_example)
            flat = flat.reshape(-1, flat.shape[-1])
            curvature = state.curvature + flat.T @ flat

    count = jnp.maximum(jnp.sum(weights), 1.0)
    nll = -jnp.sum(log_likelihood) / count
    prior_term = 0.5 * state.prior_precision * _sum_of_squares(subset_params) / config.num_data
    metrics = {"nll": nll}
    if config.likelihood == "classification":
        correct = jnp.argmax(outputs, axis=-1) == labels
        metrics["accuracy"] = jnp.sum(weights * correct) / count
    else:
        errors = jnp.sum(jnp.square(outputs - labels.reshape(outputs.shape)), axis=-1)
        metrics["mse"] = jnp.sum(weights * errors) / (count * outputs.shape[-1])
    new_state = state._replace(
        step=state.step + 1,
        curvature=curvature,
        num_seen=state.num_seen + jnp.sum(mask).astype(jnp.int32),
        log_likelihood=state.log_likelihood + jnp.sum(log_likelihood).astype(jnp.float32),
    )
    return new_state, Info(loss=nll + prior_term, metrics=metrics)


def sample(key: PRNGKey, state: LaplaceState, num_samples: int) -> Params:
    """Draws parameters from :math:`\\mathcal{N}(\\theta^*, \\Lambda^{-1})`, stacked on axis 0.

    Last-layer variants perturb only the last layer; every other parameter is the MAP.

    Args:
      key: PRNG key.
      state: a fitted state.
      num_samples: number of samples.

    Returns:
      The full parameter pytree with a leading axis of ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, num_data=10, prior_precision=4.0)
      >>> state = family.init({"kernel": jnp.zeros((2, 2))}, {})
      >>> samples = sample(jax.random.key(0), state, 1000)  # no data: the prior N(0, 1/4)
      >>> round(float(samples["kernel"].std()), 1)
      0.5
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    config = state.config
    basis, omega = _eigen(state)
    mean = _extract(config, state.params)

    def one(sample_key: PRNGKey) -> Params:
        noise = _normal_like(sample_key, omega)
        coordinates = jax.tree.map(lambda z, w: z * jax.lax.rsqrt(w), noise, omega)
        delta = _from_coordinates(config, basis, coordinates, mean)
        return _insert(config, state.params, jax.tree.map(jnp.add, mean, delta))

    return jax.vmap(one)(jax.random.split(key, num_samples))


def log_prob(state: LaplaceState, params: Params) -> jax.Array:
    """Log density of the Laplace Gaussian at ``params``.

    For last-layer variants this is the density of the last layer's parameters (the
    others are a point mass at the MAP and are ignored).

    Args:
      state: a fitted state.
      params: a full parameter pytree (one sample, no leading axis).

    Returns:
      Scalar log density.

    Example:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, num_data=10, prior_precision=1.0)
      >>> state = family.init({"kernel": jnp.zeros((1, 1))}, {})
      >>> round(float(log_prob(state, {"kernel": jnp.zeros((1, 1))})), 4)  # -log(2 pi)/2
      -0.9189
    """
    config = state.config
    basis, omega = _eigen(state)
    mean = _extract(config, state.params)
    delta = jax.tree.map(jnp.subtract, _extract(config, params), mean)
    coordinates = _to_coordinates(config, basis, delta)
    quadratic = _tree_sum(jax.tree.map(lambda c, w: jnp.sum(w * c**2), coordinates, omega))
    log_det = _tree_sum(jax.tree.map(lambda w: jnp.sum(jnp.log(w)), omega))
    size = _subset_size(mean)
    return -0.5 * quadratic + 0.5 * log_det - 0.5 * size * math.log(2 * math.pi)


def fit(
    key: PRNGKey,
    state: LaplaceState,
    apply_fn: ApplyFn,
    inputs: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int = 128,
) -> LaplaceState:
    """Accumulates the curvature of a whole data set in one compiled pass.

    The data go through one ``lax.scan`` of :func:`update` in order (no shuffling). The
    last batch is padded with repeated examples that are masked out, so every example is
    counted exactly once and one batch shape is compiled. The curvature is added to what
    ``state`` already holds.

    Args:
      key: PRNG key passed on to :func:`update` (which does not use it).
      state: state from ``family.init(map_params, model_state)``.
      apply_fn: the model.
      inputs: ``(N, ...)`` inputs.
      labels: ``(N,)`` integer labels or ``(N, D)`` / ``(N,)`` regression targets.
      batch_size: examples per batch (memory grows with ``batch_size x outputs x P`` for
        ``"diag"``/``"full"``).

    Returns:
      The state with the data set's curvature added.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, likelihood="regression", num_data=5, prior_precision=1.0)
      >>> state = family.init({"kernel": jnp.zeros((1, 1))}, {})
      >>> x = jnp.arange(5.0)[:, None]
      >>> state = fit(jax.random.key(0), state, apply, x, jnp.zeros(5), batch_size=2)
      >>> float(state.curvature["kernel"][0, 0]), int(state.num_seen)  # sum x^2 / sigma^2
      (30.0, 5)
    """
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError("inputs is empty: fit needs at least one example.")
    if labels.ndim == 0 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"inputs and labels disagree on the number of examples: {inputs.shape} vs "
            f"{labels.shape}."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return _fit(
        key, state, inputs, labels, apply_fn=apply_fn, batch_size=min(batch_size, len(inputs))
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _fit(key, state, inputs, labels, *, apply_fn, batch_size):
    num = inputs.shape[0]
    num_batches = -(-num // batch_size)
    index = jnp.arange(num_batches * batch_size)
    batches = {
        "inputs": inputs[index % num].reshape(num_batches, batch_size, *inputs.shape[1:]),
        "labels": labels[index % num].reshape(num_batches, batch_size, *labels.shape[1:]),
        "mask": (index < num).reshape(num_batches, batch_size),
    }

    def body(carry, xs):
        batch, step_key = xs
        carry, _ = update(step_key, carry, batch, apply_fn)
        return carry, None

    keys = jax.random.split(key, num_batches)
    state, _ = jax.lax.scan(body, state, (batches, keys))
    return state


def posterior_precision(state: LaplaceState) -> Any:
    """The posterior precision :math:`\\Lambda = (\\frac{N}{n} C + \\lambda I)/T`, materialised.

    Args:
      state: a fitted state.

    Returns:
      For ``"diag"`` a pytree of per-parameter precisions shaped like the covered subset
      (the last layer as ``{"kernel", "bias"}``); for ``"full"`` and ``"kron"`` the dense
      ``(P, P)`` matrix in the order of the module docstring (for KFAC this materialises
      the Kronecker product: for inspection and tests on small layers).

    Example:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, num_data=10, prior_precision=2.0, temperature=0.5)
      >>> state = family.init({"kernel": jnp.zeros((1, 1))}, {})
      >>> posterior_precision(state)["kernel"]  # no data: prior / T
      Array([[4.]], dtype=float32)
    """
    config = state.config
    scale = _data_scale(state)
    prior = state.prior_precision
    temperature = config.temperature
    if config.covariance == "diag":
        return jax.tree.map(lambda c: (scale * c + prior) / temperature, state.curvature)
    if config.covariance == "full":
        curvature = state.curvature
    else:
        factor_a, factor_g = state.curvature
        curvature = jnp.kron(factor_a, factor_g) * _kron_scale(state) / scale
    eye = jnp.eye(curvature.shape[0], dtype=curvature.dtype)
    return (scale * curvature + prior * eye) / temperature


def log_marginal_likelihood(
    state: LaplaceState, prior_precision: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Laplace approximation of the log marginal likelihood (evidence) at a prior precision.

    .. math::

        \\log Z \\approx \\frac{1}{T}\\Big(\\log p(\\mathcal{D} \\mid \\theta^*)
        + \\log \\mathcal{N}(\\theta^*; 0, \\lambda^{-1} I)\\Big)
        + \\frac{P}{2}\\log 2\\pi - \\frac{1}{2}\\log\\det\\Lambda,

    with :math:`\\log p(\\mathcal{D}\\mid\\theta^*) = \\frac{N}{n}\\sum_i \\log p(y_i\\mid
    x_i,\\theta^*)` over the examples seen, and :math:`P` and the prior over the covered
    parameters only (the last layer for last-layer variants). :math:`\\theta^*` is held
    fixed, so for linear-Gaussian regression this is the exact evidence at the
    :math:`\\lambda` the MAP was trained with. With :math:`T = 1` it is the usual evidence.

    Args:
      state: a fitted state.
      prior_precision: :math:`\\lambda`; the state's value when ``None``.

    Returns:
      Scalar log evidence.

    Example:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, num_data=10, prior_precision=1.0)
      >>> state = family.init({"kernel": jnp.zeros((1, 1))}, {})
      >>> float(log_marginal_likelihood(state))  # no data: the prior integrates to 1
      0.0
    """
    config = state.config
    precision = state.prior_precision if prior_precision is None else prior_precision
    precision = jnp.asarray(precision, jnp.float32)
    mean = _extract(config, state.params)
    size = _subset_size(mean)
    _, omega = _eigen(state, precision)
    log_det = _tree_sum(jax.tree.map(lambda w: jnp.sum(jnp.log(w)), omega))
    log_prior = (
        -0.5 * precision * _sum_of_squares(mean)
        + 0.5 * size * jnp.log(precision)
        - 0.5 * size * math.log(2 * math.pi)
    )
    log_joint = _data_scale(state) * state.log_likelihood + log_prior
    return log_joint / config.temperature + 0.5 * size * math.log(2 * math.pi) - 0.5 * log_det


def glm_predictive(
    state: LaplaceState,
    apply_fn: ApplyFn,
    inputs: jax.Array,
    *,
    link_approximation: str = "probit",
    key: PRNGKey | None = None,
    num_samples: int = 100,
    chunk_size: int = 32,
) -> jax.Array | dict[str, jax.Array]:
    """The linearised (GLM) predictive of a fitted state.

    The model is linearised at the MAP, :math:`f(x, \\theta) \\approx f(x, \\theta^*) +
    J(\\theta - \\theta^*)`, so the function-space distribution is
    :math:`\\mathcal{N}(f(x, \\theta^*), J \\Lambda^{-1}
    J^\\top)`. For regression the predictive is the exact Gaussian with covariance
    :math:`J\\Lambda^{-1}J^\\top + \\sigma^2 I`. For classification, ``"probit"`` is
    MacKay's approximation :math:`\\operatorname{softmax}\\big(f / \\sqrt{1 + \\frac{\\pi}{8}
    \\operatorname{diag}(J\\Lambda^{-1}J^\\top)}\\big)` and ``"mc"`` averages the softmax over
    ``num_samples`` draws of the linearised logits.

    Args:
      state: a fitted state.
      apply_fn: the model (``train=False``).
      inputs: ``(M, ...)`` inputs.
      link_approximation: ``"probit"`` or ``"mc"`` (classification only).
      key: PRNG key, required for ``"mc"``.
      num_samples: logit samples for ``"mc"``.
      chunk_size: inputs whose Jacobians are held in memory at once.

    Returns:
      Classification: ``(M, C)`` log-probabilities. Regression: a dict with ``mean``
      ``(M, D)``, ``variance`` ``(M, D)`` (function variance + :math:`\\sigma^2`),
      ``function_variance`` ``(M, D)`` and ``covariance`` ``(M, D, D)`` (with noise).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, likelihood="regression", num_data=1, prior_precision=1.0)
      >>> state = family.init({"kernel": jnp.zeros((1, 1))}, {})
      >>> out = glm_predictive(state, apply, jnp.ones((1, 1)))
      >>> float(out["variance"][0, 0])  # prior variance 1 + noise 1
      2.0
    """
    if link_approximation not in _LINK_APPROXIMATIONS:
        raise ValueError(
            f"link_approximation must be one of {_LINK_APPROXIMATIONS}, got {link_approximation!r}."
        )
    config = state.config
    if config.likelihood == "classification" and link_approximation == "mc":
        if key is None:
            raise ValueError("link_approximation='mc' needs a PRNG key.")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    inputs = _check_inputs(inputs)
    _check_chunk_size(chunk_size)
    return _glm_predictive(
        state,
        inputs,
        key,
        apply_fn=apply_fn,
        link_approximation=link_approximation,
        num_samples=int(num_samples),
        chunk_size=min(chunk_size, inputs.shape[0]),
    )


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "link_approximation", "num_samples", "chunk_size")
)
def _glm_predictive(state, inputs, key, *, apply_fn, link_approximation, num_samples, chunk_size):
    config = state.config
    basis, omega = _eigen(state)

    def per_input(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        output, coordinates = _jacobian_coordinates(state, apply_fn, basis, x)
        return output, _function_covariance(coordinates, omega)

    outputs, covariances = jax.lax.map(per_input, inputs, batch_size=chunk_size)
    if config.likelihood == "regression":
        noise = config.noise_std**2
        eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
        function_variance = jnp.diagonal(covariances, axis1=-2, axis2=-1)
        return {
            "mean": outputs,
            "variance": function_variance + noise,
            "function_variance": function_variance,
            "covariance": covariances + noise * eye,
        }
    if link_approximation == "probit":
        return _probit_log_probs(outputs, covariances)
    return _monte_carlo_log_probs(key, outputs, covariances, num_samples)


def tune_prior_precision(
    state: LaplaceState,
    apply_fn: ApplyFn | None = None,
    *,
    method: str = "marglik",
    grid: jax.typing.ArrayLike | None = None,
    validation_data: tuple[jax.Array, jax.Array] | None = None,
    chunk_size: int = 32,
) -> LaplaceState:
    """Picks the prior precision on a grid and returns the state with it.

    * ``"marglik"`` maximises :func:`log_marginal_likelihood` (closed form from the fitted
      curvature; no data needed). The MAP is held fixed, so alternate refitting the MAP
      and tuning for the evidence-maximising fixed point.
    * ``"val_nll"`` minimises the NLL of :func:`glm_predictive` (probit for
      classification, the exact Gaussian for regression) on ``validation_data``. The
      Jacobians of each input chunk are computed once for the whole grid.

    Args:
      state: a fitted state.
      apply_fn: the model; needed for ``"val_nll"``.
      method: ``"marglik"`` or ``"val_nll"``.
      grid: 1-D positive candidate precisions; default ``logspace(-4, 4, 81)``.
      validation_data: ``(inputs, labels)`` for ``"val_nll"``.
      chunk_size: validation inputs per Jacobian chunk.

    Returns:
      ``state`` with ``prior_precision`` set to the best grid value.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["kernel"], s)
      >>> family = build(apply, likelihood="regression", num_data=50)
      >>> x = jax.random.normal(jax.random.key(0), (50, 1))
      >>> state = family.init({"kernel": jnp.full((1, 1), 2.0)}, {})
      >>> state = fit(jax.random.key(1), state, apply, x, 2.0 * x[:, 0], batch_size=50)
      >>> tuned = tune_prior_precision(state, grid=jnp.array([1e-3, 0.25, 1e3]))
      >>> float(tuned.prior_precision)  # the evidence prefers 1/w^2 for one weight w = 2
      0.25
    """
    if method not in _TUNING_METHODS:
        raise ValueError(f"method must be one of {_TUNING_METHODS}, got {method!r}.")
    grid = jnp.logspace(-4.0, 4.0, 81) if grid is None else jnp.asarray(grid, jnp.float32)
    if grid.ndim != 1 or grid.shape[0] == 0:
        raise ValueError(f"grid must be a non-empty 1-D array, got shape {grid.shape}.")
    if not isinstance(grid, jax.core.Tracer) and not bool(jnp.all(grid > 0)):
        raise ValueError("grid values must be positive (and not NaN).")
    if method == "marglik":
        best = jnp.argmax(_marglik_scores(state, grid))
    else:
        if apply_fn is None or validation_data is None:
            raise ValueError("method='val_nll' needs apply_fn and validation_data.")
        inputs, labels = validation_data
        inputs, labels = _check_inputs(inputs), jnp.asarray(labels)
        if labels.ndim == 0 or labels.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"validation inputs and labels disagree on the number of examples: "
                f"{inputs.shape} vs {labels.shape}."
            )
        _check_chunk_size(chunk_size)
        chunk_size = min(chunk_size, inputs.shape[0])
        scores = _validation_nll(
            state, inputs, labels, grid, apply_fn=apply_fn, chunk_size=chunk_size
        )
        best = jnp.argmin(scores)
    return state._replace(prior_precision=grid[best])


def find_last_layer(params: Params) -> tuple:
    """The path of the last dense layer, by the rule of :func:`build`.

    A *dense layer* is a mapping whose array children are a 2-D kernel (the leaf named
    ``"kernel"``, or the only 2-D array) and at most one 1-D bias of the kernel's width
    (``"bias"``, or the only 1-D array). The last layer is the only dense layer in the
    tree, or else the only one named ``"output"`` or ``"head"``; anything else is
    ambiguous and raises ``ValueError`` listing the candidates. (Parameter dicts returned
    by jitted code have sorted keys, so creation order cannot be recovered.)

    Args:
      params: a parameter pytree of nested mappings.

    Returns:
      The tuple of keys leading to the layer's mapping (``()`` for the top level).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"hidden_0": {"kernel": jnp.zeros((3, 8)), "bias": jnp.zeros(8)},
      ...           "output": {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(2)}}
      >>> find_last_layer(params)
      ('output',)
    """
    candidates = [path for path, _ in _dense_layers(params, ())]
    if len(candidates) == 1:
        return candidates[0]
    named = [path for path in candidates if path and path[-1] in _OUTPUT_LAYER_NAMES]
    if len(named) == 1:
        return named[0]
    raise ValueError(
        "cannot auto-detect the last layer: found dense layers (mappings with a 2-D kernel "
        f"and optional 1-D bias) at {candidates}; pass last_layer_path=(...) to build."
    )


# ----------------------------------------------------------------------------- helpers


def _make_config(**kwargs: Any) -> LaplaceConfig:
    for name, value, options in (
        ("likelihood", kwargs["likelihood"], _LIKELIHOODS),
        ("curvature", kwargs["curvature"], _CURVATURES),
        ("subset", kwargs["subset"], _SUBSETS),
        ("covariance", kwargs["covariance"], _COVARIANCES),
    ):
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}.")
    if kwargs["covariance"] == "kron" and kwargs["subset"] != "last_layer":
        raise ValueError("covariance='kron' is implemented for subset='last_layer' only.")
    if kwargs["last_layer_path"] is not None and kwargs["subset"] != "last_layer":
        raise ValueError("last_layer_path is only used with subset='last_layer'.")
    num_data = kwargs["num_data"]
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data <= 0:
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}.")
    _check_positive("temperature", kwargs["temperature"])
    noise_std = kwargs["noise_std"]
    if kwargs["likelihood"] == "regression":
        if noise_std is None:
            raise ValueError(
                "noise_std=None (learned heteroscedastic noise) is not supported by Laplace; "
                "give the observation noise standard deviation."
            )
        _check_positive("noise_std", noise_std)
    path = kwargs["last_layer_path"]
    if path is not None:
        if isinstance(path, str):
            path = (path,)
        path = tuple(path)
    return LaplaceConfig(
        likelihood=kwargs["likelihood"],
        curvature=kwargs["curvature"],
        subset=kwargs["subset"],
        covariance=kwargs["covariance"],
        num_data=int(num_data),
        temperature=float(kwargs["temperature"]),
        noise_std=float(noise_std) if noise_std is not None else 1.0,
        last_layer_path=path,
    )


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}.") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def _check_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    if "inputs" not in batch or "labels" not in batch:
        raise ValueError(f"batch needs 'inputs' and 'labels', got keys {sorted(batch)}.")
    inputs, labels = batch["inputs"], batch["labels"]
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"batch inputs must be a non-empty batch, got shape {inputs.shape}.")
    if labels.ndim == 0 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"batch inputs and labels disagree on the batch size: {inputs.shape} vs {labels.shape}."
        )
    mask = batch.get("mask")
    if mask is None:
        return inputs, labels, jnp.ones(inputs.shape[0], bool)
    if mask.shape != (inputs.shape[0],) or mask.dtype != jnp.bool_:
        raise ValueError(
            f"batch mask must be boolean of shape ({inputs.shape[0]},), got {mask.shape} "
            f"{mask.dtype}."
        )
    return inputs, labels, mask


def _check_inputs(inputs: jax.Array) -> jax.Array:
    inputs = jnp.asarray(inputs)
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch, got shape {inputs.shape}.")
    return inputs


def _check_chunk_size(chunk_size: Any) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def _check_outputs(
    config: LaplaceConfig, subset_params: Params, outputs: jax.Array, labels: jax.Array
) -> None:
    if outputs.ndim != 2:
        raise ValueError(f"Laplace expects model outputs of shape (B, C), got {outputs.shape}.")
    if config.subset == "last_layer" and subset_params["kernel"].shape[1] != outputs.shape[1]:
        raise ValueError(
            f"the last layer at {config.last_layer_path} has width "
            f"{subset_params['kernel'].shape[1]} but the model outputs {outputs.shape[1]} "
            "values: it is not the output layer; pass last_layer_path."
        )
    if config.likelihood == "classification":
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"classification labels must be integers of shape (B,), got {labels.shape} "
                f"{labels.dtype}."
            )
        if outputs.shape[1] < 2:
            raise ValueError("classification needs at least two logits per example.")
    elif labels.size != outputs.size:
        raise ValueError(
            f"regression targets of shape {labels.shape} do not match outputs {outputs.shape}."
        )


def _log_likelihood(config: LaplaceConfig, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    if config.likelihood == "classification":
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        return jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    sigma = config.noise_std
    residual = (labels.reshape(outputs.shape) - outputs) / sigma
    per_dim = -0.5 * residual**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(axis=-1)


def _output_factors(config: LaplaceConfig, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example output-space factors ``(B, K, C)`` whose outer products sum to the curvature.

    GGN: the columns of :math:`L` with :math:`LL^\\top = H`; empirical Fisher: the gradient
    of the NLL with respect to the outputs (``K = 1``).
    """
    num_outputs = outputs.shape[-1]
    if config.likelihood == "classification":
        probs = jax.nn.softmax(outputs, axis=-1)
        if config.curvature == "ggn":
            eye = jnp.eye(num_outputs, dtype=outputs.dtype)
            return jnp.sqrt(probs)[:, :, None] * (eye[None] - probs[:, None, :])
        one_hot = jax.nn.one_hot(labels, num_outputs, dtype=outputs.dtype)
        return (probs - one_hot)[:, None, :]
    sigma = config.noise_std
    if config.curvature == "ggn":
        eye = jnp.eye(num_outputs, dtype=outputs.dtype) / sigma
        return jnp.broadcast_to(eye, (outputs.shape[0], num_outputs, num_outputs))
    return ((outputs - labels.reshape(outputs.shape)) / sigma**2)[:, None, :]


def _dense_layers(node: Any, path: tuple) -> list[tuple[tuple, tuple[str, str | None]]]:
    if not isinstance(node, Mapping):
        return []
    found = []
    names = _dense_layer_names(node)
    if names is not None:
        found.append((path, names))
    for name, child in node.items():
        found.extend(_dense_layers(child, (*path, name)))
    return found


def _dense_layer_names(node: Mapping) -> tuple[str, str | None] | None:
    arrays = {k: v for k, v in node.items() if hasattr(v, "ndim") and hasattr(v, "shape")}
    matrices = [k for k, v in arrays.items() if v.ndim == 2]
    vectors = [k for k, v in arrays.items() if v.ndim == 1]
    if "kernel" in arrays and arrays["kernel"].ndim == 2:
        kernel = "kernel"
    elif len(matrices) == 1 and len(arrays) <= 2:
        kernel = matrices[0]
    else:
        return None
    width = arrays[kernel].shape[1]
    if "bias" in vectors:
        bias = "bias"
    elif len(vectors) == 1 and len(arrays) == 2:
        bias = vectors[0]
    else:
        bias = None
    if bias is not None and arrays[bias].shape[0] != width:
        return None
    return kernel, bias


def _resolve_last_layer(config: LaplaceConfig, params: Params) -> LaplaceConfig:
    if config.subset != "last_layer":
        return config
    path = config.last_layer_path
    if path is None:
        path = find_last_layer(params)
    node = params
    for index, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(
                f"last_layer_path {path} does not exist in params (failed at {path[: index + 1]})."
            )
        node = node[name]
    names = _dense_layer_names(node) if isinstance(node, Mapping) else None
    if names is None:
        raise ValueError(
            f"params at last_layer_path {path} is not a dense layer (a mapping with a 2-D "
            "kernel and an optional 1-D bias of the kernel's width)."
        )
    if config.bias_name is not None or config.kernel_name is not None:
        if (config.kernel_name, config.bias_name) != names or config.last_layer_path != path:
            raise ValueError("params do not match the last layer this state was built for.")
    return dataclasses.replace(
        config, last_layer_path=path, kernel_name=names[0], bias_name=names[1]
    )


def _extract(config: LaplaceConfig, params: Params) -> Params:
    """The covered parameters: all of them, or ``{"kernel", "bias"}`` of the last layer."""
    if config.subset == "all":
        return params
    node = params
    for name in config.last_layer_path:
        node = node[name]
    subset = {"kernel": node[config.kernel_name]}
    if config.bias_name is not None:
        subset["bias"] = node[config.bias_name]
    return subset


def _insert(config: LaplaceConfig, params: Params, subset: Params) -> Params:
    if config.subset == "all":
        return subset

    def rebuild(node: Mapping, path: tuple) -> Mapping:
        if not path:
            values = {**node, config.kernel_name: subset["kernel"]}
            if config.bias_name is not None:
                values[config.bias_name] = subset["bias"]
        else:
            values = {**node, path[0]: rebuild(node[path[0]], path[1:])}
        return values if type(node) is dict else type(node)(values)

    return rebuild(params, config.last_layer_path)


def _subset_size(subset: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(subset))


def _kron_shape(subset: Params) -> tuple[int, int]:
    rows, columns = subset["kernel"].shape
    return rows + (1 if "bias" in subset else 0), columns


def _flatten(config: LaplaceConfig, subset: Params) -> jax.Array:
    if config.subset == "all":
        return ravel_pytree(subset)[0]
    parts = [subset["kernel"].reshape(-1)]
    if "bias" in subset:
        parts.append(subset["bias"])
    return jnp.concatenate(parts)


def _unflatten(config: LaplaceConfig, vector: jax.Array, like: Params) -> Params:
    if config.subset == "all":
        return ravel_pytree(like)[1](vector)
    kernel = like["kernel"]
    out = {"kernel": vector[: kernel.size].reshape(kernel.shape)}
    if "bias" in like:
        out["bias"] = vector[kernel.size :]
    return out


def _to_matrix(subset: Params) -> jax.Array:
    if "bias" in subset:
        return jnp.concatenate([subset["kernel"], subset["bias"][None]], axis=0)
    return subset["kernel"]


def _from_matrix(matrix: jax.Array, like: Params) -> Params:
    rows = like["kernel"].shape[0]
    out = {"kernel": matrix[:rows]}
    if "bias" in like:
        out["bias"] = matrix[rows]
    return out


def _data_scale(state: LaplaceState) -> jax.Array:
    """:math:`N / n` (0 before any data is seen)."""
    seen = state.num_seen.astype(jnp.float32)
    return jnp.where(seen > 0, state.config.num_data / jnp.maximum(seen, 1.0), 0.0)


def _kron_scale(state: LaplaceState) -> jax.Array:
    """:math:`N / n^2`, the scale of KFAC's :math:`\\tfrac{N}{n} \\tfrac{1}{n} A \\otimes G`."""
    seen = state.num_seen.astype(jnp.float32)
    return _data_scale(state) / jnp.maximum(seen, 1.0)


def _eigen(state: LaplaceState, prior_precision: jax.Array | None = None) -> tuple[Any, Any]:
    """``(basis, omega)``: :math:`\\Lambda = Q\\,\\operatorname{diag}(\\omega)\\,Q^\\top`.

    ``basis`` is ``None`` (diag), the eigenvectors ``U`` (full) or ``(U_A, U_G)`` (kron);
    ``omega`` has the shape of the coordinates: the subset pytree, ``(P,)`` or
    ``(D + 1, C)``. Tiny negative eigenvalues from round-off are clipped to zero.
    """
    config = state.config
    prior = state.prior_precision if prior_precision is None else prior_precision
    temperature = config.temperature
    if config.covariance == "diag":
        scale = _data_scale(state)
        omega = jax.tree.map(lambda c: (scale * c + prior) / temperature, state.curvature)
        return None, omega
    if config.covariance == "full":
        values, vectors = jnp.linalg.eigh(state.curvature)
        curvature = _data_scale(state) * jnp.maximum(values, 0.0)
        return vectors, (curvature + prior) / temperature
    factor_a, factor_g = state.curvature
    values_a, vectors_a = jnp.linalg.eigh(factor_a)
    values_g, vectors_g = jnp.linalg.eigh(factor_g)
    curvature = _kron_scale(state) * jnp.outer(
        jnp.maximum(values_a, 0.0), jnp.maximum(values_g, 0.0)
    )
    return (vectors_a, vectors_g), (curvature + prior) / temperature


def _to_coordinates(config: LaplaceConfig, basis: Any, delta: Params) -> Any:
    """:math:`Q^\\top \\delta` in the coordinate shape of :func:`_eigen`."""
    if config.covariance == "diag":
        return delta
    if config.covariance == "full":
        return basis.T @ _flatten(config, delta)
    vectors_a, vectors_g = basis
    return vectors_a.T @ _to_matrix(delta) @ vectors_g


def _from_coordinates(config: LaplaceConfig, basis: Any, coordinates: Any, like: Params) -> Params:
    """:math:`Q c` back in the subset's pytree shape."""
    if config.covariance == "diag":
        return coordinates
    if config.covariance == "full":
        return _unflatten(config, basis @ coordinates, like)
    vectors_a, vectors_g = basis
    return _from_matrix(vectors_a @ coordinates @ vectors_g.T, like)


def _jacobian_coordinates(
    state: LaplaceState, apply_fn: ApplyFn, basis: Any, x: jax.Array
) -> tuple[jax.Array, Any]:
    """Output ``(C,)`` at one input and the Jacobian rows in eigen-coordinates ``(C, ...)``."""
    config = state.config
    subset = _extract(config, state.params)

    def single_output(sub: Params) -> jax.Array:
        full = _insert(config, state.params, sub)
        return apply_fn(full, state.model_state, x[None], train=False, key=None)[0][0]

    output, vjp_fn = jax.vjp(single_output, subset)
    eye = jnp.eye(output.shape[0], dtype=output.dtype)
    rows = jax.vmap(lambda u: vjp_fn(u)[0])(eye)
    return output, jax.vmap(lambda r: _to_coordinates(config, basis, r))(rows)


def _function_covariance(coordinates: Any, omega: Any) -> jax.Array:
    """:math:`J\\Lambda^{-1}J^\\top = \\sum_p (JQ)_{cp}(JQ)_{dp} / \\omega_p`."""
    terms = jax.tree.map(
        lambda c, w: jnp.einsum(
            "cp,dp->cd", (c / w).reshape(c.shape[0], -1), c.reshape(c.shape[0], -1)
        ),
        coordinates,
        omega,
    )
    return _tree_sum(terms)


def _probit_log_probs(outputs: jax.Array, covariances: jax.Array) -> jax.Array:
    variances = jnp.diagonal(covariances, axis1=-2, axis2=-1)
    scaled = outputs * jax.lax.rsqrt(1.0 + (math.pi / 8.0) * variances)
    return jax.nn.log_softmax(scaled, axis=-1)


def _monte_carlo_log_probs(
    key: PRNGKey, outputs: jax.Array, covariances: jax.Array, num_samples: int
) -> jax.Array:
    values, vectors = jnp.linalg.eigh(covariances)
    roots = vectors * jnp.sqrt(jnp.maximum(values, 0.0))[..., None, :]
    noise = standard_normal(key, (num_samples, *outputs.shape), outputs.dtype)
    logits = outputs + jnp.einsum("mcd,smd->smc", roots, noise)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jax.scipy.special.logsumexp(log_probs, axis=0) - math.log(num_samples)


@jax.jit
def _marglik_scores(state: LaplaceState, grid: jax.Array) -> jax.Array:
    return jax.vmap(lambda value: log_marginal_likelihood(state, value))(grid)


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def _validation_nll(
    state: LaplaceState,
    inputs: jax.Array,
    labels: jax.Array,
    grid: jax.Array,
    *,
    apply_fn: ApplyFn,
    chunk_size: int,
) -> jax.Array:
    """Summed validation NLL of the GLM predictive for every grid value, shape ``(G,)``."""
    config = state.config
    basis, _ = _eigen(state)
    omegas = jax.vmap(lambda value: _eigen(state, value)[1])(grid)

    def per_input(xy: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = xy
        output, coordinates = _jacobian_coordinates(state, apply_fn, basis, x)

        def nll(omega: Any) -> jax.Array:
            covariance = _function_covariance(coordinates, omega)
            if config.likelihood == "classification":
                log_probs = _probit_log_probs(output[None], covariance[None])[0]
                return -log_probs[y]
            covariance = covariance + config.noise_std**2 * jnp.eye(output.shape[0])
            residual = y.reshape(output.shape) - output
            _, log_det = jnp.linalg.slogdet(covariance)
            quadratic = residual @ jnp.linalg.solve(covariance, residual)
            return 0.5 * (quadratic + log_det + output.shape[0] * math.log(2 * math.pi))

        return jax.vmap(nll)(omegas)

    per_example = jax.lax.map(per_input, (inputs, labels), batch_size=chunk_size)
    return per_example.sum(axis=0)


def _normal_like(key: PRNGKey, tree: Any) -> Any:
    """Standard normals shaped like ``tree``, from one draw (one RNG kernel to compile)."""
    leaves, treedef = jax.tree.flatten(tree)
    dtype = jnp.result_type(*leaves)
    flat = standard_normal(key, (sum(x.size for x in leaves),), dtype)
    pieces, start = [], 0
    for x in leaves:
        pieces.append(flat[start : start + x.size].reshape(x.shape).astype(x.dtype))
        start += x.size
    return treedef.unflatten(pieces)


def _sum_of_squares(tree: Params) -> jax.Array:
    return _tree_sum(jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), tree))


def _tree_sum(tree: Any) -> jax.Array:
    return sum(jax.tree.leaves(tree), jnp.zeros((), jnp.float32))
