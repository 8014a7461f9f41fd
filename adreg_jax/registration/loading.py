"""Scans from files to the arrays the registration stages see: the first step of adreg-register.

Where this sits: NIfTI files -> **loading** (canonical RAS+ arrays and affines, intensities
normalised to [0, 1] by modality, the moving scan, its labels and mask resampled onto the fixed
grid through both affines, point files checked against their images and mapped to fixed-grid
voxels) -> affine stage -> deformable stage -> outputs.

Intensities: MR between its 0.5 and 99.5 percentiles; CT (detected from its values, or
``--modality ct``) through a fixed Hounsfield window, ``CT_WINDOW_HU``, so that the lungs (-1000
to -500 HU) get 40 % of the range whatever bone, metal or the field of view's padding hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adreg_jax.data.nifti import load_nifti
from adreg_jax.data.points import PointFile

MODALITIES = ("auto", "ct", "mr")
# Air to soft tissue and contrast-filled vessels: the lung parenchyma, its vessels and airways,
# the chest wall and the diaphragm all keep contrast; bone saturates.
CT_WINDOW_HU = (-1000.0, 200.0)


def detect_modality(volume: np.ndarray) -> str:
    """ "ct" when the image holds Hounsfield units: at least 1 % of its voxels at -500 or below
    (air, lungs, the padding outside the field of view); MR intensities are not negative."""
    return _modality_of(np.percentile(volume, 1.0))


def _modality_of(first_percentile: float) -> str:
    return "ct" if first_percentile <= -500.0 else "mr"


def normalise(
    volume: np.ndarray, path: str, modality: str = "mr", percentiles: Sequence[float] | None = None
) -> np.ndarray:
    """Intensities mapped to [0, 1], clipped: CT linearly over ``CT_WINDOW_HU``, MR (and anything
    else) between its 0.5 and 99.5 percentiles (``percentiles``: those two when known)."""
    volume = volume.astype(np.float32)
    if modality == "ct":
        low, high = CT_WINDOW_HU
    elif percentiles is not None:
        low, high = percentiles
    else:
        low, high = np.percentile(volume, (0.5, 99.5))
    if not np.ptp(volume) > 0 or not high > low:
        raise ValueError(f"{path}: the image is empty (constant intensity {volume.flat[0]})")
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def detect_and_normalise(volume: np.ndarray, path: str) -> tuple[np.ndarray, str]:
    """(``normalise`` of the volume as its ``detect_modality``, that modality), the three
    percentiles in one pass (each np.percentile of a 1 mm brain partitions 9 M voxels)."""
    low, first, high = np.percentile(volume, (0.5, 1.0, 99.5))
    modality = _modality_of(first)
    return normalise(volume, path, modality, (low, high)), modality


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
    shift = np.rint(voxel_map[:3, 3])
    if np.allclose(voxel_map[:3, :3], np.eye(3), atol=1e-6) and np.allclose(
        voxel_map[:3, 3], shift, atol=1e-4
    ):
        return _shifted(volume, shape, shift.astype(int))
    from scipy import ndimage  # here: grids that differ by whole voxels need no SciPy

    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = voxel_map[:3, :3] @ grid + voxel_map[:3, 3:4]
    out = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0)
    return out.reshape(shape).astype(volume.dtype)


def _shifted(volume: np.ndarray, shape: Sequence[int], shift: np.ndarray) -> np.ndarray:
    """out[q] = volume[q + shift] (zero outside): resampling between grids that differ by whole
    voxels (the same spacing and axes, e.g. a template and a scan on one 1 mm grid), what
    map_coordinates gives there, by copying the overlap (a 1 mm brain on a loaded machine:
    2.0 s -> 0.03 s)."""
    out = np.zeros(tuple(shape), volume.dtype)
    target, source = [], []
    for n_out, n_in, offset in zip(shape, volume.shape, shift, strict=True):
        start, stop = max(0, -offset), min(n_out, n_in - offset)
        if stop <= start:
            return out
        target.append(slice(start, stop))
        source.append(slice(start + offset, stop + offset))
    out[tuple(target)] = volume[tuple(source)]
    return out


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel spacing in mm of a 4x4 affine (column norms of its linear part)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def moving_points_on_fixed_grid(points, moving_affine, fixed_affine) -> np.ndarray:
    """Moving-image voxel coordinates -> voxel coordinates of the fixed grid (through world)."""
    voxel_map = np.linalg.inv(fixed_affine) @ moving_affine
    return points @ voxel_map[:3, :3].T + voxel_map[:3, 3]


def check_on_image_grid(volume, affine, image_shape, image_affine, flag: str, path: str) -> None:
    """A label map or mask must lie on its image's grid (same shape and affine)."""
    if volume.shape != tuple(image_shape) or not np.allclose(affine, image_affine, atol=1e-4):
        raise ValueError(
            f"{flag} {path}: grid {volume.shape} differs from its image's {tuple(image_shape)} "
            f"(or its affine does); expected it on the image's grid"
        )


def load_mask(path: str, flag: str, image_shape, image_affine) -> np.ndarray:
    """A mask (nonzero = inside) on its image's grid, as float32 0/1."""
    mask, affine = load_volume(path, flag)
    check_on_image_grid(mask, affine, image_shape, image_affine, flag, path)
    mask = (mask != 0).astype(np.float32)
    if not mask.any():
        raise ValueError(f"{flag} {path}: the mask is empty (no nonzero voxel)")
    return mask


def check_points_inside(points: np.ndarray, shape, file: PointFile, flag: str) -> None:
    """Every point (0-based voxel coordinates of the canonical array) must lie inside its image,
    [0, n - 1] per axis; the error names the file's line of the first that does not."""
    outside = np.any((points < -1e-3) | (points > np.asarray(shape) - 1 + 1e-3), axis=1)
    if not outside.any():
        return
    index = int(np.argmax(outside))
    point = tuple(np.round(file.values[index].astype(np.float64), 3).tolist())
    raise ValueError(
        f"{flag} {file.path} line {int(file.lines[index])}: point {point} lies outside its "
        f"image (at voxel {tuple(np.round(points[index].astype(np.float64), 1).tolist())} of "
        f"the canonical array of shape {tuple(shape)}, voxels 0..n-1); "
        f"{int(outside.sum())} of {len(points)} points are outside"
    )


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
        check_on_image_grid(seg, seg_affine, image_shape, affine, f"--{name}-seg", path)
        seg = np.rint(seg).astype(np.int32)
        if name == "moving":
            segs["moving_native"] = seg
            seg = resample_to_grid(seg, affine, shape, fixed_affine, order=0)
        segs[name] = seg
    return segs
