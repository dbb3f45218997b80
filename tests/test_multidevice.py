"""Multi-device training and BMA: 1 device vs a 4-device CPU mesh.

The 4-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is
imported, so ``tests/_multidevice_worker.py`` runs them in a subprocess and saves the
1-device and 4-device results side by side; the tests below compare them.

Tolerance: the data-parallel gradient is a sum of per-device partial sums followed by an
all-reduce, a different float32 summation order from the single-device sum. After 6 steps
of SAM/momentum on parameters of size O(1) the measured differences are at most 4e-7;
``ATOL = 1e-5`` leaves a 25x margin and is still four orders of magnitude below the effect
of changing the perturbation granularity (SAM vs 2-sharpness differ by 0.1 here), so a run
that perturbed per device instead of per global batch fails.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

from bnn_flat import bma, objectives, sharding, training
from bnn_flat.posteriors import ensemble, point
from tests.conftest import linear_apply

ATOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("multidevice") / "results.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    completed = subprocess.run(
        [sys.executable, "-m", "tests._multidevice_worker", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with np.load(output) as data:
        return {key: data[key] for key in data.files}


def _compare(results, prefix, reference="1dev", other="4dev", atol=ATOL):
    keys = [k for k in results if k.startswith(f"{prefix}/{reference}")]
    assert keys, prefix
    for key in keys:
        np.testing.assert_allclose(
            results[key.replace(f"/{reference}", f"/{other}", 1)],
            results[key],
            atol=atol,
            rtol=0,
            err_msg=key,
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam", "msam2"])
def test_data_parallel_sam_equals_one_device(results, name):
    # Parameters, BatchNorm-like statistics (a mean over the global batch) and the per-epoch
    # loss and accuracy agree; the state stays replicated.
    _compare(results, name)
    assert str(results[f"{name}/4dev/spec"]) == "()"
    assert results[f"{name}/1dev/loss"][-1] < results[f"{name}/1dev/loss"][0]


@pytest.mark.slow
def test_perturbation_is_per_global_batch(results):
    # One SAM perturbation per global batch on 4 devices equals 1-device SAM, and is far
    # from 2-sharpness (two perturbations per batch): the granularity is set by
    # num_sub_batches, not by the device count.
    sam_4 = results["sam/4dev/params['w1']"]
    np.testing.assert_allclose(sam_4, results["sam/1dev/params['w1']"], atol=ATOL)
    assert np.max(np.abs(sam_4 - results["msam2/1dev/params['w1']"])) > 1e3 * ATOL


@pytest.mark.slow
def test_dataset_split_over_devices_gives_same_run(results):
    np.testing.assert_allclose(
        results["msam2/4dev_sharded_dataset/params['w1']"],
        results["msam2/1dev/params['w1']"],
        atol=ATOL,
    )


@pytest.mark.slow
def test_ensemble_with_members_over_devices_equals_one_device(results):
    _compare(results, "ensemble")
    assert str(results["ensemble/4dev/spec"]) == "('members',)"


@pytest.mark.slow
def test_sgld_chains_over_devices_equal_one_device(results):
    # Chains on separate devices: same noise (keys are split per chain, independent of
    # placement) and same sample banks.
    _compare(results, "sgld")
    assert str(results["sgld/4dev/spec"]) == "('members',)"
    chains = results["sgld/1dev/params['w1']"]
    assert np.min(np.abs(chains[0] - chains[1])) > 0  # the chains differ


@pytest.mark.slow
def test_sharded_epoch_compiles_once_and_all_reduces(results):
    assert int(results["compile/traces"]) == 1
    assert int(results["compile/cache_size"]) == 1
    assert bool(results["compile/all_reduce"])


@pytest.mark.slow
def test_shard_map_sam_with_axis_name(results):
    # Per-device gradients (check_vma=False): averaging the incoming gradient before
    # sam(axis_name="data") gives the one-device SAM step; not averaging it gives one
    # perturbation per device, i.e. 4-sharpness on the devices' contiguous slices.
    w0, sam_step = results["shard_map/w0"], results["shard_map/reference_sam"]
    msam_step = results["shard_map/reference_msam4"]
    np.testing.assert_allclose(results["shard_map/average_True_vma_False"], sam_step, atol=1e-6)
    np.testing.assert_allclose(results["shard_map/average_False_vma_False"], msam_step, atol=1e-6)
    assert np.max(np.abs(sam_step - msam_step)) > 2e-4
    # With check_vma=True, JAX sums the gradient of the replicated weights over the axis
    # itself: the transform's pmean is then a no-op and the step is 4x the global one.
    np.testing.assert_allclose(
        results["shard_map/average_False_vma_True"], w0 + 4 * (sam_step - w0), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data", "2d", "members"])
def test_sharded_bma_equals_single_device(results, mesh):
    for part in ("log_probs", "members"):
        np.testing.assert_allclose(
            results[f"bma/{mesh}/{part}"], results[f"bma/1dev/{part}"], atol=1e-5, rtol=0
        )
    assert results["bma/1dev/members"].shape == (6, 50, 3)


@pytest.mark.slow
def test_sharded_regression_and_posterior_predictive(results):
    _compare(results, "bma_regression", atol=1e-5)
    _compare(results, "bma_ensemble", atol=1e-5)


# In-process checks (one device): error messages and the one-device mesh.


def _family():
    loss_fn = objectives.classification_loss(linear_apply, num_data=8)
    family = point.build(loss_fn, optax.sgd(0.1))
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    return family, family.init(params, {})


def _data():
    return jax.random.normal(jax.random.key(0), (8, 2)), jnp.arange(8) % 3


def test_batch_size_not_divisible_by_data_axis_is_rejected():
    family, state = _family()
    mesh = AbstractMesh((4,), ("data",))
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 'data'"):
        training.fit(
            jax.random.key(0), family, state, _data(), num_epochs=1, batch_size=6, mesh=mesh
        )
    with pytest.raises(ValueError, match="batch_size 6 is not divisible"):
        training.make_epoch_fn(family, 6, mesh=mesh)
    sharding.check_batch_size(8, mesh)


def test_members_not_divisible_by_member_axis_are_rejected():
    family, _ = _family()
    deep = ensemble.build(family)
    state = deep.init({"w": jnp.zeros((3, 2, 3)), "b": jnp.zeros((3, 3))}, {})
    mesh = AbstractMesh((2, 1), ("members", "data"))
    with pytest.raises(ValueError, match="members/chains/samples 3 is not divisible"):
        training.fit(jax.random.key(0), deep, state, _data(), num_epochs=1, batch_size=4, mesh=mesh)
    with pytest.raises(ValueError, match="member_batches 3 is not divisible"):
        training.make_epoch_fn(deep, 4, member_batches=3, mesh=mesh)


def test_make_mesh_validates_its_arguments():
    with pytest.raises(ValueError, match="only 1 devices"):
        sharding.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="distinct"):
        sharding.make_mesh(1, ("data", "data"))
    with pytest.raises(ValueError, match="differ in length"):
        sharding.make_mesh(1, ("members", "data"), (1,))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(1, ("members", "data"), (-1, -1))
    with pytest.raises(ValueError, match="num_devices"):
        sharding.make_mesh(0)
    mesh = sharding.make_mesh(1, ("members", "data"), (1, -1))
    assert dict(mesh.shape) == {"members": 1, "data": 1}
    assert sharding.axis_size(mesh, "model") == 1


def test_one_device_mesh_gives_the_single_device_run_bit_for_bit():
    family, state = _family()
    key = jax.random.key(3)
    plain = training.fit(key, family, state, _data(), num_epochs=2, batch_size=4, progress=False)
    meshed = training.fit(
        key,
        family,
        state,
        _data(),
        num_epochs=2,
        batch_size=4,
        progress=False,
        mesh=sharding.make_mesh(1),
    )
    np.testing.assert_array_equal(meshed.state.params["w"], plain.state.params["w"])
    assert meshed.history[-1]["loss"] == plain.history[-1]["loss"]
    # The caller's state is not donated away.
    assert float(jnp.sum(state.params["w"])) == 0.0


def test_bma_with_a_one_device_mesh_and_bad_strategy():
    samples = {"w": jax.random.normal(jax.random.key(1), (3, 2, 3)), "b": jnp.zeros((3, 3))}
    inputs = jax.random.normal(jax.random.key(2), (5, 2))

    def predict_fn(sample, x):
        return linear_apply(sample, {}, x, train=False, key=None)[0]

    mesh = sharding.make_mesh(1, ("members", "data"))
    expected = bma.predict(predict_fn, samples, inputs, strategy="map")
    np.testing.assert_allclose(
        bma.predict(predict_fn, samples, inputs, mesh=mesh), expected, atol=1e-6
    )
    with pytest.raises(ValueError, match="strategy"):
        bma.predict(predict_fn, samples, inputs, mesh=mesh, strategy="loop")
    with pytest.raises(ValueError, match="example axis"):
        bma.predict(predict_fn, samples, inputs[:0], mesh=mesh)


def test_global_batch_from_local_equals_shard_batch_on_one_process():
    mesh = sharding.make_mesh(1)
    local = np.arange(12.0).reshape(6, 2)
    stitched = sharding.global_batch_from_local(local, mesh)
    np.testing.assert_array_equal(stitched, local)
    assert stitched.sharding == sharding.shard_batch(jnp.asarray(local), mesh).sharding
    with pytest.raises(ValueError, match="cannot shard axis 1"):
        sharding.shard_batch(jnp.zeros(3), mesh, axis=1)
