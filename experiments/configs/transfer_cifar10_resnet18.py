"""Bayesian transfer learning at accelerator scale: CIFAR-10 10-shot from ImageNet ResNet-18.

Needs CIFAR-10 prepared for TFDS (``python -m bnn_flat.data.prepare cifar10 --data_dir DIR``
on a machine with network), optionally the CIFAR-10-C corruptions for ``data.corruptions``
(``cifar10_corrupted/<corruption>_<severity>``), and torchvision's ImageNet ResNet-18 weights
converted to ``.safetensors`` (see docs/pretrained.md). Without the weight file the run stops
before loading any data.

Run (one GPU/TPU host):
  python -m experiments.main --config=experiments/configs/transfer_cifar10_resnet18.py \\
      --workdir=runs/transfer_cifar10 --config.data.data_dir=$TFDS_DATA_DIR \\
      --config.model.pretrained_path=$WEIGHTS/resnet18_imagenet.safetensors

Follows SA-BMA's README (algorithms.md §2.4) where the pipeline allows: 10 shots per class,
trainable BatchNorm + ``fc`` (BatchNorm statistics kept at the ImageNet values), SWAG rank 5,
30-sample BMA, SA-BMA rho 0.5. Differences: images stay at 32x32 (SA-BMA resizes to 224 and
augments), the prior is an isotropic-plus-random-low-rank Gaussian at the pretrained weights
(SA-BMA's ImageNet SWAG moments are not distributed), and steps are counted instead of
epochs (150 epochs of one 100-example batch). The shifted target is the procedural
noise/blur shift of the test set plus the listed CIFAR-10-C sets. Not run here (no data or
weights offline); smoke-tested on TFDS mock data with a random weight file.
``transfer_cifar100_resnet18.py`` is the CIFAR-100 variant.
"""

from ml_collections import ConfigDict

from experiments.configs import transfer_digits


def get_config() -> ConfigDict:
    config = transfer_digits.get_config()
    config.shots = (10,)
    config.data.name = "cifar10"
    config.data.data_dir = None
    config.data.source_classes = ()
    config.data.target_classes = ()  # all ten classes
    config.data.val_per_class = 50
    config.data.shift_kinds = ("noise", "blur")
    config.data.shift_severity = 3
    config.data.shift_value_range = 4.0  # [0, 1] pixels standardised by a std of about 0.25
    config.data.corruptions = (
        "cifar10_corrupted/gaussian_noise_3",
        "cifar10_corrupted/gaussian_blur_3",
        "cifar10_corrupted/contrast_3",
    )
    config.model.name = "resnet18"
    config.model.width = 64
    config.model.stage_sizes = (2, 2, 2, 2)
    config.model.pretrained_path = ""  # required: torchvision ResNet-18 ImageNet weights
    config.prior.kind = "isotropic"
    config.prior.std = 1e-2
    config.prior.factor_std = 1e-2
    config.train.num_steps = 150
    config.train.batch_size = 256
    config.sabma.learning_rate = 5e-2  # SA-BMA README
    config.sharpness.num_samples = 5
    config.sharpness.num_iterations = 20
    config.sharpness.max_examples = 1000
    config.eval_batch_size = 1000
    return config
