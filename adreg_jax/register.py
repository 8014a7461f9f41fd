"""Register one pair of NIfTI scans from files: the ``adreg-register`` command.

    adreg-register --fixed subject.nii.gz --moving atlas.nii.gz --out results/ \
        [--checkpoint runs/demo] [--moving-seg S --fixed-seg S] \
        [--fixed-points P --moving-points P] [--instance-steps 150]

Where this sits: files -> (canonical RAS arrays, affines; the moving scan resampled onto the fixed
grid through both affines) -> optional network prediction (a training run directory) ->
instance optimisation -> outputs in the fixed image's space with its affine.

Instance optimisation: Adam on a stationary velocity field, integrated by scaling and squaring,
coarse to fine over grids 1/4, 1/2 and 1 of the fixed grid, minimising
``(1 - NCC(warped, fixed)) + smooth_weight * smoothness(velocity)``. It starts from the network's
DDF (used as the initial velocity) or from zero, so the command registers with no trained model.

Outputs in ``--out``: ``warped.nii.gz``; ``ddf.nii.gz`` (D, H, W, 3): the displacement of each
fixed voxel in world millimetres (RAS+, the fixed affine's 3x3 applied to the voxel displacement),
so that world point x of the fixed image corresponds to x + ddf(x) in the moving image;
``jacobian.nii.gz`` (det J of the voxel map); ``warped_seg.nii.gz`` with ``--moving-seg``;
``metrics.json``. Point files hold three numbers per line, 0-based voxel coordinates of the
canonical (RAS+) arrays.
"""

from __future__ import annotations

import argparse
import json
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


def _level_step(fixed, moving, smooth_weight, integration_steps, optimizer):
    def loss_fn(velocity):
        ddf = ops.integrate_velocity(velocity, integration_steps)
        warped = ops.warp(moving, ddf)
        similarity = jnp.mean(ops.ncc_local(warped, fixed, window=5))
        return (1.0 - similarity) + smooth_weight * ops.smoothness(velocity)

    @jax.jit
    def step(velocity, opt_state):
        loss, grad = jax.value_and_grad(loss_fn)(velocity)
        updates, opt_state = optimizer.update(grad, opt_state, velocity)
        return optax.apply_updates(velocity, updates), opt_state, loss

    return step


def instance_optimise(
    fixed: jnp.ndarray,
    moving: jnp.ndarray,
    steps: int,
    initial: jnp.ndarray | None = None,
    factors: Sequence[int] = (4, 2, 1),
    learning_rate: float = 0.1,
    smooth_weight: float = 1.0,
    integration_steps: int = 6,
    progress: bool = True,
) -> jnp.ndarray:
    """Optimise a velocity for one pair (images (1, D, H, W, 1)); returns the DDF (1, D, H, W, 3).

    ``steps`` Adam steps per resolution level; the velocity is carried between levels with
    ``resize_ddf`` (values rescaled with the grid).
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    velocity = None if initial is None else initial.astype(jnp.float32)
    bar = tqdm(total=steps * len(factors), desc="register", disable=not progress)
    for factor in factors:
        level_shape = tuple(max(4, n // factor) for n in shape)
        fixed_l = jax.image.resize(fixed, (1, *level_shape, 1), "linear")
        moving_l = jax.image.resize(moving, (1, *level_shape, 1), "linear")
        if velocity is None:
            velocity = jnp.zeros((1, *level_shape, 3), jnp.float32)
        else:
            velocity = ops.resize_ddf(velocity, level_shape)
        optimizer = optax.adam(learning_rate)
        opt_state = optimizer.init(velocity)
        step = _level_step(fixed_l, moving_l, smooth_weight, integration_steps, optimizer)
        for _ in range(steps):
            velocity, opt_state, loss = step(velocity, opt_state)
            bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return ops.integrate_velocity(ops.resize_ddf(velocity, shape), integration_steps)


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


def register(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    fixed_raw, fixed_affine = load_volume(args.fixed, "--fixed")
    moving_raw, moving_affine = load_volume(args.moving, "--moving")
    shape = fixed_raw.shape
    fixed = _normalise(fixed_raw, args.fixed)
    moving = _normalise(moving_raw, args.moving)
    moving = resample_to_grid(moving, moving_affine, shape, fixed_affine, order=1)

    segs = {}
    for name, path, image_shape, affine in (
        ("fixed", args.fixed_seg, fixed_raw.shape, fixed_affine),
        ("moving", args.moving_seg, moving_raw.shape, moving_affine),
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

    fixed_j = jnp.asarray(fixed)[None, ..., None]
    moving_j = jnp.asarray(moving)[None, ..., None]
    initial = None
    if args.checkpoint:
        from adreg_jax.training import restore_for_inference

        _, model, variables = restore_for_inference(args.checkpoint)
        initial = jax.jit(model.apply)(variables, fixed_j, moving_j)["ddf"]
    if args.instance_steps > 0:
        ddf = instance_optimise(
            fixed_j,
            moving_j,
            args.instance_steps,
            initial=initial,
            smooth_weight=args.smooth_weight,
            progress=not args.quiet,
        )
    elif initial is not None:
        ddf = initial
    else:
        raise ValueError("nothing to do: give --checkpoint and/or --instance-steps > 0")

    warped = ops.warp(moving_j, ddf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ddf_vox = np.asarray(ddf[0])
    ddf_mm = ddf_vox @ fixed_affine[:3, :3].T  # world (RAS+) mm displacement per fixed voxel
    save_nifti(out / "warped.nii.gz", np.asarray(warped[0, ..., 0]), fixed_affine)
    save_nifti(out / "ddf.nii.gz", ddf_mm.astype(np.float32), fixed_affine)
    save_nifti(out / "jacobian.nii.gz", np.asarray(ops.jacobian_determinant(ddf[0])), fixed_affine)
    metrics = {
        "ncc_before": float(ops.ncc_local(moving_j, fixed_j)[0]),
        "ncc_after": float(ops.ncc_local(warped, fixed_j)[0]),
        "folding_percent": float(100.0 * ops.folding_fraction(ddf)[0]),
    }
    if "moving" in segs:
        warped_seg = np.asarray(
            ops.warp(jnp.asarray(segs["moving"])[..., None], ddf[0], order=0)[..., 0]
        )
        save_nifti(out / "warped_seg.nii.gz", warped_seg.astype(np.int32), fixed_affine)
        if "fixed" in segs:
            metrics.update(_dice_report(segs["fixed"], segs["moving"], warped_seg))
    if args.fixed_points and args.moving_points:
        fixed_points = jnp.asarray(read_points(args.fixed_points))
        moving_points = jnp.asarray(read_points(args.moving_points))
        spacing = np.sqrt((fixed_affine[:3, :3] ** 2).sum(axis=0))
        metrics["tre_mm"] = float(jnp.mean(ops.tre(fixed_points, moving_points, ddf[0], spacing)))
        before = ops.tre(fixed_points, moving_points, jnp.zeros_like(ddf[0]), spacing)
        metrics["tre_mm_before"] = float(jnp.mean(before))
    metrics["time_s"] = time.perf_counter() - started
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
    parser.add_argument("--instance-steps", type=int, default=100, help="Adam steps per level")
    parser.add_argument("--smooth-weight", type=float, default=1.0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = register(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"adreg-register: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
