"""Synthesised brain pairs (SynthMorph-like): random contrasts drawn from deformed label maps.

Where this sits: ``config.data.dataset = "synth_brain"`` (``configs/brain.py``), fed to the Grain
pipeline (pipeline.py) like the generated brain pairs. Everything is numpy/scipy so that it runs
in Grain worker processes without JAX. A network trained on these pairs with a label loss
(``config.loss.dice_weight``) cannot rely on one contrast: it learns to align anatomy.

One pair (deterministic from (seed, index)):
  fine labels   the packaged 2 mm MNI152 tissue labels (1 CSF, 2 GM, 3 WM), each tissue split
                into 1-4 sub-labels by quantiles of the atlas T1 inside it, and (half of the
                pairs) a head shell of 1-3 random blob labels around the brain: many boundaries
  subjects      moving = fine labels o T_m, a random subject, and fixed = moving o U: the same
                anatomy under a second random map U (inter-subject differences after an affine
                stage), each of T_m and U a small random affine map (rotation, scale, shift
                about the centre) after a random smooth diffeomorphism (a velocity on control
                points ``scale_mm`` apart, integrated by scaling and squaring; with
                ``detail_mm``, after a second, finer one too); the fixed labels are sampled
                once, through T_m o U
  images        each drawn from its label map: a uniform random mean and a random std per label,
                Gaussian blur, a smooth multiplicative bias field, gamma, Gaussian noise, min-max
                to [0, 1]; with probability ``same_contrast`` fixed and moving share one
                label -> intensity map, and with probability ``real_contrast`` a map is the
                atlas's own T1 intensities (real T1-like contrast in the mix)
  segs          ``fixed_seg`` / ``moving_seg``: the tissue labels 0..3 of each subject (nearest)
  true_ddf      U - id in voxels, the field that warps moving onto fixed (the pull convention of
                DESIGN.md): a dense target for a supervised term (``loss.ddf_weight``) that
                teaches a network far faster than the label overlap alone
  same_contrast 1.0 where both images take one label -> intensity map (a shared map, or the
                atlas's T1 twice), else 0.0: the pairs on which an intensity similarity such as
                local NCC is a right loss (``losses.registration_loss`` counts it on those only)

The grid: the atlas (cropped to the brain) is zero padded, centred, to ``FULL_EXTENT`` at its own
2 mm (the extent of the 2 mm MNI grid, each side a multiple of 16), then resampled to the
requested shape when it differs (the spacing scaled to match), so that a small test grid sees
the same field of view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from adreg_jax.data.generated import (
    BRAIN_LABELS,
    _resample,
    compose,
    integrate,
    load_atlas,
    pair_rng,
    smooth_velocity,
)
from adreg_jax.data.preprocess import crop_or_pad

FULL_EXTENT = (96, 112, 96)  # voxels of 2 mm: 192 x 224 x 192 mm, the MNI152 2 mm grid's extent
SUBLABELS = 4  # fine label = 4 * tissue + sub-label; tissue = fine // 4 (0: background, shell)
SYNTH_LABELS = BRAIN_LABELS  # evaluated with Dice: CSF, GM, WM
# mm between the control points of a smooth deformation, (low, high), log-uniform: 32 mm is what
# the 2 mm MNI grid had before this was set in mm (configs/default.py's data.synth_scale_mm)
SCALE_MM = (32.0, 32.0)
DETAIL_SCALE_MM = (8.0, 16.0)  # the finer map's control points (subject_ddf's detail_mm)


def atlas_on_grid(
    shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 image (D, H, W) in [0, 1], tissue labels (D, H, W) int32, spacing (3,) mm) of the
    atlas padded to ``FULL_EXTENT`` at 2 mm, then resampled to ``shape`` (linear for the image,
    nearest for the labels) when given and different."""
    image, labels, spacing = load_atlas()
    image, _ = crop_or_pad(image, FULL_EXTENT)
    labels, _ = crop_or_pad(labels, FULL_EXTENT)
    if shape is not None and tuple(shape) != FULL_EXTENT:
        factors = [n / o for n, o in zip(shape, FULL_EXTENT, strict=True)]
        image = ndimage.zoom(image, factors, order=1, grid_mode=True, mode="grid-constant")
        labels = ndimage.zoom(labels, factors, order=0, grid_mode=True, mode="grid-constant")
        spacing = spacing / np.asarray(factors, np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels.astype(np.int32), spacing


def fine_labels(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, shell_distance: np.ndarray
) -> np.ndarray:
    """The atlas's tissues split into sub-labels ``4 * tissue + s`` (s < 1-4 random, by random
    quantiles of the T1 inside the tissue) and, with probability 1/2, a head shell of random
    thickness (4-12 mm, ``shell_distance`` in mm from the brain) split into blob labels 1..3."""
    fine = np.zeros(labels.shape, np.int32)
    for tissue in BRAIN_LABELS:
        inside = labels == tissue
        count = int(rng.integers(1, SUBLABELS + 1))
        values = image[inside]
        cuts = np.sort(rng.uniform(0.1, 0.9, size=count - 1))
        thresholds = np.quantile(values, cuts) if values.size and count > 1 else np.zeros(0)
        fine[inside] = SUBLABELS * tissue + np.searchsorted(thresholds, values)
    if rng.random() < 0.5:
        shell = (shell_distance > 0) & (shell_distance <= rng.uniform(4.0, 12.0))
        blobs = smooth_velocity(rng, labels.shape, 1.0)  # three smooth random fields
        fine[shell] = 1 + np.argmax(blobs[shell], axis=-1)
    return fine


def random_affine(
    rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, affine: Sequence[float]
) -> np.ndarray:
    """(4, 4) voxel map p -> M (p - c) + c + t about the grid centre c: rotations up to
    ``affine[0]`` degrees about each axis, scales 1 +- ``affine[1]``, shifts up to ``affine[2]``
    mm (uniform). Rotations act in mm, so anisotropic voxels rotate as physical space does."""
    degrees, scale, shift_mm = (float(a) for a in affine)
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-degrees, degrees, size=3))):
        a, b = [k for k in range(3) if k != axis]
        rotation = np.eye(3)
        rotation[a, a] = rotation[b, b] = np.cos(angle)
        rotation[a, b], rotation[b, a] = -np.sin(angle), np.sin(angle)
        matrix = rotation @ matrix
    matrix = matrix @ np.diag(1.0 + rng.uniform(-scale, scale, size=3))
    to_mm = np.diag(spacing.astype(np.float64))
    voxel_matrix = np.linalg.inv(to_mm) @ matrix @ to_mm
    centre = (np.asarray(shape, np.float64) - 1.0) / 2.0
    shift = rng.uniform(-shift_mm, shift_mm, size=3) / spacing
    out = np.eye(4)
    out[:3, :3] = voxel_matrix
    out[:3, 3] = centre - voxel_matrix @ centre + shift
    return out


def subject_ddf(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: np.ndarray,
    max_mm: float,
    affine: Sequence[float],
    scale_mm: Sequence[float] = SCALE_MM,
    detail_mm: float = 0.0,
    detail_scale_mm: Sequence[float] = DETAIL_SCALE_MM,
) -> np.ndarray:
    """The DDF (D, H, W, 3) in voxels of one random subject: q(p) = A(p + phi(p)), with phi a
    smooth diffeomorphism whose velocity's largest component is uniform in [max_mm / 4, max_mm]
    mm, and A = ``random_affine``: ``labels(p + ddf(p))`` is the subject's label map.

    With ``detail_mm`` > 0, phi is that map after a second, finer one (p -> p + detail(p), then
    phi's coarse map): a diffeomorphism of the same kind whose largest velocity is up to
    ``detail_mm`` on control points ``detail_scale_mm`` apart. Real anatomy differs at every
    scale; the coarse map alone (16-48 mm) taught a network nothing finer (known fields of 6-16 mm
    on the MNI template: cosine 0.26-0.38 against 0.68 at 16-48 mm, 2026-11-28). Without it (the
    default) no random number more is drawn, so earlier recipes give the same pairs.

    The velocity is noise on control points ``scale_mm`` apart (log-uniform in that range), so
    a deformation varies over the same millimetres on any grid. (Until 2026-11-28 the points were
    8 voxels of a half-resolution grid apart: 32 mm on the 2 mm MNI grid, but on the 6 mm
    training grid 2 points per axis, a bend of the whole brain, which is what the first shipped
    model learnt.)"""
    ddf = np.zeros((*shape, 3), np.float32)
    if max_mm > 0:
        low, high = (float(s) for s in scale_mm)
        scale = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        # integrated on a grid half as fine when that grid still has 4 voxels per control-point
        # spacing (4 times cheaper to integrate), then upsampled with its values rescaled to
        # voxels of ``shape``
        coarsen = 2 if scale / float(np.max(spacing)) >= 8.0 else 1
        half = tuple(max(2, (n + coarsen - 1) // coarsen) for n in shape)
        factors = np.asarray(shape, np.float32) / np.asarray(half, np.float32)
        largest = rng.uniform(0.25, 1.0) * max_mm / float(np.min(spacing * factors))
        coarse = integrate(smooth_velocity(rng, half, largest, scale / (spacing * factors)))
        ddf = np.stack(
            [
                ndimage.zoom(coarse[..., k], factors, order=1, grid_mode=True, mode="nearest")
                * factors[k]
                for k in range(3)
            ],
            axis=-1,
        )
    if detail_mm > 0:
        low, high = (float(s) for s in detail_scale_mm)
        detail_scale = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        largest = rng.uniform(0.25, 1.0) * detail_mm / float(np.min(spacing))
        detail = integrate(smooth_velocity(rng, shape, largest, detail_scale / spacing))
        ddf = compose(detail, ddf)
    matrix = random_affine(rng, shape, spacing, affine)
    points = np.indices(shape, dtype=np.float32).transpose(1, 2, 3, 0) + ddf
    mapped = points @ matrix[:3, :3].T.astype(np.float32) + matrix[:3, 3].astype(np.float32)
    return (mapped - np.indices(shape, dtype=np.float32).transpose(1, 2, 3, 0)).astype(np.float32)


def draw_contrast(rng: np.random.Generator, num_labels: int, real_contrast: float) -> dict:
    """A label -> intensity map: a mean uniform in [0, 1] and a std uniform in [0, 0.1] per fine
    label (the background is 0 in half the maps, as in skull-stripped scans), or with
    probability ``real_contrast`` the atlas's own T1 (``means`` None)."""
    if rng.random() < real_contrast:
        return {"means": None, "stds": rng.uniform(0.0, 0.03, size=num_labels)}
    means = rng.uniform(0.0, 1.0, size=num_labels)
    if rng.random() < 0.5:
        means[0] = 0.0
    return {"means": means, "stds": rng.uniform(0.0, 0.1, size=num_labels)}


def render(
    rng: np.random.Generator, labels: np.ndarray, t1: np.ndarray, contrast: dict
) -> np.ndarray:
    """One image (D, H, W) in [0, 1] of a fine label map: per-label intensities (``contrast``;
    ``t1`` when its means are None), Gaussian blur (sigma uniform in [0, 1] voxel), a smooth
    bias field (exp of a smooth field up to +-0.3), gamma (exp N(0, 0.25)), Gaussian noise (std
    uniform in [0, 0.03]), min-max."""
    noise = rng.normal(size=labels.shape).astype(np.float32)
    base = t1 if contrast["means"] is None else contrast["means"][labels].astype(np.float32)
    image = base + contrast["stds"][labels].astype(np.float32) * noise
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.0, 1.0))
    bias = smooth_velocity(rng, labels.shape, rng.uniform(0.0, 0.3))[..., 0]
    image = np.clip(image, 0.0, None) * np.exp(bias)
    image = (image / max(float(image.max()), 1e-6)) ** np.exp(rng.normal(scale=0.25))
    image = image + rng.normal(scale=rng.uniform(0.0, 0.03), size=labels.shape)
    low, high = float(image.min()), float(image.max())
    return ((image - low) / max(high - low, 1e-6)).astype(np.float32)


def options_from_config(data) -> dict:
    """``SynthBrainPairs``' options (also ``synth_device.DeviceSynthBrain``'s) from
    ``config.data``; the fields a run's saved config may predate take their defaults."""
    return {
        "max_mm": float(data.synth_max_mm),
        "affine": tuple(float(a) for a in data.synth_affine),
        "same_contrast": float(data.synth_same_contrast),
        "real_contrast": float(data.synth_real_contrast),
        "pair_max_mm": float(data.get("synth_pair_max_mm", data.synth_max_mm)),
        "pair_affine": tuple(float(a) for a in data.get("synth_pair_affine", data.synth_affine)),
        "scale_mm": tuple(float(a) for a in data.get("synth_scale_mm", SCALE_MM)),
        "detail_mm": float(data.get("synth_detail_mm", 0.0)),
        "detail_scale_mm": tuple(
            float(a) for a in data.get("synth_detail_scale_mm", DETAIL_SCALE_MM)
        ),
    }


@dataclasses.dataclass
class SynthBrainPairs:
    """Random-access source of synthesised brain pairs (a Grain data source: len and getitem).

    Args:
      shape: (D, H, W) of every volume (``FULL_EXTENT`` = the atlas at its own 2 mm).
      length: number of distinct pairs (any index below it is a fresh pair).
      seed: with the index, determines the pair exactly.
      max_mm: largest velocity component of the moving subject's smooth deformation, in mm.
      affine: (degrees, scale fraction, shift mm), the largest of the subject's affine map.
      scale_mm: (low, high), the spacing in mm of the control points of each smooth deformation
        (log-uniform per map; ``subject_ddf``): how local the deformations are.
      detail_mm, detail_scale_mm: a finer map inside each of them (``subject_ddf``; 0: none),
        for the subject and for the pair's map alike: anatomy and fields that vary at every scale.
      pair_max_mm, pair_affine: the same for the map U between the pair's images (the field to
        find); None: as the subject's. What an affine stage leaves to a deformable network is
        U without its affine part: ``pair_affine`` (0, 0, 0) trains for that.
      same_contrast: probability that fixed and moving share one label -> intensity map.
      real_contrast: probability that a map is the atlas's T1 intensities.
    """

    shape: tuple[int, int, int]
    length: int
    seed: int = 0
    max_mm: float = 8.0
    affine: tuple[float, float, float] = (5.0, 0.05, 4.0)
    same_contrast: float = 0.3
    real_contrast: float = 0.2
    pair_max_mm: float | None = None
    pair_affine: tuple[float, float, float] | None = None
    scale_mm: tuple[float, float] = SCALE_MM
    detail_mm: float = 0.0
    detail_scale_mm: tuple[float, float] = DETAIL_SCALE_MM

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        self._atlas = atlas_on_grid(self.shape)
        image, labels, spacing = self._atlas
        self._shell_distance = ndimage.distance_transform_edt(labels == 0, sampling=spacing)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = pair_rng(self.seed, index, self.length)
        t1, labels, spacing = self._atlas
        fine = fine_labels(rng, t1, labels, self._shell_distance)
        num_labels = SUBLABELS * (max(BRAIN_LABELS) + 1)
        shared = rng.random() < self.same_contrast
        first = draw_contrast(rng, num_labels, self.real_contrast)
        contrasts = (first, first if shared else draw_contrast(rng, num_labels, self.real_contrast))
        detail = (self.detail_mm, self.detail_scale_mm)
        moving_ddf = subject_ddf(
            rng, self.shape, spacing, self.max_mm, self.affine, self.scale_mm, *detail
        )
        true_ddf = subject_ddf(
            rng,
            self.shape,
            spacing,
            self.max_mm if self.pair_max_mm is None else self.pair_max_mm,
            self.affine if self.pair_affine is None else self.pair_affine,
            self.scale_mm,
            *detail,
        )
        fixed_ddf = compose(true_ddf, moving_ddf)
        same = shared or (contrasts[0]["means"] is None and contrasts[1]["means"] is None)
        element = {"true_ddf": true_ddf, "same_contrast": np.float32(same)}
        for name, contrast, ddf in zip(
            ("fixed", "moving"), contrasts, (fixed_ddf, moving_ddf), strict=True
        ):
            subject = _resample(fine, ddf, order=0)
            subject_t1 = _resample(t1, ddf, order=1)
            element[name] = render(rng, subject, subject_t1, contrast)[..., None]
            element[f"{name}_seg"] = (subject // SUBLABELS).astype(np.int32)
        element["spacing"] = spacing.astype(np.float32)
        return element
