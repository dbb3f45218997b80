"""Laurent et al.'s symmetry toy (figure 1): 10,000 vmapped 2-2-1 MLPs, canonicalised.

Run:
  python -m experiments.main --config=experiments/configs/symmetry_toy.py \\
      --workdir=runs/symmetry_toy

About 15 s on 2 CPU cores. Writes ``symmetry_toy.png`` (last-layer weights raw, after
scaling removal, after permutation removal), ``summary.json`` and ``results.md``.
Expected: every canonicalised network computes the original function (worst MSE < 1e-4), and
after permutation removal 100% of the points lie on one side of the diagonal.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.runner = "symmetry_toy"
    config.seed = 0
    config.plot = True
    config.plot_limit = config_dict.placeholder(
        float
    )  # half-width of the panels; None: 99% of the points per panel

    config.data = ConfigDict()
    config.data.num_per_class = 200
    config.data.separation = 1.0
    config.data.std = 0.5

    config.train = ConfigDict()
    config.train.num_networks = 10_000
    config.train.learning_rate = 2.0
    config.train.batch_size = 10
    config.train.num_epochs = 10
    config.train.max_loss = 0.01  # keep runs whose last-epoch mean loss is at most this

    config.canonical = ConfigDict()
    config.canonical.scaling = "row_norm"  # or "min_mass"
    config.canonical.row_norm = 3.0  # the paper's toy value
    config.canonical.permutation = "outgoing"  # sort by the output weights (the toy's form)
    config.canonical.library_key = "max"  # canonicalize_permutation's key, shown alongside

    config.check = ConfigDict()
    config.check.num_inputs = 256
    config.check.max_mse = 1e-4
    return config
