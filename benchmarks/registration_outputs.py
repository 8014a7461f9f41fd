"""Saved transforms on real 1 mm brain MR: other tools applying ddf_itk.nii.gz, inverse
consistency, points there and back, and a cohort in one command against one command per pair.

    pip install antspyx SimpleITK        # peers, kept out of the core dependencies
    python benchmarks/registration_outputs.py                      # everything (~15 min, 2 cores)
    python benchmarks/registration_outputs.py --parts itk inverse  # or a subset: itk inverse cohort
    python benchmarks/registration_outputs.py --parts folds --out DIR  # re-analyse a run's outputs

Needs ``../shared/data/brain`` (two OASIS subjects and the labelled test scan, 160x192x224 at
1 mm, affinely pre-aligned; see its README; nothing here is packaged).

Parts:
  itk      oasis_b -> oasis_a with ``adreg-register --inverse``; ANTs (``ants.apply_transforms``)
           and SimpleITK (``DisplacementFieldTransform``) resample the moving scan through
           ``ddf_itk.nii.gz``, and the fixed scan through ``ddf_inverse_itk.nii.gz``; mean
           absolute difference to adreg's own output in % of its intensity range. 2000 physical
           points in ANTs' CSV form (x,y,z,t, LPS mm) mapped by ``adreg-apply --points`` and by
           ANTs' ``apply_transforms_to_points`` through the same fields, forward and back (the
           largest difference, mm). Again with the moving scan's header rotated by 12 degrees
           (an oblique affine; ``--affine``).
  inverse  the same registrations: inverse consistency from metrics.json (mean and max of
           |phi^-1(phi(x)) - x| in mm), and 2000 points inside the brain mapped by
           ``adreg-apply --points`` forward and back (max error, mm); where the inverse is off by
           more than 1 mm, whether it is next to a fold of the forward map (no inverse there).
  cohort   ten pairs of the same size (the atlas oasis_a fixed; the moving scans: oasis_b and the
           test scan, each under five smooth random deformations): ten ``adreg-register``
           processes one after another against one ``adreg-register --pairs`` (its default three
           pairs in flight, and again with one), each run as its console script, all with the
           same warm persistent compilation cache (a first, untimed, command fills it); then
           the cohort killed after its third pair and rerun, counting the pairs the rerun
           registers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brain"


def command(name: str, *argv: str, workers: int | None = None) -> list[str]:
    """A console script of this package run as a fresh process, as a user runs it: its entry
    point (``cli``: malloc tuned, the process ended at once) in this interpreter (``workers``:
    cohort threads per device instead of ``cohort.WORKERS_PER_DEVICE``). Before 2026-11-28 this
    ran ``main`` instead, without the malloc tuning: every figure measured was slower (the cohort
    of ten pairs 57.8 s, ten commands 84.8 s)."""
    entry = {"adreg-register": "cli", "adreg-apply": "apply_cli"}[name]
    code = f"from adreg_jax.registration.commands import {entry}; "
    if workers:
        code += f"import adreg_jax.registration.cohort as c; c.WORKERS_PER_DEVICE = {workers}; "
    return [sys.executable, "-c", code + f"{entry}()", *argv]


def run(name: str, *argv: str, workers: int | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command(name, *argv, workers=workers), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def rotated_header(source: Path, target: Path, degrees: float) -> None:
    """The same voxels with the world rotated about the volume's centre (an oblique affine)."""
    image = nib.load(str(source))
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    centre = image.affine @ np.append((np.asarray(image.shape) - 1) / 2.0, 1.0)
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    affine = back @ rotation @ shift @ image.affine
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, np.float32), affine), str(target))


# --- itk and inverse ---------------------------------------------------------------------------


def difference_percent(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(100.0 * np.abs(theirs - ours).mean() / (ours.max() - ours.min()))


def peers_resample(moving: Path, field: Path, reference: Path) -> dict[str, float]:
    """ANTs and SimpleITK resampling ``moving`` through the ITK field onto ``reference``'s grid,
    each compared with ``reference`` (adreg's output)."""
    import ants
    import SimpleITK as sitk

    ours_ants = ants.image_read(str(reference))
    theirs = ants.apply_transforms(
        fixed=ours_ants,
        moving=ants.image_read(str(moving)),
        transformlist=[str(field)],
        interpolator="linear",
        defaultvalue=0,
    )
    result = {"ants_diff_percent": difference_percent(ours_ants.numpy(), theirs.numpy())}
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(field)), sitk.sitkVectorFloat64)
    )
    ours_sitk = sitk.ReadImage(str(reference))
    resampled = sitk.Resample(
        sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat32),
        ours_sitk,
        transform,
        sitk.sitkLinear,
        0.0,
    )
    result["sitk_diff_percent"] = difference_percent(
        sitk.GetArrayFromImage(ours_sitk), sitk.GetArrayFromImage(resampled)
    )
    return result


def brain_points(fixed: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(``count`` canonical voxel coordinates inside the fixed brain, each jittered within its
    voxel; the fixed image's canonical affine)."""
    from adreg_jax.data.nifti import load_nifti

    array, affine = load_nifti(fixed)
    inside = np.argwhere(array > np.percentile(array, 60)).astype(np.float64)
    rng = np.random.default_rng(seed)
    points = inside[rng.choice(len(inside), count, replace=False)]
    return points + rng.uniform(-0.5, 0.5, (count, 3)), affine


def points_there_and_back(out: Path, fixed: Path, work: Path, count: int = 2000) -> dict:
    """Points inside the fixed brain (canonical voxel coordinates) forward, then --inverse."""
    points, affine = brain_points(fixed, count, seed=0)
    np.savetxt(work / "points.txt", points)
    apply = ["adreg-apply", "--transform", str(out), "--points"]
    run(*apply, str(work / "points.txt"), "--out", str(work / "moved.txt"))
    run(*apply, str(work / "moved.txt"), "--out", str(work / "back.txt"), "--inverse")
    to_mm = lambda a, b: np.linalg.norm((a - b) @ affine[:3, :3].T, axis=1)  # noqa: E731
    back_mm = to_mm(np.loadtxt(work / "back.txt"), points)
    return {
        "points": count,
        "points_moved_mean_mm": float(to_mm(np.loadtxt(work / "moved.txt"), points).mean()),
        "points_back_mean_mm": float(back_mm.mean()),
        "points_back_max_mm": float(back_mm.max()),
    }


def points_against_ants(out: Path, fixed: Path, work: Path, count: int = 2000) -> dict:
    """Physical points (ANTs' CSV, x,y,z,t in LPS mm) inside the fixed brain through
    ``adreg-apply --points`` and through ANTs' ``apply_transforms_to_points`` on the ITK fields:
    forward with ddf_itk.nii.gz, then the moved points back with ddf_inverse_itk.nii.gz (for
    ANTs, the inverse field read linearly; for adreg-apply, ``--inverse``: that field, then
    Newton steps on the forward field). The mean and largest difference, mm."""
    import ants
    import pandas as pd

    voxels, affine = brain_points(fixed, count, seed=1)
    lps = (voxels @ affine[:3, :3].T + affine[:3, 3]) * (-1, -1, 1)
    table = pd.DataFrame({"x": lps[:, 0], "y": lps[:, 1], "z": lps[:, 2], "t": 0.0})
    table.to_csv(work / "points.csv", index=False)
    apply = ["adreg-apply", "--transform", str(out), "--points"]
    run(*apply, str(work / "points.csv"), "--out", str(work / "moved.csv"))
    run(*apply, str(work / "moved.csv"), "--out", str(work / "back.csv"), "--inverse")
    ours_moved, ours_back = (pd.read_csv(work / f"{n}.csv") for n in ("moved", "back"))
    theirs_moved = ants.apply_transforms_to_points(3, table, [str(out / "ddf_itk.nii.gz")])
    theirs_back = ants.apply_transforms_to_points(
        3, ours_moved, [str(out / "ddf_inverse_itk.nii.gz")]
    )
    xyz = ["x", "y", "z"]
    gap = lambda a, b: np.linalg.norm(a[xyz].values - b[xyz].values, axis=1)  # noqa: E731
    forward, inverse = gap(ours_moved, theirs_moved), gap(ours_back, theirs_back)
    return {
        "ants_points_moved_max_mm": float(gap(ours_moved, table).max()),
        "ants_points_forward_diff_mean_mm": float(forward.mean()),
        "ants_points_forward_diff_max_mm": float(forward.max()),
        "ants_points_inverse_diff_mean_mm": float(inverse.mean()),
        "ants_points_inverse_diff_max_mm": float(inverse.max()),
    }


def itk_and_inverse(work: Path, cache: str) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    oblique = work / "oasis_b_oblique.nii.gz"
    rotated_header(DATA / "oasis_b.nii.gz", oblique, 12.0)
    cases = [
        ("oasis_b -> oasis_a", DATA / "oasis_b.nii.gz", []),
        ("oasis_b (oblique header) -> oasis_a, --affine", oblique, ["--affine"]),
    ]
    for name, moving, extra in cases:
        out = work / f"out_{len(rows)}"
        fixed = DATA / "oasis_a.nii.gz"
        argv = ["--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--inverse"]
        seconds = run("adreg-register", *argv, *extra, "--cache-dir", cache, "--quiet")
        metrics = json.loads((out / "metrics.json").read_text())
        row = {"case": name, "command_s": seconds}
        row.update({k: v for k, v in metrics.items() if k.startswith("inverse_consistency")})
        row.update(
            {
                "ncc_before": metrics["ncc_before"],
                "ncc_after": metrics["ncc_after"],
                "folding_percent": metrics["folding_percent"],
            }
        )
        forward = peers_resample(moving, out / "ddf_itk.nii.gz", out / "warped.nii.gz")
        row.update({f"forward_{k}": v for k, v in forward.items()})
        fixed_on_moving = out / "fixed_on_moving.nii.gz"
        apply = ["adreg-apply", "--transform", str(out), "--moving", str(fixed)]
        run(*apply, "--out", str(fixed_on_moving), "--inverse")
        inverse = peers_resample(fixed, out / "ddf_inverse_itk.nii.gz", fixed_on_moving)
        row.update({f"inverse_{k}": v for k, v in inverse.items()})
        row.update(points_there_and_back(out, fixed, out))
        row.update(points_against_ants(out, fixed, out))
        row.update(consistency_at_folds(out))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def consistency_at_folds(out: Path, radius: int = 3) -> dict:
    """Where |phi(phi^-1(y)) - y| exceeds 1 mm on the moving grid: how many voxels, how many of
    them have their inverse image within ``radius`` voxels of a fold of the forward map (det J
    <= 0, where no inverse exists), and the max error of the others."""
    import jax.numpy as jnp

    from adreg_jax.data.nifti import load_nifti
    from adreg_jax.registration import load_transform
    from adreg_jax.registration.transform import _round_trip_error

    transform = load_transform(out)
    fixed, moving = transform.fixed, transform.moving
    fixed_inv = np.linalg.inv(fixed.affine)
    error, inside = _round_trip_error(
        jnp.asarray(transform.inverse_ddf_mm),
        jnp.asarray(transform.ddf_mm),
        jnp.asarray(fixed_inv @ moving.affine, jnp.float32),
        tuple(fixed.shape),
        jnp.asarray(fixed_inv[:3, :3], jnp.float32),
    )
    error = np.where(np.asarray(inside), np.asarray(error), 0.0)
    jacobian, _ = load_nifti(out / "jacobian.nii.gz")
    near_fold = ndimage.binary_dilation(jacobian <= 0, iterations=radius)
    voxels = np.indices(moving.shape).reshape(3, -1).T
    world = voxels @ moving.affine[:3, :3].T + moving.affine[:3, 3]
    world += transform.inverse_ddf_mm.reshape(-1, 3)
    preimage = np.rint(world @ fixed_inv[:3, :3].T + fixed_inv[:3, 3]).astype(int)
    preimage = np.clip(preimage, 0, np.asarray(fixed.shape) - 1)
    at_fold = near_fold[tuple(preimage.T)].reshape(moving.shape)
    over = error > 1.0
    return {
        "folded_voxels": int((jacobian <= 0).sum()),
        "inverse_over_1mm_voxels": int(over.sum()),
        "inverse_over_1mm_near_folds": int((over & at_fold).sum()),
        "inverse_max_mm_away_from_folds": float(error[~at_fold].max()),
        "inverse_p99_99_mm": float(np.percentile(error[np.asarray(inside)], 99.99)),
    }


# --- cohort ------------------------------------------------------------------------------------


def smooth_deformation(shape, seed: int, amplitude_vox: float = 3.0) -> np.ndarray:
    """A random smooth displacement (3, D, H, W) in voxels (Gaussian-filtered noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(3, *(n // 16 for n in shape)))
    field = np.stack([ndimage.zoom(c, np.asarray(shape) / c.shape, order=3) for c in coarse])
    return amplitude_vox * field / np.abs(field).max()


def cohort_inputs(work: Path) -> Path:
    """pairs.csv of ten pairs: oasis_a fixed, oasis_b and the test scan under five deformations
    each as moving scans (all 160x192x224)."""
    work.mkdir(parents=True, exist_ok=True)
    affine = nib.load(str(DATA / "oasis_a.nii.gz")).affine
    subjects = {
        "oasis_b": np.asarray(nib.load(str(DATA / "oasis_b.nii.gz")).dataobj, np.float32),
        "scan": np.load(DATA / "test_scan.npz")["vol"].astype(np.float32),
    }
    rows = ["fixed,moving"]
    grid = np.indices(subjects["scan"].shape, dtype=np.float32)
    for seed in range(5):
        for name, volume in subjects.items():
            field = smooth_deformation(volume.shape, seed)
            warped = ndimage.map_coordinates(volume, grid + field, order=1).astype(np.float32)
            path = work / f"{name}_{seed}.nii.gz"
            nib.save(nib.Nifti1Image(warped, affine), str(path))
            rows.append(f"{DATA / 'oasis_a.nii.gz'},{path.name}")
    (work / "pairs.csv").write_text("\n".join(rows) + "\n")
    return work / "pairs.csv"


def cohort(work: Path, cache: str) -> dict:
    pairs_csv = cohort_inputs(work)
    pairs = [line.split(",") for line in pairs_csv.read_text().splitlines()[1:]]
    options = ["--cache-dir", cache, "--quiet"]
    # fill the persistent cache (both kinds of run read the same programs from it)
    fixed, moving = pairs[0][0], str(work / pairs[0][1])
    run(
        "adreg-register",
        "--fixed",
        fixed,
        "--moving",
        moving,
        "--out",
        str(work / "warm"),
        *options,
    )
    separate = time.perf_counter()
    for number, (fixed, moving) in enumerate(pairs):
        out = work / "separate" / f"{number:03d}"
        argv = ["--fixed", fixed, "--moving", str(work / moving), "--out", str(out)]
        run("adreg-register", *argv, *options)
    separate = time.perf_counter() - separate
    argv = ["--pairs", str(pairs_csv), "--out", str(work / "cohort")]
    together = run("adreg-register", *argv, *options)
    argv = ["--pairs", str(pairs_csv), "--out", str(work / "cohort_one_worker")]
    one_worker = run("adreg-register", *argv, *options, workers=1)
    # kill after the third pair, rerun
    killed_dir = work / "killed"
    process = subprocess.Popen(
        command("adreg-register", "--pairs", str(pairs_csv), "--out", str(killed_dir), *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(list(killed_dir.glob("*/metrics.json"))) < 3 and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(killed_dir.glob("*/metrics.json")))
    result = subprocess.run(
        command("adreg-register", "--pairs", str(pairs_csv), "--out", str(killed_dir), *options),
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    table = (killed_dir / "metrics.csv").read_text().splitlines()
    row = {
        "pairs": len(pairs),
        "separate_commands_s": separate,
        "one_cohort_command_s": together,
        "speedup": separate / together,
        "one_cohort_command_one_worker_s": one_worker,
        "speedup_one_worker": separate / one_worker,
        "done_when_killed": done_at_kill,
        "rerun_registered": summary["registered"],
        "rerun_skipped": summary["skipped_done"],
        "table_rows_after_rerun": len(table) - 1,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["itk", "inverse", "cohort"])
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not (DATA / "oasis_a.nii.gz").is_file():
        print(f"error: {DATA} missing (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    work = Path(args.out or tempfile.mkdtemp(prefix="adreg_outputs_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = str(work / "xla_cache")
    results = {}
    if {"itk", "inverse"} & set(args.parts):
        results["itk_inverse"] = itk_and_inverse(work / "itk", cache)
    if "folds" in args.parts:  # the analysis alone, on the outputs of an earlier run in --out
        for out in sorted((work / "itk").glob("out_*")):
            print(json.dumps({"out": out.name, **consistency_at_folds(out)}), flush=True)
    if "cohort" in args.parts:
        results["cohort"] = cohort(work / "cohort_inputs", cache)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")
    if not args.out:  # the temporary folder keeps results.json only (the rest: gigabytes)
        for folder in (p for p in work.iterdir() if p.is_dir()):
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
