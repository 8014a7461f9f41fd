"""Generated breathing thorax phantom: inhale/exhale pairs with corresponding landmarks.

Where this sits: the lung counterpart of generated.py (``config.data.dataset =
"generated_lung"``), numpy/scipy only so that it runs in Grain worker processes.

One pair (deterministic from (seed, index)):
  fixed  = phantom at end-inhale (body, two lungs, vessel-like bright branches, ribs)
  motion = a smooth stationary velocity w: diaphragm motion along D (superior-inferior) of
           ``diaphragm_mm`` (random in 5..20 mm) fading towards the apex, plus rib-cage radial
           motion in-plane (a quarter of it)
  moving = fixed o exp(w)      (end-exhale)
  true_ddf = exp(-w) - id      warps moving back onto fixed (DESIGN.md pull convention)
  fixed_points = vessel voxels inside the lungs; moving_points = p + true_ddf(p), so the true
  TRE of a perfect registration is 0 and the zero-DDF TRE is the breathing motion.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from adreg_jax.data.generated import _resample, integrate, pair_rng

LUNG_LABELS = (1, 2)  # 1 body (soft tissue), 2 lungs


@dataclasses.dataclass
class GeneratedLungPairs:
    """Random-access source of thorax phantom pairs (len and getitem, a Grain data source).

    Args:
      shape: (D, H, W) of every volume; D is superior-inferior.
      length: number of distinct pairs.
      seed: with the index, determines the pair exactly.
      field_of_view_mm: (3,) physical extent; spacing = field_of_view_mm / shape.
      motion_mm: (low, high) range of the diaphragm motion.
      num_points: landmarks per pair.
    """

    shape: tuple[int, int, int]
    length: int
    seed: int = 0
    field_of_view_mm: tuple[float, float, float] = (300.0, 320.0, 320.0)
    motion_mm: tuple[float, float] = (5.0, 20.0)
    num_points: int = 32

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = pair_rng(self.seed, index, self.length)
        shape = tuple(int(n) for n in self.shape)
        spacing = np.asarray(self.field_of_view_mm, np.float32) / np.asarray(shape, np.float32)
        # normalised coordinates in [-1, 1] along each axis
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                              indexing="ij")  # fmt: skip
        body = (y / rng.uniform(0.6, 0.75)) ** 2 + (x / rng.uniform(0.8, 0.9)) ** 2 < 1
        image = np.where(body, 0.5, 0.0).astype(np.float32)
        lungs = np.zeros(shape, bool)
        for side in (-1.0, 1.0):
            cx = side * rng.uniform(0.35, 0.45)
            radius = ((y + 0.05) / 0.45) ** 2 + ((x - cx) / 0.3) ** 2 + ((z - 0.1) / 0.8) ** 2
            lungs |= radius < 1
        image[lungs] = 0.1
        # vessel-like bright branches: random smooth noise thresholded inside the lungs
        noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.0)
        vessels = lungs & (noise > np.quantile(noise[lungs], 0.93) if lungs.any() else False)
        image[vessels] = 0.8
        # ribs: a bright ring just inside the body outline, in bands along D
        ring = np.abs(np.sqrt((y / 0.62) ** 2 + (x / 0.82) ** 2) - 0.92) < 0.04
        bands = np.cos(z * np.pi * rng.uniform(5.0, 7.0)) > 0.3
        image[ring & bands & body] = 1.0
        # a little blur, as a CT's point spread: keeps thin vessels interpolable
        image = ndimage.gaussian_filter(image, 0.7)

        # breathing velocity in voxels: diaphragm motion along D fading towards the apex
        amplitude_mm = rng.uniform(*self.motion_mm)
        fade = np.clip((z + 1.0) / 2.0, 0.0, 1.0) ** 1.5  # 0 at the apex (z=-1), 1 at the base
        inside = ndimage.gaussian_filter(body.astype(np.float32), 2.0)
        velocity = np.zeros(shape + (3,), np.float32)
        velocity[..., 0] = -amplitude_mm / spacing[0] * fade * inside
        radial_mm = 0.25 * amplitude_mm
        velocity[..., 1] = radial_mm / spacing[1] * y * inside
        velocity[..., 2] = radial_mm / spacing[2] * x * inside
        moving = _resample(image, integrate(velocity), order=1)
        true_ddf = integrate(-velocity).astype(np.float32)
        labels = np.where(lungs, 2, np.where(body, 1, 0)).astype(np.int32)
        moving_labels = _resample(labels, integrate(velocity), order=0).astype(np.int32)

        candidates = np.argwhere(vessels)
        if len(candidates) == 0:
            candidates = np.argwhere(np.ones(shape, bool))
        chosen = candidates[rng.choice(len(candidates), self.num_points, replace=True)]
        fixed_points = chosen.astype(np.float32)
        moved = np.stack(
            [ndimage.map_coordinates(true_ddf[..., k], fixed_points.T, order=1) for k in range(3)],
            axis=-1,
        )
        return {
            "fixed": image[..., None],
            "moving": np.clip(moving, 0.0, 1.0)[..., None].astype(np.float32),
            "fixed_seg": labels,
            "moving_seg": moving_labels,
            "fixed_points": fixed_points,
            "moving_points": (fixed_points + moved).astype(np.float32),
            "points_mask": np.ones(self.num_points, bool),
            "spacing": spacing,
            "true_ddf": true_ddf,
        }


def thorax_hu(
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    points: np.ndarray,
    lung_margin_mm: float = 15.0,
    seed: int = 0,
) -> np.ndarray:
    """A thorax-like int16 CT in HU whose lungs hold the given landmarks (for DIR-Lab-format
    test cases at any size, e.g. with the real landmark files).

    (D, H, W) = (z, y, x); air -1000 outside; a soft-tissue (40 HU) elliptic body along z around
    the points; lungs (-850 HU) = everything within ``lung_margin_mm`` of a point; a couch (+300
    HU) under the body where the field of view has room; noise of 10 HU.
    """
    spacing = np.asarray(spacing, np.float64)
    points = np.asarray(points, np.float64)
    near = np.ones(shape, bool)
    near[tuple(np.clip(np.round(points), 0, np.asarray(shape) - 1).astype(int).T)] = False
    lungs = ndimage.distance_transform_edt(near, sampling=spacing) <= lung_margin_mm
    low, high = points.min(axis=0), points.max(axis=0)
    centre = (low + high) / 2.0
    # the body's ellipse holds the lungs' bounding rectangle (corners at sqrt(2) of the half sides)
    half_mm = np.sqrt(2.0) * ((high - low) / 2.0 * spacing + lung_margin_mm) + 10.0
    y = (np.arange(shape[1]) - centre[1]) * spacing[1] / half_mm[1]
    x = (np.arange(shape[2]) - centre[2]) * spacing[2] / half_mm[2]
    body = (y[:, None] ** 2 + x[None, :] ** 2) <= 1.0
    volume = np.full(shape, -1000.0, np.float32)
    volume[:, body] = 40.0
    couch = int(np.ceil(centre[1] + half_mm[1] / spacing[1] + 10.0 / spacing[1]))
    if couch + 3 < shape[1]:
        volume[:, couch : couch + 3, :] = 300.0
    volume[lungs] = -850.0
    volume += np.random.default_rng(seed).normal(0.0, 10.0, shape).astype(np.float32)
    return np.clip(np.round(volume), -1024, 3071).astype(np.int16)
