"""Intensity and geometry preprocessing shared by the loaders (numpy only).

Where this sits: files -> loaders (dirlab.py, generated.py) -> **preprocess** -> pipeline.py.
Every geometric step returns a ``GridMap`` so that landmarks move with the volume and can be
mapped back to the original voxel grid, where TRE is reported in the original physical mm;
``inside_grid`` says which landmarks a step left in the grid. ``lung_bounding_box`` finds the
lungs of a CT in HU, where a crop can be centred.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GridMap:
    """Affine map between original voxel coords p and processed ones q: q = p * scale + shift.

    scale, shift: (3,) in array axis order (D, H, W).
    """

    scale: np.ndarray
    shift: np.ndarray

    @staticmethod
    def identity() -> GridMap:
        return GridMap(np.ones(3), np.zeros(3))

    def then(self, other: GridMap) -> GridMap:
        """This map followed by ``other``."""
        return GridMap(self.scale * other.scale, self.shift * other.scale + other.shift)

    def forward(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) original voxel coords -> processed voxel coords."""
        return points * self.scale + self.shift

    def inverse(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) processed voxel coords -> original voxel coords."""
        return (points - self.shift) / self.scale


def window(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] (e.g. a HU window) and normalise to [0, 1] float32."""
    if not high > low:
        raise ValueError(f"intensity window needs high > low, got ({low}, {high})")
    clipped = np.clip(volume.astype(np.float32), low, high)
    return (clipped - low) / (high - low)


def percentile_normalise(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and normalise to [0, 1] float32."""
    lo, hi = np.percentile(volume, [low, high])
    return window(volume, float(lo), float(max(hi, lo + 1e-6)))


def crop_or_pad(
    volume: np.ndarray,
    shape: Sequence[int | None],
    center: Sequence[float] | None = None,
) -> tuple[np.ndarray, GridMap]:
    """Crop or zero pad the first three axes to ``shape`` (None keeps an axis).

    Centred on the volume, or on the voxel coordinate ``center`` (see ``crop_or_pad_map``).
    Returns the new volume and the GridMap (a whole-voxel shift) that moves points with it.
    """
    target = [volume.shape[k] if shape[k] is None else int(shape[k]) for k in range(3)]
    grid_map = crop_or_pad_map(volume.shape[:3], target, center)
    offsets = [int(-v) for v in grid_map.shift]
    out = np.zeros(tuple(target) + volume.shape[3:], volume.dtype)
    src, dst = [], []
    for k in range(3):
        start = max(offsets[k], 0)
        stop = min(offsets[k] + target[k], volume.shape[k])
        src.append(slice(start, stop))
        dst.append(slice(start - offsets[k], stop - offsets[k]))
    out[tuple(dst)] = volume[tuple(src)]
    return out, grid_map


def crop_or_pad_map(
    shape: Sequence[int], target: Sequence[int], center: Sequence[float] | None = None
) -> GridMap:
    """The point map of ``crop_or_pad`` from shapes alone (landmarks without images).

    Without ``center`` the window is centred on the volume. With ``center`` ((3,) voxel coords
    of the input, e.g. the middle of the lungs) the window is centred there, then moved by whole
    voxels so that it stays inside the input along axes where it is smaller than the input and
    holds the whole input along axes where it is larger (no voxel is padded while data is cut).
    """
    if center is None:
        # offset = index in the original of new index 0 (negative = padding before)
        offsets = [(int(n) - int(t)) // 2 for n, t in zip(shape, target, strict=True)]
    else:
        offsets = []
        for n, t, c in zip(shape, target, center, strict=True):
            offset = int(np.floor(float(c) - (int(t) - 1) / 2 + 0.5))
            low, high = min(0, int(n) - int(t)), max(0, int(n) - int(t))
            offsets.append(min(max(offset, low), high))
    return GridMap(np.ones(3), -np.asarray(offsets, np.float64))


def inside_grid(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(N,) bool: which (N, 3) voxel coords lie in a grid of ``shape`` (0 <= p <= n - 1)."""
    upper = np.asarray(shape, np.float64)[:3] - 1.0
    return np.all((points >= 0.0) & (points <= upper), axis=-1)


def lung_bounding_box(volume_hu: np.ndarray, air_below: float = -500.0) -> np.ndarray | None:
    """(2, 3) first and last voxel index (D, H, W) of the lungs of a thoracic CT in HU.

    Lungs = voxels below ``air_below`` HU that the body encloses in their axial slice (axis 0 is
    the slice axis; air connected to a slice's edge is outside the body), kept in 3-D connected
    components of at least a tenth of the largest (airways join the lungs; bowel gas and noise
    drop out). Volumes wider than 256 voxels in-plane are searched every 2nd (4th...) voxel.
    None when no such air exists.
    """
    from scipy import ndimage  # here: reading NIfTI files (nifti.py) needs no SciPy

    step = max(1, max(volume_hu.shape[1:3]) // 256)
    air = np.asarray(volume_hu[:, ::step, ::step]) < air_below
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    slices, count = ndimage.label(air, structure=in_plane)
    if count == 0:
        return None
    edge = np.zeros(air.shape, bool)
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    outside = np.unique(slices[edge & air])
    enclosed = air & ~np.isin(slices, outside)
    parts, count = ndimage.label(enclosed)
    if count == 0:
        return None
    sizes = np.bincount(parts.ravel())[1:]
    lungs = np.isin(parts, np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1)
    box = np.zeros((2, 3), np.int64)
    for axis in range(3):
        hits = np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))
        scale = 1 if axis == 0 else step
        box[0, axis] = hits[0] * scale
        box[1, axis] = min(hits[-1] * scale + scale - 1, volume_hu.shape[axis] - 1)
    return box


def resample_map(shape: Sequence[int], target: Sequence[int]) -> GridMap:
    """The point map of ``resample``: voxel centres scale, q + 0.5 = (p + 0.5) * factor."""
    factors = np.asarray([t / n for n, t in zip(shape, target, strict=True)], np.float64)
    return GridMap(factors, 0.5 * factors - 0.5)


def pad_to_multiple(volume: np.ndarray, axis: int, multiple: int) -> tuple[np.ndarray, GridMap]:
    """Zero pad one axis at its end to a multiple of ``multiple`` (the network stride)."""
    size = volume.shape[axis]
    extra = (-size) % multiple
    widths = [(0, 0)] * volume.ndim
    widths[axis] = (0, extra)
    return np.pad(volume, widths), GridMap.identity()


def resample(
    volume: np.ndarray, shape: Sequence[int], order: int = 1
) -> tuple[np.ndarray, GridMap]:
    """Resample the first three axes to ``shape`` (voxel centres aligned, grid_mode)."""
    from scipy import ndimage

    grid_map = resample_map(volume.shape[:3], shape)
    factors = grid_map.scale
    out = ndimage.zoom(
        volume,
        list(factors) + [1.0] * (volume.ndim - 3),
        order=order,
        grid_mode=True,
        mode="grid-constant",
    )
    return out, grid_map


def resample_to_spacing(
    volume: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float], order: int = 1
) -> tuple[np.ndarray, GridMap, np.ndarray]:
    """Resample to a chosen (e.g. isotropic) spacing in mm; returns volume, map, actual spacing."""
    shape = [
        max(1, round(n * s / t))
        for n, s, t in zip(volume.shape[:3], spacing, new_spacing, strict=True)
    ]
    out, grid_map = resample(volume, shape, order)
    actual = np.asarray(spacing, np.float64) / grid_map.scale
    return out, grid_map, actual.astype(np.float32)


def check_finite(volume: np.ndarray, name: str) -> None:
    """Raise a ValueError naming ``name`` when the volume holds NaN or inf."""
    if not np.all(np.isfinite(volume)):
        bad = int(np.size(volume) - np.count_nonzero(np.isfinite(volume)))
        raise ValueError(f"{name}: {bad} non-finite voxels (NaN/inf); expected finite values")
