"""Flat-seeking BNNs at CPU scale: each family and its flat (SAM) version, 3 seeds.

Run:
  python -m experiments.main --config=experiments/configs/flat_bnn_digits.py \\
      --workdir=runs/flat_bnn_digits

About 10 minutes on 2 CPU cores (36 trainings of an MLP on the embedded digits). Prints one
line per method and writes ``results.md`` (mean ± std over seeds of accuracy, NLL, ECE,
Brier, shifted-set NLL, OOD AUROC and the one-step SAM sharpness of posterior samples).
Expected: every flat version has lower sharpness than its baseline; NLL/ECE differences are
within a seed's spread for most families (see the README for the measured table).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.runner = "flat_bnn"
    config.seeds = (0, 1, 2)
    config.data_seed = 0
    config.families = ("swag", "swag_diag", "mc_dropout", "deep_ensemble", "sgld", "mfvi")

    config.data = ConfigDict()
    config.data.name = "digits"  # or a prepared TFDS name (see the CIFAR-10 config)
    config.data.data_dir = None
    config.data.val_fraction = 0.15
    config.data.test_fraction = 0.25
    config.data.shift_kinds = ("rotation", "noise", "blur")
    config.data.shift_severities = (3,)

    config.model = ConfigDict()
    config.model.name = "mlp"  # mlp | resnet20 (norm without running statistics)
    config.model.hidden_sizes = (128, 128)
    config.model.norm = "group"
    config.sharpness_examples = 2000  # training examples in the sharpness loss

    config.train = ConfigDict()
    config.train.num_epochs = 40
    config.train.batch_size = 64
    config.train.learning_rate = 0.05
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4

    config.sam = ConfigDict()
    config.sam.rho = 0.05

    config.bma = ConfigDict()
    config.bma.num_samples = 30

    config.swag = ConfigDict()  # F-BNN: rank 20, scales 0.1 (full) and 0.2 (diagonal)
    config.swag.learning_rate = 0.02  # constant SWAG learning rate
    config.swag.start_fraction = 0.5  # collect once per epoch over the last half
    config.swag.rank = 10
    config.swag.scale = 0.1
    config.swag.diag_scale = 0.2

    config.mc_dropout = ConfigDict()
    config.mc_dropout.rate = 0.1

    config.ensemble = ConfigDict()
    config.ensemble.num_members = 3

    config.sgld = ConfigDict()
    config.sgld.learning_rate = 0.05
    config.sgld.temperature = 0.01  # SA-BMA's SGLD baseline temperature
    config.sgld.burn_in_fraction = 0.5

    config.vi = ConfigDict()
    config.vi.temperature = 0.1
    config.vi.init_std = 1e-3
    return config
