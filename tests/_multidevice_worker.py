"""Runs training and BMA on one device and on a 4-device CPU mesh; saves both to an ``.npz``.

Run by ``tests/test_multidevice.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX is
imported). Usage: ``python -m tests._multidevice_worker OUTPUT.npz``. Importing this module
does nothing (pytest imports it for doctests).
"""

from __future__ import annotations

import sys

__all__: list[str] = []


def _run(output_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bnn_flat import bma, objectives, sharding, training, transforms
    from bnn_flat.posteriors import ensemble, point, sgmcmc
    from bnn_flat.types import Posterior

    if jax.device_count() != 4:
        raise RuntimeError(f"expected 4 devices, got {jax.device_count()}.")
    out: dict[str, np.ndarray] = {}

    def save(prefix, tree):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)

    def save_history(prefix, history):
        out[prefix + "/loss"] = np.array([r["loss"] for r in history])
        out[prefix + "/accuracy"] = np.array([r["accuracy"] for r in history])

    # Three Gaussian blobs in 2-D; 96 examples, so batches of 32 split into 4 x 8.
    key = jax.random.key(0)
    centres = jnp.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = jnp.repeat(jnp.arange(3), 32).astype(jnp.int32)
    inputs = centres[labels] + 0.8 * jax.random.normal(key, (96, 2))

    def mlp_apply(params, model_state, x, *, train, key):
        del key
        h = x @ params["w1"] + params["b1"]
        if train:  # batch-norm-like centring: a statistic of the whole (global) batch
            mean = h.mean(axis=0)
            model_state = {"mean": 0.9 * model_state["mean"] + 0.1 * mean}
        else:
            mean = model_state["mean"]
        return jnp.tanh(h - mean) @ params["w2"], model_state

    def init_params(k):
        k1, k2 = jax.random.split(k)
        return {
            "w1": jax.random.normal(k1, (2, 16)),
            "b1": jnp.zeros(16),
            "w2": 0.3 * jax.random.normal(k2, (16, 3)),
        }

    loss_fn = objectives.classification_loss(mlp_apply, num_data=96, prior_precision=1.0)
    model_state = {"mean": jnp.zeros(16)}
    mesh_data = sharding.make_mesh(4)  # ("data",): 4
    mesh_2d = sharding.make_mesh(4, ("members", "data"), (2, 2))
    mesh_members = sharding.make_mesh(4, ("members",))
    fit_key = jax.random.key(1)

    def fit(family, state, mesh, **kwargs):
        return training.fit(
            fit_key,
            family,
            state,
            (inputs, labels),
            num_epochs=2,
            batch_size=32,
            progress=False,
            mesh=mesh,
            **kwargs,
        )

    # 1. Point + SAM (one perturbation per global batch of 32), and m-sharpness with m = 2
    # (sub-batches of 16, each spread over two of the four devices).
    for name, num_sub_batches in (("sam", None), ("msam2", 2)):
        tx = optax.chain(
            transforms.sam(0.5, num_sub_batches=num_sub_batches), optax.sgd(0.3, momentum=0.9)
        )
        family = point.build(loss_fn, tx)
        state = family.init(init_params(jax.random.key(2)), model_state)
        for label, mesh in (("1dev", None), ("4dev", mesh_data)):
            result = fit(family, state, mesh)
            save(f"{name}/{label}/params", result.state.params)
            save(f"{name}/{label}/model_state", result.state.model_state)
            save_history(f"{name}/{label}", result.history)
            if mesh is not None:
                out[f"{name}/4dev/spec"] = np.array(
                    str(tuple(result.state.params["w1"].sharding.spec))
                )
    # The training set split over the devices instead of replicated.
    result = fit(family, state, mesh_data, shard_dataset=True)
    save("msam2/4dev_sharded_dataset/params", result.state.params)

    # 2. A deep ensemble of 4 members with independent data orders, members over "members".
    tx = optax.chain(transforms.sam(0.5), optax.sgd(0.3, momentum=0.9))
    family = ensemble.build(point.build(loss_fn, tx), independent_batches=True)
    member_params = jax.vmap(init_params)(jax.random.split(jax.random.key(3), 4))
    member_states = jax.tree.map(lambda x: jnp.stack([x] * 4), model_state)
    state = family.init(member_params, member_states)
    for label, mesh in (("1dev", None), ("4dev", mesh_2d)):
        result = fit(family, state, mesh, member_batches=4)
        save(f"ensemble/{label}/params", result.state.params)
        save_history(f"ensemble/{label}", result.history)
    out["ensemble/4dev/spec"] = np.array(str(tuple(result.state.params["w1"].sharding.spec)))
    ensemble_state = result.state

    # 3. SGLD with 4 chains, chains over "members" (each device runs one chain).
    sgld = sgmcmc.sgld(
        loss_fn, learning_rate=0.02, num_data=96, temperature=1.0, num_samples_max=4, thin=2
    )
    chains = ensemble.build(sgld)
    state = chains.init(member_params, member_states)
    for label, mesh in (("1dev", None), ("4dev", mesh_members)):
        result = fit(chains, state, mesh)
        save(f"sgld/{label}/params", result.state.params)
        save(f"sgld/{label}/samples", result.state.members.samples)
        save_history(f"sgld/{label}", result.history)
    out["sgld/4dev/spec"] = np.array(str(tuple(result.state.members.samples["w1"].sharding.spec)))

    # 4. Compile once on the sharded path: a trace counter on update and the jit cache.
    traces = [0]

    def counting_update(key, state, batch):
        traces[0] += 1
        return base.update(key, state, batch)

    base = point.build(loss_fn, optax.chain(transforms.sam(0.5), optax.sgd(0.3)))
    counted = Posterior(base.init, counting_update, base.sample, base.log_prob)
    state = sharding.place_state(
        counted.init(init_params(jax.random.key(2)), model_state), mesh_data
    )
    epoch_fn = training.make_epoch_fn(
        counted, 32, mesh=mesh_data, state_sharding=sharding.state_sharding(state, mesh_data)
    )
    data = sharding.replicate((inputs, labels), mesh_data)
    for epoch in range(3):
        state, _ = epoch_fn(state, jax.random.fold_in(fit_key, epoch), *data)
    out["compile/traces"] = np.array(traces[0])
    out["compile/cache_size"] = np.array(epoch_fn._cache_size())
    # The per-device program splits the batch: the gradient needs an all-reduce.
    compiled = epoch_fn.lower(state, fit_key, *data).compile().as_text()
    out["compile/all_reduce"] = np.array("all-reduce" in compiled)

    # 5. Explicit shard_map code with sam(axis_name="data"): one SAM step on a linear
    # softmax model. With check_vma=False (per-device gradients, as under pmap), averaging
    # the incoming gradient gives the global perturbation (as on one device) and not
    # averaging it gives one perturbation per device (4-sharpness). With check_vma=True JAX
    # itself sums the gradients of replicated parameters over the axis.
    from jax.sharding import PartitionSpec

    def linear_loss(w, batch):
        log_probs = jax.nn.log_softmax(batch["inputs"] @ w)
        return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], 1))

    w0 = 0.5 * jax.random.normal(jax.random.key(8), (2, 3))
    batch = {"inputs": inputs[:32], "labels": labels[:32]}

    def one_step(tx, w, batch, average_incoming):
        grad_fn = jax.grad(lambda p: linear_loss(p, batch))
        grads = grad_fn(w)
        if average_incoming:
            grads = jax.lax.pmean(grads, "data")
        updates, _ = tx.update(grads, tx.init(w), w, grad_fn=grad_fn)
        return w + updates

    sam_tx = optax.chain(transforms.sam(0.5, axis_name="data"), optax.sgd(1.0))
    for average, check_vma in ((True, False), (False, False), (False, True)):
        step = jax.shard_map(
            lambda w, b, average=average: one_step(sam_tx, w, b, average),
            mesh=mesh_data,
            in_specs=(PartitionSpec(), PartitionSpec("data")),
            out_specs=PartitionSpec(),
            check_vma=check_vma,
        )
        name = f"shard_map/average_{average}_vma_{check_vma}"
        out[name] = np.asarray(jax.jit(step)(w0, batch))
    out["shard_map/w0"] = np.asarray(w0)
    plain = optax.chain(transforms.sam(0.5), optax.sgd(1.0))
    grad_fn = jax.grad(lambda p: linear_loss(p, batch))
    updates, _ = plain.update(grad_fn(w0), plain.init(w0), w0, grad_fn=grad_fn)
    out["shard_map/reference_sam"] = np.asarray(w0 + updates)
    msam = optax.chain(transforms.sam(0.5, num_sub_batches=4), optax.sgd(1.0))
    split_grad_fn = transforms.make_split_grad_fn(
        lambda p, sub_batch, index: jax.grad(lambda q: linear_loss(q, sub_batch))(p), batch
    )
    updates, _ = msam.update(
        grad_fn(w0), msam.init(w0), w0, grad_fn=grad_fn, split_grad_fn=split_grad_fn
    )
    out["shard_map/reference_msam4"] = np.asarray(w0 + updates)

    # 6. BMA: 6 samples (not divisible by 4) on 50 inputs (not divisible by 4).
    samples = jax.vmap(init_params)(jax.random.split(jax.random.key(4), 6))
    test_inputs = jax.random.normal(jax.random.key(5), (50, 2))
    fn = bma.model_predict_fn(mlp_apply, {"mean": 0.1 * jnp.ones(16)})
    log_probs, members = bma.predict(fn, samples, test_inputs, return_members=True)
    out["bma/1dev/log_probs"], out["bma/1dev/members"] = np.asarray(log_probs), np.asarray(members)
    for mesh_name, mesh, strategy in (
        ("data", mesh_data, "map"),
        ("2d", mesh_2d, "vmap"),
        ("members", mesh_members, "map"),
    ):
        log_probs, members = bma.predict(
            fn, samples, test_inputs, return_members=True, mesh=mesh, strategy=strategy
        )
        out[f"bma/{mesh_name}/log_probs"] = np.asarray(log_probs)
        out[f"bma/{mesh_name}/members"] = np.asarray(members)

    def regression_fn(sample, x):
        outputs = fn(sample, x)
        return outputs, jnp.exp(0.1 * outputs)

    targets = jax.random.normal(jax.random.key(6), (50, 3))
    for label, mesh in (("1dev", None), ("4dev", mesh_2d)):
        save(
            f"bma_regression/{label}",
            bma.predict_regression(regression_fn, samples, test_inputs, targets, mesh=mesh),
        )
    for label, mesh in (("1dev", None), ("4dev", mesh_2d)):
        log_probs, members = bma.posterior_predictive(
            jax.random.key(7),
            family,
            ensemble_state,
            mlp_apply,
            test_inputs,
            num_samples=1,
            mesh=mesh,
        )
        out[f"bma_ensemble/{label}/log_probs"] = np.asarray(log_probs)

    np.savez(output_path, **out)


if __name__ == "__main__":
    _run(sys.argv[1])
