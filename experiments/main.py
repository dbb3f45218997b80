"""Command-line entry point of the experiments.

Usage:
  python -m experiments.main --config=experiments/configs/default.py --workdir=runs/default
  python -m experiments.main --config=experiments/configs/default.py --workdir=/tmp/x \\
      --config.train.num_epochs=5 --config.methods="('map',)"

Any config field can be overridden with ``--config.<path>=<value>``; unknown fields are
rejected before anything runs.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import importlib

    config = _CONFIG.value
    # A config may name its runner module in experiments/ (default: the main job).
    runner = importlib.import_module(f"experiments.{config.get('runner', 'train')}")
    runner.run(config, _WORKDIR.value)


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
