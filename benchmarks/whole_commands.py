"""Whole ``adreg-register`` commands as a user runs them: wall time from the shell and accuracy.

    python benchmarks/whole_commands.py                                  # the four pairs below
    python benchmarks/whole_commands.py --pairs scan_to_mni --runs 5
    python benchmarks/whole_commands.py --pairs mni_to_scan scan_to_mni mni_t2_to_scan \\
        --runs 1 --flags="--instance-steps 0 --no-png"                  # the affine stage alone

Each run is the console script in a fresh process (Python start-up, imports, reading, the
registration, writing every output and the PNG), with the flags ``real_scans.py`` passes for
the pair (points for the lungs, ``--affine`` and the GM/WM label maps for the brains) and a
compilation cache that a first, untimed, run fills. Printed per pair: each run's wall time, the
last run's ``time_register_s`` (the images in memory to the final field), its Dice or TRE and
its folding. The inputs are those of ``real_scans.py`` (needs ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_scans import (
    DATA,
    PAIRS,
    pair_argv,
    prepare_pairs,
    shared_data,
)
from registration_outputs import command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument(
        "--pairs", nargs="+", default=["lung", "mni_to_scan", "scan_to_mni", "lung_dirlab"]
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per pair")
    parser.add_argument("--flags", default="", help="more adreg-register flags, one string")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.pairs) - set(PAIRS))
    if unknown:
        print(f"error: unknown pairs {unknown}; known: {list(PAIRS)}", file=sys.stderr)
        return 1
    data = shared_data(args.data)
    if data is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="whole_commands_") as work:
        work = Path(work)
        pairs = prepare_pairs(data, work, args.pairs)
        print("| pair | wall s | registration s | accuracy | % det J <= 0 |")
        print("|---|---|---|---|---|")
        for name in args.pairs:
            argv = [*pair_argv(pairs[name]), "--out", str(work / "out" / name)]
            argv += ["--cache-dir", str(work / "cache"), "--quiet", *shlex.split(args.flags)]
            times = []
            for run in range(args.runs + 1):  # the first fills the cache
                started = time.perf_counter()
                result = subprocess.run(
                    command("adreg-register", *argv), capture_output=True, text=True
                )
                elapsed = time.perf_counter() - started
                if result.returncode != 0:
                    raise RuntimeError(
                        f"adreg-register {shlex.join(argv)}:\n{result.stderr[-2000:]}"
                    )
                if run:
                    times.append(elapsed)
            metrics = json.loads(result.stdout.strip().splitlines()[-1])
            if "dice_mean" in metrics:
                dice = metrics["dice"]
                accuracy = f"Dice {dice['1']:.3f} / {dice['2']:.3f} ({metrics['dice_mean']:.3f})"
            else:
                accuracy = f"TRE {metrics['tre_mm']:.2f} mm"
            print(
                f"| {name} | {', '.join(f'{t:.2f}' for t in times)} | "
                f"{metrics['time_register_s']:.1f} | {accuracy} | "
                f"{metrics['folding_percent']:.4f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
