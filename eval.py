"""Evaluate a trained run on its test split: a thin entry point over adreg_jax.evaluation.

    python eval.py --config configs/demo.py --workdir runs/demo
    python eval.py --config configs/demo.py --workdir runs/demo --compare runs/demo_unet
    python eval.py --config configs/demo.py --workdir runs/demo --figures 2
    python eval.py --config configs/demo.py --workdir runs/demo --checkpoint 150  # a kept step
    python eval.py --config configs/brain.py --workdir runs/brain_pretrained --model brain
    python eval.py --config configs/dirlab.py --workdir runs/dirlab \
        --dirlab_runs runs/dirlab_case1,runs/dirlab_case2,...,runs/dirlab_case10

Writes WORKDIR/eval/metrics.json, per_case.csv, table.md (structures.md for IXI), figures/*.png
and, with --compare, compare.md and compare.json (each compared run's own evaluation goes to
WORKDIR/eval/compare/<run name>/; with --checkpoint N all of it under WORKDIR/eval/step_N/); prints
the tables. With --dirlab_runs it evaluates nothing: it reads the eval/metrics.json that each
leave-one-case-out DIR-Lab run already wrote and writes the Table-I-like WORKDIR/dirlab_table.md
(per-case TRE mean (std) before/after in the original mm, landmarks used, the mean over the
cases).
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The configs/*.py file of the run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory that train.py wrote.")
_WHICH = flags.DEFINE_string(
    "checkpoint",
    "best",
    "Which checkpoint: best, latest or a step number (then of every --compare run too; the "
    "results go to WORKDIR/eval/step_N).",
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "A pretrained model of the package (e.g. brain) evaluated in place of the "
    "workdir's checkpoint; the results go to WORKDIR/eval.",
)
_FIGURES = flags.DEFINE_integer("figures", -1, "Cases that get figures: -1 all, 0 none.")
_COMPARE = flags.DEFINE_list(
    "compare", [], "Other run directories (ablations, baselines) evaluated on the same test cases."
)
_DIRLAB_RUNS = flags.DEFINE_list(
    "dirlab_runs", [], "Evaluated DIR-Lab runs (one held-out case each) to gather into one table."
)
flags.mark_flags_as_required(["config", "workdir"])


def _dirlab_table(workdir: Path, runs: list[str]) -> None:
    from adreg_jax.evaluation import dirlab_table

    results = []
    for run in map(Path, runs):
        path = run / "eval" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing; expected eval.py to have evaluated {run}")
        results.append(json.loads(path.read_text()))
    table = dirlab_table(results)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dirlab_table.md").write_text(table)
    print(table)
    print(f"wrote {workdir}/dirlab_table.md")


def _checkpoint(value: str) -> str | int:
    """--checkpoint's value: "best", "latest" or a step number."""
    if value in ("best", "latest"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--checkpoint={value}: expected best, latest or a step number") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from adreg_jax.evaluation import compare_runs, evaluate_run, markdown_table

    workdir = Path(_WORKDIR.value)
    try:
        if _DIRLAB_RUNS.value:
            _dirlab_table(workdir, _DIRLAB_RUNS.value)
            return
        which = _checkpoint(_WHICH.value)
        out = workdir / "eval" if isinstance(which, str) else workdir / "eval" / f"step_{which}"
        result = evaluate_run(
            _CONFIG.value,
            workdir,
            which=which,
            figures=_FIGURES.value,
            out=out,
            pretrained=_MODEL.value,
        )
        print(markdown_table(result["per_case"], result["summary"]))
        print(f"wrote {out}/metrics.json, per_case.csv, table.md, figures/")
        if _COMPARE.value:
            results = {workdir.name: result}
            for other in map(Path, _COMPARE.value):
                name = other.name if other.name not in results else str(other)
                results[name] = evaluate_run(
                    _CONFIG.value, other, which=which, figures=0, out=out / "compare" / other.name
                )
            comparison = compare_runs(results)
            (out / "compare.md").write_text(comparison["table"])
            (out / "compare.json").write_text(json.dumps(comparison["metrics"], indent=2))
            print(comparison["table"])
            print(f"wrote {out}/compare.md and compare.json")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
