"""Entry point: ``python -m train.main --config configs/<recipe>.py --workdir runs/<name>``.

Flags in, ``train_and_evaluate`` out (flax examples/imagenet style). ``--config.<key>=<value>``
overrides a field (unknown keys are rejected); multi-host setup: README, Training.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and samples (resumed if it has them)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    from train.trainer import train_and_evaluate  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
