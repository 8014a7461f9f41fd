"""The paper's ablation study on one recipe: the five ``adreg_jax.models.ABLATIONS`` variants
trained alike, evaluated on the same held-out pairs (and optionally on real brain scans).

    python benchmarks/ablation.py --config configs/brain.py --workdir runs/ablation --steps 2000 \\
        --real-pairs mni_to_scan scan_to_mni
    python benchmarks/ablation.py --config configs/demo.py --workdir runs/ablation_demo \\
        --steps 200 --variants ad-regnet-full u-net-baseline
    python benchmarks/ablation.py --config configs/demo.py --workdir /tmp/ablation_smoke \\
        --steps 2 --image-size 16 16 16 --config.data.val_size=1 --config.data.test_size=4
    # on one GPU, all five at once for 7 minutes, then evaluated on another machine (the
    # README's table: 7 + 4.5 minutes on an H200, cut at step 1200)
    python benchmarks/ablation.py --config configs/brain.py --workdir runs/gpu_ablation_v4 \\
        --minutes 7 --train-only --config.train.learning_rate=1e-3 --config.data.num_workers=3
    python benchmarks/ablation.py --config configs/brain.py --workdir runs/gpu_ablation_v4 \\
        --steps 1200 --checkpoint latest --config.train.learning_rate=1e-3 \\
        --config.data.num_workers=3 --real-pairs mni_to_scan scan_to_mni mni_t2_to_scan \\
        thick_slice

Where this sits: for each variant, the config with that variant's ``config.model`` overrides ->
``training.train_and_evaluate`` in ``WORKDIR/<slug>`` (slugs: ``ad-regnet-full``,
``no-cross-attention``, ``no-regional-attention``, ``no-multi-resolution``, ``u-net-baseline``)
-> ``evaluation.evaluate_run`` on the config's test split (the same generated pairs for every
variant: they come from ``config.data`` and ``config.seed``, not from the run) ->
``evaluation.compare_runs`` (mean (std) per metric, two-sided paired Wilcoxon signed-rank p
against the full model, which comes first) -> with ``--real-pairs``, each variant's network alone
(``adreg-register --checkpoint RUN --instance-steps 0 --keep-network``,
``benchmarks/real_scans.run_adreg``) on
the brain pairs of ``benchmarks/real_scans.py`` (needs ``../shared/data``).

Every variant gets the same config, seed (so the same training batches) and number of steps
(``--steps``, default the config's ``train.max_steps``; early stopping is switched off so that
no variant stops sooner). With ``--minutes M`` instead, the variants train at once, a process
each (``WORKDIR/<slug>/train.log``), for M minutes of wall time; then each is cut back to the last
step that all of them validated and saved, which becomes the number of steps (a small model
leaves one GPU mostly idle, and its data comes from the host's cores). The study is then
finished, evaluated or extended to real pairs elsewhere with ``--steps`` set to that number and the
same overrides (the finished variants are not trained again). ``--train-only`` stops after the
training (with ``--minutes``, after the cut): the accelerator's time goes to training alone.

Config fields are overridden as in train.py (``--config.a.b=value``); ``--image-size D H W``
sets ``config.data.image_size``. A killed study run again with the same command goes on where it
stopped: a variant that finished (``WORKDIR/<slug>/ablation_done.json`` records its config) is
not trained again, one that was interrupted resumes from its last checkpoint
(``train_and_evaluate``; with ``--minutes``, the children stop with the study and the minutes
count again from the restart). Evaluations are always redone (they are deterministic).
A smoke-sized image can make the deepest feature map one region: regional attention is then the
identity and "no regional attention" the full model again (the script prints a note).

Output: one markdown table, variants as rows, the command line that produced it at the top,
printed and written to ``WORKDIR/ablation.md``; ``WORKDIR/ablation.json`` holds every compared
metric (mean, std, p) and the real-pair metrics. Each variant's own evaluation is in
``WORKDIR/<slug>/eval/`` (per-case metrics, as ``eval.py`` writes them); real-pair outputs in
``WORKDIR/real/<pair>/<slug>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import ml_collections

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and benchmarks/

from benchmarks import real_scans  # noqa: E402

REAL_PAIRS = ("mni_to_scan", "scan_to_mni", "oasis_b_to_a", "mni_t2_to_scan", "thick_slice")
# compare_runs keys shown in the table (when the data set has them), with their column names
COLUMNS = {
    "dice": "Dice",
    "dice_17": "Dice (17 structures)",
    "tre_mm": "TRE mm",
    "negative_jacobian_percent": "% det J <= 0",
    "jacobian_std": "det J std",
}
DONE_FILE = "ablation_done.json"


def variant_slug(name: str) -> str:
    """A variant's folder name: "AD-RegNet (full)" -> "ad-regnet-full"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """``path``'s get_config() with train.py-style ``--config.a.b=value`` overrides applied (the
    same ml_collections flag parsing, in a flag registry of its own)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["ablation.py", f"--config={path}", *overrides]
    registry = flags.FlagValues()
    # sys_argv: the override flags are found in this list, not in sys.argv (main(argv) callers)
    config_flags.DEFINE_config_file(
        "config", None, "configs/*.py file", flag_values=registry, sys_argv=argv
    )
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file; expected a configs/*.py file")
    try:
        registry(argv)
    except (flags.Error, AttributeError, KeyError) as error:  # an unknown field, a wrong type
        raise ValueError(
            f"--config {path} {' '.join(overrides)}: not a field of the config or not a valid "
            f"value ({error})"
        ) from error
    return registry.config


def variant_configs(
    config: ml_collections.ConfigDict, variants: list[str]
) -> dict[str, ml_collections.ConfigDict]:
    """Variant name -> ``config`` with that variant's ``config.model`` overrides, in ABLATIONS
    order (the full model first, the reference of the p-values)."""
    from adreg_jax.models import ABLATIONS

    configs = {}
    for name, overrides in ABLATIONS.items():
        if variant_slug(name) not in variants:
            continue
        variant = config.copy_and_resolve_references()
        for field, value in overrides.items():
            if field not in variant.model:
                raise ValueError(f"ABLATIONS[{name!r}] sets model.{field}, which config lacks")
            variant.model[field] = value
        configs[name] = variant
    return configs


def single_region(config: ml_collections.ConfigDict) -> bool:
    """Whether the deepest feature map (image_size / 2^(levels - 1)) is one region of
    ``model.region_size``: regional attention is then the identity (R * w_r - 1 = 0), and its
    ablation the full model again."""
    levels = len(config.model.channels)
    deepest = [math.ceil(int(n) / 2 ** (levels - 1)) for n in config.data.image_size]
    return all(n <= int(r) for n, r in zip(deepest, config.model.region_size, strict=True))


def train_variant(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """Train (or resume) one variant in ``workdir``; "skipped" when a finished run of this very
    config is there already, else "trained"."""
    from adreg_jax.training import train_and_evaluate

    done = workdir / DONE_FILE
    wanted = json.loads(config.to_json_best_effort())
    if done.is_file() and json.loads(done.read_text()).get("config") == wanted:
        return "skipped"
    train_and_evaluate(config, workdir)
    done.write_text(json.dumps({"config": wanted}, indent=2))
    return "trained"


def _evaluated_steps(run: Path) -> list[int]:
    """Steps of ``run`` that were validated and have a finished checkpoint (ascending)."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    validated = set()
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if any(key.startswith("val/") for key in record):
            validated.add(int(record["step"]))
    saved = {int(d.name) for d in (run / "checkpoints").glob("*") if d.name.isdigit()}
    return sorted(validated & saved)


def train_concurrently(argv: list[str], runs: dict[str, Path], minutes: float) -> int:
    """Train every variant at once, each in a process of its own (``--train-only``), for
    ``minutes`` of wall time; then stop them all and cut every run back to the last step that all
    of them validated and saved, which is returned (the study's number of steps).

    Meant for one accelerator that a single small run leaves mostly idle: the variants share it,
    the host's cores make their data. Each run keeps every validated checkpoint meanwhile
    (``train.keep_best`` raised in the children only), so that the common step is still there.
    Logs: ``WORKDIR/<slug>/train.log``."""
    import os
    import signal
    import subprocess
    import time

    env = dict(os.environ)
    # several processes on one GPU: each takes memory as it needs it, not 75 % of the card
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    base = _drop_option_values(argv, ("--variants", "--minutes", "--real-pairs", "--steps"))
    children = {}
    for name, run in runs.items():
        run.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *base,
            "--variants",
            variant_slug(name),
            "--steps",
            str(10**9),
            "--train-only",
            f"--config.train.keep_best={10**6}",
        ]
        log = (run / "train.log").open("a")
        children[name] = (
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            ),
            log,
        )
        print(f"started {name}: {run / 'train.log'}", flush=True)
    # the children run in sessions of their own: stopped with this process however it ends
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        deadline = time.monotonic() + 60.0 * minutes
        while time.monotonic() < deadline and all(c.poll() is None for c, _ in children.values()):
            time.sleep(5.0)
    finally:
        for child, _ in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child, log in children.values():
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    return cut_to_common_step(runs, f"after {minutes} min")


def cut_to_common_step(runs: dict[str, Path], when: str = "") -> int:
    """Cut every run back to the last step that all of them validated and saved: later
    checkpoints are deleted and metrics.jsonl stops there. Returns that step; a ValueError (with
    the logs' ends) when there is none."""
    reached = {name: _evaluated_steps(run) for name, run in runs.items()}
    for name, steps in reached.items():
        print(f"{name}: validated and saved up to step {max(steps, default=0)}", flush=True)
    common = set.intersection(*(set(steps) for steps in reached.values()))
    if not common:
        tails = {}
        for name, run in runs.items():
            log = run / "train.log"
            tails[name] = log.read_text()[-2000:] if log.is_file() else "(no train.log)"
        raise ValueError(
            f"{when}: no step was validated and saved by every variant (see eval_every, "
            f"checkpoint_every); the logs end: {tails}"
        )
    step = max(common)
    for run in runs.values():
        for folder in (run / "checkpoints").glob("*"):
            if folder.name.isdigit() and int(folder.name) > step:
                shutil.rmtree(folder)
        # the cut run's log stops at the common step too
        metrics = run / "metrics.jsonl"
        kept = [
            line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step
        ]
        metrics.write_text("".join(line + "\n" for line in kept))
    return step


def _drop_option_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and the values that follow each (up to the next option)."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("-"):
            skipping = arg.split("=")[0] in options
            if skipping:
                continue
        if not skipping:
            kept.append(arg)
    return kept


def real_pair_metrics(
    runs: dict[str, Path], pair_names: list[str], data: Path, out: Path
) -> dict[str, dict[str, dict]]:
    """Each run's network alone (``--instance-steps 0``) on the real brain pairs:
    {variant: {pair: adreg-register's metrics.json}}."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pairs = real_scans.prepare_pairs(data, inputs, pair_names)
    results: dict[str, dict[str, dict]] = {}
    for name, run in runs.items():
        results[name] = {}
        for pair_name in pair_names:
            metrics = real_scans.run_adreg(
                pairs[pair_name],
                out / pair_name / variant_slug(name),
                str(run),
                [0],
                cache=str(out / "xla_cache"),
                repeat=1,
                flags=["--keep-network"],  # the network's field, whatever it does to the similarity
            )
            results[name][pair_name] = metrics
            print(f"{pair_name}: {name}: {json.dumps(metrics)}", flush=True)
    return results


def _stat_cell(stat: dict[str, Any]) -> str:
    cell = f"{stat['mean']:.4f} ({stat['std']:.4f})"
    return cell if stat.get("p") is None else cell + f", p={stat['p']:.3g}"


def _real_cells(metrics: dict) -> list[str]:
    """Dice GM / WM (mean) (or NCC without labels) and % det J <= 0 of one real pair."""
    dice = metrics.get("dice")
    if dice:
        first = " / ".join(f"{dice[k]:.3f}" for k in sorted(dice))
        first += f" ({metrics['dice_mean']:.3f})"
    else:
        first = f"{metrics['ncc_after']:.3f}"
    return [first, f"{metrics['folding_percent']:.4f}"]


def ablation_table(
    command: str,
    comparison: dict[str, Any],
    real: dict[str, dict[str, dict]],
    cases: int,
    steps: int,
    dataset: str,
) -> str:
    """The study as one markdown table, variants as rows (``comparison``: ``compare_runs``)."""
    metrics = comparison["metrics"]
    keys = [key for key in COLUMNS if key in metrics]
    names = list(next(iter(metrics.values()))) if metrics else list(real)
    reference = names[0]
    header = [COLUMNS[key] for key in keys]
    pair_names = list(next(iter(real.values()))) if real else []
    for pair_name in pair_names:
        dice = real[reference][pair_name].get("dice")
        labels = " / ".join(real_scans.GMWM.get(k, k) for k in sorted(dice or {}))
        first = f"Dice {labels} (mean)" if dice else "NCC"
        header += [f"{pair_name} {first}", f"{pair_name} % det J <= 0"]
    lines = [
        f"`{command}`",
        "",
        "| variant | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for name in names:
        cells = [_stat_cell(metrics[key][name]) for key in keys]
        for pair_name in pair_names:
            cells += _real_cells(real[name][pair_name])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (
        f"\n{steps} training steps per variant, same config and seed. Generated columns: mean "
        f"(std) over the {cases} test pairs of {dataset} (the config's test split); p: two-sided "
        f"paired Wilcoxon signed-rank test against {reference}."
    )
    if pair_names:
        note += (
            " Real pairs (benchmarks/real_scans.py): the network alone (adreg-register "
            "--checkpoint RUN --instance-steps 0 --keep-network), Dice after registration."
        )
    return "\n".join(lines) + "\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    from adreg_jax.models import ABLATIONS

    # Grain's worker processes read absl flags (train.py parses them through absl.app)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    slugs = [variant_slug(name) for name in ABLATIONS]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Any --config.a.b=value is applied to the config as train.py does.",
    )
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--workdir", required=True, help="one run folder per variant goes here")
    parser.add_argument("--steps", type=int, default=None, help="default: train.max_steps")
    parser.add_argument("--image-size", type=int, nargs=3, metavar=("D", "H", "W"))
    parser.add_argument("--variants", nargs="+", choices=slugs, default=slugs)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument(
        "--real-pairs",
        nargs="+",
        choices=REAL_PAIRS,
        default=[],
        help="also run each variant's network alone on these real brain pairs",
    )
    parser.add_argument("--data", default=str(real_scans.DATA), help="the shared real scans")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train all variants at once for this long (one accelerator shared), then cut every "
        "run to the last step all of them validated: that is the study's number of steps",
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train (with --minutes: and cut), then stop; evaluate later with --steps N",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.minutes is not None and args.steps is not None:
        print("error: --minutes decides the steps; leave --steps out", file=sys.stderr)
        return 1
    command = shlex.join(
        ["python", "benchmarks/ablation.py", *(sys.argv[1:] if argv is None else argv)]
    )
    stray = [arg for arg in overrides if arg.startswith("-") and not arg.startswith("--config.")]
    if stray:
        print(
            f"error: unknown arguments {stray}; config fields: --config.a.b=value", file=sys.stderr
        )
        return 1
    data = Path(args.data).resolve()
    if args.real_pairs and real_scans.shared_data(args.data) is None:
        return 1
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from adreg_jax.evaluation import compare_runs, evaluate_run

    workdir = Path(args.workdir)
    try:
        config = load_config(args.config, overrides)
        if args.steps is not None:
            config.train.max_steps = args.steps
        if args.image_size:
            config.data.image_size = tuple(args.image_size)
        config.train.early_stopping_patience = 0
        configs = variant_configs(config, args.variants)
        if next(iter(ABLATIONS)) not in configs:
            print(f"note: no full model; p-values are against {next(iter(configs))}")
        if single_region(config):
            print(
                f"note: at image_size {tuple(config.data.image_size)} the deepest feature map is "
                "one region: regional attention is the identity there"
            )
        runs = {name: workdir / variant_slug(name) for name in configs}
        if args.minutes is not None:
            steps = train_concurrently(sys.argv[1:] if argv is None else argv, runs, args.minutes)
            print(f"== every variant cut to step {steps}", flush=True)
            if args.train_only:
                print(
                    f"trained and cut to step {steps}; evaluate with the same command, --steps "
                    f"{steps} in place of --minutes and without --train-only"
                )
                return 0
            config.train.max_steps = steps
            configs = variant_configs(config, args.variants)
        elif args.train_only:  # also each child of --minutes
            for name, variant in configs.items():
                train_variant(variant, runs[name])
            return 0
        for name, variant in configs.items():
            print(f"== {name}: {runs[name]}", flush=True)
            status = train_variant(variant, runs[name])
            if status == "skipped":
                print(f"{runs[name]} finished already ({DONE_FILE}): not trained again")
        results = {}
        for name in configs:
            results[name] = evaluate_run(config, runs[name], which=args.checkpoint, figures=0)
        comparison = compare_runs(results)
        real = {}
        if args.real_pairs:
            real = real_pair_metrics(runs, args.real_pairs, data, workdir / "real")
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from adreg_jax.training import total_steps

    table = ablation_table(
        command,
        comparison,
        real,
        cases=next(iter(results.values()))["cases"],
        steps=total_steps(config.train),
        dataset=str(config.data.dataset),
    )
    record = {
        "command": command,
        "config": json.loads(config.to_json_best_effort()),
        "runs": {name: str(run) for name, run in runs.items()},
        "generated": comparison["metrics"],
        "real": real,
    }
    (workdir / "ablation.md").write_text(table)
    (workdir / "ablation.json").write_text(json.dumps(record, indent=2))
    print(table)
    print(f"wrote {workdir}/ablation.md and ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
