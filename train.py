"""Train AD-RegNet: a thin entry point over adreg_jax.training.train_and_evaluate.

    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/ixi.py --workdir runs/ixi --config.train.learning_rate=1e-4

Running the same command again resumes from the last checkpoint in --workdir. SIGTERM or Ctrl-C
stops the run after the step under way and saves it (exit code 128 + the signal's number);
--config.train.max_minutes=M stops it after M minutes the same way (exit code 0).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from adreg_jax.training import TrainingInterrupted, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except TrainingInterrupted as stop:  # saved, said so: the shell's code for that signal
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    app.run(main)
