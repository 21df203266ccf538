"""Entry point: ``python -m train.main --config configs/<recipe>.py --workdir runs/<name>``.

Kept short on purpose (flax examples/imagenet style): flags in, ``train_and_evaluate`` out.
``--config.<key>=<value>`` overrides any config field; unknown keys are rejected by ml_collections
(the config is locked). Multi-host: ``--config.distributed.initialize=True`` (plus the coordinator
address, process count and id unless the cluster is auto-detected), or set
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` in each process's environment.
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
