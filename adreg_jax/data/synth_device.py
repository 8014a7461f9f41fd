"""Synthesised brain pairs drawn on the accelerator: ``synth.py``'s recipe in JAX, for training.

Where this sits: ``config.data.synth_on_device = True`` with ``dataset = "synth_brain"``; the
training loop (``pipeline.make_iterator``) then asks ``DeviceSynthBrain.batch(i)`` for batch i
instead of reading Grain's workers. The validation and test pairs stay those of the numpy
generator (``synth.SynthBrainPairs``), so that runs with and without it are measured on the same
held-out pairs.

Why: on a GPU host the numpy generator set the pace. The ablation study's five runs trained at
2.0-2.5 steps/s on one H200, mostly idle, their 15 workers making about 11 pairs/s together
(2026-11-28); a pair is 61 ``map_coordinates`` calls on one core. Here a batch is one jitted
program on the device that trains on it: no worker processes, no host-to-device copy.

The recipe is ``synth.py``'s, step for step (fine labels from the atlas's tissues and T1
quantiles, an optional head shell, a random subject and a purely deformable pair map, each a
smooth diffeomorphism with a finer one inside and an affine part, images drawn per label with
blur, bias field, gamma and noise, shared or mixed contrasts), with two differences, both for
static shapes under ``jit``:

- A smooth random field is white noise blurred by a Gaussian in Fourier space (on a grid padded
  by ``_PAD`` of the shape against wrap-around), not noise on control points ``scale`` apart,
  upsampled and blurred: the control spacing is random per map, and with it the numpy grid's
  shape. Its Gaussian's sigma is ``SIGMA_PER_SPACING`` times the control spacing and its mean
  absolute value is ``MEAN_PER_LARGEST`` times the numpy field's largest value, calibrated so
  that a pair's field is as large and as smooth as the numpy generator's (see the constants).
- Every map is integrated on the full grid (numpy integrates coarse maps on a half grid).

One more than numpy: with ``data.synth_shapes`` (a probability, 0 by default) a pair's anatomy
is a map of random shapes instead of the atlas's (SynthMorph's anatomy-free data: a network
that must register any shapes cannot learn one atlas's), drawn in random contrasts only.

The pairs are not those of the numpy generator for the same seed: pair i of the stream is
determined by (seed, i) through JAX's counter-based keys (``jax.random.fold_in``), in any order,
so a resumed run reads the batches it would have read. They are drawn with
``jax_threefry_partitionable`` off whatever the process's setting (JAX's default turned it on in
0.5; the bits differ between the two), so that a run resumed under another setting, or a test
that turns it off, reads the same pairs. Off, it is also faster on the CPU: configs/brain.py's
batch (30 % shapes) 0.53 s against 0.74 s with it on, compiled in 9.2 s against 9.8 s
(2026-12-07, 2-core CPU, 8 batches each in one process).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from adreg_jax import ops
from adreg_jax.data.generated import BRAIN_LABELS
from adreg_jax.data.synth import (
    DETAIL_SCALE_MM,
    SCALE_MM,
    SUBLABELS,
    atlas_on_grid,
    options_from_config,
)

# Calibrated on configs/brain.py's pairs (48 x 56 x 48, 4 mm; a coarse map over 16-48 mm with a
# finer one inside over 8-16 mm), so that the pair's field is as large and as smooth as the numpy
# generator's: ``python benchmarks/bench_data.py --config configs/brain.py --device 1 --pairs 24``
# (2026-12-07), mean field in the brain 3.19 mm against 3.29, mean |gradient| 0.097 against 0.103
# per mm, Dice before registration 0.647 against 0.646. (One field alone matches the numpy one's
# gradient per mean value at sigma 0.72 of the spacing, and the numpy field's mean value is
# 0.13-0.16 of its largest; composed and integrated, the pair's field needed less of both.)
SIGMA_PER_SPACING = 0.55
MEAN_PER_LARGEST = 0.115
NUM_FINE = SUBLABELS * (max(BRAIN_LABELS) + 1)  # fine labels 0..15: 4 per tissue, as synth.py's
# random-shape label maps (``data.synth_shapes``): the control spacing of their fields, mm
SHAPES_SCALE_MM = (16.0, 64.0)
_PAD = 0.5  # each side of the Fourier grid padded by this fraction of the shape
_STREAM = 0x5EED  # folded into the run's seed: the pairs' keys, apart from the model's
_BLUR_RADIUS = 3  # voxels: the image blur's sigma is at most 1 voxel


def smooth_field(key: jax.Array, shape: Sequence[int], sigma, channels: int) -> jax.Array:
    """A random smooth field (*shape, channels) with mean |value| 1: white noise on a grid padded
    by ``_PAD`` of the shape, blurred in Fourier space by a Gaussian of ``sigma`` voxels (one per
    axis, may be traced), cropped."""
    pad = [int(round(_PAD * n)) for n in shape]
    big = [n + 2 * p for n, p in zip(shape, pad, strict=True)]
    noise = jax.random.normal(key, (channels, *big), jnp.float32)
    freqs = [jnp.fft.fftfreq(n) for n in big[:-1]] + [jnp.fft.rfftfreq(big[-1])]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (3,))
    exponent = 0.0
    for axis, f in enumerate(freqs):
        shape_a = [1, 1, 1]
        shape_a[axis] = f.shape[0]
        exponent = exponent + (sigma[axis] * f.reshape(shape_a)) ** 2
    spectrum = jnp.fft.rfftn(noise, axes=(1, 2, 3)) * jnp.exp(-2.0 * jnp.pi**2 * exponent)[None]
    field = jnp.fft.irfftn(spectrum, s=big, axes=(1, 2, 3))
    field = field[
        :, pad[0] : pad[0] + shape[0], pad[1] : pad[1] + shape[1], pad[2] : pad[2] + shape[2]
    ]
    field = jnp.moveaxis(field, 0, -1)
    return field / jnp.maximum(jnp.mean(jnp.abs(field)), 1e-12)


def _log_uniform(key, low: float, high: float) -> jax.Array:
    return jnp.exp(jax.random.uniform(key, minval=np.log(low), maxval=np.log(high)))


def _velocity_ddf(key, shape, spacing, largest_mm: float, scale_mm: Sequence[float]) -> jax.Array:
    """exp(v) - id (*shape, 3) in voxels: v a smooth field on control spacings log-uniform in
    ``scale_mm``, its mean |value| ``MEAN_PER_LARGEST`` of a largest value uniform in
    [largest_mm / 4, largest_mm] (mm, in voxels of the finest axis, as numpy's)."""
    k_scale, k_size, k_field = jax.random.split(key, 3)
    scale = _log_uniform(k_scale, *(float(s) for s in scale_mm))
    largest = jax.random.uniform(k_size, minval=0.25, maxval=1.0) * largest_mm / jnp.min(spacing)
    field = smooth_field(k_field, shape, SIGMA_PER_SPACING * scale / spacing, 3)
    return ops.integrate_velocity(field * (MEAN_PER_LARGEST * largest), 4)


def _random_affine(key, shape, spacing, affine: Sequence[float]) -> tuple[jax.Array, jax.Array]:
    """(3x3 matrix, shift) in voxels of ``synth.random_affine``'s map about the grid centre."""
    degrees, scale, shift_mm = (float(a) for a in affine)
    k_angle, k_scale, k_shift = jax.random.split(key, 3)
    angles = jnp.deg2rad(jax.random.uniform(k_angle, (3,), minval=-degrees, maxval=degrees))
    matrix = jnp.eye(3)
    for axis in range(3):
        a, b = [k for k in range(3) if k != axis]
        c, s = jnp.cos(angles[axis]), jnp.sin(angles[axis])
        rotation = jnp.eye(3).at[a, a].set(c).at[b, b].set(c).at[a, b].set(-s).at[b, a].set(s)
        matrix = rotation @ matrix
    matrix = matrix @ jnp.diag(1.0 + jax.random.uniform(k_scale, (3,), minval=-scale, maxval=scale))
    voxel_matrix = jnp.diag(1.0 / spacing) @ matrix @ jnp.diag(spacing)
    centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
    shift = jax.random.uniform(k_shift, (3,), minval=-shift_mm, maxval=shift_mm) / spacing
    return voxel_matrix, centre - voxel_matrix @ centre + shift


class SynthOptions(NamedTuple):
    """``synth.SynthBrainPairs``' options and ``shapes`` (hashable: a static argument of the
    jitted batch; ``DeviceSynthBrain`` documents them)."""

    max_mm: float
    affine: tuple[float, float, float]
    same_contrast: float
    real_contrast: float
    pair_max_mm: float
    pair_affine: tuple[float, float, float]
    scale_mm: tuple[float, float]
    detail_mm: float
    detail_scale_mm: tuple[float, float]
    shapes: float


class Atlas(NamedTuple):
    """What every pair is drawn from, on the device: the atlas on the grid (``t1``, tissue
    ``labels``, ``shell_distance`` in mm from the brain), the sorted T1 values inside each
    tissue (``tissue_values``) and the grid's ``spacing`` (mm)."""

    t1: jax.Array
    labels: jax.Array
    shell_distance: jax.Array
    tissue_values: tuple[jax.Array, ...]
    spacing: jax.Array


class DeviceSynthBrain:
    """Batches of synthesised brain pairs made on the default device, with the keys of
    ``synth.SynthBrainPairs``' elements and its options (``from_config`` reads them from
    ``config.data`` as ``pipeline.build_dataset`` does, ``synth.options_from_config``), and
    ``shapes``: the probability that a pair's anatomy is random shapes (``_shape_labels``).

    ``batch(i)``: batch i (pairs ``i * batch_size`` to ``(i + 1) * batch_size - 1`` of the
    stream of ``seed``), one jitted program, shared by every generator of the same shape, batch
    size and options; ``pair(i)``: pair i alone (the same numbers)."""

    def __init__(
        self,
        shape: Sequence[int],
        batch_size: int,
        seed: int = 0,
        max_mm: float = 8.0,
        affine: Sequence[float] = (5.0, 0.05, 4.0),
        same_contrast: float = 0.3,
        real_contrast: float = 0.2,
        pair_max_mm: float | None = None,
        pair_affine: Sequence[float] | None = None,
        scale_mm: Sequence[float] = SCALE_MM,
        detail_mm: float = 0.0,
        detail_scale_mm: Sequence[float] = DETAIL_SCALE_MM,
        shapes: float = 0.0,
    ):
        self.shape = tuple(int(n) for n in shape)
        self.batch_size = int(batch_size)
        self.options = SynthOptions(
            max_mm=float(max_mm),
            affine=tuple(float(a) for a in affine),
            same_contrast=float(same_contrast),
            real_contrast=float(real_contrast),
            pair_max_mm=float(max_mm if pair_max_mm is None else pair_max_mm),
            pair_affine=tuple(float(a) for a in (affine if pair_affine is None else pair_affine)),
            scale_mm=tuple(float(v) for v in scale_mm),
            detail_mm=float(detail_mm),
            detail_scale_mm=tuple(float(v) for v in detail_scale_mm),
            shapes=float(shapes),
        )
        t1, labels, spacing = atlas_on_grid(self.shape)
        shell_distance = ndimage.distance_transform_edt(labels == 0, sampling=spacing)
        # the T1 values inside each tissue, sorted: its quantiles are the sub-label thresholds
        tissue_values = tuple(np.sort(t1[labels == tissue]) for tissue in BRAIN_LABELS)
        self._atlas = jax.device_put(
            Atlas(t1, labels, shell_distance.astype(np.float32), tissue_values, spacing)
        )
        self._key = jax.random.fold_in(jax.random.key(int(seed)), _STREAM)

    @classmethod
    def from_config(cls, data, seed: int) -> DeviceSynthBrain:
        """The generator of ``config.data`` (a "synth_brain" data set) for run seed ``seed``."""
        if data.dataset != "synth_brain":
            raise ValueError(
                f"config.data.synth_on_device needs config.data.dataset='synth_brain'; got "
                f"{data.dataset!r}"
            )
        if data.augment_flip or data.augment_intensity > 0:
            raise ValueError(
                "config.data.synth_on_device draws every pair fresh and applies no Grain "
                "augmentation: set config.data.augment_flip=False and "
                "config.data.augment_intensity=0"
            )
        return cls(
            shape=tuple(data.image_size),
            batch_size=int(data.batch_size),
            seed=int(seed),
            shapes=float(data.get("synth_shapes", 0.0)),
            **options_from_config(data),
        )

    def batch(self, index: int) -> dict[str, jax.Array]:
        """Batch ``index`` of the stream (arrays on the device, leading axis the batch)."""
        with jax.threefry_partitionable(False):
            return _batch(self._key, index, self._atlas, self.options, self.batch_size)

    def pair(self, index: int) -> dict[str, jax.Array]:
        """Pair ``index`` of the stream (no batch axis)."""
        with jax.threefry_partitionable(False):
            return _one_pair(jax.random.fold_in(self._key, index), self._atlas, self.options)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _batch(key, index, atlas: Atlas, options: SynthOptions, batch_size: int):
    first = index * batch_size
    keys = jax.vmap(lambda i: jax.random.fold_in(key, first + i))(jnp.arange(batch_size))
    return jax.vmap(_pair, in_axes=(0, None, None))(keys, atlas, options)


def _pair(key, atlas: Atlas, options: SynthOptions) -> dict[str, jax.Array]:
    """One pair: ``synth.SynthBrainPairs.__getitem__``'s steps."""
    o, shape = options, atlas.t1.shape
    keys = jax.random.split(key, 8)
    fine = _fine_labels(keys[0], atlas)
    real_contrast = o.real_contrast
    if o.shapes > 0:  # drawn from a key of its own: pairs without shapes stay as they were
        k_shapes, k_which = jax.random.split(jax.random.fold_in(key, len(keys)))
        is_shapes = jax.random.uniform(k_which) < o.shapes
        fine = jnp.where(is_shapes, _shape_labels(k_shapes, shape, atlas.spacing), fine)
        real_contrast = jnp.where(is_shapes, 0.0, real_contrast)  # no T1 for random shapes
    shared = jax.random.uniform(keys[1]) < o.same_contrast
    first = _contrast(keys[2], real_contrast)
    second = _contrast(keys[3], real_contrast)
    second = jax.tree.map(lambda a, b: jnp.where(shared, a, b), first, second)
    detail = (o.detail_mm, o.detail_scale_mm)
    moving_ddf = _subject_ddf(
        keys[4], shape, atlas.spacing, o.max_mm, o.affine, o.scale_mm, *detail
    )
    true_ddf = _subject_ddf(
        keys[5], shape, atlas.spacing, o.pair_max_mm, o.pair_affine, o.scale_mm, *detail
    )
    # fixed = moving o U: p -> p + U(p) -> through the moving subject's map
    fixed_ddf = ops.compose(moving_ddf, true_ddf)
    same = shared | (first["real"] & second["real"])
    element = {"true_ddf": true_ddf, "same_contrast": same.astype(jnp.float32)}
    for name, contrast, ddf, k in zip(
        ("fixed", "moving"), (first, second), (fixed_ddf, moving_ddf), keys[6:], strict=True
    ):
        subject = ops.warp(fine[..., None], ddf, order=0)[..., 0]
        subject_t1 = ops.warp(atlas.t1[..., None], ddf)[..., 0]
        element[name] = _render(k, subject, subject_t1, contrast)[..., None]
        element[f"{name}_seg"] = (subject // SUBLABELS).astype(jnp.int32)
    element["spacing"] = atlas.spacing
    return element


_one_pair = jax.jit(_pair, static_argnums=2)


def _fine_labels(key, atlas: Atlas) -> jax.Array:
    """``synth.fine_labels``: each tissue split into 1-4 sub-labels by random quantiles of the
    T1 inside it; with probability 1/2 a head shell (4-12 mm) of blob labels 1..3."""
    t1, labels = atlas.t1, atlas.labels
    keys = jax.random.split(key, 2 * len(BRAIN_LABELS) + 3)
    fine = jnp.zeros(labels.shape, jnp.int32)
    for i, (tissue, values) in enumerate(zip(BRAIN_LABELS, atlas.tissue_values, strict=True)):
        count = jax.random.randint(keys[2 * i], (), 1, SUBLABELS + 1)
        cuts = jax.random.uniform(keys[2 * i + 1], (SUBLABELS - 1,), minval=0.1, maxval=0.9)
        thresholds = jnp.quantile(values, cuts)
        # only count - 1 cuts: the others beyond every value
        thresholds = jnp.where(jnp.arange(SUBLABELS - 1) < count - 1, thresholds, jnp.inf)
        sub = jnp.sum(t1[..., None] > thresholds.reshape(1, 1, 1, -1), axis=-1)
        fine = jnp.where(labels == tissue, SUBLABELS * tissue + sub, fine)
    k_on, k_thick, k_blobs = keys[-3:]
    thickness = jax.random.uniform(k_thick, minval=4.0, maxval=12.0)
    shell = (atlas.shell_distance > 0) & (atlas.shell_distance <= thickness)
    shell = shell & (jax.random.uniform(k_on) < 0.5)
    blobs = smooth_field(k_blobs, labels.shape, SIGMA_PER_SPACING * 8.0, 3)
    return jnp.where(shell, 1 + jnp.argmax(blobs, axis=-1), fine)


def _shape_labels(key, shape, spacing) -> jax.Array:
    """A label map of random shapes, SynthMorph's anatomy-free training data (Hoffmann et al.
    2022): the argmax over ``NUM_FINE`` smooth random fields whose control spacing is
    log-uniform in ``SHAPES_SCALE_MM``. Every voxel has a label; ``label // SUBLABELS`` groups
    them into four classes, the "tissues" the Dice term overlaps (class 0 is no background)."""
    k_scale, k_fields = jax.random.split(key)
    scale = _log_uniform(k_scale, *SHAPES_SCALE_MM)
    fields = smooth_field(k_fields, shape, SIGMA_PER_SPACING * scale / spacing, NUM_FINE)
    return jnp.argmax(fields, axis=-1).astype(jnp.int32)


def _contrast(key, real_contrast) -> dict[str, jax.Array]:
    """``synth.draw_contrast``: per fine label a mean and a std, or the atlas's T1."""
    num_labels = NUM_FINE
    k_real, k_means, k_zero, k_stds = jax.random.split(key, 4)
    real = jax.random.uniform(k_real) < real_contrast
    means = jax.random.uniform(k_means, (num_labels,))
    means = means.at[0].multiply(jnp.where(jax.random.uniform(k_zero) < 0.5, 0.0, 1.0))
    stds = jax.random.uniform(k_stds, (num_labels,)) * jnp.where(real, 0.03, 0.1)
    return {"real": real, "means": means, "stds": stds}


def _render(key, labels, t1, contrast) -> jax.Array:
    """``synth.render``: intensities, blur, bias field, gamma, noise, min-max to [0, 1]."""
    keys = jax.random.split(key, 7)
    base = jnp.where(contrast["real"], t1, contrast["means"][labels])
    noise = jax.random.normal(keys[0], labels.shape)
    image = _blur(base + contrast["stds"][labels] * noise, jax.random.uniform(keys[1]))
    bias_size = jax.random.uniform(keys[2], maxval=0.3)
    bias = smooth_field(keys[3], labels.shape, SIGMA_PER_SPACING * 8.0, 1)[..., 0]
    image = jnp.clip(image, 0.0, None) * jnp.exp(bias * (MEAN_PER_LARGEST * bias_size))
    gamma = jnp.exp(0.25 * jax.random.normal(keys[4]))
    image = (image / jnp.maximum(jnp.max(image), 1e-6)) ** gamma
    noise_std = jax.random.uniform(keys[5], maxval=0.03)
    image = image + noise_std * jax.random.normal(keys[6], labels.shape)
    low, high = jnp.min(image), jnp.max(image)
    return (image - low) / jnp.maximum(high - low, 1e-6)


def _subject_ddf(key, shape, spacing, max_mm, affine, scale_mm, detail_mm, detail_scale_mm):
    """``synth.subject_ddf``: q(p) = A(p + phi(p)), phi the coarse map after the finer one."""
    k_coarse, k_detail, k_affine = jax.random.split(key, 3)
    ddf = jnp.zeros((*shape, 3), jnp.float32)
    if max_mm > 0:
        ddf = _velocity_ddf(k_coarse, shape, spacing, max_mm, scale_mm)
    if detail_mm > 0:
        detail = _velocity_ddf(k_detail, shape, spacing, detail_mm, detail_scale_mm)
        ddf = ops.compose(ddf, detail)  # p -> p + detail(p) -> through the coarse map
    matrix, shift = _random_affine(k_affine, shape, spacing, affine)
    grid = ops.identity_grid(shape)
    return (grid + ddf) @ matrix.T + shift.reshape(1, 1, 1, 3) - grid


def _blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """A Gaussian blur of ``sigma`` voxels (traced, at most 1) along each axis, edges mirrored
    (``scipy.ndimage.gaussian_filter``'s "reflect"); sigma 0 leaves the image as it is."""
    x = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * x**2 / jnp.maximum(sigma, 1e-3) ** 2)
    weights = weights / jnp.sum(weights)
    r = _BLUR_RADIUS
    for axis in range(3):
        widths = [(0, 0)] * 3
        widths[axis] = (r, r)
        padded = jnp.pad(image, widths, mode="symmetric")
        n = image.shape[axis]
        image = sum(
            weights[j] * jax.lax.slice_in_dim(padded, j, j + n, axis=axis) for j in range(2 * r + 1)
        )
    return image
