"""Entry point: ``python -m train.main --config configs/<recipe>.py --workdir runs/<name>``.

Flags in, ``train_and_evaluate`` out (flax examples/imagenet style). ``--config.<key>=<value>``
overrides a field (unknown keys are rejected); multi-host setup: README, Training. A bad input file
under ``config.input.bad_examples="error"`` ends the run with one line on stderr (the file, the
split, the step, how to resume) and exit status 1, not a traceback.
"""

from __future__ import annotations

import sys

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
    from train.data.bad_examples import BadExampleError
    from train.trainer import train_and_evaluate  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except BadExampleError as err:  # the user's data, not a bug: the message says it all
        print(f"train.main: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
