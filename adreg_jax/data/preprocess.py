"""Intensity and geometry preprocessing shared by the loaders (numpy only).

Where this sits: files -> loaders (dirlab.py, generated.py) -> **preprocess** -> pipeline.py.
Every geometric step returns a ``GridMap`` so that landmarks move with the volume and can be
mapped back to the original voxel grid, where TRE is reported in the original physical mm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


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


def crop_or_pad(volume: np.ndarray, shape: Sequence[int | None]) -> tuple[np.ndarray, GridMap]:
    """Centred crop or zero pad of the first three axes to ``shape`` (None keeps an axis).

    Returns the new volume and the GridMap (a shift) that moves points with it.
    """
    target = [volume.shape[k] if shape[k] is None else int(shape[k]) for k in range(3)]
    grid_map = crop_or_pad_map(volume.shape[:3], target)
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


def crop_or_pad_map(shape: Sequence[int], target: Sequence[int]) -> GridMap:
    """The point map of ``crop_or_pad`` from shapes alone (landmarks without images)."""
    # offset = index in the original of new index 0 (negative = padding before)
    offsets = [(int(n) - int(t)) // 2 for n, t in zip(shape, target, strict=True)]
    return GridMap(np.ones(3), -np.asarray(offsets, np.float64))


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
