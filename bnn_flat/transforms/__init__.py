"""Sharpness-aware and noise transforms, all :class:`optax.GradientTransformationExtraArgs`.

* :mod:`~bnn_flat.transforms.sam`: the generic :func:`sharpness_aware` transform and
  its thin factories :func:`sam`, :func:`asam`, :func:`fisher_sam`; directions;
  m-sharpness helper :func:`make_split_grad_fn`.
* :mod:`~bnn_flat.transforms.rethinking`: :func:`random_sam`, :func:`mix_sam`,
  :func:`vsam` (Ujváry et al., 2022).
* :mod:`~bnn_flat.transforms.bsam`: the bSAM optimizer and its posterior sampler.
* :mod:`~bnn_flat.transforms.langevin`: SGLD noise, SGHMC and cyclical schedules.
* :mod:`~bnn_flat.transforms.sabma`: SA-BMA's Fisher-metric perturbation of a Gaussian
  posterior's parameters (paper form and released-code form).

The extra-args contract (``grad_fn``, ``split_grad_fn``, ``key``) is described in
:mod:`bnn_flat.types` and :mod:`bnn_flat.transforms.sam`.
"""

from bnn_flat.transforms.bsam import BSAMState, bsam, bsam_posterior_scale, bsam_sample
from bnn_flat.transforms.langevin import (
    LangevinNoiseState,
    SGHMCState,
    cyclical_schedule,
    is_sampling_phase,
    langevin_noise,
    sghmc,
)
from bnn_flat.transforms.rethinking import (
    VSAMState,
    mix_sam,
    mix_sam_direction,
    random_sam,
    random_sam_direction,
    vsam,
    vsam_inverse_scale_gradient,
)
from bnn_flat.transforms.sabma import (
    posterior_fisher_inverse_product,
    posterior_fisher_vector_product,
    released_perturbation,
    sabma,
    sabma_direction,
    sabma_released,
)
from bnn_flat.transforms.sam import (
    Direction,
    SharpnessAwareState,
    asam,
    asam_direction,
    fisher_sam,
    fisher_sam_direction,
    make_split_grad_fn,
    normal_like,
    sam,
    sam_direction,
    sharpness_aware,
)

__all__ = [
    # sam.py
    "Direction",
    "SharpnessAwareState",
    "sharpness_aware",
    "sam",
    "asam",
    "fisher_sam",
    "sam_direction",
    "asam_direction",
    "fisher_sam_direction",
    "make_split_grad_fn",
    "normal_like",
    # rethinking.py
    "random_sam",
    "mix_sam",
    "random_sam_direction",
    "mix_sam_direction",
    "VSAMState",
    "vsam",
    "vsam_inverse_scale_gradient",
    # bsam.py
    "BSAMState",
    "bsam",
    "bsam_posterior_scale",
    "bsam_sample",
    # langevin.py
    "LangevinNoiseState",
    "langevin_noise",
    "SGHMCState",
    "sghmc",
    "cyclical_schedule",
    "is_sampling_phase",
    # sabma.py
    "sabma",
    "sabma_direction",
    "sabma_released",
    "released_perturbation",
    "posterior_fisher_vector_product",
    "posterior_fisher_inverse_product",
]
