"""Helpers shared by the posterior families (not public API)."""

from __future__ import annotations

import jax

from bnn_flat.types import Batch, LossFn, ModelState, PRNGKey

_PERTURBED_DROPOUT = ("fresh", "same")


def check_perturbed_dropout(value: str) -> str:
    if value not in _PERTURBED_DROPOUT:
        raise ValueError(f"perturbed_dropout must be one of {_PERTURBED_DROPOUT}, got {value!r}.")
    return value


def make_grad_fn(
    loss_fn: LossFn,
    model_state: ModelState,
    batch: Batch,
    key: PRNGKey,
    perturbed_dropout: str = "fresh",
):
    """The ``grad_fn`` extra argument: gradient of the same objective on the same batch.

    The returned function never updates the model state (BatchNorm statistics stay those of
    the clean pass). With ``perturbed_dropout="fresh"`` every call draws a new dropout mask
    (folded from ``key`` and a call counter captured at trace time); with ``"same"`` it reuses
    the clean pass's mask.
    """
    counter = [0]

    def grad_fn(params):
        counter[0] += 1
        call_key = key if perturbed_dropout == "same" else jax.random.fold_in(key, counter[0])
        return jax.grad(lambda p: loss_fn(p, model_state, batch, call_key)[0])(params)

    return grad_fn


def make_split_grad_fn(
    loss_fn: LossFn,
    model_state: ModelState,
    batch: Batch,
    key: PRNGKey,
    perturbed_dropout: str = "fresh",
):
    """The ``split_grad_fn`` extra argument (m-sharpness): per-sub-batch gradients, vmapped.

    Sub-batch ``j`` uses the dropout key ``fold_in(key, j)`` (and, with ``"fresh"``, a new
    fold per call). BatchNorm statistics are never updated.
    """
    from bnn_flat.transforms import make_split_grad_fn as _split

    counter = [0]

    def split_grad_fn(stacked_params):
        counter[0] += 1
        call_key = key if perturbed_dropout == "same" else jax.random.fold_in(key, counter[0])

        def batch_grad_fn(params, sub_batch, index):
            sub_key = jax.random.fold_in(call_key, index)
            return jax.grad(lambda p: loss_fn(p, model_state, sub_batch, sub_key)[0])(params)

        return _split(batch_grad_fn, batch)(stacked_params)

    return split_grad_fn
