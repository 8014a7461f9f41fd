"""How fine must a network's field be to register the real brain pairs as well as ANTs SyN?

    python benchmarks/field_resolution.py                # 6, 4 and 3 mm (about 2 min, 2 cores)
    python benchmarks/field_resolution.py --mm 6 4       # a subset

A network predicts a dense field on its own grid (``adreg-register --model`` resamples the scans
to that grid and the field back), so no network on that grid can do better than the best field
of that resolution. This measures the best one instance optimisation finds: ``adreg-register
--affine`` on the real brain pairs of ``real_scans.py`` (mni_to_scan, scan_to_mni; Dice over grey
and white matter) with the deformable levels ending at the grid's spacing (``--levels 2G G``, G
the grid spacing in voxels of the 1 mm fixed scan), the field on the images' own grid
(``--grid-factor 1``, as a network's), 60 and 100 Adam steps. Rows: the affine stage alone,
then each grid spacing. The brain model's grid is about 4 mm (``configs/brain.py``: 48x56x48 over
the MNI extent; its first version's 6 mm). ANTs SyN's Dice on these pairs is in the README
(real_scans.py).

Needs ``../shared/data`` (see its README; nothing here is packaged).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from real_scans import DATA, pair_argv, prepare_brain, shared_data
from registration_outputs import command


def register(pair: dict, out: Path, *options: str) -> dict:
    """``adreg-register`` (its console script, a fresh process) on the pair; its metrics."""
    argv = [*pair_argv(pair), "--out", str(out), "--quiet", "--no-png", *options]
    result = subprocess.run(command("adreg-register", *argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"adreg-register {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--mm", type=int, nargs="+", default=[6, 4, 3])
    args = parser.parse_args(argv)
    data = shared_data(args.data)
    if data is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="field_resolution_") as work:
        work = Path(work)
        pairs = prepare_brain(data, work)
        names = ("mni_to_scan", "scan_to_mni")
        rows = [("affine only", ["--instance-steps", "0"])]
        for mm in args.mm:
            options = ["--levels", str(2 * mm), str(mm), "--grid-factor", "1"]
            options += ["--instance-steps", "60", "100"]
            rows.append((f"best field on a {mm} mm grid", options))
        print("| field | " + " | ".join(f"{n} Dice GM/WM (mean)" for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for label, options in rows:
            cells = []
            for name in names:
                metrics = register(pairs[name], work / name, *options)
                dice = metrics["dice"]
                cells.append(f"{dice['1']:.3f} / {dice['2']:.3f} ({metrics['dice_mean']:.3f})")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
