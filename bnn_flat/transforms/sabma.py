r"""SA-BMA: sharpness-aware perturbation in the parameter space of a Gaussian posterior.

SA-BMA (Lim et al., 2024) trains a Gaussian variational posterior
:math:`q_\phi = \mathcal{N}(\mu, \Sigma)` with
:math:`\Sigma = \operatorname{diag}(\sigma^2) + W^\top W`,
:math:`\sigma = \operatorname{softplus}(s)`, :math:`\phi = \{\mu, s, W\}` (the family of
:mod:`bnn_flat.posteriors.low_rank_vi`; without ``"factor"`` the mean-field family of
:mod:`bnn_flat.posteriors.mean_field_vi`), on the sharpness-aware objective whose
neighbourhood is measured by the divergence between posteriors,

.. math::

    \min_\phi \max_{\Delta^\top F_\phi \Delta \le \rho^2} L(\phi + \Delta), \qquad
    \mathrm{KL}(q_{\phi+\Delta} \Vert q_\phi) \approx \tfrac12 \Delta^\top F_\phi \Delta,

with :math:`L(\phi) = \mathbb{E}_{q_\phi}[\ell(\theta)]` (+ the family's KL weight) and
:math:`F_\phi` the Fisher information of :math:`q_\phi` with respect to :math:`\phi`. The
linearised inner problem gives the **paper form** (:func:`sabma`)

.. math:: \Delta^* = \rho\, F^{-1} g / \sqrt{g^\top F^{-1} g}, \qquad
          \text{update with } \nabla_\phi L(\phi + \Delta^*)

(the gradient at the perturbed posterior with the *same* reparameterisation noise, which
the VI families guarantee through ``grad_fn``). The Fisher of a Gaussian is
block-diagonal between the mean and the covariance parameters:

* mean: :math:`F_{\mu\mu} = \Sigma^{-1}`, so :math:`F^{-1} g_\mu = \Sigma g_\mu`, exact
  in :math:`O(dK)`;
* covariance parameters :math:`\psi = (s, W)`:
  :math:`(F_{\psi\psi})_{ij} = \tfrac12 \operatorname{tr}(\Sigma^{-1}\partial_i\Sigma\,
  \Sigma^{-1}\partial_j\Sigma)`. For a diagonal :math:`q` it is
  :math:`\operatorname{diag}(2\sigma'^2/\sigma^2)` (:math:`\sigma' = \operatorname{sigmoid}(s)`;
  :math:`2I` in a log-std parameterisation), solved in closed form. With a factor
  :math:`W` the product :math:`F_{\psi\psi} v` is computed exactly in :math:`O(dK^2)`
  through the Woodbury form of :math:`\Sigma^{-1}` (:func:`posterior_fisher_vector_product`).
  :math:`F_{\psi\psi}` is singular with a factor: :math:`\Sigma` depends on :math:`W` only
  through :math:`W^\top W`, so rotations :math:`W \to OW` are flat directions, and
  single-sample reparameterised gradients do have components along them. The default
  ``covariance_fisher="diagonal"`` therefore preconditions the covariance parameters by
  the exact *diagonal* of :math:`F_{\psi\psi}` (closed form, :math:`O(dK^2)`, positive
  whenever a factor row is nonzero), plus the damping; ``"exact"`` solves
  :math:`(F_{\psi\psi} + \lambda I)^{-1} g_\psi` with Jacobi-preconditioned conjugate
  gradients (``cg_iterations``), which amplifies the flat directions by up to
  :math:`1/\lambda`: use it with a substantial damping. The damping is *relative*:
  :math:`\lambda = ` ``damping`` :math:`\times` the mean of
  :math:`\operatorname{diag} F_{\psi\psi}`, so it does not depend on the scale of
  :math:`\sigma`. Entries whose Fisher diagonal is exactly zero (an all-zero factor row,
  e.g. an unfilled SWAG deviation) carry no information about :math:`q` and are not
  perturbed (pseudo-inverse).

Reductions (tested): with :math:`q = \mathcal{N}(\mu, \sigma^2 I)` and ``perturb="mean"``,
:math:`\Delta_\mu = \rho\sigma\, g/\lVert g\rVert`, which is SAM with radius
:math:`\rho\sigma`; with :math:`q = \mathcal{N}(w, \operatorname{diag}(1/(N s)))` the mean
perturbation is along :math:`g/s`, bSAM's direction (bSAM uses a fixed multiplier instead
of the normalisation).

The **released-code form** (:func:`sabma_released`) perturbs each block
:math:`b \in \{\mu, s, W\}` by its normalised *score* at a posterior sample,
:math:`\Delta_b = \rho\, \varsigma_b / \lVert \varsigma_b \rVert` with
:math:`\varsigma = \nabla_\phi \log q_\phi(\theta)` at the clean pass's first draw
:math:`\theta` (held fixed), so :math:`\lVert\Delta\rVert = \rho\sqrt{3}` and the
perturbation does not depend on the loss (algorithms.md §2.2). Deliberate differences to
that code: the score uses the family's own density (the code scores
:math:`\mathcal{N}(\mu, \operatorname{diag}(e^{\ell}) + C^\top C)` while sampling with
std :math:`e^{\ell}/\sqrt2` and factor :math:`C/\sqrt{2(K-1)}`, and offsets the low-rank
noise mean by ``z_scale``: pitfalls 5 and 6), and the scale is softplus-parameterised.

Both are :class:`optax.GradientTransformationExtraArgs` over the variational-parameter
dict of a VI family: ``optax.chain(sabma(0.5), optax.sgd(5e-2, momentum=0.9))`` passed as
the family's optimizer *is* SA-BMA.

References:
  Lim, Yeom, Kim, Byun, Kang, Jung, Jung, Song. Flat Posterior Does Matter For Bayesian
  Transfer Learning. arXiv 2406.15664 (2024).
  Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and Sharpness Aware
  Minimisation. ICML 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bnn_flat._linalg import gram, small_matmul
from bnn_flat._random import standard_normal
from bnn_flat.transforms.sam import (
    Direction,
    SharpnessAwareState,
    _check_number,
    _require_callable,
    _require_key,
    _require_params,
    _sharpness_aware,
)
from bnn_flat.types import Params, PRNGKey

__all__ = [
    "sabma",
    "sabma_direction",
    "sabma_released",
    "released_perturbation",
    "posterior_fisher_vector_product",
    "posterior_fisher_inverse_product",
]

_PERTURB_OPTIONS = ("all", "mean")
_COVARIANCE_FISHER_OPTIONS = ("diagonal", "exact")


def sabma(
    rho: jax.typing.ArrayLike = 0.5,
    *,
    perturb: str = "all",
    covariance_fisher: str = "diagonal",
    damping: float = 1e-3,
    cg_iterations: int = 10,
    eps: float = 1e-12,
    axis_name: str | None = None,
    num_sub_batches: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SA-BMA, paper form: the gradient at :math:`\phi + \rho F^{-1}g/\sqrt{g^\top F^{-1}g}`.

    Args:
      rho: radius :math:`\rho \ge 0` of the Fisher ball (:math:`\Delta^\top F\Delta =
        \rho^2`); the code's README uses 0.5.
      perturb: ``"all"`` (mean and covariance parameters, the paper) or ``"mean"`` (the
        covariance parameters are held; the SAM-with-radius-:math:`\rho\sigma` reduction).
      covariance_fisher: ``"diagonal"`` (exact diagonal of the covariance-parameter
        Fisher) or ``"exact"`` (damped conjugate-gradient solve); the same for a
        mean-field :math:`q`, whose Fisher is diagonal.
      damping: relative damping of the covariance-parameter Fisher (times the mean of its
        diagonal; see the module docstring).
      cg_iterations: conjugate-gradient iterations of the ``"exact"`` solve.
      eps: added to the normaliser :math:`\sqrt{g^\top F^{-1} g}`.
      axis_name: average the perturbed gradient over this axis (``shard_map`` code).
      num_sub_batches: m-sharpness, as in :func:`bnn_flat.transforms.sharpness_aware`.

    Returns:
      A transform over ``{"mean", "raw_scale"[, "factor"]}`` needing ``params`` and
      ``grad_fn`` in ``update`` (the VI families pass both).

    Raises:
      ValueError: on a negative ``rho`` or ``damping``, an unknown ``perturb``, a
        non-positive ``cg_iterations``, or params that are not variational parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.array([1.0, 0.0]), "raw_scale": jnp.full(2, inverse_softplus(0.5))}
      >>> grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(p["mean"] ** 2))
      >>> tx = sabma(rho=2.0, perturb="mean")
      >>> updates, _ = tx.update(grad_fn(phi), tx.init(phi), phi, grad_fn=grad_fn)
      >>> updates["mean"]  # SAM with radius rho * sigma = 1: mean + g / |g|
      Array([2., 0.], dtype=float32)
    """
    direction = sabma_direction(
        perturb=perturb,
        covariance_fisher=covariance_fisher,
        damping=damping,
        cg_iterations=cg_iterations,
        eps=eps,
    )
    return _sharpness_aware(rho, direction, axis_name, num_sub_batches, "sabma")


def sabma_direction(
    *,
    perturb: str = "all",
    covariance_fisher: str = "diagonal",
    damping: float = 1e-3,
    cg_iterations: int = 10,
    eps: float = 1e-12,
) -> Direction:
    r"""The unit-Fisher-norm direction :math:`F^{-1}g / (\sqrt{g^\top F^{-1}g} + \varepsilon)`.

    Args:
      perturb: ``"all"`` or ``"mean"`` (see :func:`sabma`).
      covariance_fisher: ``"diagonal"`` or ``"exact"`` (see :func:`sabma`).
      damping: relative Fisher damping of the covariance parameters.
      cg_iterations: conjugate-gradient iterations of the ``"exact"`` solve.
      eps: added to the normaliser.

    Returns:
      A :class:`bnn_flat.transforms.Direction` over variational-parameter dicts.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(2.0))}
      >>> g = {"mean": jnp.array([3.0, 4.0]), "raw_scale": jnp.zeros(2)}
      >>> sabma_direction()(g, phi, None)["mean"]  # Sigma g / sqrt(g Sigma g) = 2 g / 5
      Array([1.2, 1.6], dtype=float32)
    """
    _check_options(perturb, covariance_fisher)
    _check_number("damping", damping, minimum=0.0)
    _check_number("eps", eps, minimum=0.0)
    _check_cg_iterations(cg_iterations)

    def direction(gradient: Params, params: Params, key: PRNGKey | None) -> Params:
        del key
        natural = posterior_fisher_inverse_product(
            params,
            gradient,
            perturb=perturb,
            covariance_fisher=covariance_fisher,
            damping=damping,
            cg_iterations=cg_iterations,
        )
        squared_norm = _tree_dot(gradient, natural)
        inverse_norm = 1.0 / (jnp.sqrt(jnp.maximum(squared_norm, 0.0)) + eps)
        return jax.tree.map(lambda n, p: (n * inverse_norm).astype(p.dtype), natural, params)

    return direction


def posterior_fisher_vector_product(
    variational_params: dict[str, Params], tangent: dict[str, Params]
) -> dict[str, Params]:
    r"""Exact Fisher-vector product :math:`F_\phi v` of the Gaussian :math:`q_\phi`.

    :math:`F v = (\Sigma^{-1} v_\mu,\; \tfrac12 J^\top \operatorname{vec}(\Sigma^{-1}
    \delta\Sigma\, \Sigma^{-1}))` with :math:`\delta\Sigma = J v_\psi` the covariance change
    along the covariance-parameter part of ``tangent``; :math:`O(dK^2)` with a factor.

    Args:
      variational_params: ``{"mean", "raw_scale"[, "factor"]}``.
      tangent: a pytree with the same structure.

    Returns:
      :math:`F v`, structured like ``tangent`` (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(2.0)])}
      >>> fv = posterior_fisher_vector_product(phi, {"mean": jnp.ones(1), "raw_scale": jnp.ones(1)})
      >>> fv["mean"]  # 1 / sigma^2
      Array([0.25], dtype=float32)
    """
    geometry = _Geometry.build(variational_params)
    tangent_flat = geometry.flatten(tangent)
    out = {"mean": geometry.inverse_covariance_matvec(tangent_flat["mean"])}
    out.update(geometry.covariance_fisher_matvec(tangent_flat))
    return geometry.unflatten(out)


def posterior_fisher_inverse_product(
    variational_params: dict[str, Params],
    vector: dict[str, Params],
    *,
    perturb: str = "all",
    covariance_fisher: str = "diagonal",
    damping: float = 1e-3,
    cg_iterations: int = 10,
) -> dict[str, Params]:
    r""":math:`F_\phi^{-1} v` (mean block exact; covariance block damped, see module doc).

    Args:
      variational_params: ``{"mean", "raw_scale"[, "factor"]}``.
      vector: a pytree with the same structure (typically the loss gradient).
      perturb: ``"all"``, or ``"mean"`` to return zeros for the covariance parameters.
      covariance_fisher: ``"diagonal"`` (:math:`(\operatorname{diag} F_{\psi\psi} +
        \lambda)^{-1}`) or ``"exact"`` (:math:`(F_{\psi\psi} + \lambda I)^{-1}` by CG).
      damping: relative damping (times the mean of :math:`\operatorname{diag}F_{\psi\psi}`).
      cg_iterations: conjugate-gradient iterations (``"exact"`` with a factor).

    Returns:
      :math:`F^{-1} v`, structured like ``vector`` (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.zeros(1), "raw_scale": jnp.array([inverse_softplus(2.0)])}
      >>> v = {"mean": jnp.ones(1), "raw_scale": jnp.ones(1)}
      >>> posterior_fisher_inverse_product(phi, v)["mean"]  # sigma^2
      Array([4.], dtype=float32)
    """
    _check_options(perturb, covariance_fisher)
    _check_variational(variational_params)
    # the covariance Fisher of a mean-field q is diagonal: "exact" is the diagonal solve
    if covariance_fisher == "diagonal" or perturb == "mean" or "factor" not in variational_params:
        return _diagonal_fisher_inverse_product(variational_params, vector, perturb, damping)
    geometry = _Geometry.build(variational_params)
    flat = geometry.flatten(vector)
    out = {"mean": geometry.covariance_matvec(flat["mean"])}
    out.update(geometry.covariance_fisher_cg_solve(flat, damping, cg_iterations))
    return geometry.unflatten(out)


def sabma_released(
    rho: jax.typing.ArrayLike = 0.5,
    *,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SA-BMA as released (``MLAI-Yonsei/SA-BMA`` HEAD): per-block normalised score steps.

    :math:`\Delta_b = \rho\,\varsigma_b / (\lVert\varsigma_b\rVert + \varepsilon)` for each
    block of the variational parameters, with :math:`\varsigma = \nabla_\phi \log
    q_\phi(\theta)` at a fixed posterior draw :math:`\theta`; the output is ``grad_fn`` at
    :math:`\phi + \Delta`. The draw is the first entry of the ``samples=`` extra argument
    (the clean pass's reparameterised draws, which the VI families pass, so the perturbed
    pass reuses that draw's noise as the code does); without it one draw is taken with
    ``key=``. The loss gradient is not used (see the module docstring for the code's
    quirks and what is deliberately not reproduced).

    Args:
      rho: per-block radius :math:`\rho \ge 0` (total :math:`\rho\sqrt3` with a factor,
        :math:`\rho\sqrt2` without).
      eps: added to each block norm.
      axis_name: average the perturbed gradient over this axis (``shard_map`` code).

    Returns:
      A transform over ``{"mean", "raw_scale"[, "factor"]}`` needing ``params``,
      ``grad_fn`` and ``samples`` (or ``key``) in ``update``.

    Raises:
      ValueError: on a negative ``rho``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0))}
      >>> grad_fn = jax.grad(lambda p: jnp.sum(p["mean"]))
      >>> tx = sabma_released(rho=0.1)
      >>> theta = jnp.array([[3.0, 4.0]])  # one draw; score of the mean = theta - mu
      >>> updates, _ = tx.update(grad_fn(phi), tx.init(phi), phi, grad_fn=grad_fn,
      ...                        samples=theta)
      >>> updates["mean"]  # the gradient of sum(mean) is 1 everywhere
      Array([1., 1.], dtype=float32)
    """
    _check_number("rho", rho, minimum=0.0)
    _check_number("eps", eps, minimum=0.0)
    name = "sabma_released"

    def init_fn(params: Params) -> SharpnessAwareState:
        del params
        return SharpnessAwareState()

    def update_fn(
        updates: Params,
        state: SharpnessAwareState,
        params: Params | None = None,
        *,
        grad_fn: Callable[[Params], Params] | None = None,
        samples: Params | None = None,
        key: PRNGKey | None = None,
        **extra_args: Any,
    ) -> tuple[Params, SharpnessAwareState]:
        del updates, extra_args
        _require_params(name, params)
        _require_callable(name, "grad_fn", grad_fn)
        delta = released_perturbation(params, rho, samples=samples, key=key, eps=eps)
        new_updates = grad_fn(jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, delta))
        if axis_name is not None:
            new_updates = jax.lax.pmean(new_updates, axis_name)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def released_perturbation(
    variational_params: dict[str, Params],
    rho: jax.typing.ArrayLike,
    *,
    samples: Params | None = None,
    key: PRNGKey | None = None,
    eps: float = 1e-12,
) -> dict[str, Params]:
    r"""The released code's :math:`\Delta_b = \rho\,\varsigma_b/\lVert\varsigma_b\rVert`.

    Args:
      variational_params: ``{"mean", "raw_scale"[, "factor"]}``.
      rho: per-block radius.
      samples: draws stacked on a leading axis (the first is used), or ``None``.
      key: PRNG key for one draw when ``samples`` is ``None``.
      eps: added to each block norm.

    Returns:
      :math:`\Delta`, structured like ``variational_params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat.posteriors.mean_field_vi import inverse_softplus
      >>> phi = {"mean": jnp.zeros(2), "raw_scale": jnp.full(2, inverse_softplus(1.0))}
      >>> delta = released_perturbation(phi, 1.0, samples=jnp.array([[3.0, 4.0]]))
      >>> delta["mean"]  # the normalised score (theta - mu) / sigma^2
      Array([0.6, 0.8], dtype=float32)
    """
    geometry = _Geometry.build(variational_params)
    if samples is None:
        key = _require_key("sabma_released (without samples=)", key)
        draw = geometry.draw(key)
    else:
        draw = jax.tree.map(lambda x: x[0], samples)
        if jax.tree.structure(draw) != jax.tree.structure(variational_params["mean"]):
            raise ValueError(
                "samples must be stacked draws structured like the variational mean, got "
                f"{jax.tree.structure(draw)} vs {jax.tree.structure(variational_params['mean'])}."
            )
    draw = jax.lax.stop_gradient(draw)
    score = jax.grad(lambda phi: _log_density(phi, draw))(variational_params)
    delta = {}
    for block, value in score.items():
        factor = rho / (jnp.sqrt(_tree_dot(value, value)) + eps)
        delta[block] = jax.tree.map(
            lambda s, p, factor=factor: (factor * s).astype(p.dtype),
            value,
            variational_params[block],
        )
    return delta


# The diagonal-Fisher path, leaf by leaf -------------------------------------------------------


def _diagonal_fisher_inverse_product(
    params: dict[str, Params], vector: dict[str, Params], perturb: str, damping: float
) -> dict[str, Params]:
    """``posterior_fisher_inverse_product`` with the diagonal covariance Fisher, per leaf.

    The same numbers as the flattened :class:`_Geometry` (the tests compare both with dense
    references), without concatenating the parameter leaves into (K, d) matrices: every
    quantity is a per-leaf element-wise expression or a sum over leaves of K-vectors and
    K x K matrices, so XLA fuses the step into a few passes over the factor.
    """
    _check_variational(params)
    if set(vector) != set(params):
        raise ValueError(f"expected a pytree with keys {sorted(params)}, got {sorted(vector)}.")
    if jax.tree.structure(vector) != jax.tree.structure(params):
        raise ValueError(
            "the vector must be structured like the variational parameters, got "
            f"{jax.tree.structure(vector)} vs {jax.tree.structure(params)}"
        )
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params["mean"])), jnp.float32)

    def cast(x):
        return jnp.asarray(x, dtype)

    raw = jax.tree.map(cast, params["raw_scale"])
    std = jax.tree.map(jax.nn.softplus, raw)
    variance = jax.tree.map(jnp.square, std)
    factor = params.get("factor")
    mean_out = jax.tree.map(lambda v, g: v * cast(g), variance, vector["mean"])
    if factor is not None:
        factor = jax.tree.map(cast, factor)
        rank = jax.tree.leaves(factor)[0].shape[0]

        def rows(x):
            return x.reshape(rank, -1)

        # Sigma g = sigma^2 g + W^T (W g)
        projected = sum(
            rows(w) @ cast(g).reshape(-1)
            for w, g in zip(jax.tree.leaves(factor), jax.tree.leaves(vector["mean"]), strict=True)
        )
        mean_out = jax.tree.map(
            lambda m, w: m + jnp.tensordot(projected, w, axes=1), mean_out, factor
        )
    out = {"mean": mean_out}
    if perturb == "mean":
        out["raw_scale"] = jax.tree.map(
            lambda g: jnp.zeros(jnp.shape(g), dtype), vector["raw_scale"]
        )
        if factor is not None:
            out["factor"] = jax.tree.map(lambda g: jnp.zeros(jnp.shape(g), dtype), vector["factor"])
        return out
    chain = jax.tree.map(lambda s, r: s * jax.nn.sigmoid(r), std, raw)  # d sigma^2/ds / 2
    inverse_variance = jax.tree.map(lambda v: 1.0 / v, variance)
    if factor is None:
        diagonal = {
            "raw_scale": jax.tree.map(lambda c, a: 2.0 * c**2 * a**2, chain, inverse_variance)
        }
    else:
        scaled = jax.tree.map(lambda w, a: w * a[None], factor, inverse_variance)  # W D^-1
        factor_gram = sum(  # G = W D^-1 W^T, (K, K)
            gram(rows(a), rows(w))
            for a, w in zip(jax.tree.leaves(scaled), jax.tree.leaves(factor), strict=True)
        )
        capacitance = jnp.eye(rank, dtype=dtype) + factor_gram
        inverse_cholesky = jax.scipy.linalg.solve_triangular(
            jnp.linalg.cholesky(capacitance), jnp.eye(rank, dtype=dtype), lower=True
        )
        capacitance_inverse = inverse_cholesky.T @ inverse_cholesky
        # B^T = W Sigma^-1 = M^-1 W D^-1 (push-through identity: no cancellation)
        b_rows = jax.tree.map(lambda a: small_matmul(capacitance_inverse, a), scaled)
        # diag(Sigma^-1) = D^-1 - diag(D^-1 W^T M^-1 W D^-1)
        a_diagonal = jax.tree.map(
            lambda a, sc, b: a - jnp.sum(sc * b, axis=0), inverse_variance, scaled, b_rows
        )
        # diag(W Sigma^-1 W^T) = diag(M^-1 G), from K x K matrices: no pass over the factor
        # (a sum over leaves of rows(w) * rows(b) re-reads every factor row per output row)
        quadratic = jnp.sum(capacitance_inverse * factor_gram.T, axis=1)
        diagonal = {
            "raw_scale": jax.tree.map(lambda c, a: 2.0 * c**2 * a**2, chain, a_diagonal),
            "factor": jax.tree.map(
                lambda b, a: b**2 + quadratic.reshape((rank,) + (1,) * a.ndim) * a[None],
                b_rows,
                a_diagonal,
            ),
        }
    values = jax.tree.leaves(diagonal)
    total = sum(jnp.sum(value) for value in values)
    count = sum(value.size for value in values)
    absolute_damping = damping * total / count
    for name, block in diagonal.items():
        out[name] = jax.tree.map(
            lambda f, g: jnp.where(f > 0, cast(g) / (f + absolute_damping), 0.0),
            block,
            vector[name],
        )
    return out


# The Gaussian geometry on flattened parameters ---------------------------------------------


class _Geometry:
    """Flattened :math:`\\mu, \\sigma, \\sigma', W` and the Woodbury pieces of one q."""

    def __init__(self, params, mean_unravel, factor_unravel, std, std_derivative, factor):
        self.params = params
        self.mean_unravel = mean_unravel
        self.factor_unravel = factor_unravel
        self.std = std  # (d,)
        self.std_derivative = std_derivative  # (d,) d sigma / d s
        self.factor = factor  # (K, d) or None
        self.inverse_variance = 1.0 / (std * std)
        if factor is not None:
            # every (K, d) quantity is kept with d as the contiguous axis: K is small (~5) and
            # would waste most of each vector register as the minor axis
            rank = factor.shape[0]
            scaled = factor * self.inverse_variance[None, :]  # W D^-1
            capacitance = jnp.eye(rank, dtype=std.dtype) + gram(scaled, factor)
            cholesky = jnp.linalg.cholesky(capacitance)
            # A = Sigma^-1 = D^-1 - U U^T with U^T = L^-1 W D^-1; invert the K x K factor
            # first: XLA:CPU's triangular solve with d right-hand sides is ~20x slower than
            # this small inverse and a matrix product
            inverse_cholesky = jax.scipy.linalg.solve_triangular(
                cholesky, jnp.eye(rank, dtype=std.dtype), lower=True
            )
            self.woodbury_rows = inverse_cholesky @ scaled  # U^T, (K, d)
            # B^T = W Sigma^-1 = M^-1 W D^-1 (push-through identity): no subtraction, so no
            # cancellation when W dominates D (W D^-1 - (W U) U^T loses every digit in
            # float32 at sigma = 1e-3, |W| = 0.05)
            self.sigma_inverse_factor_rows = inverse_cholesky.T @ self.woodbury_rows
            self.inverse_covariance_diagonal = self.inverse_variance - jnp.sum(
                self.woodbury_rows**2, axis=0
            )

    @property
    def woodbury(self) -> jax.Array:
        """:math:`U`, (d, K)."""
        return self.woodbury_rows.T

    @property
    def sigma_inverse_factor(self) -> jax.Array:
        """:math:`B = A W^T`, (d, K)."""
        return self.sigma_inverse_factor_rows.T

    @classmethod
    def build(cls, params: dict[str, Params]) -> _Geometry:
        _check_variational(params)
        mean_flat, mean_unravel = ravel_pytree(params["mean"])
        raw_flat, _ = ravel_pytree(params["raw_scale"])
        dtype = jnp.promote_types(mean_flat.dtype, jnp.float32)
        raw_flat = raw_flat.astype(dtype)
        std = jax.nn.softplus(raw_flat)
        std_derivative = jax.nn.sigmoid(raw_flat)
        factor, factor_unravel = None, None
        if "factor" in params:
            factor = jax.vmap(lambda row: ravel_pytree(row)[0])(params["factor"]).astype(dtype)
            factor_unravel = jax.vmap(
                ravel_pytree(jax.tree.map(lambda x: x[0], params["factor"]))[1]
            )
        return cls(params, mean_unravel, factor_unravel, std, std_derivative, factor)

    def flatten(self, tree: dict[str, Params]) -> dict[str, jax.Array]:
        if set(tree) != set(self.params):
            raise ValueError(
                f"expected a pytree with keys {sorted(self.params)}, got {sorted(tree)}."
            )
        dtype = self.std.dtype
        out = {
            "mean": ravel_pytree(tree["mean"])[0].astype(dtype),
            "raw_scale": ravel_pytree(tree["raw_scale"])[0].astype(dtype),
        }
        if self.factor is not None:
            out["factor"] = jax.vmap(lambda row: ravel_pytree(row)[0])(tree["factor"]).astype(dtype)
        return out

    def unflatten(self, flat: dict[str, jax.Array]) -> dict[str, Params]:
        out = {
            "mean": self.mean_unravel(flat["mean"]),
            "raw_scale": self.mean_unravel(flat["raw_scale"]),
        }
        if self.factor is not None:
            out["factor"] = self.factor_unravel(flat["factor"])
        return out

    # Sigma and Sigma^-1 applied to vectors / columns of matrices.

    def covariance_matvec(self, vector: jax.Array) -> jax.Array:
        out = self.std**2 * vector
        if self.factor is not None:
            out = out + self.factor.T @ (self.factor @ vector)
        return out

    def inverse_covariance_matvec(self, vector: jax.Array) -> jax.Array:
        return self.inverse_covariance_rows(vector[None, :])[0]

    def inverse_covariance_rows(self, rows: jax.Array) -> jax.Array:
        """``rows @ Sigma^-1`` for ``rows`` of shape (m, d)."""
        out = rows * self.inverse_variance[None, :]
        if self.factor is not None:
            out = out - gram(rows, self.woodbury_rows) @ self.woodbury_rows
        return out

    def apply_inverse_covariance(self, columns: jax.Array) -> jax.Array:
        return self.inverse_covariance_rows(columns.T).T

    # The covariance-parameter block of the Fisher.

    def covariance_fisher_matvec(self, tangent: dict[str, jax.Array]) -> dict[str, jax.Array]:
        chain = self.std * self.std_derivative  # d(sigma^2)/ds = 2 sigma sigma'
        variance_change = 2.0 * chain * tangent["raw_scale"]
        if self.factor is None:
            # diag(A dD A) = dD / sigma^4
            return {"raw_scale": chain * variance_change * self.inverse_variance**2}
        u = self.woodbury
        b = self.sigma_inverse_factor  # A W^T, (d, K)
        inv = self.inverse_variance
        # diag(A diag(dd) A)_i = sum_j A_ij^2 dd_j with A = D^-1 - U U^T
        gram = u.T @ (variance_change[:, None] * u)
        diagonal = (
            inv**2 * variance_change
            - 2.0 * inv * jnp.sum(u * u, axis=1) * variance_change
            + jnp.sum((u @ gram) * u, axis=1)
        )
        tangent_columns = tangent["factor"].T  # P = dW^T, (d, K)
        a_tangent = self.apply_inverse_covariance(tangent_columns)
        diagonal = diagonal + 2.0 * jnp.sum(a_tangent * b, axis=1)
        # W A dSigma A = (A (B * dd))^T + (B^T P) B^T + (B^T W^T) (A P)^T
        factor_out = (
            self.apply_inverse_covariance(b * variance_change[:, None]).T
            + (b.T @ tangent_columns) @ b.T
            + (b.T @ self.factor.T) @ a_tangent.T
        )
        return {"raw_scale": chain * diagonal, "factor": factor_out}

    def covariance_fisher_diagonal(self) -> dict[str, jax.Array]:
        chain = self.std * self.std_derivative
        if self.factor is None:
            return {"raw_scale": 2.0 * chain**2 * self.inverse_variance**2}
        a_diagonal = self.inverse_covariance_diagonal
        b_rows = self.sigma_inverse_factor_rows  # B^T, (K, d)
        quadratic = jnp.sum(self.factor * b_rows, axis=1)  # diag(W A W^T), (K,)
        factor_diagonal = b_rows**2 + quadratic[:, None] * a_diagonal[None, :]
        return {"raw_scale": 2.0 * chain**2 * a_diagonal**2, "factor": factor_diagonal}

    def covariance_fisher_cg_solve(
        self, vector: dict[str, jax.Array], damping: float, iterations: int
    ) -> dict[str, jax.Array]:
        """Damped CG solve of the covariance block (with a factor; Jacobi-preconditioned)."""
        right = {name: value for name, value in vector.items() if name != "mean"}
        diagonal = self.covariance_fisher_diagonal()
        total = sum(jnp.sum(value) for value in diagonal.values())
        count = sum(value.size for value in diagonal.values())
        damping = damping * total / count
        preconditioner = {name: 1.0 / (value + damping) for name, value in diagonal.items()}

        def matvec(x):
            fx = self.covariance_fisher_matvec(x)
            return {name: fx[name] + damping * x[name] for name in x}

        return _preconditioned_cg(matvec, right, preconditioner, iterations)

    def draw(self, key: PRNGKey) -> Params:
        diagonal_key, factor_key = jax.random.split(key)
        mean, _ = ravel_pytree(self.params["mean"])
        draw = mean.astype(self.std.dtype) + self.std * standard_normal(
            diagonal_key, self.std.shape, self.std.dtype
        )
        if self.factor is not None:
            draw = draw + self.factor.T @ jax.random.normal(
                factor_key, (self.factor.shape[0],), self.std.dtype
            )
        return self.mean_unravel(draw)


def _log_density(variational_params: dict[str, Params], params: Params) -> jax.Array:
    """The VI family's own exact log density (imported here: the families import transforms)."""
    from bnn_flat.posteriors import low_rank_vi, mean_field_vi

    family = low_rank_vi if "factor" in variational_params else mean_field_vi
    return family.log_density(variational_params, params)


def _preconditioned_cg(matvec, right, preconditioner, iterations):
    """Fixed-iteration preconditioned CG on dicts of flat arrays (guards converged steps)."""

    def dot(a, b):
        return sum(jnp.vdot(a[name], b[name]) for name in a)

    def axpy(alpha, x, y):
        return {name: y[name] + alpha * x[name] for name in y}

    def times(a, b):
        return {name: a[name] * b[name] for name in a}

    solution = times(preconditioner, right)
    residual = axpy(-1.0, matvec(solution), right)
    preconditioned = times(preconditioner, residual)
    direction = preconditioned
    rz = dot(residual, preconditioned)
    tiny = jnp.finfo(rz.dtype).tiny

    def body(_, carry):
        solution, residual, direction, rz = carry
        product = matvec(direction)
        curvature = dot(direction, product)
        alpha = jnp.where(curvature > tiny, rz / jnp.maximum(curvature, tiny), 0.0)
        solution = axpy(alpha, direction, solution)
        residual = axpy(-alpha, product, residual)
        preconditioned = times(preconditioner, residual)
        new_rz = dot(residual, preconditioned)
        beta = jnp.where(rz > tiny, new_rz / jnp.maximum(rz, tiny), 0.0)
        direction = axpy(beta, direction, preconditioned)
        return solution, residual, direction, new_rz

    solution, *_ = jax.lax.fori_loop(0, iterations, body, (solution, residual, direction, rz))
    return solution


def _check_variational(params: Any) -> None:
    if not isinstance(params, dict) or not {"mean", "raw_scale"} <= set(params):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            "SA-BMA acts on the variational parameters of a Gaussian VI family, a dict "
            f'with "mean", "raw_scale" and optionally "factor"; got {got}. Use it as the '
            "optimizer of bnn_flat.posteriors.low_rank_vi or mean_field_vi."
        )
    extra = set(params) - {"mean", "raw_scale", "factor"}
    if extra:
        raise ValueError(f"unknown variational-parameter entries {sorted(extra)}.")


def _check_options(perturb: Any, covariance_fisher: Any) -> None:
    if perturb not in _PERTURB_OPTIONS:
        raise ValueError(f"perturb must be one of {_PERTURB_OPTIONS}, got {perturb!r}.")
    if covariance_fisher not in _COVARIANCE_FISHER_OPTIONS:
        raise ValueError(
            f"covariance_fisher must be one of {_COVARIANCE_FISHER_OPTIONS}, got "
            f"{covariance_fisher!r}."
        )


def _check_cg_iterations(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cg_iterations must be a positive int, got {value!r}.")


def _tree_dot(left: Params, right: Params) -> jax.Array:
    return sum(
        jnp.sum(jnp.asarray(a, jnp.float32) * jnp.asarray(b, jnp.float32))
        for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True)
    )
