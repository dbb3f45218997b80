"""End-to-end and unit tests of the diagnostics experiments (symmetry toy, posterior
comparison, flatness diagnostic plots)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import models, sharpness, symmetry
from experiments import diagnostic_plots, posterior_comparison, symmetry_toy
from experiments.configs import posterior_comparison_digits
from experiments.configs import symmetry_toy as symmetry_toy_config

# Symmetry toy ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_symmetry_toy_end_to_end(tmp_path):
    config = symmetry_toy_config.get_config()
    config.train.num_networks = 64
    summary = symmetry_toy.run(config, str(tmp_path))
    assert summary["num_kept"] >= 48  # the blobs are easy: most runs reach loss <= 0.01
    assert summary["function_preserved"]
    for name in ("scaled", "canonical", "library"):
        assert summary["max_mse"][name] < 1e-4, name
        assert summary["max_abs_error"][name] < 1e-3, name
    sides = summary["one_side_fraction"]
    assert sides["canonical"] == 1.0
    assert sides["library_sort_key"] == 1.0
    assert 0.2 < sides["raw"] < 0.8  # the raw posterior is symmetric under the swap
    assert (tmp_path / "symmetry_toy.png").stat().st_size > 0
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["num_kept"] == summary["num_kept"]
    assert (tmp_path / "results.md").read_text().count("\n| ") == 5  # header + 4 stages


@pytest.mark.parametrize("scaling", ["row_norm", "min_mass"])
def test_toy_canonical_form_is_invariant_and_preserves_the_function(scaling):
    keys = jax.random.split(jax.random.key(0), 16)
    params = jax.vmap(symmetry_toy.init_params)(keys)
    # A random symmetry transform of each network (permutation, then scaling).
    moved = jax.vmap(lambda k, p: symmetry.random_permutation(k, p)[0])(keys, params)
    moved = jax.vmap(lambda k, p: symmetry.random_scaling(k, p, scale=1.0))(
        jax.random.split(jax.random.key(1), 16), moved
    )

    def canonical(p):
        return symmetry_toy.canonicalize(p, scaling=scaling, row_norm=3.0)

    first, second = jax.vmap(canonical)(params), jax.vmap(canonical)(moved)
    inputs = jax.random.normal(jax.random.key(2), (32, 2))
    mse, max_abs = symmetry_toy.function_errors(params, first, inputs)
    assert float(jnp.max(mse)) < 1e-10 and float(jnp.max(max_abs)) < 1e-5
    # Both members of an orbit reach the same canonical network.
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    outgoing = np.asarray(first["output"]["kernel"][:, :, 0])
    assert symmetry_toy.one_side_fraction(outgoing) == 1.0
    if scaling == "row_norm":
        hidden = first["hidden_0"]
        norms = jnp.sqrt(jnp.sum(hidden["kernel"] ** 2, axis=1) + hidden["bias"] ** 2)
        np.testing.assert_allclose(norms, 3.0, rtol=1e-5)


def test_one_side_fraction_and_validation():
    assert symmetry_toy.one_side_fraction(np.array([[1.0, 2.0], [2.0, 1.0]])) == 0.5
    with pytest.raises(ValueError, match="shape"):
        symmetry_toy.one_side_fraction(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="unknown permutation"):
        symmetry_toy.canonicalize(symmetry_toy.init_params(jax.random.key(0)), permutation="x")
    config = symmetry_toy_config.get_config()
    config.train.typo = 1
    with pytest.raises(ValueError, match="unknown config keys: train.typo"):
        symmetry_toy.run(config, "/nonexistent/never_written")


# Posterior comparison --------------------------------------------------------------------------


def test_dropout_weight_samples_mask_whole_units():
    shapes = {"hidden_0": (4, 6), "hidden_1": (6, 5), "output": (5, 3)}
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        name: {"kernel": jax.random.normal(k, shape), "bias": jnp.zeros(shape[1])}
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }
    samples = posterior_comparison.dropout_weight_samples(jax.random.key(1), params, 0.25, 200)
    np.testing.assert_array_equal(
        samples["hidden_0"]["kernel"], jnp.broadcast_to(params["hidden_0"]["kernel"], (200, 4, 6))
    )
    for layer, units in (("hidden_1", 6), ("output", 5)):
        ratio = samples[layer]["kernel"] / params[layer]["kernel"]
        # every row is scaled by 0 or 1 / (1 - p) as a whole
        row = ratio[:, :, :1]
        np.testing.assert_allclose(ratio, jnp.broadcast_to(row, ratio.shape), rtol=1e-6)
        values = np.unique(np.round(np.asarray(row), 5))
        np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-5)
        kept = float(jnp.mean(row > 0))
        assert abs(kept - 0.75) < 4 * np.sqrt(0.75 * 0.25 / (200 * units))


def _tiny_comparison_config():
    config = posterior_comparison_digits.get_config()
    config.families = ("swag",)
    config.model.hidden_sizes = (16,)
    config.train.num_epochs = 4
    config.reference.num_members = 8
    config.num_samples = 8
    config.num_modes = 2
    config.data.ood_kinds = ("noise",)
    config.laplace.grid = (10.0, 1000.0)
    return config


@pytest.mark.slow
def test_posterior_comparison_end_to_end(tmp_path):
    summary = posterior_comparison.run(_tiny_comparison_config(), str(tmp_path))
    rows = {name: row["mean"] for name, row in summary["rows"].items()}
    assert set(rows) == {"deep_ensemble", "swag/one_mode", "swag/multi_mode"}
    for name, row in rows.items():
        for metric in posterior_comparison.METRICS:
            assert np.isfinite(row[metric]), (name, metric)
        assert row["accuracy"] > 0.7, name
        assert 0.0 <= row["id_mi"] <= np.log(10) and 0.0 <= row["fpr95"] <= 1.0
    halves = rows["deep_ensemble"]
    # one mode is far from an ensemble of independent modes, with or without symmetries
    assert rows["swag/one_mode"]["mmd"] > halves["mmd"] + 0.1
    assert rows["swag/one_mode"]["ns"] > halves["ns"]
    # several modes are closer to the ensemble than one
    assert rows["swag/multi_mode"]["mmd"] < rows["swag/one_mode"]["mmd"]
    # functional diversity: a single SWAG mode has less mutual information than the ensemble
    assert rows["swag/one_mode"]["id_mi"] < halves["id_mi"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 1 + 3  # header and 3 rows
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.__setattr__("families", ("swag", "hmc")), "unknown families"),
        (lambda c: c.__setattr__("num_samples", 7), "multiple of num_modes"),
        (lambda c: c.mmd.__setattr__("aggregate", "median"), "mmd.aggregate"),
        (lambda c: c.laplace.__setattr__("tune_prior", "yes"), "laplace.tune_prior"),
        (lambda c: c.reference.__setattr__("num_members", 2), "at least 4"),
    ],
)
def test_posterior_comparison_rejects_bad_configs(tmp_path, edit, message):
    config = _tiny_comparison_config()
    edit(config)
    with pytest.raises(ValueError, match=message):
        posterior_comparison.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()


# Diagnostic computations -------------------------------------------------------------------------


def _conv_and_dense_params():
    key = jax.random.key(3)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.ones(4)},
        "dense": {"kernel": jax.random.normal(k2, (8, 5)), "bias": jax.random.normal(k3, (5,))},
    }


@pytest.mark.parametrize("vectors", ["zero", "filter"])
def test_filter_normalisation_identity(vectors):
    params = _conv_and_dense_params()
    direction = diagnostic_plots.filter_normalized_direction(
        jax.random.key(0), params, vectors=vectors
    )
    for layer in ("conv", "dense"):
        kernel, step = params[layer]["kernel"], direction[layer]["kernel"]
        axes = tuple(range(kernel.ndim - 1))
        np.testing.assert_allclose(
            jnp.linalg.norm(step.reshape(-1, step.shape[-1]), axis=0),
            jnp.sqrt(jnp.sum(kernel**2, axis=axes)),
            rtol=1e-5,
        )
        assert not np.allclose(step / kernel, (step / kernel).ravel()[0])  # random, not a copy
        bias = direction[layer]["bias"]
        if vectors == "zero":
            np.testing.assert_array_equal(bias, 0.0)
        else:
            np.testing.assert_allclose(
                jnp.linalg.norm(bias), jnp.linalg.norm(params[layer]["bias"]), rtol=1e-5
            )
    with pytest.raises(ValueError, match="vectors"):
        diagnostic_plots.filter_normalized_direction(jax.random.key(0), params, vectors="none")


def test_slices_surfaces_and_sharpness_match_direct_evaluation():
    module = models.mlp([8], num_outputs=3)
    params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 4)))
    inputs = jax.random.normal(jax.random.key(1), (50, 4))
    labels = jax.random.randint(jax.random.key(2), (50,), 0, 3)
    loss = sharpness.make_loss_for_hessian(models.make_apply(module), {}, inputs, labels)
    reference = jax.jit(loss)
    dx = diagnostic_plots.filter_normalized_direction(jax.random.key(3), params)
    dy = diagnostic_plots.filter_normalized_direction(jax.random.key(4), params)
    alphas = jnp.linspace(-1.0, 1.0, 5)
    betas = jnp.array([-0.5, 0.25])

    @jax.jit
    def moved_loss(a, b):
        return loss(jax.tree.map(lambda p, u, v: p + a * u + b * v, params, dx, dy))

    line = diagnostic_plots.loss_slice_1d(loss, params, dx, alphas)
    assert float(line[2]) == pytest.approx(float(reference(params)), rel=1e-6)  # slice at 0
    expected = [float(moved_loss(a, 0.0)) for a in alphas]
    np.testing.assert_allclose(line, expected, rtol=1e-5)
    chunked = diagnostic_plots.loss_slice_1d(loss, params, dx, alphas, batch_size=2)
    np.testing.assert_allclose(chunked, line, rtol=1e-6)

    surface = diagnostic_plots.loss_surface_2d(loss, params, dx, dy, alphas, betas)
    assert surface.shape == (2, 5)
    expected = [[float(moved_loss(a, b)) for a in alphas] for b in betas]
    np.testing.assert_allclose(surface, expected, rtol=1e-5)

    rhos = jnp.array([0.0, 0.05, 0.5])
    curve = diagnostic_plots.sharpness_curve(loss, params, rhos, num_steps=2)
    one_radius = jax.jit(lambda r: sharpness.sam_sharpness(loss, params, r, num_steps=2))
    expected = [float(one_radius(r)) for r in rhos]
    np.testing.assert_allclose(curve, expected, rtol=1e-4, atol=1e-7)
    assert abs(float(curve[0])) < 1e-6 and 0 < float(curve[1]) < float(curve[2])
    with pytest.raises(ValueError, match="non-negative"):
        diagnostic_plots.sharpness_curve(loss, params, jnp.array([-0.1]))
    with pytest.raises(ValueError, match="alphas"):
        diagnostic_plots.loss_slice_1d(loss, params, dx, jnp.array([jnp.nan]))


def test_spectral_density_of_a_quadratic_finds_its_eigenvalues():
    eigenvalues = jnp.array([0.5, 2.0, 2.0, 7.0])

    def loss(w):
        return 0.5 * jnp.sum(eigenvalues * w**2)

    result = diagnostic_plots.hessian_spectral_density(
        jax.random.key(0), loss, jnp.ones(4), num_iterations=3, num_probes=2, grid=64
    )
    np.testing.assert_allclose(jnp.sort(result.nodes, axis=1), [[0.5, 2.0, 7.0]] * 2, rtol=1e-4)
    # The quadrature weights reproduce tr(H)/d on average (Rademacher probes: exactly).
    np.testing.assert_allclose(
        jnp.sum(result.weights * result.nodes, axis=1), jnp.mean(eigenvalues), rtol=1e-4
    )


@pytest.mark.slow
def test_diagnostic_runner_writes_every_plot(tmp_path):
    config = diagnostic_plots.get_config()
    config.num_epochs = 3
    config.hidden_sizes = (16,)
    config.loss_examples = 300
    config.spectrum.num_iterations = 10
    config.spectrum.num_probes = 2
    config.slice.num_points = 11
    config.surface.num_points = 7
    config.rhos = (0.0, 0.01, 0.1, 1.0)
    config.sharpness_steps = 2
    summary = diagnostic_plots.run(config, str(tmp_path))
    for name in ("reliability", "spectrum", "slice_1d", "surface_2d", "sharpness"):
        assert (tmp_path / f"diagnostics_{name}.png").stat().st_size > 0, name
    for name, row in summary["methods"].items():
        assert row["slice_at_zero"] == pytest.approx(row["train_loss"], rel=1e-5), name
        assert min(row["slice_at_edges"]) > row["train_loss"], name  # a minimum along the line
        values = [row["sharpness"][key] for key in ("0.01", "0.1", "1")]
        assert values == sorted(values) and values[0] > 0, name
        assert row["top_eigenvalue"] > 0 and row["test_accuracy"] > 0.7, name
    config.typo = 1
    with pytest.raises(ValueError, match="unknown config keys: typo"):
        diagnostic_plots.run(config, str(tmp_path / "x"))


def test_plots_validate_their_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        diagnostic_plots.plot_slices_1d(str(tmp_path / "a.png"), jnp.arange(2.0), {})
    with pytest.raises(ValueError, match="non-empty dict"):
        diagnostic_plots.plot_reliability(str(tmp_path / "b.png"), {}, jnp.zeros(2, jnp.int32))
    assert not os.path.exists(tmp_path / "a.png")
