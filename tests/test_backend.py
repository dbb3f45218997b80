"""The XLA:CPU tuning of bnn_flat.backend: when it applies, and that it changes no numbers.

Each case runs in a fresh interpreter, because XLA reads ``XLA_FLAGS`` once per process.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import backend, models
from bnn_flat.models import conv

_STATUS = "import json, bnn_flat; print(json.dumps(bnn_flat.backend.status()))"


def _run(code: str, **env_changes: str | None) -> dict:
    env = dict(os.environ)
    env.pop("BNN_FLAT_CPU_TUNING", None)
    env["XLA_FLAGS"] = ""
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_flag_before_the_first_computation():
    status = _run(_STATUS)
    assert status["applied"] is True
    assert status["xla_flags"].split() == list(backend.CPU_FLAGS)


def test_flag_is_appended_to_existing_xla_flags():
    status = _run(_STATUS, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert status["applied"] is True
    assert status["xla_flags"].split() == [
        "--xla_force_host_platform_device_count=2",
        *backend.CPU_FLAGS,
    ]


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_environment_variable_disables_tuning(value):
    status = _run(_STATUS, BNN_FLAT_CPU_TUNING=value)
    assert status["applied"] is False
    assert "disabled" in status["reason"]
    assert status["xla_flags"] == ""


def test_users_own_choice_of_the_option_wins():
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
    status = _run(_STATUS, XLA_FLAGS=mine)
    assert status["applied"] is False
    assert status["xla_flags"] == mine
    options = _run(
        "import json, bnn_flat; print(json.dumps(bnn_flat.backend.compiler_options()))",
        XLA_FLAGS=mine,
    )
    assert options == {}


def test_backend_used_before_import_falls_back_to_compiler_options():
    code = (
        "import json, jax, jax.numpy as jnp; jnp.ones(1).block_until_ready();"
        "import bnn_flat;"
        "print(json.dumps({'status': bnn_flat.backend.status(),"
        " 'options': bnn_flat.backend.compiler_options()}))"
    )
    result = _run(code)
    assert result["status"]["applied"] is False
    assert "initialised" in result["status"]["reason"]
    assert result["options"] == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def test_compiler_options_are_accepted_by_xla():
    # the option name and enum values must exist in this jaxlib (a typo would raise here)
    options = {backend._OPTION: backend._COMPILE_OPTION_VALUE}
    x = jnp.arange(12.0).reshape(3, 4)
    out = jax.jit(lambda a: jnp.sum(a @ a.T, axis=0), compiler_options=options)(x)
    np.testing.assert_allclose(out, np.sum(np.asarray(x) @ np.asarray(x).T, axis=0))


def test_tuned_and_default_kernels_give_the_same_resnet_gradient():
    """The tuned program (XLA's convolution) matches jaxlib's default one to float32 accuracy."""
    # XLA's own convolutions (the oneDNN custom call would bypass the kernels compared here)
    xla_conv = functools.partial(conv.Conv, implementation="canonical")
    module = models.ResNet(stage_sizes=(1, 1), num_classes=10, width=8, norm="group", conv=xla_conv)
    inputs = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    params, state = models.init(module, jax.random.key(1), inputs[:1])
    apply_fn = models.make_apply(module)

    def loss(p):
        logits, _ = apply_fn(p, state, inputs, train=True, key=None)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

    grad = jax.grad(loss)
    tuned = jax.jit(grad, compiler_options={backend._OPTION: backend._COMPILE_OPTION_VALUE})
    default = jax.jit(
        grad,
        compiler_options={
            backend._OPTION: "LIBRARY_FUSION_TYPE_DOT,"
            "LIBRARY_FUSION_TYPE_REDUCE,"
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        },
    )
    for a, b in zip(jax.tree.leaves(tuned(params)), jax.tree.leaves(default(params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
