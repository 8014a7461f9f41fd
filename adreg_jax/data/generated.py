"""Generated brain pairs with exact ground truth, from the packaged 2 mm MNI152 atlas.

Where this sits: the default data set of ``configs/demo.py`` (a new user has no IXI copy), fed to
the Grain pipeline (pipeline.py). Everything is numpy/scipy so that it runs in Grain worker
processes without JAX.

One pair (deterministic from (seed, index)):
  subject = atlas o exp(v_a)         anatomical variation, a random smooth velocity v_a
  fixed   = subject                  plus intensity changes (gamma, bias field, noise)
  moving  = subject o exp(v_b)       a second random smooth velocity v_b, own intensity changes
  true_ddf = exp(-v_b) - id          the field that warps moving back onto fixed (DESIGN.md)
Labels (0 background, 1 CSF, 2 GM, 3 WM) follow each warp by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

ATLAS = Path(__file__).resolve().parent / "assets" / "mni152_2mm.npz"
BRAIN_LABELS = (1, 2, 3)  # CSF, GM, WM


def load_atlas(shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packaged atlas: image (D, H, W) float32 in [0, 1], labels (D, H, W) int32, spacing.

    With ``shape`` the atlas is resampled to that grid (linear for the image, nearest for labels)
    and the spacing scaled to match.
    """
    with np.load(ATLAS) as data:
        image = data["image"].astype(np.float32) / 255.0
        labels = data["labels"].astype(np.int32)
        spacing = data["spacing"].astype(np.float32)
    if shape is not None and tuple(shape) != image.shape:
        factors = [n / o for n, o in zip(shape, image.shape, strict=True)]
        image = ndimage.zoom(image, factors, order=1, grid_mode=True, mode="grid-constant")
        labels = ndimage.zoom(labels, factors, order=0, grid_mode=True, mode="grid-constant")
        spacing = spacing / np.asarray(factors, np.float32)
    return np.clip(image, 0.0, 1.0), labels, spacing


def pair_rng(seed: int, index: int, length: int) -> np.random.Generator:
    """The random generator of pair ``index`` of a generated source of ``length`` pairs: the same
    numbers for the same (seed, index), in any order and any worker process."""
    if not 0 <= index < length:
        raise IndexError(f"pair index {index} outside 0..{length - 1}")
    return np.random.default_rng((seed, int(index)))


def smooth_velocity(
    rng: np.random.Generator,
    shape: Sequence[int],
    max_voxels: float,
    coarse_voxels: float | Sequence[float] = 8.0,
):
    """A random smooth velocity (D, H, W, 3): Gaussian noise on a grid ``coarse_voxels`` times
    coarser (per axis, or one number for all; at least 2 noise points per axis), linear
    upsampling, then a Gaussian blur of the coarse spacing's width (cheaper than cubic splines at
    the same smoothness), scaled so that its largest component is ``max_voxels``."""
    coarse_voxels = np.broadcast_to(np.asarray(coarse_voxels, np.float64), (3,))
    coarse_shape = tuple(
        max(2, int(round(n / c))) for n, c in zip(shape, coarse_voxels, strict=True)
    )
    factors = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    components = []
    for _ in range(3):
        coarse = rng.normal(size=coarse_shape).astype(np.float32)
        fine = ndimage.zoom(coarse, factors, order=1, grid_mode=True, mode="nearest")
        components.append(ndimage.gaussian_filter(fine, sigma=[f / 2 for f in factors]))
    field = np.stack(components, axis=-1)
    return field * (max_voxels / max(float(np.abs(field).max()), 1e-6))


def _resample(volume: np.ndarray, ddf: np.ndarray, order: int) -> np.ndarray:
    """volume(p + ddf(p)), zero outside (the pull convention of adreg_jax.ops.warp)."""
    coords = np.indices(volume.shape, dtype=np.float32) + np.moveaxis(ddf, -1, 0)
    return ndimage.map_coordinates(volume, coords, order=order, mode="grid-constant", cval=0.0)


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The DDF of p -> q = p + first(p) -> q + second(q): ``first + second o (id + first)``
    (linear interpolation, the field extended by its border values), in numpy."""
    coords = np.indices(first.shape[:3], dtype=np.float32) + np.moveaxis(first, -1, 0)
    moved = np.stack(
        [
            ndimage.map_coordinates(second[..., k], coords, order=1, mode="nearest")
            for k in range(3)
        ],
        axis=-1,
    )
    return first + moved


def integrate(velocity: np.ndarray, steps: int = 4) -> np.ndarray:
    """Scaling and squaring in numpy (the same scheme as adreg_jax.ops.integrate_velocity)."""
    ddf = velocity / (2.0**steps)
    for _ in range(steps):
        ddf = compose(ddf, ddf)
    return ddf


def _intensity(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """Gamma, a smooth multiplicative bias field and Rician-like noise, kept in [0, 1]."""
    if strength <= 0:
        return image
    gamma = float(np.exp(rng.normal(scale=0.2 * strength)))
    bias = smooth_velocity(rng, image.shape, 0.1 * strength)[..., 0]
    noisy = (image**gamma) * (1.0 + bias)
    noisy = noisy + rng.normal(scale=0.01 * strength, size=image.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class GeneratedBrainPairs:
    """Random-access source of generated brain pairs (a Grain data source: len and getitem).

    Args:
      shape: (D, H, W) of every volume.
      length: number of distinct pairs (any index below it is a fresh pair).
      seed: with the index, determines the pair exactly.
      anatomy_voxels, motion_voxels: largest velocity components of v_a and v_b.
      intensity: strength of the intensity changes, 0 = none.
    """

    shape: tuple[int, int, int]
    length: int
    seed: int = 0
    anatomy_voxels: float = 2.0
    motion_voxels: float = 4.0
    intensity: float = 1.0

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        self._atlas = load_atlas(self.shape)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = pair_rng(self.seed, index, self.length)
        image, labels, spacing = self._atlas
        anatomy = integrate(smooth_velocity(rng, self.shape, self.anatomy_voxels))
        subject = _resample(image, anatomy, order=1)
        subject_labels = _resample(labels, anatomy, order=0)
        motion_velocity = smooth_velocity(rng, self.shape, self.motion_voxels)
        motion = integrate(motion_velocity)
        moving = _resample(subject, motion, order=1)
        moving_labels = _resample(subject_labels, motion, order=0)
        return {
            "fixed": _intensity(rng, subject, self.intensity)[..., None],
            "moving": _intensity(rng, moving, self.intensity)[..., None],
            "fixed_seg": subject_labels.astype(np.int32),
            "moving_seg": moving_labels.astype(np.int32),
            "true_ddf": integrate(-motion_velocity).astype(np.float32),
            "spacing": spacing.astype(np.float32),
        }
