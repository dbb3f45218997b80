"""The weight-space symmetry toy of Laurent et al. (ICLR 2024, figure 1), vmapped.

Thousands of 2-2-1 ReLU networks are trained independently on one two-class, 2-D data set
(binary cross-entropy with logits, plain SGD with learning rate 2, batch 10, 10 epochs,
PyTorch's default uniform initialisation) in **one** jitted program (``jax.vmap`` over
networks, ``lax.scan`` over epochs and steps; every network has its own initialisation and
data order). Runs whose mean loss over the last epoch exceeds ``train.max_loss`` (0.01) are
discarded. The two output-layer weights of every kept network are then plotted

1. raw: the posterior is symmetric under swapping the two hidden units and spread along the
   scaling orbits;
2. after scaling removal (:func:`bnn_flat.symmetry.canonicalize_scaling`; ``"row_norm"`` with
   norm 3 as in the paper's toy, or the convex ``"min_mass"`` form);
3. after scaling and permutation removal.

Permutation removal: the toy sorts the hidden units by their *outgoing* (output-layer)
weight, descending (``permutation="outgoing"``; the paper's notebook sorts by the last layer
too, "to improve visuals"), which puts every point on one side of the diagonal
``v_0 = v_1``. The library's :func:`bnn_flat.symmetry.canonicalize_permutation` sorts by the
*incoming* weights instead (key ``"max"``: the first incoming weight); its result is plotted in
a fourth panel and its one-side fraction is reported on the coordinates it sorts.

Every canonicalised network is checked against its original on random inputs (mean squared
output difference < ``check.max_mse``, 1e-4 in the paper's code); the summary reports the
worst value over networks.

Differences from the paper's code: the data are generated here (two Gaussian blobs; the
paper's ``data.pt`` is not shipped), and ``row_norm`` normalises each hidden unit's incoming
weights *and bias* (the paper's toy leaves the bias out of the norm).

Run::

  python -m experiments.main --config=experiments/configs/symmetry_toy.py \\
      --workdir=runs/symmetry_toy

Writes ``symmetry_toy.png``, ``summary.json`` and ``results.md``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from bnn_flat import models, symmetry
from bnn_flat.types import Params, PRNGKey

__all__ = [
    "PERMUTATION_METHODS",
    "toy_data",
    "init_params",
    "train_networks",
    "sort_by_outgoing",
    "canonicalize",
    "function_errors",
    "one_side_fraction",
    "run",
]

PERMUTATION_METHODS = ("outgoing", "max", "mean", "l2")
_SCALING_METHODS = ("row_norm", "min_mass")
_MODULE = models.mlp([2], num_outputs=1)
_APPLY = models.make_apply(_MODULE)


def toy_data(
    seed: int, num_per_class: int = 200, separation: float = 1.0, std: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs in 2-D, centred at ``-(s, s)`` (label 0) and ``(s, s)`` (label 1).

    Args:
      seed: NumPy seed.
      num_per_class: Points per class.
      separation: ``s``, the blob centres' coordinate.
      std: Standard deviation of each blob (isotropic).

    Returns:
      ``(inputs, labels)`` of shapes ``(2n, 2)`` and ``(2n,)``, float32 (labels 0.0 / 1.0).

    Example:
      >>> inputs, labels = toy_data(0, num_per_class=3)
      >>> inputs.shape, labels.tolist()
      ((6, 2), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    """
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be positive, got {num_per_class}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    rng = np.random.default_rng(seed)
    negative = rng.normal([-separation, -separation], std, (num_per_class, 2))
    positive = rng.normal([separation, separation], std, (num_per_class, 2))
    inputs = np.concatenate([negative, positive]).astype(np.float32)
    labels = np.repeat(np.array([0.0, 1.0], np.float32), num_per_class)
    return inputs, labels


def init_params(key: PRNGKey) -> Params:
    """PyTorch's default ``nn.Linear`` initialisation of a 2-2-1 MLP: ``U(-1/sqrt(fan_in), .)``.

    The tree has the layout of :func:`bnn_flat.models.mlp` (``hidden_0``, ``output``), so the
    library's symmetry functions and :func:`bnn_flat.models.make_apply` apply to it.

    Args:
      key: PRNG key.

    Returns:
      ``{"hidden_0": {"kernel": (2, 2), "bias": (2,)}, "output": {"kernel": (2, 1),
      "bias": (1,)}}``.

    Example:
      >>> import jax
      >>> params = init_params(jax.random.key(0))
      >>> params["output"]["kernel"].shape, bool(abs(params["hidden_0"]["kernel"]).max() < 0.71)
      ((2, 1), True)
    """
    keys = jax.random.split(key, 4)
    bound = 1.0 / math.sqrt(2.0)  # fan_in = 2 for both layers

    def uniform(k: PRNGKey, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.uniform(k, shape, minval=-bound, maxval=bound)

    return {
        "hidden_0": {"kernel": uniform(keys[0], (2, 2)), "bias": uniform(keys[1], (2,))},
        "output": {"kernel": uniform(keys[2], (2, 1)), "bias": uniform(keys[3], (1,))},
    }


def _bce_loss(params: Params, inputs: jax.Array, labels: jax.Array) -> jax.Array:
    logits = _APPLY(params, {}, inputs, train=False, key=None)[0][:, 0]
    # log(1 + e^z) - z y, stably
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


@functools.partial(
    jax.jit, static_argnames=("num_networks", "batch_size", "num_epochs", "learning_rate")
)
def _train(key, inputs, labels, num_networks, batch_size, num_epochs, learning_rate):
    num_data = inputs.shape[0]
    steps = num_data // batch_size

    def one(network_key):
        init_key, order_key = jax.random.split(network_key)

        def epoch(params, epoch_key):
            order = jax.random.permutation(epoch_key, num_data)[: steps * batch_size]

            def step(params, index):
                loss, grads = jax.value_and_grad(_bce_loss)(params, inputs[index], labels[index])
                return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), loss

            params, losses = jax.lax.scan(step, params, order.reshape(steps, batch_size))
            return params, jnp.mean(losses)

        return jax.lax.scan(epoch, init_params(init_key), jax.random.split(order_key, num_epochs))

    return jax.vmap(one)(jax.random.split(key, num_networks))


def train_networks(
    key: PRNGKey,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    num_networks: int,
    learning_rate: float = 2.0,
    batch_size: int = 10,
    num_epochs: int = 10,
) -> tuple[Params, jax.Array]:
    """Trains ``num_networks`` independent 2-2-1 networks with SGD in one compiled program.

    Args:
      key: PRNG key; network ``i`` uses ``jax.random.split(key, num_networks)[i]`` for its
        initialisation and data order.
      inputs: ``(N, 2)`` inputs.
      labels: ``(N,)`` binary labels (0/1).
      num_networks: Number of networks.
      learning_rate: SGD step size.
      batch_size: Examples per step (a trailing partial batch is dropped each epoch).
      num_epochs: Passes over the data.

    Returns:
      ``(params, epoch_losses)``: stacked parameters (leading axis ``num_networks``) and the
      ``(num_networks, num_epochs)`` mean training loss of every epoch.

    Example:
      >>> import jax
      >>> inputs, labels = toy_data(0, num_per_class=20)
      >>> params, losses = train_networks(jax.random.key(0), inputs, labels, num_networks=3,
      ...                                 num_epochs=2)
      >>> params["output"]["kernel"].shape, losses.shape
      ((3, 2, 1), (3, 2))
    """
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    if inputs.ndim != 2 or inputs.shape[1] != 2 or labels.shape != (inputs.shape[0],):
        raise ValueError(
            f"expected (N, 2) inputs and (N,) labels, got {inputs.shape}, {labels.shape}"
        )
    for name, value in (
        ("num_networks", num_networks),
        ("batch_size", batch_size),
        ("num_epochs", num_epochs),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size > inputs.shape[0]:
        raise ValueError(f"batch_size {batch_size} exceeds the {inputs.shape[0]} examples")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    return _train(key, inputs, labels, num_networks, batch_size, num_epochs, float(learning_rate))


def sort_by_outgoing(params: Params) -> Params:
    """Permutes the hidden units so that their outgoing weights decrease (the toy's form).

    Only valid for a single output (the output kernel has shape ``(hidden, 1)``). Exactly a
    permutation: the function is unchanged.

    Args:
      params: One network (``hidden_0``, ``output``).

    Returns:
      The permuted network; ``output.kernel[:, 0]`` is sorted in decreasing order.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"hidden_0": {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([3.0, 4.0])},
      ...           "output": {"kernel": jnp.array([[5.0], [6.0]]), "bias": jnp.zeros(1)}}
      >>> result = sort_by_outgoing(params)
      >>> result["output"]["kernel"][:, 0].tolist(), result["hidden_0"]["bias"].tolist()
      ([6.0, 5.0], [4.0, 3.0])
    """
    outgoing = params["output"]["kernel"]
    if outgoing.ndim != 2 or outgoing.shape[1] != 1:
        raise ValueError(f"sort_by_outgoing needs one output, got kernel shape {outgoing.shape}")
    order = jnp.argsort(-outgoing[:, 0], stable=True)
    return {
        "hidden_0": {
            "kernel": params["hidden_0"]["kernel"][:, order],
            "bias": params["hidden_0"]["bias"][order],
        },
        "output": {"kernel": outgoing[order], "bias": params["output"]["bias"]},
    }


def canonicalize(
    params: Params,
    *,
    scaling: str | None = "row_norm",
    row_norm: float = 3.0,
    permutation: str | None = "outgoing",
) -> Params:
    """Scaling removal, then permutation removal, of one network (vmap it over networks).

    Args:
      params: One 2-2-1 network.
      scaling: ``"row_norm"``, ``"min_mass"`` or ``None`` (no scaling removal).
      row_norm: Target norm for ``"row_norm"``.
      permutation: ``"outgoing"`` (:func:`sort_by_outgoing`), a key of
        :func:`bnn_flat.symmetry.canonicalize_permutation` (``"max"``, ``"mean"``, ``"l2"``),
        or ``None``.

    Returns:
      The canonical network.

    Example:
      >>> import jax
      >>> params = init_params(jax.random.key(0))
      >>> canonical = canonicalize(params, scaling="row_norm", row_norm=3.0)
      >>> hidden = canonical["hidden_0"]
      >>> row_norms = jax.numpy.sqrt((hidden["kernel"] ** 2).sum(0) + hidden["bias"] ** 2)
      >>> [round(float(v), 4) for v in row_norms]
      [3.0, 3.0]
    """
    if scaling is not None:
        if scaling not in _SCALING_METHODS:
            raise ValueError(f"unknown scaling {scaling!r}; expected one of {_SCALING_METHODS}")
        params = symmetry.canonicalize_scaling(params, method=scaling, row_norm=row_norm)
    if permutation is None:
        return params
    if permutation not in PERMUTATION_METHODS:
        raise ValueError(
            f"unknown permutation {permutation!r}; expected one of {PERMUTATION_METHODS}"
        )
    if permutation == "outgoing":
        return sort_by_outgoing(params)
    return symmetry.canonicalize_permutation(params, architecture="mlp", key=permutation)[0]


@jax.jit
def _errors(before: Params, after: Params, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    def one(first, second):
        difference = (
            _APPLY(first, {}, inputs, train=False, key=None)[0]
            - _APPLY(second, {}, inputs, train=False, key=None)[0]
        )
        return jnp.mean(jnp.sum(jnp.square(difference), axis=-1)), jnp.max(jnp.abs(difference))

    return jax.vmap(one)(before, after)


def function_errors(
    before: Params, after: Params, inputs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-network output errors between two stacks of networks, on the same inputs.

    Args:
      before: Stacked networks (leading axis ``M``).
      after: Their transformed versions.
      inputs: ``(N, 2)`` test inputs.

    Returns:
      ``(mse, max_abs)``, each ``(M,)``: the mean over inputs of the squared output difference
      (the paper's integrity check) and the largest absolute difference.

    Example:
      >>> import jax
      >>> params = jax.vmap(init_params)(jax.random.split(jax.random.key(0), 4))
      >>> mse, _ = function_errors(params, jax.vmap(sort_by_outgoing)(params),
      ...                          jax.random.normal(jax.random.key(1), (8, 2)))
      >>> mse.tolist()
      [0.0, 0.0, 0.0, 0.0]
    """
    return _errors(before, after, jnp.asarray(inputs))


def one_side_fraction(points: np.ndarray) -> float:
    """Fraction of 2-D points with ``x >= y`` (on or below the diagonal).

    Args:
      points: ``(M, 2)`` array.

    Returns:
      The fraction in ``[0, 1]``.

    Example:
      >>> one_side_fraction(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]))
      0.75
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape (M, 2) with M >= 1, got {points.shape}")
    return float(np.mean(points[:, 0] >= points[:, 1]))


def _validate(config: ConfigDict) -> None:
    from experiments.configs import symmetry_toy as defaults

    expected = defaults.get_config()
    unknown = sorted(_flat_keys(config) - _flat_keys(expected))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    if config.canonical.scaling not in _SCALING_METHODS:
        raise ValueError(
            f"canonical.scaling must be one of {_SCALING_METHODS}, got {config.canonical.scaling!r}"
        )
    if config.canonical.permutation not in PERMUTATION_METHODS:
        raise ValueError(
            f"canonical.permutation must be one of {PERMUTATION_METHODS}, got "
            f"{config.canonical.permutation!r}"
        )
    if config.canonical.library_key not in PERMUTATION_METHODS[1:]:
        raise ValueError(
            f"canonical.library_key must be one of {PERMUTATION_METHODS[1:]}, got "
            f"{config.canonical.library_key!r}"
        )
    if not config.train.max_loss > 0:
        raise ValueError(f"train.max_loss must be positive, got {config.train.max_loss}")
    if not config.canonical.row_norm > 0:
        raise ValueError(f"canonical.row_norm must be positive, got {config.canonical.row_norm}")


def _flat_keys(config: Any, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ConfigDict):
            keys |= _flat_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def _last_layer(params: Params) -> np.ndarray:
    return np.asarray(params["output"]["kernel"][:, :, 0])


def _plot(panels: list[tuple[str, np.ndarray]], path: str, limit: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, points) in zip(axes, panels, strict=True):
        if limit is None:  # every panel shows 99% of its points
            limit_here = 1.1 * float(np.quantile(np.abs(points), 0.99))
        else:
            limit_here = limit
        axis.hexbin(
            points[:, 0],
            points[:, 1],
            gridsize=60,
            extent=(-limit_here, limit_here, -limit_here, limit_here),
            mincnt=1,
            cmap="Oranges",
            bins="log",
            linewidths=0.0,
        )
        axis.plot(
            [-limit_here, limit_here], [-limit_here, limit_here], "--", color="0.4", linewidth=0.8
        )
        axis.set_xlim(-limit_here, limit_here)
        axis.set_ylim(-limit_here, limit_here)
        axis.set_aspect("equal")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("$v_0$ (output weight of unit 0)", fontsize=8)
        axis.grid(True, linestyle=":", alpha=0.5)
    axes[0].set_ylabel("$v_1$", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the networks, canonicalises them, checks them, plots and writes the summary."""
    _validate(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    inputs, labels = toy_data(
        config.seed,
        num_per_class=config.data.num_per_class,
        separation=config.data.separation,
        std=config.data.std,
    )
    train_key, check_key = jax.random.split(jax.random.key(config.seed))
    begin = time.perf_counter()
    params, losses = train_networks(
        train_key,
        inputs,
        labels,
        num_networks=config.train.num_networks,
        learning_rate=config.train.learning_rate,
        batch_size=config.train.batch_size,
        num_epochs=config.train.num_epochs,
    )
    final_losses = np.asarray(jax.block_until_ready(losses)[:, -1])
    train_seconds = time.perf_counter() - begin
    kept = np.flatnonzero(final_losses <= config.train.max_loss)
    if kept.size == 0:
        raise ValueError(
            f"no run reached loss <= {config.train.max_loss}; raise train.num_epochs or "
            "train.max_loss"
        )
    params = jax.tree.map(lambda leaf: leaf[kept], params)

    begin = time.perf_counter()
    scaling, norm = config.canonical.scaling, config.canonical.row_norm
    scaled = jax.vmap(lambda p: canonicalize(p, scaling=scaling, row_norm=norm, permutation=None))(
        params
    )
    canonical = jax.vmap(
        lambda p: canonicalize(
            p, scaling=scaling, row_norm=norm, permutation=config.canonical.permutation
        )
    )(params)
    library = jax.vmap(
        lambda p: canonicalize(
            p, scaling=scaling, row_norm=norm, permutation=config.canonical.library_key
        )
    )(params)
    check_inputs = jax.random.normal(check_key, (config.check.num_inputs, 2))
    errors = {
        name: [float(np.max(np.asarray(e))) for e in function_errors(params, other, check_inputs)]
        for name, other in (("scaled", scaled), ("canonical", canonical), ("library", library))
    }
    canonical_seconds = time.perf_counter() - begin

    raw_points, scaled_points = _last_layer(params), _last_layer(scaled)
    canonical_points, library_points = _last_layer(canonical), _last_layer(library)
    # The library key sorts the hidden units by their first incoming weight.
    library_sorted = np.asarray(library["hidden_0"]["kernel"][:, 0, :])
    summary = {
        "num_networks": int(config.train.num_networks),
        "num_kept": int(kept.size),
        "kept_fraction": float(kept.size / config.train.num_networks),
        "final_loss_median": float(np.median(final_losses)),
        "train_seconds": train_seconds,
        "canonicalize_seconds": canonical_seconds,
        "scaling": scaling,
        "permutation": config.canonical.permutation,
        "library_key": config.canonical.library_key,
        "max_mse": {name: values[0] for name, values in errors.items()},
        "max_abs_error": {name: values[1] for name, values in errors.items()},
        "function_preserved": all(values[0] < config.check.max_mse for values in errors.values()),
        "one_side_fraction": {
            "raw": one_side_fraction(raw_points),
            "scaled": one_side_fraction(scaled_points),
            "canonical": one_side_fraction(canonical_points),
            "library_last_layer": one_side_fraction(library_points),
            "library_sort_key": one_side_fraction(library_sorted),
        },
    }
    if config.plot:
        _plot(
            [
                ("raw", raw_points),
                (f"after scaling removal ({scaling})", scaled_points),
                (f"+ permutation removal ({config.canonical.permutation})", canonical_points),
                (f"+ library permutation (key {config.canonical.library_key})", library_points),
            ],
            os.path.join(workdir, "symmetry_toy.png"),
            config.plot_limit,
        )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _table(summary)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summary


def _table(summary: dict[str, Any]) -> str:
    sides = summary["one_side_fraction"]
    lines = [
        f"{summary['num_kept']} of {summary['num_networks']} networks kept (final loss <= "
        f"max_loss); training {summary['train_seconds']:.1f} s, canonicalisation "
        f"{summary['canonicalize_seconds']:.1f} s.",
        "",
        "| stage | fraction with v0 >= v1 | worst MSE vs original | worst max abs error |",
        "|---|---|---|---|",
        f"| raw | {sides['raw']:.4f} | - | - |",
    ]
    for name, label, side in (
        ("scaled", f"scaling removed ({summary['scaling']})", sides["scaled"]),
        ("canonical", f"+ permutation ({summary['permutation']})", sides["canonical"]),
        (
            "library",
            f"+ library permutation ({summary['library_key']})",
            sides["library_last_layer"],
        ),
    ):
        lines.append(
            f"| {label} | {side:.4f} | {summary['max_mse'][name]:.2e} | "
            f"{summary['max_abs_error'][name]:.2e} |"
        )
    lines += [
        "",
        f"Library permutation: fraction of networks whose first incoming weights are sorted "
        f"(its sort key): {sides['library_sort_key']:.4f}.",
    ]
    return "\n".join(lines) + "\n"
