"""Register one pair of NIfTI scans from files: the ``adreg-register`` command.

    adreg-register --fixed subject.nii.gz --moving atlas.nii.gz --out results/ \
        [--checkpoint runs/demo] [--affine] [--similarity ncc|mi] [--instance-steps 60 20] \
        [--moving-seg S --fixed-seg S] [--fixed-points P --moving-points P]

Where this sits: files -> (canonical RAS arrays, affines; the moving scan resampled onto the fixed
grid through both affines) -> optional affine stage -> optional network prediction (a training
run directory) -> instance optimisation -> outputs in the fixed image's space with its affine.

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
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from adreg_jax import ops
from adreg_jax.data.nifti import load_nifti, read_points, save_nifti


def _normalise(volume: np.ndarray, path: str) -> np.ndarray:
    volume = volume.astype(np.float32)
    low, high = np.percentile(volume, (0.5, 99.5))
    if not high > low:
        raise ValueError(f"{path}: the image is empty (constant intensity {low})")
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def load_volume(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    array, affine = load_nifti(path)
    array = np.squeeze(array)
    if array.ndim != 3:
        raise ValueError(f"{name} {path}: expected a 3-D image, got shape {array.shape}")
    return array, affine


def resample_to_grid(
    volume: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray, order
) -> np.ndarray:
    """volume (on ``affine``) sampled at the voxels of the target grid, zero outside."""
    if tuple(volume.shape) == tuple(shape) and np.allclose(affine, target_affine, atol=1e-4):
        return volume
    voxel_map = np.linalg.inv(affine) @ target_affine
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = voxel_map[:3, :3] @ grid + voxel_map[:3, 3:4]
    out = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0)
    return out.reshape(shape).astype(volume.dtype)


SIMILARITIES = ("ncc", "mi")


def similarity_fn(name: str):
    """``f(warped, fixed) -> scalar``, higher is better: local NCC (window 5, same modality) or
    Parzen mutual information (different modalities)."""
    if name == "ncc":
        return lambda a, b: jnp.mean(ops.ncc_local(a, b, window=5))
    if name == "mi":
        return lambda a, b: jnp.mean(ops.mutual_information(a, b))
    raise ValueError(f"--similarity {name!r}: expected one of {SIMILARITIES}")


def _level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    return tuple(max(4, n // factor) for n in shape)


# Every full-resolution operation here is jitted: run op by op (eagerly), a warp or a composition
# of a 1 mm brain took 2-3 s instead of 0.2 s (no fusion, every intermediate materialised).


@functools.partial(jax.jit, static_argnums=1)
def _resize(image: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
    return jax.image.resize(image, (image.shape[0], *shape, image.shape[-1]), "linear")


# --- affine stage ------------------------------------------------------------------------------
# The map is q = centre + half * ((I + M) p + t) with p = (x - centre) / half the normalised
# coordinate of voxel x (centre = (n - 1) / 2, half = n / 2). Normalised coordinates agree between
# grids resized with jax.image.resize (half-pixel centres), so (M, t) carries over between levels.


def affine_ddf(matrix: jnp.ndarray, translation: jnp.ndarray, shape: Sequence[int]):
    """The DDF (1, D, H, W, 3) in voxels of the affine map with parameters M (3, 3), t (3,)."""
    size = jnp.asarray(shape, jnp.float32).reshape(1, 1, 1, 3)
    p = (ops.identity_grid(shape) - (size - 1.0) / 2.0) / (size / 2.0)
    return ((size / 2.0) * (p @ matrix.T + translation.reshape(1, 1, 1, 3)))[None]


def centre_of_mass(image: np.ndarray) -> np.ndarray:
    weights = np.clip(np.asarray(image, np.float32), 0.0, None)
    total = max(float(weights.sum(dtype=np.float64)), 1e-12)
    centre = []
    for axis, n in enumerate(weights.shape):  # from the marginals: no coordinate grids
        others = tuple(a for a in range(weights.ndim) if a != axis)
        marginal = weights.sum(axis=others, dtype=np.float64)
        centre.append(float(marginal @ np.arange(n)) / total)
    return np.asarray(centre)


def optimise_affine(
    fixed: jnp.ndarray,
    moving: jnp.ndarray,
    similarity: str = "ncc",
    steps: int = 100,
    factors: Sequence[int] | None = None,
    learning_rate: float = 0.01,
    progress: bool = True,
):
    """Adam on (M, t) over coarse levels, starting from the centre-of-mass translation; returns
    (M, t) for ``affine_ddf``. Images (1, D, H, W, 1) on the fixed grid.

    ``factors``: the downsampling of each level; by default the two coarsest of 8, 4, 2, 1 that
    keep at least 16 voxels along every axis ((8, 4) for a 1 mm brain; an affine map is
    determined by coarse images, and there a step costs milliseconds).
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    if factors is None:
        factors = [f for f in (8, 4, 2, 1) if min(shape) // f >= 16][:2] or [1]
    half = np.asarray(shape, np.float64) / 2.0
    shift = centre_of_mass(moving[0, ..., 0]) - centre_of_mass(fixed[0, ..., 0])
    params = {"matrix": jnp.zeros((3, 3)), "translation": jnp.asarray(shift / half, jnp.float32)}
    # Same modality: the global correlation. Local NCC, right for the deformable stage, is biased
    # here: it rewards the smoothing that magnification brings (measured: a rotated, shifted
    # textured phantom came out scaled by 0.95).
    if similarity == "ncc":
        sim = lambda a, b: jnp.mean(ops.ncc_global(a, b))  # noqa: E731
    else:
        sim = similarity_fn(similarity)
    optimizer = optax.adam(learning_rate)

    def loss_fn(p, fixed, moving):
        ddf = affine_ddf(p["matrix"], p["translation"], fixed.shape[1:4])
        return -sim(ops.warp(moving, ddf), fixed)

    @jax.jit
    def step(p, state, fixed, moving):
        loss, grad = jax.value_and_grad(loss_fn)(p, fixed, moving)
        updates, state = optimizer.update(grad, state, p)
        return optax.apply_updates(p, updates), state, loss

    bar = tqdm(total=steps * len(factors), desc="affine", disable=not progress)
    for factor in factors:
        level_shape = _level_shape(shape, factor)
        fixed_l, moving_l = _resize(fixed, level_shape), _resize(moving, level_shape)

        state = optimizer.init(params)
        for _ in range(steps):
            params, state, loss = step(params, state, fixed_l, moving_l)
            bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return params["matrix"], params["translation"]


# --- deformable stage: instance optimisation of a stationary velocity ------------------------


def _level_step(fixed, moving, similarity, smooth_weight, integration_steps, optimizer):
    """One jitted Adam step on a (coarser) velocity against the images of one level."""
    sim = similarity_fn(similarity)

    def loss_fn(velocity, fixed, moving):
        ddf = ops.integrate_velocity(velocity, integration_steps)
        ddf = ops.resize_ddf(ddf, fixed.shape[1:4])
        return -sim(ops.warp(moving, ddf), fixed) + smooth_weight * ops.smoothness(velocity)

    # The images are arguments, not closed-over constants: as constants XLA folds the fixed
    # image's statistics at compile time (seconds per level).
    @jax.jit
    def step(velocity, opt_state, fixed, moving):
        loss, grad = jax.value_and_grad(loss_fn)(velocity, fixed, moving)
        updates, opt_state = optimizer.update(grad, opt_state, velocity)
        return optax.apply_updates(velocity, updates), opt_state, loss

    return functools.partial(step, fixed=fixed, moving=moving)


def instance_optimise(
    fixed: jnp.ndarray,
    moving: jnp.ndarray,
    steps: int | Sequence[int],
    initial: jnp.ndarray | None = None,
    factors: Sequence[int] = (4, 2),
    grid_factor: int = 2,
    similarity: str = "ncc",
    learning_rate: float = 0.1,
    smooth_weight: float = 0.25,
    integration_steps: int = 4,
    progress: bool = True,
) -> jnp.ndarray:
    """Optimise a velocity for one pair (images (1, D, H, W, 1)); returns the DDF (1, D, H, W, 3).

    ``steps`` Adam steps at each level (one number for all, or one per level), coarse to fine
    over image grids ``1/factor`` of the fixed grid. At each level the stationary velocity lives
    on a grid ``grid_factor`` times coarser than the level's images (a control grid, as in
    free-form deformations): it is integrated there by scaling and squaring, and the resulting
    DDF is resized (trilinear, values rescaled) to the images' grid. The coarse grid regularises
    and keeps the cost down: the gradient through each squaring step is a scatter-add over the
    velocity grid, the dominant cost per step.

    The velocity is carried between levels with ``resize_ddf``; the returned DDF is the last
    level's integrated field resized to the fixed grid, the same map the optimisation saw.
    ``factors=(4, 2)`` stops the images at half resolution (at 1 mm brain scans the cost/accuracy
    balance; a full-resolution level costs 8 times the half-resolution one); add 1 to refine.
    ``initial`` (a DDF on the fixed grid, e.g. the network's) starts the velocity.
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    velocity = None if initial is None else initial.astype(jnp.float32)
    per_level = [steps] * len(factors) if isinstance(steps, int) else list(steps)
    if len(per_level) != len(factors):
        raise ValueError(f"steps {steps}: expected one number or one per level of {factors}")
    bar = tqdm(total=sum(per_level), desc="deformable", disable=not progress)
    for factor, level_steps in zip(factors, per_level, strict=True):
        level_shape = _level_shape(shape, factor)
        grid_shape = _level_shape(level_shape, grid_factor)
        fixed_l, moving_l = _resize(fixed, level_shape), _resize(moving, level_shape)
        if velocity is None:
            velocity = jnp.zeros((1, *grid_shape, 3), jnp.float32)
        else:
            velocity = ops.resize_ddf(velocity, grid_shape)
        optimizer = optax.adam(learning_rate)
        opt_state = optimizer.init(velocity)
        step = _level_step(
            fixed_l, moving_l, similarity, smooth_weight, integration_steps, optimizer
        )
        for _ in range(level_steps):
            velocity, opt_state, loss = step(velocity, opt_state)
            bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return _velocity_to_ddf(velocity, integration_steps, tuple(shape))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _velocity_to_ddf(velocity, integration_steps: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return ops.resize_ddf(ops.integrate_velocity(velocity, integration_steps), shape)


@jax.jit
def _affine_warp(matrix, translation, moving):
    """(the affine DDF on the moving image's grid, the moving image warped by it)"""
    ddf = affine_ddf(matrix, translation, moving.shape[1:4])
    return ddf, ops.warp(moving, ddf)


_compose = jax.jit(ops.compose)
_resize_ddf = jax.jit(ops.resize_ddf, static_argnums=1)
_warp = jax.jit(ops.warp, static_argnames=("order", "mode"))


@functools.partial(jax.jit, static_argnums=3)
def _field_and_image_metrics(ddf, moving, fixed, similarity: str):
    """(warped, det J, the image and folding metrics) of the final field, in one program."""
    sim = similarity_fn(similarity)
    warped = ops.warp(moving, ddf)
    metrics = {
        "ncc_before": ops.ncc_local(moving, fixed)[0],
        "ncc_after": ops.ncc_local(warped, fixed)[0],
        f"{similarity}_objective_before": sim(moving, fixed),
        f"{similarity}_objective_after": sim(warped, fixed),
        "folding_percent": 100.0 * ops.folding_fraction(ddf)[0],
    }
    return warped, ops.jacobian_determinant(ddf[0]), metrics


def default_levels(spacing: Sequence[float], finest_mm: float = 2.0) -> tuple[int, int]:
    """Two levels, the finer one with voxels of about ``finest_mm`` (never finer than the scan):
    (4, 2) for 1 mm brains, (2, 1) for scans of 2 mm voxels or coarser."""
    finest = max(1, int(finest_mm / float(np.min(spacing)) + 1e-6))
    return (2 * finest, finest)


def network_ddf(checkpoint: str, fixed: jnp.ndarray, moving: jnp.ndarray) -> jnp.ndarray:
    """The trained network's DDF (1, D, H, W, 3) on the fixed grid.

    The network runs on a grid with the fixed grid's aspect and as many voxels as the run's
    training images (``config.data.image_size``), each side a multiple of the U-Net's downsampling
    factor; its field is resized (and rescaled) back to the fixed grid.
    """
    from adreg_jax.training import restore_for_inference

    config, model, variables = restore_for_inference(checkpoint)
    shape = np.asarray(fixed.shape[1:4], np.float64)
    multiple = 2 ** (len(config.model.channels) - 1)
    scale = (np.prod(config.data.image_size) / np.prod(shape)) ** (1.0 / 3.0)
    net_shape = tuple(int(max(multiple, round(n * scale / multiple) * multiple)) for n in shape)
    ddf = jax.jit(model.apply)(variables, _resize(fixed, net_shape), _resize(moving, net_shape))
    return _resize_ddf(ddf["ddf"], tuple(fixed.shape[1:4]))


def _dice_report(fixed_seg, moving_seg, warped_seg) -> dict:
    labels = [int(v) for v in np.union1d(np.unique(fixed_seg), np.unique(moving_seg)) if v != 0]
    if not labels:
        return {}
    before = np.asarray(ops.dice(jnp.asarray(moving_seg), jnp.asarray(fixed_seg), labels))
    after = np.asarray(ops.dice(jnp.asarray(warped_seg), jnp.asarray(fixed_seg), labels))
    return {
        "dice": {str(k): float(v) for k, v in zip(labels, after, strict=True)},
        "dice_mean": float(np.nanmean(after)),
        "dice_before": {str(k): float(v) for k, v in zip(labels, before, strict=True)},
        "dice_mean_before": float(np.nanmean(before)),
    }


def _moving_points_on_fixed_grid(points, moving_affine, fixed_affine) -> np.ndarray:
    """Moving-image voxel coordinates -> voxel coordinates of the fixed grid (through world)."""
    voxel_map = np.linalg.inv(fixed_affine) @ moving_affine
    return points @ voxel_map[:3, :3].T + voxel_map[:3, 3]


def _load_segmentations(args, fixed_info, moving_info, shape, fixed_affine) -> dict:
    segs = {}
    for name, path, (image_shape, affine) in (
        ("fixed", args.fixed_seg, fixed_info),
        ("moving", args.moving_seg, moving_info),
    ):
        if path is None:
            continue
        seg, seg_affine = load_volume(path, f"--{name}-seg")
        if seg.shape != image_shape or not np.allclose(seg_affine, affine, atol=1e-4):
            raise ValueError(
                f"--{name}-seg {path}: grid {seg.shape} differs from its image's {image_shape} "
                f"(or its affine does); expected the segmentation on the image's grid"
            )
        seg = np.rint(seg).astype(np.int32)
        if name == "moving":
            seg = resample_to_grid(seg, affine, shape, fixed_affine, order=0)
        segs[name] = seg
    return segs


def register(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    similarity_fn(args.similarity)  # reject an unknown name before any work
    fixed_raw, fixed_affine = load_volume(args.fixed, "--fixed")
    moving_raw, moving_affine = load_volume(args.moving, "--moving")
    shape = fixed_raw.shape
    fixed = _normalise(fixed_raw, args.fixed)
    moving = _normalise(moving_raw, args.moving)
    moving = resample_to_grid(moving, moving_affine, shape, fixed_affine, order=1)
    segs = _load_segmentations(
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
        moving_points = _moving_points_on_fixed_grid(
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
    spacing = np.sqrt((fixed_affine[:3, :3] ** 2).sum(axis=0))
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
        affine, source = jax.block_until_ready(_affine_warp(matrix, translation, moving_j))
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

    warped, jacobian, image_metrics = _field_and_image_metrics(
        ddf, moving_j, fixed_j, args.similarity
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ddf_vox = np.asarray(ddf[0])
    ddf_mm = ddf_vox @ fixed_affine[:3, :3].T  # world (RAS+) mm displacement per fixed voxel
    save_nifti(out / "warped.nii.gz", np.asarray(warped[0, ..., 0]), fixed_affine)
    save_nifti(out / "ddf.nii.gz", ddf_mm.astype(np.float32), fixed_affine)
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
            metrics.update(_dice_report(segs["fixed"], segs["moving"], warped_seg))
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
