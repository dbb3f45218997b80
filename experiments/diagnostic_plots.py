r"""Flatness diagnostics and their plots: reliability, Hessian spectrum, loss slices, sharpness.

Computations (pure JAX, every grid evaluated in one compiled, vmapped program):

* :func:`filter_normalized_direction`: a random direction :math:`d` in parameter space,
  rescaled per *filter* (Li et al. 2018): for every output unit :math:`j` of a kernel
  (the last axis of a Flax ``Dense`` or ``Conv`` kernel),
  :math:`d_{\cdot j} \leftarrow d_{\cdot j}\, \|\theta_{\cdot j}\| / \|d_{\cdot j}\|`, so a
  step of 1 along :math:`d` moves every filter by its own norm and the plots are comparable
  between networks of different scales. One-dimensional leaves (biases, normalisation
  scales) are zeroed by default (``vectors="zero"``) or rescaled as one filter
  (``vectors="filter"``);
* :func:`loss_slice_1d`: :math:`\alpha \mapsto L(\theta + \alpha d)` on a grid of
  :math:`\alpha`;
* :func:`loss_surface_2d`: :math:`(\alpha, \beta) \mapsto L(\theta + \alpha d_1 + \beta d_2)`;
* :func:`sharpness_curve`: the SAM sharpness
  :math:`\max_{\|\epsilon\| \le \rho} L(\theta + \epsilon) - L(\theta)`
  (:func:`bnn_flat.sharpness.sam_sharpness`) over a grid of radii :math:`\rho`;
* :func:`hessian_spectral_density`: the Hessian eigenvalue density by stochastic Lanczos
  quadrature (:func:`bnn_flat.sharpness.spectral_density` on Hessian-vector products).

Plots (matplotlib, Agg backend): :func:`plot_reliability` (from
:func:`bnn_flat.metrics.reliability_diagram_data`), :func:`plot_spectral_densities`,
:func:`plot_slices_1d`, :func:`plot_surfaces_2d`, :func:`plot_sharpness_curves`.

The runner trains MAP and F-MAP (SAM, the flat-seeking point estimate) on the embedded
digits and draws every diagnostic for both::

  python -m experiments.main --config=experiments/diagnostic_plots.py --workdir=runs/diagnostics
  python -m experiments.diagnostic_plots --workdir=runs/diagnostics

It writes ``diagnostics_{reliability,spectrum,slice_1d,surface_2d,sharpness}.png``,
``summary.json`` and ``results.md``.

References:
  Li, Xu, Taylor, Studer, Goldstein. Visualizing the loss landscape of neural nets.
  NeurIPS 2018. Ghorbani, Krishnan, Xiao. An investigation into neural net optimization via
  Hessian eigenvalue density. ICML 2019. Foret et al. Sharpness-aware minimization. ICLR 2021.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from ml_collections import ConfigDict

from bnn_flat import data, metrics, models, objectives, sharpness, training, transforms
from bnn_flat.posteriors import point
from bnn_flat.types import Params, PRNGKey

__all__ = [
    "VECTOR_MODES",
    "filter_normalized_direction",
    "loss_slice_1d",
    "loss_surface_2d",
    "sharpness_curve",
    "hessian_spectral_density",
    "plot_reliability",
    "plot_spectral_densities",
    "plot_slices_1d",
    "plot_surfaces_2d",
    "plot_sharpness_curves",
    "get_config",
    "run",
    "main",
]

VECTOR_MODES = ("zero", "filter")
"""How :func:`filter_normalized_direction` treats one-dimensional leaves (biases)."""

Loss = Callable[[Params], jax.Array]


# Computations ---------------------------------------------------------------------------------


def filter_normalized_direction(key: PRNGKey, params: Params, *, vectors: str = "zero") -> Params:
    """A Gaussian random direction with every filter rescaled to the norm of its weights.

    For a leaf of rank >= 2 with output units on the last axis, the slice ``d[..., j]`` is
    rescaled to ``||params[..., j]||`` (a filter whose weights are all zero gets a zero
    direction). Rank-0/1 leaves are zeroed (``vectors="zero"``, Li et al.'s default for
    biases and normalisation parameters) or rescaled as a single filter
    (``vectors="filter"``).

    Args:
      key: PRNG key.
      params: Parameter pytree (one network).
      vectors: ``"zero"`` or ``"filter"``.

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
      >>> direction = filter_normalized_direction(jax.random.key(0), params)
      >>> jnp.linalg.norm(direction["kernel"], axis=0).round(4).tolist(), direction["bias"].tolist()
      ([5.0, 1.0], [0.0, 0.0])
    """
    if vectors not in VECTOR_MODES:
        raise ValueError(f"unknown vectors mode {vectors!r}; expected one of {VECTOR_MODES}")
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
        raise ValueError("params is empty")
    keys = jax.random.split(key, len(leaves))
    directions = []
    for leaf_key, leaf in zip(keys, leaves, strict=True):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"params must hold floating-point arrays, got {leaf.dtype}")
        noise = jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
        if leaf.ndim >= 2:
            axes = tuple(range(leaf.ndim - 1))
            weight_norm = jnp.sqrt(jnp.sum(jnp.square(leaf), axis=axes, keepdims=True))
            noise_norm = jnp.sqrt(jnp.sum(jnp.square(noise), axis=axes, keepdims=True))
        elif vectors == "zero":
            directions.append(jnp.zeros_like(leaf))
            continue
        else:
            weight_norm = jnp.linalg.norm(leaf)
            noise_norm = jnp.linalg.norm(noise)
        directions.append(noise * weight_norm / jnp.where(noise_norm > 0, noise_norm, 1.0))
    return jax.tree.unflatten(treedef, directions)


def _check_grid(values: ArrayLike, name: str) -> jax.Array:
    grid = jnp.asarray(values)
    if grid.ndim != 1 or grid.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {grid.shape}")
    if not bool(jnp.all(jnp.isfinite(grid))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return grid


def _check_like(params: Params, direction: Params, name: str) -> None:
    if jax.tree.structure(params) != jax.tree.structure(direction):
        raise ValueError(f"{name} must have the tree structure of params")
    for leaf, other in zip(jax.tree.leaves(params), jax.tree.leaves(direction), strict=True):
        if jnp.shape(leaf) != jnp.shape(other):
            raise ValueError(
                f"{name} leaf has shape {jnp.shape(other)}, expected {jnp.shape(leaf)}"
            )


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _map_grid(function: Callable[[jax.Array], jax.Array], grid: jax.Array, batch_size: int | None):
    if batch_size is None:
        return jax.vmap(function)(grid)
    return jax.lax.map(function, grid, batch_size=min(batch_size, grid.shape[0]))


def loss_slice_1d(
    loss: Loss,
    params: Params,
    direction: Params,
    alphas: ArrayLike,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """``L(params + alpha * direction)`` for every ``alpha``, in one compiled program.

    Args:
      loss: Scalar function of the parameters.
      params: The centre of the slice.
      direction: A pytree like ``params`` (e.g. :func:`filter_normalized_direction`).
      alphas: 1-D grid of step sizes.
      batch_size: ``None`` evaluates the whole grid under ``jax.vmap``; otherwise
        ``lax.map`` over chunks of this many points (bounds memory).

    Returns:
      ``(len(alphas),)`` loss values.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> loss_slice_1d(loss, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, jnp.array([-1.0, 0.0, 1.0]))
      Array([0., 2., 8.], dtype=float32)
    """
    _check_like(params, direction, "direction")
    alphas = _check_grid(alphas, "alphas")
    _check_batch_size(batch_size)
    return _slice_1d(loss, batch_size, params, direction, alphas)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _slice_1d(loss, batch_size, params, direction, alphas):
    # ``loss`` is static: calls with the same loss object (e.g. MAP and F-MAP) share one
    # compilation.
    def at(alpha):
        return loss(jax.tree.map(lambda p, d: p + (alpha * d).astype(p.dtype), params, direction))

    return _map_grid(at, alphas, batch_size)


def loss_surface_2d(
    loss: Loss,
    params: Params,
    direction_x: Params,
    direction_y: Params,
    alphas: ArrayLike,
    betas: ArrayLike,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """``L(params + alpha * direction_x + beta * direction_y)`` on a grid, in one program.

    Args:
      loss: Scalar function of the parameters.
      params: The centre of the plane.
      direction_x: First direction (pytree like ``params``).
      direction_y: Second direction.
      alphas: 1-D grid along ``direction_x``.
      betas: 1-D grid along ``direction_y``.
      batch_size: ``None`` (one ``vmap`` over all points) or chunk size for ``lax.map``.

    Returns:
      ``(len(betas), len(alphas))`` loss values (rows follow ``betas``, as
      ``matplotlib.contour(alphas, betas, values)`` expects).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p: p[0] ** 2 + 10 * p[1] ** 2
      >>> surface = loss_surface_2d(loss, jnp.zeros(2), jnp.array([1.0, 0.0]),
      ...                           jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0]), jnp.array([2.0]))
      >>> surface.tolist()
      [[40.0, 41.0]]
    """
    _check_like(params, direction_x, "direction_x")
    _check_like(params, direction_y, "direction_y")
    alphas = _check_grid(alphas, "alphas")
    betas = _check_grid(betas, "betas")
    _check_batch_size(batch_size)
    return _surface_2d(loss, batch_size, params, direction_x, direction_y, alphas, betas)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _surface_2d(loss, batch_size, params, direction_x, direction_y, alphas, betas):
    mesh_beta, mesh_alpha = jnp.meshgrid(betas, alphas, indexing="ij")
    points = jnp.stack([mesh_alpha.ravel(), mesh_beta.ravel()], axis=1)

    def at(point):
        return loss(
            jax.tree.map(
                lambda p, u, v: p + (point[0] * u + point[1] * v).astype(p.dtype),
                params,
                direction_x,
                direction_y,
            )
        )

    return _map_grid(at, points, batch_size).reshape(betas.shape[0], alphas.shape[0])


def sharpness_curve(
    loss: Loss, params: Params, rhos: ArrayLike, *, num_steps: int = 1
) -> jax.Array:
    """SAM sharpness at every radius of ``rhos``: :func:`bnn_flat.sharpness.sam_sharpness`, vmapped.

    Args:
      loss: Scalar function of the parameters.
      params: Where the sharpness is measured.
      rhos: 1-D grid of non-negative radii.
      num_steps: Ascent steps per radius (1: the one-step estimate of F-BNN).

    Returns:
      ``(len(rhos),)`` sharpness values.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # sharpness rho |w| + rho^2 / 2
      >>> curve = sharpness_curve(loss, jnp.array([3.0, 4.0]), jnp.array([0.0, 1.0, 2.0]))
      >>> [round(float(value), 4) for value in curve]
      [0.0, 5.5, 12.0]
    """
    rhos = _check_grid(rhos, "rhos")
    if bool(jnp.any(rhos < 0)):
        raise ValueError("rhos must be non-negative")

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return _sharpness_curve(loss, num_steps, params, rhos)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sharpness_curve(loss, num_steps, params, rhos):
    return jax.vmap(lambda rho: sharpness.sam_sharpness(loss, params, rho, num_steps=num_steps))(
        rhos
    )


def hessian_spectral_density(
    key: PRNGKey,
    loss: Loss,
    params: Params,
    *,
    num_iterations: int = 30,
    num_probes: int = 4,
    grid: ArrayLike | int = 512,
    sigma: float | None = None,
) -> sharpness.SpectralDensity:
    """Hessian eigenvalue density of ``loss`` at ``params`` by stochastic Lanczos quadrature.

    Args:
      key: PRNG key for the probes.
      loss: Scalar function of the parameters.
      params: Where the Hessian is taken.
      num_iterations: Lanczos steps per probe.
      num_probes: Rademacher probes.
      grid: Evaluation points or their number (see
        :func:`bnn_flat.sharpness.spectral_density`).
      sigma: Gaussian smoothing width (default: 1% of the spectral range).

    Returns:
      :class:`bnn_flat.sharpness.SpectralDensity`; ``nodes.max()`` estimates the top
      eigenvalue.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * (w[0] ** 2 + 3.0 * w[1] ** 2)
      >>> result = hessian_spectral_density(jax.random.key(0), loss, jnp.zeros(2),
      ...                                   num_iterations=2, num_probes=1, grid=8)
      >>> sorted(round(float(node), 4) for node in result.nodes[0])
      [1.0, 3.0]
    """

    if isinstance(grid, int):
        return _density(loss, num_iterations, num_probes, grid, sigma, key, params, None)
    return _density(loss, num_iterations, num_probes, None, sigma, key, params, jnp.asarray(grid))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _density(loss, num_iterations, num_probes, num_points, sigma, key, params, grid):
    return sharpness.spectral_density(
        key,
        lambda vector: sharpness.hvp(loss, params, vector),
        params,
        num_iterations=num_iterations,
        num_probes=num_probes,
        grid=num_points if grid is None else grid,
        sigma=sigma,
    )


# Plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_named(items: Mapping[str, Any], name: str) -> None:
    if not isinstance(items, Mapping) or not items:
        raise ValueError(f"{name} must be a non-empty dict from method name to values")


def plot_reliability(
    path: str,
    predictions: Mapping[str, ArrayLike],
    labels: ArrayLike,
    *,
    num_bins: int = 15,
) -> dict[str, dict[str, np.ndarray]]:
    """Reliability diagrams (one panel per method): bin accuracy vs bin confidence.

    Args:
      path: Output PNG path.
      predictions: ``{method: (N, C) log-probabilities}``.
      labels: ``(N,)`` integer labels.
      num_bins: Equal-width confidence bins.

    Returns:
      ``{method: reliability_diagram_data(...)}``, the plotted numbers.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]]))
      >>> path = os.path.join(tempfile.mkdtemp(), "reliability.png")
      >>> tables = plot_reliability(path, {"map": log_probs}, jnp.array([0, 0]), num_bins=2)
      >>> tables["map"]["count"].tolist(), os.path.getsize(path) > 0
      ([0, 2], True)
    """
    _check_named(predictions, "predictions")
    tables = {
        name: metrics.reliability_diagram_data(log_probs, labels, num_bins=num_bins)
        for name, log_probs in predictions.items()
    }
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.2), squeeze=False)
    for axis, (name, table) in zip(axes[0], tables.items(), strict=True):
        edges = table["bin_edges"]
        centres = 0.5 * (edges[:-1] + edges[1:])
        filled = table["count"] > 0
        axis.bar(
            centres[filled],
            table["accuracy"][filled],
            width=np.diff(edges)[filled],
            edgecolor="k",
            linewidth=0.5,
            alpha=0.8,
            label="accuracy",
        )
        axis.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8, label="perfect calibration")
        axis.plot(
            table["confidence"][filled],
            table["accuracy"][filled],
            "o",
            markersize=3,
            color="C3",
            label="(confidence, accuracy)",
        )
        error = float(metrics.ece(predictions[name], labels, num_bins=num_bins))
        axis.set_title(f"{name} (ECE {error:.4f})", fontsize=9)
        axis.set_xlabel("confidence", fontsize=8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return tables


def plot_spectral_densities(path: str, densities: Mapping[str, sharpness.SpectralDensity]) -> None:
    """Hessian eigenvalue densities on a symmetric-log density axis, one curve per method.

    Args:
      path: Output PNG path.
      densities: ``{method: SpectralDensity}``.

    Returns:
      None.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp
      >>> density = hessian_spectral_density(jax.random.key(0), lambda w: jnp.sum(w**2),
      ...                                    jnp.zeros(3), num_iterations=2, num_probes=1)
      >>> path = os.path.join(tempfile.mkdtemp(), "spectrum.png")
      >>> plot_spectral_densities(path, {"quadratic": density}); os.path.getsize(path) > 0
      True
    """
    _check_named(densities, "densities")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for index, (name, density) in enumerate(densities.items()):
        top = float(jnp.max(density.nodes))
        axis.plot(
            np.asarray(density.grid),
            np.asarray(density.density) + 1e-8,
            color=f"C{index}",
            label=f"{name} (top eigenvalue {top:.3g})",
        )
    axis.set_yscale("log")
    axis.set_xlabel("Hessian eigenvalue", fontsize=8)
    axis.set_ylabel("density (SLQ)", fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_slices_1d(path: str, alphas: ArrayLike, slices: Mapping[str, ArrayLike]) -> None:
    """1-D loss slices, one curve per method.

    Args:
      path: Output PNG path.
      alphas: The common grid.
      slices: ``{method: (len(alphas),) loss values}``.

    Returns:
      None.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> path = os.path.join(tempfile.mkdtemp(), "slice.png")
      >>> plot_slices_1d(path, jnp.arange(3.0), {"a": jnp.array([1.0, 0.0, 1.0])})
      >>> os.path.getsize(path) > 0
      True
    """
    _check_named(slices, "slices")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in slices.items():
        axis.plot(np.asarray(alphas), np.asarray(values), label=name)
    axis.set_yscale("log")
    axis.set_xlabel(r"$\alpha$ (filter-normalised direction)", fontsize=8)
    axis.set_ylabel("training loss", fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_surfaces_2d(
    path: str, alphas: ArrayLike, betas: ArrayLike, surfaces: Mapping[str, ArrayLike]
) -> None:
    """Contour plots of 2-D loss surfaces (log10 of the loss), one panel per method.

    Args:
      path: Output PNG path.
      alphas: Grid along the first direction.
      betas: Grid along the second direction.
      surfaces: ``{method: (len(betas), len(alphas)) loss values}``.

    Returns:
      None.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> grid = jnp.linspace(-1.0, 1.0, 5)
      >>> surface = 1.0 + grid[:, None] ** 2 + grid[None, :] ** 2
      >>> path = os.path.join(tempfile.mkdtemp(), "surface.png")
      >>> plot_surfaces_2d(path, grid, grid, {"bowl": surface}); os.path.getsize(path) > 0
      True
    """
    _check_named(surfaces, "surfaces")
    plt = _pyplot()
    logs = {name: np.log10(np.maximum(np.asarray(v), 1e-12)) for name, v in surfaces.items()}
    low = min(float(v.min()) for v in logs.values())
    high = max(float(v.max()) for v in logs.values())
    levels = np.linspace(low, high, 21) if high > low else None
    figure, axes = plt.subplots(1, len(logs), figsize=(3.4 * len(logs), 3.2), squeeze=False)
    for axis, (name, values) in zip(axes[0], logs.items(), strict=True):
        contour = axis.contourf(
            np.asarray(alphas), np.asarray(betas), values, levels=levels, cmap="viridis"
        )
        axis.plot([0], [0], "r+", markersize=8)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(r"$\alpha$", fontsize=8)
        axis.set_aspect("equal")
    axes[0][0].set_ylabel(r"$\beta$", fontsize=8)
    figure.colorbar(contour, ax=list(axes[0]), label="log10 loss", shrink=0.9)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_sharpness_curves(path: str, rhos: ArrayLike, curves: Mapping[str, ArrayLike]) -> None:
    """SAM sharpness against the radius, log-log, one curve per method.

    Args:
      path: Output PNG path.
      rhos: Radii (the zero radius, if present, is left out of the log axis).
      curves: ``{method: (len(rhos),) sharpness values}``.

    Returns:
      None.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> path = os.path.join(tempfile.mkdtemp(), "sharpness.png")
      >>> plot_sharpness_curves(path, jnp.array([0.1, 1.0]), {"a": jnp.array([0.01, 1.0])})
      >>> os.path.getsize(path) > 0
      True
    """
    _check_named(curves, "curves")
    plt = _pyplot()
    rhos = np.asarray(rhos)
    keep = rhos > 0
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in curves.items():
        axis.plot(
            rhos[keep], np.maximum(np.asarray(values)[keep], 1e-12), "o-", markersize=3, label=name
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(r"$\rho$", fontsize=8)
    axis.set_ylabel(r"SAM sharpness $L(\theta+\epsilon^*) - L(\theta)$", fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# Runner ---------------------------------------------------------------------------------------


def get_config() -> ConfigDict:
    """Default configuration of the runner (MAP vs F-MAP on the digits).

    Returns:
      The ``ml_collections.ConfigDict``; ``runner`` names this module, so the file itself is a
      valid ``--config`` for :mod:`experiments.main`.

    Example:
      >>> get_config().runner
      'diagnostic_plots'
    """
    config = ConfigDict()
    config.runner = "diagnostic_plots"
    config.seed = 0
    config.data_seed = 0
    config.hidden_sizes = (64, 64)
    config.num_epochs = 40
    config.batch_size = 64
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.sam_rho = 0.05
    config.loss_examples = 1077  # training examples in the diagnostic loss (all by default)
    config.num_bins = 15
    config.spectrum = ConfigDict()
    config.spectrum.num_iterations = 40
    config.spectrum.num_probes = 4
    config.slice = ConfigDict()
    config.slice.radius = 1.0  # alphas in [-radius, radius]
    config.slice.num_points = 81
    config.surface = ConfigDict()
    config.surface.radius = 1.0
    config.surface.num_points = 31  # per axis
    config.rhos = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    config.sharpness_steps = 5  # projected ascent steps per radius
    return config


def _flat_keys(config: Any, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in config.items():
        if isinstance(value, ConfigDict):
            keys |= _flat_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _validate(config: ConfigDict) -> None:
    unknown = sorted(_flat_keys(config) - _flat_keys(get_config()))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    for name in ("num_epochs", "batch_size", "loss_examples", "sharpness_steps"):
        if config[name] < 1:
            raise ValueError(f"{name} must be positive, got {config[name]}")
    if config.sam_rho <= 0 or config.learning_rate <= 0:
        raise ValueError("sam_rho and learning_rate must be positive")
    if config.slice.num_points < 3 or config.surface.num_points < 3:
        raise ValueError("slice.num_points and surface.num_points must be at least 3")
    if any(rho < 0 for rho in config.rhos):
        raise ValueError(f"rhos must be non-negative, got {config.rhos}")


def _train(key, config: ConfigDict, module, apply_fn, train, flat: bool) -> Params:
    num_train = len(train.labels)
    loss_fn = objectives.classification_loss(
        apply_fn,
        num_data=num_train,
        prior_precision=objectives.weight_decay_to_prior_precision(config.weight_decay, num_train),
    )
    steps = config.num_epochs * (num_train // config.batch_size)
    sgd = optax.sgd(
        optax.cosine_decay_schedule(config.learning_rate, steps), momentum=config.momentum
    )
    family = point.build(loss_fn, optax.chain(transforms.sam(config.sam_rho), sgd) if flat else sgd)
    init_key, fit_key = jax.random.split(key)
    params, model_state = models.init(module, init_key, jnp.asarray(train.inputs[:2]))
    return training.fit(
        fit_key,
        family,
        family.init(params, model_state),
        (train.inputs, train.labels),
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        progress=False,
    ).state.params


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains MAP and F-MAP, computes every diagnostic, writes PNGs, summary and table."""
    _validate(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    splits = data.load_digits(seed=config.data_seed)
    train, test = splits["train"], splits["test"]
    num_classes = int(train.labels.max()) + 1
    module = models.mlp(list(config.hidden_sizes), num_outputs=num_classes)
    apply_fn = models.make_apply(module)
    size = min(config.loss_examples, len(train.labels))
    loss = sharpness.make_loss_for_hessian(
        apply_fn, {}, jnp.asarray(train.inputs[:size]), jnp.asarray(train.labels[:size])
    )
    key = jax.random.key(config.seed)
    train_key, direction_key, spectrum_key = jax.random.split(key, 3)
    alphas = jnp.linspace(-config.slice.radius, config.slice.radius, config.slice.num_points)
    surface_grid = jnp.linspace(
        -config.surface.radius, config.surface.radius, config.surface.num_points
    )
    rhos = jnp.asarray(config.rhos, jnp.float32)
    x_key, y_key = jax.random.split(direction_key)

    predictions, densities, slices, surfaces, curves = {}, {}, {}, {}, {}
    summary: dict[str, Any] = {"methods": {}}
    timings: dict[str, float] = {}
    for name, flat in (("map", False), ("f_map (SAM)", True)):
        begin = time.perf_counter()
        params = _train(train_key, config, module, apply_fn, train, flat)
        timings[f"train {name}"] = time.perf_counter() - begin
        begin = time.perf_counter()
        logits = apply_fn(params, {}, jnp.asarray(test.inputs), train=False, key=None)[0]
        predictions[name] = jax.nn.log_softmax(logits)
        densities[name] = hessian_spectral_density(
            spectrum_key,
            loss,
            params,
            num_iterations=config.spectrum.num_iterations,
            num_probes=config.spectrum.num_probes,
        )
        # The same random directions for both solutions, filter-normalised to each.
        direction_x = filter_normalized_direction(x_key, params)
        direction_y = filter_normalized_direction(y_key, params)
        slices[name] = loss_slice_1d(loss, params, direction_x, alphas)
        surfaces[name] = loss_surface_2d(
            loss, params, direction_x, direction_y, surface_grid, surface_grid
        )
        curves[name] = sharpness_curve(loss, params, rhos, num_steps=config.sharpness_steps)
        timings[f"diagnostics {name}"] = time.perf_counter() - begin
        centre = config.slice.num_points // 2
        summary["methods"][name] = {
            "train_loss": float(loss(params)),
            "test_accuracy": float(metrics.accuracy(predictions[name], test.labels)),
            "test_nll": float(metrics.nll(predictions[name], test.labels)),
            "test_ece": float(
                metrics.ece(predictions[name], test.labels, num_bins=config.num_bins)
            ),
            "top_eigenvalue": float(jnp.max(densities[name].nodes)),
            "slice_at_zero": float(slices[name][centre]),
            "slice_at_edges": [float(slices[name][0]), float(slices[name][-1])],
            "surface_max": float(jnp.max(surfaces[name])),
            "sharpness": {
                f"{float(r):g}": float(v) for r, v in zip(rhos, curves[name], strict=True)
            },
        }
    plot_reliability(
        os.path.join(workdir, "diagnostics_reliability.png"),
        predictions,
        test.labels,
        num_bins=config.num_bins,
    )
    plot_spectral_densities(os.path.join(workdir, "diagnostics_spectrum.png"), densities)
    plot_slices_1d(os.path.join(workdir, "diagnostics_slice_1d.png"), alphas, slices)
    plot_surfaces_2d(
        os.path.join(workdir, "diagnostics_surface_2d.png"), surface_grid, surface_grid, surfaces
    )
    plot_sharpness_curves(os.path.join(workdir, "diagnostics_sharpness.png"), rhos, curves)
    summary["seconds"] = timings
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _table(summary, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summary


def _table(summary: dict[str, Any], config: ConfigDict) -> str:
    shown = [r for r in config.rhos if r in (0.01, 0.05, 0.2, 1.0)] or list(config.rhos)[:4]
    header = " | ".join(f"S(ρ={r:g})" for r in shown)
    lines = [
        f"Training loss on {config.loss_examples} examples (evaluation mode, no prior); "
        f"top eigenvalue from SLQ ({config.spectrum.num_iterations} Lanczos steps x "
        f"{config.spectrum.num_probes} probes); loss at ±{config.slice.radius:g} along one "
        f"filter-normalised direction; SAM sharpness with {config.sharpness_steps} ascent steps.",
        "",
        "| method | train loss | test acc % | test NLL | ECE | top eig. | "
        f"loss at ±{config.slice.radius:g} | {header} |",
        "|---|---|---|---|---|---|---|" + "---|" * len(shown),
    ]
    for name, row in summary["methods"].items():
        edges = "/".join(f"{v:.3g}" for v in row["slice_at_edges"])
        values = " | ".join(f"{row['sharpness'][f'{float(r):g}']:.3g}" for r in shown)
        lines.append(
            f"| {name} | {row['train_loss']:.4f} | {100 * row['test_accuracy']:.2f} | "
            f"{row['test_nll']:.4f} | {row['test_ece']:.4f} | {row['top_eigenvalue']:.3g} | "
            f"{edges} | {values} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m experiments.diagnostic_plots --workdir=DIR [--num_epochs=N]``.

    Args:
      argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
      The summary of :func:`run`.
    """
    parser = argparse.ArgumentParser(description="Flatness diagnostics of MAP vs F-MAP.")
    parser.add_argument("--workdir", default="runs/diagnostics")
    parser.add_argument("--num_epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = get_config()
    config.seed = args.seed
    if args.num_epochs is not None:
        config.num_epochs = args.num_epochs
    return run(config, args.workdir)


if __name__ == "__main__":
    main()
