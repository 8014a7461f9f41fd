"""The commands: ``adreg-register`` (one pair, or a cohort) and ``adreg-apply`` (a saved transform
applied to another image, label map or point set).

    adreg-register --fixed subject.nii.gz --moving atlas.nii.gz --out results/ \
        [--checkpoint runs/demo | --model brain [--keep-network] [--network-scales 1 1.6 1.6]] \
        [--affine] [--similarity ncc|mi] [--instance-steps 60 20] [--moving-seg S --fixed-seg S] \
        [--fixed-points P --moving-points P] [--inverse]
    adreg-register --pairs pairs.csv --out cohort/ [same options]
    adreg-apply --transform results/ --moving image.nii.gz --out warped.nii.gz \
        [--labels] [--inverse] [--reference grid.nii.gz]
    adreg-apply --transform results/ --points points.txt --out mapped.txt [--inverse]

Where this sits: arguments -> ``pipeline.register_pair`` (``loading`` -> ``affine`` -> network ->
``deformable`` -> ``transform`` -> ``transform_io``, ``metrics``) or ``cohort.run_cohort``;
``adreg-apply`` -> ``transform_io.load_transform`` -> ``Transform.warp`` / ``map_points``.

Similarity (``--similarity``): local NCC (window 5) for scans of one modality, Parzen mutual
information (``ops.mutual_information``) for different ones (T1 to T2, MR to CT).

Affine stage (``--affine``): Adam on a 12-parameter map over two coarse grids (1/8 and 1/4 of a
1 mm brain), started from the centre-of-mass translation; the deformable stage then sees the
moving image through it, and the written fields are the composition (affine first). Masks
(``--fixed-mask``, ``--moving-mask``) restrict the similarity of both stages and the centres of
mass.

Instance optimisation: Adam on a stationary velocity field on a control grid (``--grid-factor``
times coarser than the images of each level), integrated by scaling and squaring, resized to the
level's grid, coarse to fine over two levels (``--levels``; by default the finer one at about
2 mm voxels: 1/4 and 1/2 of a 1 mm brain), minimising
``-similarity(warped, fixed) + smooth_weight * smoothness(velocity)``. It starts from the
network's DDF (used as the initial velocity) or from zero, so the command registers with no
trained model. With ``--instance-steps 0`` the network's field is the result, kept only when it
raises the similarity over the affine stage alone (``pipeline._checked_network_field``;
``--keep-network``: always). ``--network-scales``: the network applied once per value, each on
its grid made that many times finer, to the moving image warped by the passes before
(``deformable.network_field``).

Outputs: see ``pipeline`` (warped.nii.gz in the moving scan's own intensities, the transform
files of ``transform_io``, jacobian.nii.gz, warped_seg.nii.gz, metrics.json, overview.png). Point
files hold three numbers per line, 0-based voxel coordinates of the canonical (RAS+) arrays.

Compiled programs are kept on disk (``--cache-dir``, default ``~/.cache/adreg_jax/xla``), so that
a second run on scans of the same size skips JIT compilation; the registration's own programs are
kept there whole (``programs``, in ``programs/``), so that it also skips tracing and lowering
them. The console scripts (``cli``, ``apply_cli``) tune glibc's malloc for large arrays and end
the process without Python's teardown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from adreg_jax.data.nifti import save_nifti
from adreg_jax.data.points import read_point_file, write_point_file
from adreg_jax.registration import programs
from adreg_jax.registration.cohort import run_cohort
from adreg_jax.registration.deformable import SIMILARITIES
from adreg_jax.registration.loading import MODALITIES, load_volume
from adreg_jax.registration.pipeline import register_pair
from adreg_jax.registration.transform import Grid
from adreg_jax.registration.transform_io import load_transform


def register(args: argparse.Namespace) -> dict:
    """One pair (``--fixed``, ``--moving``) or a cohort (``--pairs``); the metrics or the cohort's
    summary."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file of that name exists; expected a folder to write to")
    if args.pairs:
        given = [flag for flag in PAIR_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_"))]
        if given:
            raise ValueError(
                f"--pairs {args.pairs}: give {', '.join(given)} as columns of the pair list, "
                "not as flags"
            )
        return run_cohort(args)
    if not (args.fixed and args.moving):
        raise ValueError("give --fixed and --moving (one pair) or --pairs FILE (a cohort)")
    keys = ("fixed_seg", "moving_seg", "fixed_points", "moving_points", "fixed_mask", "moving_mask")
    pair = {key: getattr(args, key) for key in ("fixed", "moving", *keys) if getattr(args, key)}
    return register_pair(pair, args, Path(args.out))


PAIR_FLAGS = (
    "--fixed",
    "--moving",
    "--fixed-seg",
    "--moving-seg",
    "--fixed-points",
    "--moving-points",
    "--fixed-mask",
    "--moving-mask",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adreg-register", description="Register a moving NIfTI scan onto a fixed one."
    )
    parser.add_argument("--fixed")
    parser.add_argument("--moving")
    parser.add_argument(
        "--pairs",
        help="a cohort: CSV (header fixed,moving[,fixed_seg,moving_seg,fixed_points,"
        "moving_points]) registered in one process, one folder per pair under --out, "
        "--out/metrics.csv; a rerun skips the pairs done",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--checkpoint",
        help="a train.py run directory (its best checkpoint) or one checkpoint of it "
        "(RUN/checkpoints/N)",
    )
    parser.add_argument(
        "--model",
        help="a pretrained network shipped in the package (adreg_jax.pretrained.MODELS, e.g. "
        "brain), in place of --checkpoint; instance optimisation follows unless "
        "--instance-steps 0",
    )
    parser.add_argument(
        "--keep-network",
        action="store_true",
        help="with --instance-steps 0, the network's field is the result even when it lowers "
        "the similarity (by default it is then dropped for the affine stage's alone; "
        "metrics.json: network_kept, network_objective_gain)",
    )
    parser.add_argument(
        "--network-scales",
        type=float,
        nargs="+",
        default=None,
        metavar="SCALE",
        help="one pass of the network per value, each on its training grid made SCALE times "
        "finer per axis, on the moving image warped by the passes before it (default: 1, one "
        "pass on the training grid; e.g. 1 2 2 for the brain model, see the README)",
    )
    parser.add_argument("--fixed-seg")
    parser.add_argument("--moving-seg")
    points_help = (
        "landmarks of the {} image for TRE: an ANTs CSV (x,y,z,t, LPS mm), an elastix point "
        "file ('point': LPS mm; 'index': voxel indices along the file's axes), or three "
        "numbers per line, 0-based voxel coordinates of the canonical RAS+ arrays"
    )
    parser.add_argument("--fixed-points", help=points_help.format("fixed"))
    parser.add_argument("--moving-points", help=points_help.format("moving"))
    parser.add_argument(
        "--fixed-mask",
        help="the similarity counts only the voxels inside (nonzero); on the fixed image's grid",
    )
    parser.add_argument(
        "--moving-mask",
        help="the similarity counts only the points that map inside (nonzero); on the moving "
        "image's grid",
    )
    parser.add_argument(
        "--modality",
        default="auto",
        choices=MODALITIES,
        help="intensity handling: ct (a Hounsfield window, -1000 to 200 HU), mr (0.5 to 99.5 "
        "percentiles); auto: ct when 1 %% of the voxels are at -500 or below",
    )
    parser.add_argument(
        "--similarity",
        default="ncc",
        choices=SIMILARITIES,
        help="ncc: local NCC (same modality); mi: mutual information (e.g. T1 to T2, MR to CT)",
    )
    parser.add_argument(
        "--affine",
        action="store_true",
        help="optimise an affine map first (for scans that are not pre-aligned)",
    )
    parser.add_argument(
        "--affine-steps",
        type=int,
        default=None,
        help="Adam steps of the affine stage at each level (default: by the level's cost, "
        "registration.levels.affine_steps: 100 at the coarsest, fewer on a level of many voxels)",
    )
    parser.add_argument(
        "--instance-steps",
        type=int,
        nargs="+",
        default=None,
        help="Adam steps of the instance optimisation, one number for every level or one per "
        "level (0: network prediction, or affine, only; default: by each level's cost, "
        "registration.levels.default_steps: 60 on levels up to 83 k voxels, 20 on a level of "
        "a million; for CT 60 up to 383 k voxels, 20 on a level of a million)",
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        default=None,
        metavar="F|FxFxF",
        help="downsampling (shrink) factor of each instance-optimisation level, coarse to fine: "
        "one number for every axis, or one per array axis as AxBxC (e.g. 4x4x1 2x2x1 1 for "
        "thick slices along the third axis, as ANTs' --shrink-factors per level); default: "
        "chosen from the scan's size and spacing per axis, see registration.levels (4 2 for a "
        "1 mm brain or a 2 mm CT)",
    )
    parser.add_argument(
        "--motion-mm",
        type=float,
        default=None,
        help="the largest motion expected; the coarsest level is coarse enough to capture it "
        "(default: 20 for CT, 10 for MR)",
    )
    parser.add_argument(
        "--grid-factor",
        type=int,
        default=2,
        help="the velocity grid is this many times coarser than each level's images",
    )
    parser.add_argument(
        "--integration-steps",
        type=int,
        default=4,
        help="scaling-and-squaring steps (0: optimise the displacement itself, not diffeomorphic)",
    )
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument(
        "--smooth-weight",
        type=float,
        default=None,
        help="weight of the velocity's smoothness (its gradient in mm per mm; default 4 for CT, "
        "0.25 for MR, at least 1 with --similarity mi)",
    )
    parser.add_argument(
        "--inverse",
        action="store_true",
        help="also write the inverse map (ddf_inverse.nii.gz, ddf_inverse_itk.nii.gz on the "
        "moving grid: the negative velocity integrated, the affine inverted) and its "
        "inverse-consistency error in metrics.json",
    )
    parser.add_argument("--no-png", action="store_true", help="skip overview.png")
    parser.add_argument(
        "--cache-dir",
        default=str(_default_cache_dir()),
        help="persistent JAX compilation cache: later runs on scans of the same size skip "
        "compilation ('' to disable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


CACHE_MAX_BYTES = 1 << 30  # JAX's part of --cache-dir


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adreg_jax" / "xla"


def _enable_compilation_cache(directory: str) -> None:
    """Keep compiled programs on disk (``jax_compilation_cache_dir``) unless the environment's
    JAX_COMPILATION_CACHE_DIR already chose a place; every compilation is kept (many are small,
    together they are seconds), the least recently used deleted beyond ``CACHE_MAX_BYTES``. The
    registration's own programs are also kept whole, traced and lowered (``programs``), in its
    ``programs`` subfolder, which ``programs.MAX_BYTES`` bounds in the same way."""
    if not directory:
        programs.set_directory(None)
        return
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    programs.set_directory(Path(chosen or directory) / "programs")
    if chosen:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # JAX deletes its least recently used entries beyond this (programs.MAX_BYTES for ours)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    _give_access_times(Path(directory))


def _give_access_times(directory: Path) -> None:
    """An access time for each entry of JAX's cache in ``directory`` that has none, its file's
    modification time: entries written without a size limit (by adreg_jax before the limit, or
    by any JAX with the folder as its cache) have none, and with one missing JAX's eviction
    fails, so every later write to the cache only warned and was lost (every command compiled
    again what it had not cached before)."""
    if not directory.is_dir():
        return
    for entry in directory.glob("*-cache"):
        stamp = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
        if not stamp.exists():
            try:
                stamp.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
            except OSError:  # a read-only or vanishing entry: JAX warns about it as before
                pass


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _enable_compilation_cache(args.cache_dir)
    try:
        metrics = register(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"adreg-register: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(metrics))
    return 0


def _end_process(code: int) -> None:
    """End the process now, its output flushed (every file is written and closed by then):
    Python's and JAX's teardown, freeing the ~2 GB of buffers of a 1 mm brain pair page by page,
    took 0.3-0.4 s of a 10 s command (measured on the 2-core CPU)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def keep_freed_memory() -> None:
    """glibc's malloc, for this process only: every thread allocates from the one main heap, which
    keeps what is freed (no mmap per large block, no trimming below 1 GB). By default each of
    XLA's threads has its own arena, which cannot hold a block larger than 64 MB: every
    full-resolution buffer (a 1 mm brain's field is 100 MB) was a fresh mmap, its pages faulted in
    and zeroed by the kernel on first touch, and unmapped when freed (measured: 1.3 M page
    faults, 4-6 s of the command's CPU time in the kernel, a 100 MB elementwise program 50 ms
    slower per call). A no-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)


def cli() -> None:
    """The ``adreg-register`` console script: ``main`` (malloc tuned by ``keep_freed_memory``
    first), then ``_end_process`` (``main`` itself returns, for callers in Python, and leaves
    malloc as it is)."""
    keep_freed_memory()
    _end_process(main())


def parse_apply_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adreg-apply",
        description="Apply a transform written by adreg-register to an image, a label map or "
        "points.",
    )
    parser.add_argument("--transform", required=True, help="an adreg-register --out folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--moving",
        help="an image on the registered moving image's grid, written onto the fixed grid "
        "(with --inverse: an image on the fixed grid, written onto the moving grid)",
    )
    source.add_argument(
        "--points",
        help="points of the fixed image mapped to the moving image's (with --inverse: moving to "
        "fixed), written in the form read: an ANTs CSV (x,y,z,t, LPS mm), an elastix 'point' "
        "file (LPS mm), or three numbers per line, 0-based voxel coordinates of the canonical "
        "RAS+ arrays",
    )
    parser.add_argument("--out", required=True, help="the warped NIfTI image, or a point file")
    parser.add_argument(
        "--labels", action="store_true", help="nearest-label interpolation (label maps)"
    )
    parser.add_argument(
        "--inverse", action="store_true", help="the inverse map (adreg-register --inverse)"
    )
    parser.add_argument(
        "--reference", help="write the image on this image's grid instead of the transform's"
    )
    parser.add_argument(
        "--cache-dir", default=str(_default_cache_dir()), help="as for adreg-register"
    )
    return parser.parse_args(argv)


def apply(args: argparse.Namespace) -> dict:
    """``adreg-apply``: what was written, where."""
    transform = load_transform(args.transform)
    if args.inverse:
        transform = transform.inverted()
    if args.points:
        if args.labels or args.reference:
            raise ValueError("--labels and --reference apply to images, not to --points")
        points = read_point_file(args.points)  # voxels of the transform's fixed grid, or mm
        mapped = transform.map_points(points.to_voxels(transform.fixed.affine))
        write_point_file(args.out, points.with_voxels(mapped, transform.moving.affine))
        return {"points": len(mapped), "out": args.out, "form": points.form}
    image, affine = load_volume(args.moving, "--moving")
    reference = None
    if args.reference:
        reference_image, reference_affine = load_volume(args.reference, "--reference")
        reference = Grid(tuple(reference_image.shape), reference_affine)
    warped = transform.warp(
        image, affine, order=0 if args.labels else 1, reference=reference, name=args.moving
    )
    save_nifti(args.out, warped, (reference or transform.fixed).affine)
    return {"shape": list(warped.shape), "out": args.out}


def apply_main(argv: Sequence[str] | None = None) -> int:
    args = parse_apply_args(argv)
    _enable_compilation_cache(args.cache_dir)
    try:
        result = apply(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"adreg-apply: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def apply_cli() -> None:
    """The ``adreg-apply`` console script: ``apply_main`` (``keep_freed_memory`` first), then
    ``_end_process``."""
    keep_freed_memory()
    _end_process(apply_main())
