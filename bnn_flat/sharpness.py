r"""Curvature and sharpness of a loss: Hessian-vector products, Lanczos, Hutchinson, SLQ, SAM.

Everything here works on a scalar ``loss(params)`` and any parameter pytree. Internally,
vectors are flattened with :func:`jax.flatten_util.ravel_pytree` into one array of length
:math:`d` (the number of parameters).

**Curvature.** :func:`hvp` computes :math:`H v = \nabla^2 L(\theta)\, v` forward-over-reverse
(``jax.jvp`` of ``jax.grad``) without forming :math:`H`. On top of it:

* :func:`lanczos` builds the tridiagonal matrix :math:`T_k = V_k^\top H V_k` of a Krylov basis
  :math:`V_k` (with full reorthogonalisation by default); :func:`top_hessian_eigenvalues`
  returns the largest Ritz values (the flatness measure of SA-BMA: the top-5 Hessian
  eigenvalues of the training loss, 20 Lanczos iterations);
* :func:`power_iteration`: the eigenvalue of largest *magnitude*;
* :func:`hutchinson_trace`: :math:`\operatorname{tr} H \approx \frac1m\sum_j z_j^\top H z_j`
  with Rademacher probes :math:`z_j`;
* :func:`spectral_density`: stochastic Lanczos quadrature (SLQ), the eigenvalue density
  :math:`\phi(t) = \frac1d\sum_i \delta(t - \lambda_i)` smoothed with a Gaussian.

**Sharpness.** :func:`sam_sharpness` is the SAM sharpness of F-BNN,

.. math:: S_\rho(\theta) = \max_{\|\epsilon\|_2 \le \rho} L(\theta + \epsilon) - L(\theta)
          \approx L\big(\theta + \rho\, g / \|g\|\big) - L(\theta),\qquad g = \nabla L(\theta),

(one normalised ascent step, or several projected ones); :func:`adaptive_sharpness` is the
ASAM version with the ball :math:`\|\epsilon / (|\theta| + \eta)\|_2 \le \rho`.
:func:`posterior_sharpness` and :func:`posterior_top_eigenvalue` average either measure over
stacked posterior samples.

**The loss.** :func:`make_loss_for_hessian` turns a model in the library's ``apply`` contract
into the full-data mean loss with BatchNorm and dropout in evaluation mode (``train=False``),
so the value does not depend on how the data are batched. With ``batch_size`` it sums over
batches in a ``lax.scan`` whose body is rematerialised (``jax.checkpoint``): gradients and
HVPs of the sum are sums of per-batch ones, and memory is that of one batch (see the CPU
caveat below).

Everything is jit-compatible (except ``strategy="python"``); iteration and probe counts are
Python ints (static).

**Loops on CPU.** XLA:CPU rewrites convolutions into its fast (Eigen) form only at the top
level of a program, not inside while-loop bodies, so the weight-gradient convolutions of an
HVP or gradient inside ``lax.scan`` take a slow generic path: six Lanczos iterations on a
ResNet-20 (64 examples) measured 35x slower as a scan than unrolled (compare
``python -m experiments.bench_hessian --num_examples=64 --num_iterations=6`` with
``--unroll=0`` and ``--unroll=1``). Every loop here that evaluates gradients or HVPs
therefore takes ``unroll``: ``True`` unrolls it (``lax.scan(..., unroll=True)``:
straight-line code, compile time proportional to the number of steps), ``False`` keeps a
compiled loop, and ``None`` (the default, except for the batch loop of
:func:`make_loss_for_hessian`, which stays a loop to bound memory) unrolls on the CPU backend
when some parameter has rank 3 or more (a convolution kernel) and loops otherwise. The
posterior averages run one jitted function per sample from Python on CPU for convolutional
models (``strategy``), since unrolling the samples too would multiply the compile time by
their number.

References:
  Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", 1950. Hutchinson, "A stochastic estimator of the
  trace of the influence matrix for Laplacian smoothing splines", 1989. Ghorbani, Krishnan
  and Xiao, "An investigation into neural net optimization via Hessian eigenvalue density",
  ICML 2019. Papyan, "The full spectrum of deepnet Hessians at scale", ICML 2019. Foret et
  al., "Sharpness-aware minimization", ICLR 2021. Kwon et al., "ASAM", ICML 2021. Nguyen et
  al., "Flat seeking Bayesian neural networks", NeurIPS 2023. Lim et al., "Flat posterior
  does matter for Bayesian transfer learning", 2024.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bnn_flat.objectives import categorical_log_likelihood, gaussian_log_likelihood
from bnn_flat.types import ApplyFn, ModelState, Params, PRNGKey

__all__ = [
    "LOSSES",
    "SAMPLE_STRATEGIES",
    "LanczosResult",
    "TopEigenvalues",
    "PowerIterationResult",
    "TraceEstimate",
    "SpectralDensity",
    "PosteriorStatistic",
    "hvp",
    "make_loss_for_hessian",
    "lanczos",
    "top_hessian_eigenvalues",
    "power_iteration",
    "hutchinson_trace",
    "spectral_density",
    "sam_sharpness",
    "adaptive_sharpness",
    "posterior_sharpness",
    "posterior_top_eigenvalue",
]

LOSSES = ("classification", "regression")
"""Names accepted by :func:`make_loss_for_hessian` (a callable is accepted too)."""

SAMPLE_STRATEGIES = ("auto", "map", "python")
"""How :func:`posterior_sharpness` and :func:`posterior_top_eigenvalue` loop over samples."""

Matvec = Callable[[Params], Params]
"""A symmetric linear map on parameter pytrees, e.g. ``lambda v: hvp(loss, params, v)``."""


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
      alphas: ``(k,)`` diagonal of the tridiagonal matrix :math:`T_k`.
      betas: ``(k - 1,)`` off-diagonal of :math:`T_k` (zero where the iteration restarted
        after finding an invariant subspace).
      basis: ``(k, d)`` orthonormal Krylov basis :math:`V_k` (rows) over the flattened
        parameter vector, or ``None`` unless requested.
    """

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array | None


class TopEigenvalues(NamedTuple):
    """Output of :func:`top_hessian_eigenvalues`.

    Attributes:
      eigenvalues: ``(k,)`` largest Ritz values, in decreasing order.
      num_hessian_vector_products: Number of HVPs used (a Python int).
      eigenvectors: Ritz vectors as a parameter pytree with a leading axis of size ``k``
        (unit norm over all leaves), or ``None`` unless requested.
    """

    eigenvalues: jax.Array
    num_hessian_vector_products: int
    eigenvectors: Params | None


class PowerIterationResult(NamedTuple):
    """Output of :func:`power_iteration`.

    Attributes:
      eigenvalue: Rayleigh quotient of the last iterate (signed).
      eigenvector: The last iterate, a unit-norm parameter pytree.
    """

    eigenvalue: jax.Array
    eigenvector: Params


class TraceEstimate(NamedTuple):
    """Output of :func:`hutchinson_trace`.

    Attributes:
      trace: Mean of the per-probe estimates :math:`z^\\top A z`.
      standard_error: Their sample standard deviation over :math:`\\sqrt{m}`.
    """

    trace: jax.Array
    standard_error: jax.Array


class SpectralDensity(NamedTuple):
    """Output of :func:`spectral_density`.

    Attributes:
      grid: ``(G,)`` points where the density is evaluated.
      density: ``(G,)`` Gaussian-smoothed eigenvalue density (integrates to about 1 when the
        grid covers the spectrum).
      nodes: ``(num_probes, k)`` quadrature nodes (Ritz values) per probe.
      weights: ``(num_probes, k)`` quadrature weights per probe (each row sums to 1).
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array


class PosteriorStatistic(NamedTuple):
    """A per-sample measure summarised over posterior samples.

    Attributes:
      mean: Mean over samples.
      std: Standard deviation over samples (``ddof=0``).
      values: ``(S,)`` per-sample values.
    """

    mean: jax.Array
    std: jax.Array
    values: jax.Array


# Hessian-vector products and the loss ------------------------------------------------------


def hvp(loss: Callable[[Params], jax.Array], params: Params, vector: Params) -> Params:
    r"""Hessian-vector product :math:`\nabla^2 L(\theta)\, v`, forward-over-reverse.

    Computed as ``jax.jvp(jax.grad(loss), (params,), (vector,))``: about the cost of two
    gradient evaluations, memory of one, and the Hessian is never formed.

    Args:
      loss: Scalar function of the parameters.
      params: Parameter pytree :math:`\theta`.
      vector: Pytree with the structure and shapes of ``params``.

    Returns:
      :math:`H v`, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: 0.5 * p["w"] @ jnp.diag(jnp.array([1.0, 3.0])) @ p["w"]
      >>> hvp(loss, {"w": jnp.zeros(2)}, {"w": jnp.ones(2)})["w"]
      Array([1., 3.], dtype=float32)
    """
    vector = _match_params(params, vector, "vector")
    return jax.jvp(jax.grad(loss), (params,), (vector,))[1]


def make_loss_for_hessian(
    apply_fn: ApplyFn,
    model_state: ModelState,
    inputs: jax.Array,
    labels: jax.Array,
    loss: str | Callable[[jax.Array, jax.Array], jax.Array] = "classification",
    batch_size: int | None = None,
    *,
    prior_precision: float = 0.0,
    num_data: int | None = None,
    unroll: bool | None = False,
) -> Callable[[Params], jax.Array]:
    r"""The mean loss over a data set, in evaluation mode, as a function of the parameters.

    .. math:: L(\theta) = \frac1N \sum_{i=1}^N \ell(f_\theta(x_i), y_i)
              + \frac{\lambda}{2 N_\text{data}} \|\theta\|^2

    The model runs with ``train=False``: BatchNorm uses the running statistics in
    ``model_state`` and dropout is off, so :math:`L` is deterministic and does not depend on
    how the examples are batched. With ``batch_size`` the sum runs over batches in a
    ``lax.scan`` with a rematerialised body, so gradients and HVPs cost one batch of memory
    (a short last batch is padded with repeated examples of weight zero). The HVP of the sum
    is the sum of the per-batch HVPs. On CPU, see ``unroll``.

    Args:
      apply_fn: Model in the contract ``apply(params, model_state, inputs, *, train, key)``.
      model_state: Model state (BatchNorm statistics), ``{}`` for stateless models.
      inputs: ``(N, ...)`` inputs.
      labels: ``(N,)`` integer labels (classification) or ``(N,)`` / ``(N, D)`` targets.
      loss: ``"classification"`` (cross-entropy), ``"regression"`` (Gaussian negative
        log-likelihood with unit noise, :math:`\tfrac12\|y - f\|^2` plus a constant), or a
        callable ``(outputs, labels) -> (B,)`` per-example losses.
      batch_size: Examples per forward pass; ``None`` for one pass over all ``N``.
      prior_precision: :math:`\lambda \ge 0` of an isotropic Gaussian prior (0: none).
      num_data: :math:`N_\text{data}` dividing the prior term (default ``N``), as in the
        library's per-datum objective.
      unroll: How to loop over batches. ``False`` (default): a compiled loop, memory of one
        batch; on XLA:CPU its convolution gradients take the slow path (see the module
        docstring), so on CPU prefer ``batch_size=None`` when the data fit. ``True``:
        unrolled and fast on CPU, but memory is not bounded: XLA then keeps buffers per
        Lanczos iteration (ResNet-20, 4 batches of 50: 1.9 GB at 3 iterations, 3.3 GB at 6;
        4 batches of 250 at 20 iterations requested 47 GB). ``None``: the automatic rule.

    Returns:
      ``loss(params) -> scalar``.

    Example:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss = make_loss_for_hessian(apply, {}, jnp.ones((5, 3)), jnp.zeros(5, jnp.int32),
      ...                              batch_size=2)
      >>> round(float(loss({"w": jnp.zeros((3, 4))})), 4)  # log 4
      1.3863
    """
    per_example = _per_example_loss(loss)
    inputs = jnp.asarray(inputs)
    labels = jnp.asarray(labels)
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {inputs.shape}")
    num_examples = inputs.shape[0]
    if labels.ndim < 1 or labels.shape[0] != num_examples:
        raise ValueError(
            f"labels must have a leading axis of {num_examples} (one per input), got shape "
            f"{labels.shape}"
        )
    if loss == "classification" and (
        labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer)
    ):
        raise ValueError(
            f"classification needs integer labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    _check_finite_data(inputs, "inputs")
    _check_finite_data(labels, "labels")
    _check_nonnegative("prior_precision", prior_precision)
    if num_data is None:
        num_data = num_examples
    _check_positive_int("num_data", num_data)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    _check_unroll(unroll)

    def prior_term(params: Params) -> jax.Array:
        if isinstance(prior_precision, numbers.Real) and prior_precision == 0:
            return jnp.zeros(())
        squares = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(params))
        return 0.5 * prior_precision * squares / num_data

    if batch_size is None or batch_size >= num_examples:

        def full_loss(params: Params) -> jax.Array:
            outputs, _ = apply_fn(params, model_state, inputs, train=False, key=None)
            return jnp.mean(per_example(outputs, labels)) + prior_term(params)

        return full_loss

    num_batches = math.ceil(num_examples / batch_size)
    padded = num_batches * batch_size
    index = np.arange(padded) % num_examples
    batched_inputs = inputs[index].reshape(num_batches, batch_size, *inputs.shape[1:])
    batched_labels = labels[index].reshape(num_batches, batch_size, *labels.shape[1:])
    weights = (np.arange(padded) < num_examples).astype(np.float32)
    batched_weights = jnp.asarray(weights.reshape(num_batches, batch_size))

    @jax.checkpoint
    def batch_sum(params: Params, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
        outputs, _ = apply_fn(params, model_state, x, train=False, key=None)
        return jnp.sum(w * per_example(outputs, y))

    def batched_loss(params: Params) -> jax.Array:
        dtype = jax.eval_shape(
            batch_sum, params, batched_inputs[0], batched_labels[0], batched_weights[0]
        ).dtype

        def body(total: jax.Array, batch: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            return total + batch_sum(params, *batch), None

        total, _ = jax.lax.scan(
            body,
            jnp.zeros((), dtype),
            (batched_inputs, batched_labels, batched_weights),
            unroll=_resolve_unroll(unroll, params),
        )
        return total / num_examples + prior_term(params)

    return batched_loss


# Lanczos and friends -------------------------------------------------------------------------


def lanczos(
    key: PRNGKey,
    matvec: Matvec,
    params_like: Params,
    num_iterations: int,
    *,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    initial_vector: Params | None = None,
    unroll: bool | None = None,
) -> LanczosResult:
    r"""Lanczos tridiagonalisation of a symmetric linear map on parameter pytrees.

    From a unit start vector :math:`v_1`, the three-term recursion

    .. math:: \beta_j v_{j+1} = A v_j - \alpha_j v_j - \beta_{j-1} v_{j-1},
              \qquad \alpha_j = v_j^\top A v_j,

    builds an orthonormal basis :math:`V_k` of the Krylov space and
    :math:`T_k = V_k^\top A V_k = \operatorname{tridiag}(\beta, \alpha, \beta)`, whose
    eigenvalues (Ritz values) approximate the extreme eigenvalues of :math:`A`. With
    ``reorthogonalize=True`` (full reorthogonalisation) every new vector is also projected out
    of the stored basis, a ``(k, d)`` array over the flattened parameters (two classical
    Gram-Schmidt passes), which prevents the spurious copies of converged eigenvalues that
    plain Lanczos produces in floating point. If the iteration finds an invariant subspace
    (:math:`\beta_j \approx 0`) it restarts from a random vector orthogonal to the basis and
    stores :math:`\beta_j = 0`, so repeated eigenvalues are found with their multiplicity.

    One ``matvec`` per iteration. Memory: ``k * d`` numbers for the basis.

    Args:
      key: PRNG key for the start vector (and restarts).
      matvec: Symmetric linear map ``v -> A v`` on pytrees like ``params_like``.
      params_like: Pytree giving the structure, shapes and dtypes (values are ignored).
      num_iterations: Number of iterations :math:`k`, ``1 <= k <= d`` (static).
      reorthogonalize: Full reorthogonalisation against all previous basis vectors.
      return_basis: Also return the ``(k, d)`` basis.
      initial_vector: Start vector (a pytree like ``params_like``, normalised here); a
        standard normal one from ``key`` if ``None``.
      unroll: Unroll the iterations (see the module docstring; ``None``: automatic).

    Returns:
      :class:`LanczosResult` ``(alphas, betas, basis)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.arange(1.0, 6.0))
      >>> result = lanczos(jax.random.key(0), lambda v: a @ v, jnp.zeros(5), 5)
      >>> tridiagonal = (jnp.diag(result.alphas) + jnp.diag(result.betas, 1)
      ...                + jnp.diag(result.betas, -1))
      >>> [round(float(value), 3) for value in jnp.linalg.eigvalsh(tridiagonal)]
      [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    flat_matvec, template, unravel = _flatten_matvec(matvec, params_like)
    del unravel
    _check_iterations(num_iterations, template.size)
    start_key, restart_key = jax.random.split(key)
    if initial_vector is None:
        start = jax.random.normal(start_key, template.shape, template.dtype)
    else:
        start = ravel_pytree(
            _match_params(_zeros_like(params_like), initial_vector, "initial_vector")
        )[0].astype(template.dtype)
    alphas, betas, basis = _lanczos_flat(
        restart_key,
        flat_matvec,
        start,
        num_iterations,
        reorthogonalize,
        return_basis,
        _resolve_unroll(unroll, params_like),
    )
    return LanczosResult(alphas=alphas, betas=betas, basis=basis)


def top_hessian_eigenvalues(
    key: PRNGKey,
    loss: Callable[[Params], jax.Array],
    params: Params,
    k: int = 5,
    num_iterations: int = 20,
    *,
    reorthogonalize: bool = True,
    return_eigenvectors: bool = False,
    unroll: bool | None = None,
) -> TopEigenvalues:
    r"""The ``k`` largest eigenvalues of the Hessian of ``loss`` at ``params``, by Lanczos.

    Runs ``num_iterations`` Lanczos steps on :math:`H = \nabla^2 L(\theta)` (one HVP each, see
    :func:`lanczos`) and returns the ``k`` largest Ritz values, largest first. "Largest" is
    algebraic: negative curvature appears at the end, not first. The top Ritz values converge
    first; ``num_iterations`` of 20 (SA-BMA's setting) is usually enough for well-separated
    top eigenvalues, more for clustered ones.

    Args:
      key: PRNG key for the Lanczos start vector.
      loss: Scalar function of the parameters (e.g. from :func:`make_loss_for_hessian`).
      params: Where the Hessian is taken.
      k: Number of eigenvalues, ``1 <= k <= num_iterations`` (static).
      num_iterations: Lanczos iterations = HVPs, at most the number of parameters (static).
      reorthogonalize: Full reorthogonalisation (recommended).
      return_eigenvectors: Also return the Ritz vectors.
      unroll: Unroll the Lanczos iterations (see the module docstring; ``None``: unrolled
        on CPU for convolutional parameters).

    Returns:
      :class:`TopEigenvalues` ``(eigenvalues, num_hessian_vector_products, eigenvectors)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 11.0) * p**2)
      >>> result = top_hessian_eigenvalues(jax.random.key(0), loss, jnp.zeros(10), k=2,
      ...                                  num_iterations=10)
      >>> jnp.round(result.eigenvalues, 3), result.num_hessian_vector_products
      (Array([10.,  9.], dtype=float32), 10)
    """
    _check_positive_int("k", k)
    _check_positive_int("num_iterations", num_iterations)
    if k > num_iterations:
        raise ValueError(f"k ({k}) must not exceed num_iterations ({num_iterations})")
    result = lanczos(
        key,
        lambda vector: hvp(loss, params, vector),
        params,
        num_iterations,
        reorthogonalize=reorthogonalize,
        return_basis=return_eigenvectors,
        unroll=unroll,
    )
    values, vectors = jnp.linalg.eigh(_tridiagonal(result.alphas, result.betas))
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]  # largest first
    eigenvectors = None
    if return_eigenvectors:
        _, unravel = ravel_pytree(_zeros_like(params))
        eigenvectors = jax.vmap(unravel)(vectors.T @ result.basis)  # (k, d) Ritz vectors
    return TopEigenvalues(
        eigenvalues=values,
        num_hessian_vector_products=num_iterations,
        eigenvectors=eigenvectors,
    )


def power_iteration(
    key: PRNGKey,
    matvec: Matvec,
    params_like: Params,
    num_iterations: int,
    *,
    unroll: bool | None = None,
) -> PowerIterationResult:
    r"""The eigenvalue of largest magnitude of a symmetric map, by power iteration.

    .. math:: v_{t+1} = A v_t / \|A v_t\|, \qquad \lambda = v_T^\top A v_T

    from a standard normal :math:`v_0`. The iteration converges to the eigenvalue of largest
    **absolute value**, which for a Hessian with strong negative curvature can be negative
    (use :func:`top_hessian_eigenvalues` for the largest algebraic one). The error of the
    eigenvalue shrinks like :math:`(\lambda_2/\lambda_1)^{2T}`; with
    :math:`\lambda_2 = -\lambda_1` it does not converge. Uses ``num_iterations`` matvecs:
    :math:`T = ` ``num_iterations - 1`` normalised products, then the Rayleigh quotient.

    Args:
      key: PRNG key for the start vector.
      matvec: Symmetric linear map on pytrees like ``params_like``.
      params_like: Pytree giving structure, shapes and dtypes (values ignored).
      num_iterations: Number of matvecs, at least 1 (static).
      unroll: Unroll the iterations (see the module docstring; ``None``: automatic).

    Returns:
      :class:`PowerIterationResult` ``(eigenvalue, eigenvector)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([1.0, -6.0, 3.0]))
      >>> result = power_iteration(jax.random.key(0), lambda v: a @ v, jnp.zeros(3), 60)
      >>> round(float(result.eigenvalue), 4)
      -6.0
    """
    flat_matvec, template, unravel = _flatten_matvec(matvec, params_like)
    _check_positive_int("num_iterations", num_iterations)
    start = jax.random.normal(key, template.shape, template.dtype)
    start = start / jnp.linalg.norm(start)

    def step(vector: jax.Array, _: None) -> tuple[jax.Array, None]:
        product = flat_matvec(vector)
        norm = jnp.linalg.norm(product)
        return jnp.where(norm > 0, product / jnp.where(norm > 0, norm, 1), vector), None

    vector, _ = jax.lax.scan(
        step, start, None, length=num_iterations - 1, unroll=_resolve_unroll(unroll, params_like)
    )
    product = flat_matvec(vector)
    return PowerIterationResult(eigenvalue=jnp.vdot(vector, product), eigenvector=unravel(vector))


def hutchinson_trace(
    key: PRNGKey,
    matvec: Matvec,
    params_like: Params,
    num_probes: int,
    *,
    unroll: bool | None = None,
) -> TraceEstimate:
    r"""Hutchinson's stochastic trace estimate with Rademacher probes.

    .. math:: \operatorname{tr} A \approx \frac1m \sum_{j=1}^m z_j^\top A z_j,
              \qquad z_j \in \{-1, +1\}^d \text{ uniform},

    unbiased with variance :math:`2\sum_{i\ne k} A_{ik}^2 / m` per the Rademacher identity, so
    exact for diagonal :math:`A`. Probes run one after another (``lax.map``): one matvec of
    memory.

    Args:
      key: PRNG key for the probes.
      matvec: Symmetric linear map on pytrees like ``params_like``.
      params_like: Pytree giving structure, shapes and dtypes (values ignored).
      num_probes: Number of probes :math:`m \ge 2` (static).
      unroll: Unroll the loop over probes (see the module docstring; ``None``: automatic).

    Returns:
      :class:`TraceEstimate` ``(trace, standard_error)``; the standard error is the sample
      standard deviation of the per-probe values over :math:`\sqrt{m}`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> estimate = hutchinson_trace(jax.random.key(0), lambda v: a @ v, jnp.zeros(3), 4)
      >>> float(estimate.trace), float(estimate.standard_error)
      (6.0, 0.0)
    """
    flat_matvec, template, _ = _flatten_matvec(matvec, params_like)
    _check_positive_int("num_probes", num_probes)
    if num_probes < 2:
        raise ValueError(f"num_probes must be at least 2 (for a standard error), got {num_probes}")

    def probe(probe_key: PRNGKey) -> jax.Array:
        z = jax.random.rademacher(probe_key, template.shape, template.dtype)
        return jnp.vdot(z, flat_matvec(z))

    values = _map(probe, jax.random.split(key, num_probes), _resolve_unroll(unroll, params_like))
    standard_error = jnp.std(values, ddof=1) / math.sqrt(num_probes)
    return TraceEstimate(trace=jnp.mean(values), standard_error=standard_error)


def spectral_density(
    key: PRNGKey,
    matvec: Matvec,
    params_like: Params,
    *,
    num_iterations: int,
    num_probes: int,
    grid: jax.Array | int = 512,
    sigma: float | None = None,
    reorthogonalize: bool = True,
    unroll: bool | None = None,
) -> SpectralDensity:
    r"""Eigenvalue density by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe :math:`v` (normalised), ``num_iterations`` Lanczos steps from
    :math:`v` give :math:`T = U \operatorname{diag}(\theta) U^\top`; the nodes
    :math:`\theta_i` and weights :math:`w_i = U_{1i}^2` form a Gauss quadrature of the
    spectral measure of :math:`v`, so that :math:`\sum_i w_i \theta_i^p = v^\top A^p v`
    exactly for :math:`p < 2k`. Averaged over probes it estimates
    :math:`\operatorname{tr}(A^p)/d`, the moments of the density
    :math:`\phi(t) = \frac1d \sum_i \delta(t - \lambda_i)`. The smoothed density is

    .. math:: \hat\phi(t) = \frac1m \sum_{j=1}^m \sum_i w_{ji}\,
              \mathcal N(t;\, \theta_{ji}, \sigma^2).

    Args:
      key: PRNG key for the probes.
      matvec: Symmetric linear map (e.g. an HVP) on pytrees like ``params_like``.
      params_like: Pytree giving structure, shapes and dtypes (values ignored).
      num_iterations: Lanczos steps per probe, ``1 <= k <= d`` (static).
      num_probes: Number of probes (static). Total matvecs: ``num_iterations * num_probes``.
      grid: 1-D array of evaluation points, or the number of points of an even grid over
        ``[min node - 5 sigma, max node + 5 sigma]``.
      sigma: Gaussian smoothing width; default 1% of the range of the nodes.
      reorthogonalize: Full reorthogonalisation inside each Lanczos run.
      unroll: Unroll the loops over probes and iterations (see the module docstring;
        ``None``: automatic). Unrolled, compile time grows with ``num_probes *
        num_iterations``.

    Returns:
      :class:`SpectralDensity` ``(grid, density, nodes, weights)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([1.0, 1.0, 4.0, 4.0]))
      >>> result = spectral_density(jax.random.key(0), lambda v: a @ v, jnp.zeros(4),
      ...                           num_iterations=2, num_probes=3, grid=jnp.array([1.0, 4.0]))
      >>> round(float(jnp.mean(jnp.sum(result.weights * result.nodes, axis=1))), 4)  # tr(A)/d
      2.5
    """
    flat_matvec, template, _ = _flatten_matvec(matvec, params_like)
    _check_iterations(num_iterations, template.size)
    _check_positive_int("num_probes", num_probes)
    if sigma is not None:
        _check_positive("sigma", sigma)
    if not isinstance(grid, numbers.Integral):
        grid = jnp.asarray(grid)
        if grid.ndim != 1 or grid.size == 0:
            raise ValueError(f"grid must be a non-empty 1-D array, got shape {grid.shape}")
        _check_finite_data(grid, "grid")
    elif isinstance(grid, bool) or grid < 2:
        raise ValueError(f"grid must be an array or an integer number of points >= 2, got {grid}")

    unroll = _resolve_unroll(unroll, params_like)

    def probe(probe_key: PRNGKey) -> tuple[jax.Array, jax.Array]:
        start_key, restart_key = jax.random.split(probe_key)
        start = jax.random.rademacher(start_key, template.shape, template.dtype)
        alphas, betas, _ = _lanczos_flat(
            restart_key, flat_matvec, start, num_iterations, reorthogonalize, False, unroll
        )
        nodes, vectors = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return nodes, jnp.square(vectors[0])

    nodes, weights = _map(probe, jax.random.split(key, num_probes), unroll)
    low, high = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        spread = high - low
        sigma = 0.01 * jnp.where(spread > 0, spread, jnp.maximum(jnp.abs(high), 1.0))
    if isinstance(grid, numbers.Integral):
        grid = jnp.linspace(low - 5 * sigma, high + 5 * sigma, int(grid))
    gaussians = jnp.exp(-0.5 * jnp.square((grid[:, None, None] - nodes) / sigma))
    gaussians = gaussians / (sigma * math.sqrt(2 * math.pi))
    density = jnp.sum(gaussians * weights, axis=(1, 2)) / num_probes
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights)


# Sharpness -----------------------------------------------------------------------------------


def sam_sharpness(
    loss: Callable[[Params], jax.Array],
    params: Params,
    rho: float | jax.Array,
    *,
    num_steps: int = 1,
    step_size: float | jax.Array | None = None,
    initial_perturbation: Params | None = None,
    unroll: bool | None = None,
) -> jax.Array:
    r"""SAM sharpness :math:`\max_{\|\epsilon\|_2 \le \rho} L(\theta+\epsilon) - L(\theta)`.

    Approximated by projected normalised gradient ascent on the :math:`\rho`-ball (global
    :math:`L_2` norm over all leaves):

    .. math:: \epsilon_{t+1} = \Pi_\rho\Big(\epsilon_t + \eta\,
              \frac{\nabla L(\theta + \epsilon_t)}{\|\nabla L(\theta + \epsilon_t)\|}\Big),
              \qquad \epsilon_0 = 0,\ \eta = \rho,

    returning the largest :math:`L(\theta + \epsilon_t) - L(\theta)` over
    :math:`t = 1, \dots, T`. With the defaults (``num_steps=1``) this is the one-step
    estimate :math:`L(\theta + \rho g/\|g\|) - L(\theta)` of F-BNN (``eval_sharpness``); more
    steps give a tighter lower bound on the maximum (exact at convergence for a convex
    :math:`L`). At a point with zero gradient the ascent cannot start from
    :math:`\epsilon_0 = 0` (the value is 0); pass ``initial_perturbation`` then. Cost: one
    gradient per step plus one loss evaluation.

    Args:
      loss: Scalar function of the parameters.
      params: Where the sharpness is measured.
      rho: Radius :math:`\rho \ge 0`.
      num_steps: Ascent steps :math:`T \ge 1` (static).
      step_size: :math:`\eta > 0`; default ``rho``.
      initial_perturbation: :math:`\epsilon_0` (a pytree like ``params``, projected onto
        the ball); zero if ``None``.
      unroll: Unroll the ascent steps (see the module docstring; ``None``: automatic).

    Returns:
      Scalar sharpness estimate (:math:`\ge 0` up to rounding for a convex loss).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # g = w
      >>> float(sam_sharpness(loss, jnp.array([3.0, 4.0]), 1.0))  # 0.5 * (6^2 - 5^2)
      5.5
    """
    return _ascent_sharpness(
        loss, params, rho, None, num_steps, step_size, initial_perturbation, unroll
    )


def adaptive_sharpness(
    loss: Callable[[Params], jax.Array],
    params: Params,
    rho: float | jax.Array,
    eta: float | jax.Array = 0.0,
    *,
    num_steps: int = 1,
    step_size: float | jax.Array | None = None,
    initial_perturbation: Params | None = None,
    unroll: bool | None = None,
) -> jax.Array:
    r"""Adaptive (ASAM) sharpness: the maximum over a ball scaled by the weights.

    .. math:: \max_{\|T_\theta^{-1}\epsilon\|_2 \le \rho} L(\theta+\epsilon) - L(\theta),
              \qquad T_\theta = \operatorname{diag}(|\theta| + \eta).

    The same ascent as :func:`sam_sharpness` in the coordinates
    :math:`z = T_\theta^{-1}\epsilon` (gradient :math:`T_\theta \nabla L`), so one step gives
    :math:`\epsilon = \rho\, T_\theta^2 g / \|T_\theta g\|`. The measure is invariant to
    rescaling layers (with :math:`\eta = 0`); weights that are exactly zero are not perturbed
    when :math:`\eta = 0`.

    Args:
      loss: Scalar function of the parameters.
      params: Where the sharpness is measured.
      rho: Radius :math:`\rho \ge 0` in the scaled norm.
      eta: Offset :math:`\eta \ge 0` added to :math:`|\theta|`.
      num_steps: Ascent steps (static).
      step_size: Step in the scaled coordinates; default ``rho``.
      initial_perturbation: :math:`\epsilon_0` in parameter units; zero if ``None``.
      unroll: Unroll the ascent steps (see the module docstring; ``None``: automatic).

    Returns:
      Scalar sharpness estimate.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w: jnp.sum(w)  # linear: the ascent gains rho * ||T g||
      >>> round(float(adaptive_sharpness(loss, jnp.array([3.0, 4.0]), 0.1)), 4)
      0.5
    """
    _check_nonnegative("eta", eta)
    scale = jax.tree.map(lambda leaf: jnp.abs(leaf) + jnp.asarray(eta, leaf.dtype), params)
    return _ascent_sharpness(
        loss, params, rho, scale, num_steps, step_size, initial_perturbation, unroll
    )


def posterior_sharpness(
    key: PRNGKey,
    loss: Callable[..., jax.Array],
    samples: Params,
    rho: float | jax.Array,
    *,
    num_steps: int = 1,
    step_size: float | jax.Array | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.0,
    random_start: bool = False,
    model_states: ModelState | None = None,
    strategy: str = "auto",
    unroll: bool | None = None,
) -> PosteriorStatistic:
    r"""SAM (or ASAM) sharpness averaged over posterior samples.

    For every sample :math:`\theta_s` (a leading axis of ``samples``) computes
    :func:`sam_sharpness` (or :func:`adaptive_sharpness` with ``adaptive=True``), one sample
    at a time (``lax.map`` or a Python loop, see ``strategy``), and summarises them. This is
    the flatness measure of F-BNN (one-step SAM sharpness of SWAG / MC-dropout / ensemble
    samples) and of SA-BMA's comparison.

    Args:
      key: PRNG key; used only with ``random_start`` (one key per sample).
      loss: ``loss(params) -> scalar``, or ``loss(params, model_state)`` when
        ``model_states`` is given.
      samples: Parameter pytree with a leading sample axis of size ``S``.
      rho: Radius :math:`\rho \ge 0`.
      num_steps: Ascent steps per sample (static).
      step_size: Ascent step; default ``rho``.
      adaptive: Use the ASAM ball (:func:`adaptive_sharpness`).
      eta: ASAM offset (only with ``adaptive``).
      random_start: Start each ascent at a uniformly random point of the sphere of radius
        ``rho`` (in the ball's norm) instead of 0.
      model_states: Optional per-sample model states (e.g. BatchNorm statistics re-estimated
        per SWAG sample) with the same leading axis; passed to ``loss`` and not perturbed.
      strategy: Loop over samples: ``"map"`` (``lax.map``, works under ``jit``),
        ``"python"`` (one jitted per-sample function called from Python for each sample;
        needs concrete samples), or ``"auto"``: ``"python"`` on the CPU backend for
        convolutional parameters outside ``jit``, else ``"map"`` (see the module docstring).
      unroll: Unroll the ascent steps (``None``: automatic).

    Returns:
      :class:`PosteriorStatistic` ``(mean, std, values)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)
      >>> samples = jnp.array([[3.0, 4.0], [0.0, 1.0]])  # sharpness 5.5 and 1.5
      >>> result = posterior_sharpness(jax.random.key(0), loss, samples, 1.0)
      >>> float(result.mean), float(result.std)
      (3.5, 2.0)
    """
    num_samples = _num_samples(samples, "samples")
    if model_states is not None:
        _num_samples(model_states, "model_states", expected=num_samples)
    _check_strategy(strategy)
    _check_unroll(unroll)
    _check_positive_int("num_steps", num_steps)
    if not adaptive and _concrete_float(eta) not in (None, 0.0):
        raise ValueError("eta is only used with adaptive=True")

    def one(arguments: tuple[PRNGKey, Params, ModelState | None]) -> jax.Array:
        sample_key, params, model_state = arguments
        sample_loss = loss if model_states is None else (lambda p: loss(p, model_state))
        initial = None
        if random_start:
            initial = _random_sphere_point(sample_key, params, rho)
            if adaptive:
                initial = jax.tree.map(lambda z, w: z * (jnp.abs(w) + eta), initial, params)
        if adaptive:
            return adaptive_sharpness(
                sample_loss,
                params,
                rho,
                eta,
                num_steps=num_steps,
                step_size=step_size,
                initial_perturbation=initial,
                unroll=unroll,
            )
        return sam_sharpness(
            sample_loss,
            params,
            rho,
            num_steps=num_steps,
            step_size=step_size,
            initial_perturbation=initial,
            unroll=unroll,
        )

    keys = jax.random.split(key, num_samples)
    return _summarise(_map_samples(one, (keys, samples, model_states), strategy))


def posterior_top_eigenvalue(
    key: PRNGKey,
    loss_for_params: Callable[..., jax.Array],
    samples: Params,
    *,
    num_iterations: int = 20,
    reorthogonalize: bool = True,
    model_states: ModelState | None = None,
    strategy: str = "auto",
    unroll: bool | None = None,
) -> PosteriorStatistic:
    r"""The largest Hessian eigenvalue averaged over posterior samples (SA-BMA's flatness).

    For every sample :math:`\theta_s` runs :func:`top_hessian_eigenvalues` (``k=1``) with its
    own key, one sample at a time (``lax.map`` or a Python loop, see ``strategy``), and
    summarises the values.

    Args:
      key: PRNG key (split into one Lanczos start per sample).
      loss_for_params: ``loss(params) -> scalar``, or ``loss(params, model_state)`` when
        ``model_states`` is given.
      samples: Parameter pytree with a leading sample axis of size ``S``.
      num_iterations: Lanczos iterations (HVPs) per sample (static).
      reorthogonalize: Full reorthogonalisation.
      model_states: Optional per-sample model states with the same leading axis.
      strategy: Loop over samples, one of :data:`SAMPLE_STRATEGIES` (see
        :func:`posterior_sharpness`).
      unroll: Unroll the Lanczos iterations (``None``: automatic).

    Returns:
      :class:`PosteriorStatistic` ``(mean, std, values)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: jnp.sum(w**4) / 12  # Hessian diag(w^2)
      >>> samples = jnp.array([[1.0, 2.0], [3.0, 0.5]])  # top eigenvalues 4 and 9
      >>> result = posterior_top_eigenvalue(jax.random.key(0), loss, samples, num_iterations=2)
      >>> jnp.round(result.values, 3)
      Array([4., 9.], dtype=float32)
    """
    num_samples = _num_samples(samples, "samples")
    if model_states is not None:
        _num_samples(model_states, "model_states", expected=num_samples)
    _check_strategy(strategy)
    _check_unroll(unroll)

    def one(arguments: tuple[PRNGKey, Params, ModelState | None]) -> jax.Array:
        sample_key, params, model_state = arguments
        sample_loss = (
            loss_for_params if model_states is None else (lambda p: loss_for_params(p, model_state))
        )
        result = top_hessian_eigenvalues(
            sample_key,
            sample_loss,
            params,
            k=1,
            num_iterations=num_iterations,
            reorthogonalize=reorthogonalize,
            unroll=unroll,
        )
        return result.eigenvalues[0]

    keys = jax.random.split(key, num_samples)
    return _summarise(_map_samples(one, (keys, samples, model_states), strategy))


# Helpers -------------------------------------------------------------------------------------


def _lanczos_flat(
    key: PRNGKey,
    flat_matvec: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    num_iterations: int,
    reorthogonalize: bool,
    return_basis: bool,
    unroll: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Lanczos on flat vectors; returns ``(alphas, betas, basis or None)``."""
    dimension = start.shape[0]
    dtype = start.dtype
    tolerance = 100 * jnp.finfo(dtype).eps
    start_norm = jnp.linalg.norm(start)
    if not isinstance(start_norm, jax.core.Tracer) and not float(start_norm) > 0:
        raise ValueError("the Lanczos start vector must be non-zero and finite")
    first = start / start_norm
    store = reorthogonalize or return_basis
    basis = jnp.zeros((num_iterations if store else 1, dimension), dtype)
    basis = basis.at[0].set(first)

    def project_out(vector: jax.Array, basis: jax.Array) -> jax.Array:
        for _ in range(2):  # "twice is enough" (Kahan-Parlett)
            vector = vector - (basis @ vector) @ basis
        return vector

    def step(carry, index):
        basis, vector, previous, previous_beta = carry
        product = flat_matvec(vector)
        scale = jnp.maximum(jnp.linalg.norm(product), previous_beta)
        alpha = jnp.vdot(vector, product)
        residual = product - alpha * vector - previous_beta * previous
        if reorthogonalize:
            residual = project_out(residual, basis)
        beta = jnp.linalg.norm(residual)
        # Invariant subspace found: restart from a random vector orthogonal to the basis.
        fresh = jax.random.normal(jax.random.fold_in(key, index), (dimension,), dtype)
        if reorthogonalize:
            fresh = project_out(fresh, basis)
        else:
            fresh = fresh - jnp.vdot(vector, fresh) * vector
            fresh = fresh - jnp.vdot(previous, fresh) * previous
        breakdown = beta <= tolerance * scale
        following = jnp.where(
            breakdown,
            fresh / jnp.linalg.norm(fresh),
            residual / jnp.where(breakdown, 1, beta),
        )
        beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
        if store:
            basis = basis.at[index + 1].set(following, mode="drop")
        return (basis, following, vector, beta), (alpha, beta)

    carry = (basis, first, jnp.zeros_like(first), jnp.zeros((), dtype))
    (basis, *_), (alphas, betas) = jax.lax.scan(
        step, carry, jnp.arange(num_iterations), unroll=unroll
    )
    return alphas, betas[:-1], basis if return_basis else None


def _has_convolution_kernels(params: Params, num_leading_axes: int = 0) -> bool:
    """Whether some leaf has rank >= 3 (a convolution kernel), after the leading axes."""
    return any(_ndim(leaf) - num_leading_axes >= 3 for leaf in jax.tree.leaves(params))


def _resolve_unroll(unroll: bool | None, params: Params) -> bool:
    """``unroll``, or the automatic choice: unroll on CPU for convolutional parameters."""
    _check_unroll(unroll)
    if unroll is None:
        return jax.default_backend() == "cpu" and _has_convolution_kernels(params)
    return bool(unroll)


def _map(function: Callable[[Any], Any], xs: Any, unroll: bool) -> Any:
    """``lax.map``, optionally fully unrolled."""
    if not unroll:
        return jax.lax.map(function, xs)
    _, outputs = jax.lax.scan(lambda carry, x: (carry, function(x)), None, xs, unroll=True)
    return outputs


def _map_samples(function: Callable[[Any], jax.Array], arguments: Any, strategy: str) -> jax.Array:
    """Applies ``function`` to every sample (leading axis of ``arguments``)."""
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments))
    if strategy == "auto":
        convolutional = _has_convolution_kernels(arguments[1], num_leading_axes=1)
        cpu = jax.default_backend() == "cpu"
        strategy = "python" if cpu and convolutional and not traced else "map"
    if strategy == "map":
        return jax.lax.map(function, arguments)
    if traced:
        raise ValueError("strategy='python' needs concrete samples: use 'map' under jax.jit")
    # One compilation; the samples are arguments, so the loss is never constant-folded.
    compiled = jax.jit(function)
    num_samples = jax.tree.leaves(arguments[1])[0].shape[0]
    values = [
        compiled(jax.tree.map(lambda leaf, i=i: leaf[i], arguments)) for i in range(num_samples)
    ]
    return jnp.stack(values)


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def _ascent_sharpness(
    loss: Callable[[Params], jax.Array],
    params: Params,
    rho: float | jax.Array,
    scale: Params | None,
    num_steps: int,
    step_size: float | jax.Array | None,
    initial_perturbation: Params | None,
    unroll: bool | None,
) -> jax.Array:
    """Projected normalised ascent in ``z = epsilon / scale`` on the ball ``||z|| <= rho``."""
    _check_nonnegative("rho", rho)
    _check_positive_int("num_steps", num_steps)
    if step_size is None:
        step_size = rho
    else:
        _check_positive("step_size", step_size)
    if not jax.tree.leaves(params):
        raise ValueError("params is empty")

    def to_parameters(z: Params) -> Params:
        return z if scale is None else jax.tree.map(jnp.multiply, z, scale)

    def perturbed(z: Params) -> Params:
        return jax.tree.map(jnp.add, params, to_parameters(z))

    value_and_grad = jax.value_and_grad(lambda z: loss(perturbed(z)))

    def project(z: Params) -> Params:
        norm = _global_norm(z)
        factor = jnp.where(norm > rho, rho / jnp.where(norm > 0, norm, 1), 1.0)
        return jax.tree.map(lambda leaf: (leaf * factor).astype(leaf.dtype), z)

    def ascend(z: Params, grad: Params) -> Params:
        norm = _global_norm(grad)
        factor = step_size / jnp.where(norm > 0, norm, 1)
        return project(jax.tree.map(lambda a, b: a + (factor * b).astype(a.dtype), z, grad))

    zero = _zeros_like(params)
    if initial_perturbation is None:
        base, grad = value_and_grad(zero)
        z = zero
    else:
        initial = _match_params(params, initial_perturbation, "initial_perturbation")
        if scale is not None:
            initial = jax.tree.map(
                lambda e, s: jnp.where(s > 0, e / jnp.where(s > 0, s, 1), 0), initial, scale
            )
        z = project(initial)
        base = loss(params)
        _, grad = value_and_grad(z)

    def body(carry, _):
        z, grad, best = carry
        z = ascend(z, grad)
        value, grad = value_and_grad(z)
        return (z, grad, jnp.maximum(best, value)), None

    best = jnp.full((), -jnp.inf, jnp.result_type(base))
    if num_steps > 1:
        (z, grad, best), _ = jax.lax.scan(
            body,
            (z, grad, best),
            None,
            length=num_steps - 1,
            unroll=_resolve_unroll(unroll, params),
        )
    final = loss(perturbed(ascend(z, grad)))
    return jnp.maximum(best, final) - base


def _per_example_loss(
    loss: str | Callable[[jax.Array, jax.Array], jax.Array],
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if callable(loss):
        return loss
    if loss == "classification":
        return lambda outputs, labels: -categorical_log_likelihood(outputs, labels)
    if loss == "regression":
        return lambda outputs, targets: -gaussian_log_likelihood(outputs, targets, 1.0)
    raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")


def _flatten_matvec(
    matvec: Matvec, params_like: Params
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable[[jax.Array], Params]]:
    """Flat version of ``matvec``, a zero flat template and the unravel function."""
    if not callable(matvec):
        raise ValueError(f"matvec must be callable, got {type(matvec)}")
    template_tree = _zeros_like(params_like)
    leaves = jax.tree.leaves(template_tree)
    if not leaves:
        raise ValueError("params_like is empty: no parameters")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise ValueError(f"params_like must hold floating-point arrays, got {leaf.dtype}")
    template, unravel = ravel_pytree(template_tree)
    if template.size == 0:
        raise ValueError("params_like has no elements")

    def flat_matvec(vector: jax.Array) -> jax.Array:
        product = _match_params(template_tree, matvec(unravel(vector)), "matvec output")
        return ravel_pytree(product)[0].astype(template.dtype)

    return flat_matvec, template, unravel


def _zeros_like(tree: Params) -> Params:
    return jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), _dtype(leaf)), tree)


def _ndim(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    return len(np.shape(leaf) if shape is None else shape)


def _dtype(leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", None)
    return jnp.asarray(leaf).dtype if dtype is None else dtype


def _match_params(params: Params, vector: Params, name: str) -> Params:
    """Checks that ``vector`` has the structure and shapes of ``params``; casts dtypes."""
    params_structure = jax.tree.structure(params)
    vector_structure = jax.tree.structure(vector)
    if params_structure != vector_structure:
        raise ValueError(
            f"{name} must have the tree structure of the parameters: expected "
            f"{params_structure}, got {vector_structure}"
        )

    def cast(reference: Any, leaf: Any) -> jax.Array:
        leaf = jnp.asarray(leaf)
        if jnp.shape(reference) != leaf.shape:
            raise ValueError(f"{name} leaf has shape {leaf.shape}, expected {jnp.shape(reference)}")
        return leaf.astype(_dtype(reference))

    return jax.tree.map(cast, params, vector)


def _global_norm(tree: Params) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def _random_sphere_point(key: PRNGKey, params: Params, radius: float | jax.Array) -> Params:
    flat, unravel = ravel_pytree(params)
    direction = jax.random.normal(key, flat.shape, flat.dtype)
    return unravel(radius * direction / jnp.linalg.norm(direction))


def _summarise(values: jax.Array) -> PosteriorStatistic:
    return PosteriorStatistic(mean=jnp.mean(values), std=jnp.std(values), values=values)


def _num_samples(tree: Any, name: str, expected: int | None = None) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} is empty: expected a pytree with a leading sample axis")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every leaf of {name} needs the same leading sample axis, got {sizes}")
    (size,) = sizes
    if size == 0:
        raise ValueError(f"{name} has zero samples")
    if expected is not None and size != expected:
        raise ValueError(f"{name} has {size} samples, expected {expected} (one per sample)")
    return size


def _check_iterations(num_iterations: Any, dimension: int) -> None:
    _check_positive_int("num_iterations", num_iterations)
    if num_iterations > dimension:
        raise ValueError(
            f"num_iterations ({num_iterations}) must not exceed the number of parameters "
            f"({dimension})"
        )


def _check_unroll(unroll: Any) -> None:
    if unroll is not None and not isinstance(unroll, bool | np.bool_):
        raise ValueError(f"unroll must be True, False or None, got {unroll!r}")


def _check_strategy(strategy: Any) -> None:
    if strategy not in SAMPLE_STRATEGIES:
        raise ValueError(f"strategy must be one of {SAMPLE_STRATEGIES}, got {strategy!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _concrete_float(value: Any) -> float | None:
    if isinstance(value, jax.core.Tracer):
        return None
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"expected a scalar, got shape {array.shape}")
    return float(array)


def _check_nonnegative(name: str, value: Any) -> None:
    number = _concrete_float(value)
    if number is not None and not number >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be non-negative, got {number}")


def _check_positive(name: str, value: Any) -> None:
    number = _concrete_float(value)
    if number is not None and not number > 0:
        raise ValueError(f"{name} must be positive, got {number}")


def _check_finite_data(array: jax.Array, name: str) -> None:
    if isinstance(array, jax.core.Tracer):
        return
    if jnp.issubdtype(array.dtype, jnp.inexact) and not np.all(np.isfinite(np.asarray(array))):
        raise ValueError(f"{name} contains NaN or infinite values")
