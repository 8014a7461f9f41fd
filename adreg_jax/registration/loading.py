"""Scans from files to the arrays the registration stages see: the first step of adreg-register.

Where this sits: NIfTI files -> **loading** (canonical RAS+ arrays and affines, intensities
normalised to [0, 1], the moving scan and its labels resampled onto the fixed grid through both
affines, point files mapped to fixed-grid voxels) -> affine stage -> deformable stage -> outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from adreg_jax.data.nifti import load_nifti


def normalise(volume: np.ndarray, path: str) -> np.ndarray:
    """Intensities mapped to [0, 1] between the 0.5 and 99.5 percentiles (clipped)."""
    volume = volume.astype(np.float32)
    low, high = np.percentile(volume, (0.5, 99.5))
    if not high > low:
        raise ValueError(f"{path}: the image is empty (constant intensity {low})")
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def load_volume(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(array (D, H, W) in canonical RAS+ axes, 4x4 affine) of a 3-D NIfTI file; ``name`` is the
    flag that named it, for the error message."""
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


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel spacing in mm of a 4x4 affine (column norms of its linear part)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def moving_points_on_fixed_grid(points, moving_affine, fixed_affine) -> np.ndarray:
    """Moving-image voxel coordinates -> voxel coordinates of the fixed grid (through world)."""
    voxel_map = np.linalg.inv(fixed_affine) @ moving_affine
    return points @ voxel_map[:3, :3].T + voxel_map[:3, 3]


def load_segmentations(
    paths: dict, fixed_info, moving_info, shape, fixed_affine
) -> dict[str, np.ndarray]:
    """Label maps (int32) of the segmentations named in ``paths`` ("fixed_seg", "moving_seg"):
    "fixed" on the fixed grid, "moving" resampled onto it (nearest), "moving_native" the moving
    one on its own grid. Each must lie on its image's grid (``*_info``: (shape, affine) of the
    image)."""
    segs = {}
    for name, (image_shape, affine) in (("fixed", fixed_info), ("moving", moving_info)):
        path = paths.get(f"{name}_seg")
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
            segs["moving_native"] = seg
            seg = resample_to_grid(seg, affine, shape, fixed_affine, order=0)
        segs[name] = seg
    return segs
