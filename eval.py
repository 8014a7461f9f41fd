"""Evaluate a trained run on its test split: a thin entry point over adreg_jax.evaluation.

    python eval.py --config configs/demo.py --workdir runs/demo

Writes WORKDIR/eval/metrics.json, per_case.csv and table.md, and prints the table.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The configs/*.py file of the run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory that train.py wrote.")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from adreg_jax.evaluation import evaluate_run, markdown_table

    try:
        result = evaluate_run(_CONFIG.value, _WORKDIR.value, which=_WHICH.value)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(markdown_table(result["per_case"], result["summary"]))
    print(f"wrote {_WORKDIR.value}/eval/metrics.json, per_case.csv, table.md")


if __name__ == "__main__":
    app.run(main)
