"""The ``adreg-register`` command: register one pair of NIfTI scans from files.

    adreg-register --fixed subject.nii.gz --moving atlas.nii.gz --out results/ \
        [--checkpoint runs/demo] [--affine] [--similarity ncc|mi] [--instance-steps 60 20] \
        [--moving-seg S --fixed-seg S] [--fixed-points P --moving-points P]

Where this sits: files -> ``loading`` (canonical RAS arrays, affines; the moving scan resampled
onto the fixed grid through both affines) -> optional ``affine`` stage -> optional network
prediction (a training run directory) -> ``deformable`` instance optimisation -> outputs in the
fixed image's space with its affine (``transform_io``, ``metrics``).

Similarity (``--similarity``): local NCC (window 5) for scans of one modality, Parzen mutual
information (``ops.mutual_information``) for different ones (T1 to T2, MR to CT).

Affine stage (``--affine``): Adam on a 12-parameter map over two coarse grids (1/8 and 1/4 of a
1 mm brain), started from the centre-of-mass translation; the deformable stage then sees the
moving image through it, and the written DDF is the composition (affine first).

Instance optimisation: Adam on a stationary velocity field on a control grid (``--grid-factor``
times coarser than the images of each level), integrated by scaling and squaring, resized to the
level's grid, coarse to fine over two levels (``--levels``; by default the finer one at about
2 mm voxels: 1/4 and 1/2 of a 1 mm brain), minimising
``-similarity(warped, fixed) + smooth_weight * smoothness(velocity)``. It starts from the
network's DDF (used as the initial velocity) or from zero, so the command registers with no
trained model.

Outputs in ``--out``: ``warped.nii.gz``; ``ddf.nii.gz`` (D, H, W, 3): the displacement of each
fixed voxel in world millimetres (RAS+, the fixed affine's 3x3 applied to the voxel displacement),
so that world point x of the fixed image corresponds to x + ddf(x) in the moving image;
``jacobian.nii.gz`` (det J of the voxel map); ``warped_seg.nii.gz`` with ``--moving-seg``;
``metrics.json``; ``overview.png`` (``figures.overview_figure``). Point files hold three numbers
per line, 0-based voxel coordinates of the canonical (RAS+) arrays.

Compiled programs are kept on disk (``--cache-dir``, default ``~/.cache/adreg_jax/xla``), so that
a second run on scans of the same size skips JIT compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.data.nifti import read_points, save_nifti
from adreg_jax.registration.affine import affine_warp, optimise_affine
from adreg_jax.registration.deformable import (
    SIMILARITIES,
    default_levels,
    instance_optimise,
    network_ddf,
    similarity_fn,
)
from adreg_jax.registration.loading import (
    load_segmentations,
    load_volume,
    moving_points_on_fixed_grid,
    normalise,
    resample_to_grid,
    spacing_of,
)
from adreg_jax.registration.metrics import dice_report, field_and_image_metrics
from adreg_jax.registration.transform_io import save_ddf

_compose = jax.jit(ops.compose)
_warp = jax.jit(ops.warp, static_argnames=("order", "mode"))


def register(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    similarity_fn(args.similarity)  # reject an unknown name before any work
    fixed_raw, fixed_affine = load_volume(args.fixed, "--fixed")
    moving_raw, moving_affine = load_volume(args.moving, "--moving")
    shape = fixed_raw.shape
    fixed = normalise(fixed_raw, args.fixed)
    moving = normalise(moving_raw, args.moving)
    moving = resample_to_grid(moving, moving_affine, shape, fixed_affine, order=1)
    segs = load_segmentations(
        args,
        (fixed_raw.shape, fixed_affine),
        (moving_raw.shape, moving_affine),
        shape,
        fixed_affine,
    )
    points = None
    if bool(args.fixed_points) != bool(args.moving_points):
        raise ValueError("give both --fixed-points and --moving-points, or neither")
    if args.fixed_points:
        fixed_points = read_points(args.fixed_points)
        moving_points = moving_points_on_fixed_grid(
            read_points(args.moving_points), moving_affine, fixed_affine
        )
        if fixed_points.shape != moving_points.shape:
            raise ValueError(
                f"--fixed-points {args.fixed_points} has {len(fixed_points)} points but "
                f"--moving-points {args.moving_points} has {len(moving_points)}; expected pairs"
            )
        points = (jnp.asarray(fixed_points), jnp.asarray(moving_points))
    if min(args.instance_steps) <= 0 and not args.checkpoint and not args.affine:
        raise ValueError("nothing to do: give --checkpoint, --affine and/or --instance-steps > 0")
    spacing = spacing_of(fixed_affine)
    levels = tuple(args.levels) if args.levels else default_levels(spacing)
    if len(args.instance_steps) not in (1, len(levels)):
        raise ValueError(
            f"--instance-steps {args.instance_steps}: give one number, or one per level of "
            f"--levels {levels}"
        )

    fixed_j = jnp.asarray(fixed)[None, ..., None]
    moving_j = jnp.asarray(moving)[None, ..., None]
    loaded = time.perf_counter()
    progress = not args.quiet
    affine = None
    source = moving_j  # the moving image the deformable stage sees
    if args.affine:
        matrix, translation = optimise_affine(
            fixed_j, moving_j, args.similarity, args.affine_steps, progress=progress
        )
        affine, source = jax.block_until_ready(affine_warp(matrix, translation, moving_j))
    stages = {"affine": time.perf_counter() - loaded}
    initial = network_ddf(args.checkpoint, fixed_j, source) if args.checkpoint else None
    initial = jax.block_until_ready(initial)
    stages["network"] = time.perf_counter() - loaded - stages["affine"]
    if max(args.instance_steps) > 0:
        steps = args.instance_steps * (len(levels) // len(args.instance_steps))
        ddf = instance_optimise(
            fixed_j,
            source,
            steps,
            initial=initial,
            factors=levels,
            similarity=args.similarity,
            learning_rate=args.learning_rate,
            smooth_weight=args.smooth_weight,
            grid_factor=args.grid_factor,
            integration_steps=args.integration_steps,
            progress=progress,
        )
    elif initial is not None:
        ddf = initial
    else:
        ddf = jnp.zeros((1, *shape, 3), jnp.float32)
    if affine is not None:
        ddf = _compose(affine, ddf)  # affine first, then the deformable field
    ddf = jax.block_until_ready(ddf)
    registered = time.perf_counter()
    stages["deformable"] = registered - loaded - stages["affine"] - stages["network"]

    warped, jacobian, image_metrics = field_and_image_metrics(
        ddf, moving_j, fixed_j, args.similarity
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ddf_vox = np.asarray(ddf[0])
    save_nifti(out / "warped.nii.gz", np.asarray(warped[0, ..., 0]), fixed_affine)
    save_ddf(out, ddf_vox, fixed_affine)
    save_nifti(out / "jacobian.nii.gz", np.asarray(jacobian), fixed_affine)
    metrics = {"similarity": args.similarity}
    metrics.update({key: float(value) for key, value in image_metrics.items()})
    if affine is not None:
        metrics["affine_matrix"] = np.asarray(matrix + np.eye(3)).round(5).tolist()
        metrics["affine_translation_vox"] = (
            np.asarray(translation * np.asarray(shape) / 2.0).round(3).tolist()
        )
    if "moving" in segs:
        warped_seg = np.asarray(
            _warp(jnp.asarray(segs["moving"])[..., None], ddf[0], order=0)[..., 0]
        )
        save_nifti(out / "warped_seg.nii.gz", warped_seg.astype(np.int32), fixed_affine)
        if "fixed" in segs:
            metrics.update(dice_report(segs["fixed"], segs["moving"], warped_seg))
    if points is not None:
        fixed_points, moving_points = points
        metrics["tre_mm"] = float(jnp.mean(ops.tre(fixed_points, moving_points, ddf[0], spacing)))
        before = ops.tre(fixed_points, moving_points, jnp.zeros_like(ddf[0]), spacing)
        metrics["tre_mm_before"] = float(jnp.mean(before))
    # time_s: the whole command but the PNG; time_register_s: arrays in memory to the final field
    # (affine, network, instance optimisation, JIT compilation included): what a registration
    # library's own call costs, the figure to set beside ANTs' ants.registration time.
    metrics["time_s"] = time.perf_counter() - started
    metrics["time_load_s"] = loaded - started
    metrics["time_register_s"] = registered - loaded
    metrics.update({f"time_{name}_s": value for name, value in stages.items()})
    if not args.no_png:
        from adreg_jax.figures import overview_figure

        overview_figure(
            out / "overview.png",
            fixed,
            moving,
            np.asarray(warped[0, ..., 0]),
            ddf_vox,
            spacing=spacing,
            title=f"{Path(args.moving).name} -> {Path(args.fixed).name}",
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adreg-register", description="Register a moving NIfTI scan onto a fixed one."
    )
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="a train.py run directory (best checkpoint)")
    parser.add_argument("--fixed-seg")
    parser.add_argument("--moving-seg")
    parser.add_argument("--fixed-points")
    parser.add_argument("--moving-points")
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
    parser.add_argument("--affine-steps", type=int, default=100, help="Adam steps per level")
    parser.add_argument(
        "--instance-steps",
        type=int,
        nargs="+",
        default=[60, 20],
        help="Adam steps of the instance optimisation, one number for every level or one per "
        "level (0: network prediction, or affine, only)",
    )
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=None,
        help="downsampling factor of each instance-optimisation level, coarse to fine "
        "(default: two levels, the finer at about 2 mm voxels: 4 2 for 1 mm scans)",
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
        "--smooth-weight", type=float, default=0.25, help="weight of the velocity's smoothness"
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


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adreg_jax" / "xla"


def _enable_compilation_cache(directory: str) -> None:
    """Keep compiled programs on disk (``jax_compilation_cache_dir``) unless the environment's
    JAX_COMPILATION_CACHE_DIR already chose a place; every compilation is kept (many are small,
    together they are seconds)."""
    if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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


if __name__ == "__main__":
    sys.exit(main())
