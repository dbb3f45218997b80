"""Flat-seeking BNNs on CIFAR-10 with ResNet-20: the accelerator-scale variant.

Needs CIFAR-10 prepared for TFDS (``python -m bnn_flat.data.prepare cifar10 --data_dir DIR``
on a machine with network; then ``--config.data.data_dir=DIR``) and optionally the CIFAR-10-C
corruptions (``cifar10_corrupted/<corruption>_<severity>``) for the shift columns.

Run (one GPU/TPU host; several devices are used by XLA automatically under jit):
  python -m experiments.main --config=experiments/configs/flat_bnn_cifar10_resnet20.py \\
      --workdir=runs/flat_bnn_cifar10 --config.data.data_dir=$TFDS_DATA_DIR

ResNet-20 uses GroupNorm (a normalisation without running statistics, like the FRN
ResNet-20s of the symmetry paper's checkpoint set), so every family shares one model state;
F-BNN's own runs use BatchNorm networks with per-sample statistics re-estimation
(``bnn_flat.posteriors.batchnorm``). Not run here (no CIFAR-10 offline); expect accuracies
around 90% after 200 epochs.
"""

from experiments.configs import flat_bnn_digits


def get_config():
    config = flat_bnn_digits.get_config()
    config.data.name = "cifar10"
    config.data.data_dir = None
    config.data.val_fraction = 0.02
    config.data.corruptions = (
        "cifar10_corrupted/gaussian_noise_3",
        "cifar10_corrupted/gaussian_blur_3",
        "cifar10_corrupted/contrast_3",
    )
    config.model.name = "resnet20"
    config.model.norm = "group"
    config.train.num_epochs = 200
    config.train.batch_size = 128
    config.train.learning_rate = 0.1
    config.train.weight_decay = 5e-4
    config.swag.learning_rate = 0.01
    config.swag.rank = 20
    config.ensemble.num_members = 5
    config.mc_dropout.rate = 0.05
    config.sharpness_examples = 5000
    return config
