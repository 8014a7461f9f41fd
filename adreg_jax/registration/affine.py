"""The affine stage of adreg-register: a 12-parameter map found by Adam on coarse grids.

Where this sits: loading -> **affine stage** (optional, ``--affine``) -> deformable stage, which
sees the moving image through the affine map; the written field is the composition.

The map is q = centre + half * ((I + M) p + t) with p = (x - centre) / half the normalised
coordinate of voxel x (centre = (n - 1) / 2, half = n / 2). Normalised coordinates agree between
grids resized with jax.image.resize (half-pixel centres), so (M, t) carries over between levels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.registration import programs
from adreg_jax.registration.deformable import apply_updates, lazy_adam, resize_image
from adreg_jax.registration.levels import affine_levels, affine_steps, level_shape, level_voxels
from adreg_jax.registration.similarity import (
    fixed_statistics,
    global_correlation,
    similarity_fn,
)


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
    steps: int | Sequence[int] | None = None,
    factors: Sequence[int | Sequence[int]] | None = None,
    learning_rate: float = 0.01,
    progress: bool = True,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    masks: tuple[jnp.ndarray, jnp.ndarray] | None = None,
):
    """Adam on (M, t) over coarse levels, starting from the centre-of-mass translation; returns
    (M, t) for ``affine_ddf``. Images (1, D, H, W, 1) on the fixed grid.

    ``masks``: (fixed mask, moving mask on the fixed grid), each (1, D, H, W, 1) in [0, 1], as
    the deformable stage takes them: the similarity counts the voxels inside the fixed mask whose
    point, mapped, falls inside the moving mask, and the centres of mass are those of the images
    inside their masks.

    ``factors``: the downsampling of each level (one number, or one per axis); by default
    ``levels.affine_levels`` of the fixed grid's shape and ``spacing`` (mm): voxels of about 8
    and 4 mm, near isotropic ((8, 8, 8), (4, 4, 4) for a 1 mm brain; (16, 16, 1), (8, 8, 1) for
    0.5 x 0.5 x 3 mm slices). ``steps``: Adam steps at every level (one number) or one per level;
    by default ``levels.affine_steps`` (by each level's cost).
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    if factors is None:
        factors = affine_levels(shape, spacing)
    if steps is None:
        per_level = list(affine_steps(level_voxels(shape, factors)))
    elif isinstance(steps, int):
        per_level = [steps] * len(factors)
    else:
        per_level = list(steps)
    if len(per_level) != len(factors):
        raise ValueError(f"steps {steps}: expected one number or one per level of {factors}")
    half = np.asarray(shape, np.float64) / 2.0
    # on the host (indexing a device array is a program of its own)
    inside = (1.0, 1.0) if masks is None else [np.asarray(m)[0, ..., 0] for m in masks]
    shift = centre_of_mass(np.asarray(moving)[0, ..., 0] * inside[1]) - centre_of_mass(
        np.asarray(fixed)[0, ..., 0] * inside[0]
    )
    params = {
        "matrix": np.zeros((3, 3), np.float32),
        "translation": (shift / half).astype(np.float32),
    }
    optimizer, step, init = _affine_step(similarity, float(learning_rate))
    bar = tqdm(total=sum(per_level), desc="affine", disable=not progress)
    for factor, level_steps in zip(factors, per_level, strict=True):
        grid = level_shape(shape, factor)
        fixed_l, moving_l = resize_image(fixed, grid), resize_image(moving, grid)
        masks_l = None if masks is None else tuple(resize_image(m, grid) for m in masks)
        state, stats = init(params, fixed_l)
        for _ in range(level_steps):
            params, state, loss = step(params, state, fixed_l, moving_l, masks_l, stats)
            bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return params["matrix"], params["translation"]


@functools.cache
def _affine_step(similarity: str, learning_rate: float):
    """(the optimizer (``deformable.lazy_adam``), one jitted Adam step on the affine parameters,
    the optimizer's jitted initialisation), cached like the deformable stage's steps so that a
    cohort compiles them once."""
    # Same modality: the global correlation. Local NCC, right for the deformable stage, is biased
    # here: it rewards the smoothing that magnification brings (measured: a rotated, shifted
    # textured phantom came out scaled by 0.95).
    if similarity == "ncc":

        def sim(a, b, weight, stats):
            return global_correlation(a, b, weight)

    else:
        sim = similarity_fn(similarity)
    optimizer = lazy_adam(learning_rate)

    def loss_fn(p, fixed, moving, masks, stats):
        ddf = affine_ddf(p["matrix"], p["translation"], fixed.shape[1:4])
        weight = None
        # index_once: the points, computed from the matrix, once per point rather than in each
        # of the 8 corner reads (a 1 mm brain pair's affine stage 0.64 -> 0.44 s, same map)
        if masks is not None:  # inside the fixed mask, mapped inside the moving one
            fixed_mask, moving_mask = masks
            weight = fixed_mask * ops.warp(moving_mask, ddf, index_once=True)
        return -sim(ops.warp(moving, ddf, index_once=True), fixed, weight, stats)

    @programs.jit(key=(similarity, learning_rate))
    def step(p, state, fixed, moving, masks, stats):
        loss, grad = jax.value_and_grad(loss_fn)(p, fixed, moving, masks, stats)
        updates, state = optimizer().update(grad, state, p)
        return apply_updates(p, updates), state, loss

    @programs.jit(key=(similarity, learning_rate))
    def init(p, fixed):  # one program, not one per zeros_like
        # what the similarity reuses of the level's fixed image at every step (``mi``: its
        # Parzen weights); the global correlation has nothing worth keeping
        stats = None if similarity == "ncc" else fixed_statistics(similarity, fixed)
        return optimizer().init(p), stats

    return optimizer, step, init


@programs.jit
def affine_warp(matrix, translation, moving):
    """The moving image (1, D, H, W, C) warped by the affine map (its DDF is not kept: the final
    field is ``affine_then``)."""
    return ops.warp(moving, affine_ddf(matrix, translation, moving.shape[1:4]))


@programs.jit
def affine_then(matrix, translation, ddf):
    """The DDF (1, D, H, W, 3) of the affine map first, then ``ddf`` (the deformable stage's
    field, which saw the moving image through the affine map): ``c(p) = b(p) + a(p + b(p))`` as
    ``ops.compose(affine_ddf(...), ddf)``, with the affine map evaluated where the points land
    instead of read by interpolation from a full-resolution copy of it: elementwise (a 1 mm
    brain: no 100 MB field written and gathered from), and exact beyond the grid's edge too,
    where ``ops.compose`` holds the edge value."""
    shape = ddf.shape[1:4]
    half = [n / 2.0 for n in shape]
    # coordinates one component at a time: (..., 3) minor-axis products are slow on XLA:CPU
    normalised = [
        (jax.lax.broadcasted_iota(jnp.float32, shape, j) + ddf[0, ..., j] - (n - 1) / 2.0) / h
        for j, (n, h) in enumerate(zip(shape, half, strict=True))
    ]
    components = [
        ddf[0, ..., k]
        + half[k] * (sum(matrix[k, j] * normalised[j] for j in range(3)) + translation[k])
        for k in range(3)
    ]
    return jnp.stack(components, axis=-1)[None]
