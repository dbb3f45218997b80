"""The 2-D toy landscape of "Rethinking SAM as variational inference" (Ujváry et al. 2022).

The loss over (theta0, theta1) is the negative log of a two-component mixture of
exponentiated Gaussian KL divergences: a wide mode at theta0 = 20 and a narrow, deeper mode
at theta0 = -20. Four surfaces are computed on a 400 x 400 grid:

1. the loss L itself;
2. the mean-field-VI-smoothed loss  E_xi[L(mu + rho xi / sqrt 2)]  (1,000 draws, rho = 8);
3. the ideal SAM loss  max_{|e| <= rho} L(mu + e)  (1,000 uniform points in the disc);
4. the one-step SAM loss  L(mu + rho grad L / |grad L|), with the perturbation computed by
   ``bnn_flat.transforms.sam`` itself.

Each surface's minimiser is reported: the smoothed and sharpness-aware objectives move the
minimum from the narrow mode to the wide one.

Run:
  python -m experiments.toy_rethinking_sam --workdir=runs/toy_rethinking_sam

Writes ``landscape.png`` and ``minima.json`` and prints the minimisers. Takes ~20 s on CPU.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bnn_flat import transforms

# (mean, scale, weight, temperature) of the two components (§5.3 of the algorithms digest).
_COMPONENTS = ((20.0, 30.0, 0.7, 1.8), (-20.0, 10.0, 0.3, 1.2))


def toy_loss(theta: jax.Array) -> jax.Array:
    """The toy loss at ``theta = (theta0, theta1)`` (stable log-sum-exp form)."""
    theta0, theta1 = theta[0], theta[1]
    exponents, log_weights = [], []
    for mean, scale, weight, temperature in _COMPONENTS:
        kl = ((theta0 - mean) ** 2 + theta1**2) / (2 * scale**2) - 0.5 + jnp.log(scale)
        kl = kl - jnp.log(jnp.abs(theta1))
        exponents.append(-(kl + 0.5) / temperature**2)
        log_weights.append(jnp.log(weight))
    return -jax.scipy.special.logsumexp(jnp.stack(exponents) + jnp.stack(log_weights))


def surfaces(key: jax.Array, grid: jax.Array, rho: float = 8.0, num_draws: int = 1000):
    """The four surfaces on ``grid`` of shape ``(P, 2)``; returns a dict of ``(P,)`` arrays."""
    noise_key, disc_key = jax.random.split(key)
    gauss = jax.random.normal(noise_key, (num_draws, 2))
    radius_key, angle_key = jax.random.split(disc_key)
    radius = rho * jnp.sqrt(jax.random.uniform(radius_key, (num_draws,)))
    angle = 2 * jnp.pi * jax.random.uniform(angle_key, (num_draws,))
    disc = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=1)

    loss = jax.vmap(toy_loss)
    sam = transforms.sam(rho=rho)

    def one_step_sam(point):
        # grad_fn is the identity here, so the transform returns the perturbed point itself.
        perturbed, _ = sam.update(
            jax.grad(toy_loss)(point), sam.init(point), point, grad_fn=lambda p: p
        )
        return toy_loss(perturbed)

    def per_point(point):
        return {
            "loss": toy_loss(point),
            "mfvi": jnp.mean(loss(point + rho * gauss / jnp.sqrt(2.0))),
            "ideal_sam": jnp.max(loss(point + disc)),
            "one_step_sam": one_step_sam(point),
        }

    return jax.jit(lambda g: jax.lax.map(per_point, g, batch_size=4096))(grid)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Rethinking-SAM 2-D toy landscape.")
    parser.add_argument("--workdir", default="runs/toy_rethinking_sam")
    parser.add_argument("--grid_size", type=int, default=400)
    parser.add_argument("--rho", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    theta0 = np.linspace(-30.0, 40.0, args.grid_size)
    theta1 = np.linspace(0.0, 45.0, args.grid_size + 1)[1:]  # theta1 = 0 is a pole
    mesh = np.stack(np.meshgrid(theta0, theta1, indexing="xy"), axis=-1)
    values = surfaces(jax.random.key(args.seed), jnp.asarray(mesh.reshape(-1, 2)), args.rho)

    minima = {}
    for name, surface in values.items():
        surface = np.asarray(surface)
        index = int(np.nanargmin(surface))
        minima[name] = {
            "theta0": float(mesh.reshape(-1, 2)[index, 0]),
            "theta1": float(mesh.reshape(-1, 2)[index, 1]),
            "value": float(surface[index]),
        }
        print(
            f"{name:13s} argmin theta0={minima[name]['theta0']:7.2f} "
            f"theta1={minima[name]['theta1']:6.2f}  value={minima[name]['value']:.3f}"
        )

    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "minima.json"), "w") as f:
        json.dump(minima, f, indent=2)
    _plot(mesh, values, minima, os.path.join(args.workdir, "landscape.png"))
    return minima


def _plot(mesh, values, minima, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "loss": "loss L",
        "mfvi": "MFVI-smoothed L",
        "ideal_sam": "ideal SAM: max over disc",
        "one_step_sam": "one-step SAM",
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        surface = np.asarray(values[name]).reshape(mesh.shape[:2])
        clipped = np.clip(surface, None, np.nanpercentile(surface, 95))
        image = ax.contourf(mesh[..., 0], mesh[..., 1], clipped, levels=40, cmap="viridis")
        ax.plot(minima[name]["theta0"], minima[name]["theta1"], "r*", markersize=14)
        ax.set_title(title)
        ax.set_xlabel(r"$\theta_0$ (mean)")
        fig.colorbar(image, ax=ax)
    axes[0].set_ylabel(r"$\theta_1$ (std)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
