"""Bayesian transfer learning at accelerator scale: CIFAR-100 10-shot from ImageNet ResNet-18.

The setting of SA-BMA's README (algorithms.md §2.4); see ``transfer_cifar10_resnet18.py``
for the requirements and the differences to the paper's pipeline.

Run (one GPU/TPU host):
  python -m experiments.main --config=experiments/configs/transfer_cifar100_resnet18.py \\
      --workdir=runs/transfer_cifar100 --config.data.data_dir=$TFDS_DATA_DIR \\
      --config.model.pretrained_path=$WEIGHTS/resnet18_imagenet.safetensors

TFDS has no CIFAR-100-C, so the shifted target is the procedural noise/blur shift of the
test set only (add prepared corruption sets with ``--config.data.corruptions``). 1,000
training examples in batches of 256: 450 steps are about SA-BMA's 150 epochs.
"""

from ml_collections import ConfigDict

from experiments.configs import transfer_cifar10_resnet18


def get_config() -> ConfigDict:
    config = transfer_cifar10_resnet18.get_config()
    config.data.name = "cifar100"
    config.data.val_per_class = 20
    config.data.corruptions = ()
    config.train.num_steps = 450
    return config
