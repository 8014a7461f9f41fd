"""Accuracy metrics: Dice overlap of label maps and target registration error of landmarks.

Where this sits: validation in the training loop, ``eval.py`` tables, ``adreg-register``'s
metrics.json. Conventions of DESIGN.md: label maps are (..., D, H, W) integer ids; points are
(N, 3) 0-based voxel coordinates in (D, H, W) order; spacing is (sd, sh, sw) in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from adreg_jax.ops._checks import (
    check_ddf,
    check_integer,
    check_labels,
    check_points,
    check_spacing,
)
from adreg_jax.ops.resample import sample


def dice(seg_a: jnp.ndarray, seg_b: jnp.ndarray, labels: Sequence[int]) -> jnp.ndarray:
    """Dice per label, ``2 |A and B| / (|A| + |B|)``: (..., D, H, W) maps -> (..., len(labels)).

    A label absent from both maps gives NaN, so that ``jnp.nanmean`` leaves it out of means.
    """
    check_integer(seg_a, "seg_a")
    check_integer(seg_b, "seg_b")
    if seg_a.shape != seg_b.shape:
        raise ValueError(
            f"seg_a has shape {tuple(seg_a.shape)} but seg_b has shape {tuple(seg_b.shape)}; "
            "expected equal (..., D, H, W) label maps"
        )
    if seg_a.ndim < 3:
        raise ValueError(f"seg_a has shape {tuple(seg_a.shape)}; expected (..., D, H, W)")
    scores = []
    for label in check_labels(labels):
        in_a = seg_a == label
        in_b = seg_b == label
        inter = jnp.sum(in_a & in_b, axis=(-3, -2, -1)).astype(jnp.float32)
        total = (jnp.sum(in_a, axis=(-3, -2, -1)) + jnp.sum(in_b, axis=(-3, -2, -1))).astype(
            jnp.float32
        )
        scores.append(jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), jnp.nan))
    return jnp.stack(scores, axis=-1)


def sample_ddf_at_points(ddf: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
    """Trilinear DDF values (N, 3) at voxel points (N, 3), edge values beyond the grid."""
    return sample(ddf[None], points[None].astype(jnp.float32), order=1, mode="border")[0]


def tre(
    fixed_points: jnp.ndarray,
    moving_points: jnp.ndarray,
    ddf: jnp.ndarray,
    spacing: Sequence[float] | jnp.ndarray,
) -> jnp.ndarray:
    """Target registration error per landmark in mm: (N,).

    Fixed points p map to ``p + ddf(p)`` (DDF sampled trilinearly at p); the error is
    ``|| (p + ddf(p) - q) * spacing ||`` for the corresponding moving point q.

    Args:
      fixed_points, moving_points: (N, 3) voxel coordinates (D, H, W order, 0-based).
      ddf: (D, H, W, 3) the field on the fixed grid.
      spacing: (3,) mm per voxel along (D, H, W).
    """
    check_points(fixed_points, "fixed_points")
    check_points(moving_points, "moving_points")
    if fixed_points.shape != moving_points.shape:
        raise ValueError(
            f"fixed_points has shape {tuple(fixed_points.shape)} but moving_points has shape "
            f"{tuple(moving_points.shape)}; expected the same (N, 3)"
        )
    check_ddf(ddf)
    if ddf.ndim != 4:
        raise ValueError(f"ddf must be one field (D, H, W, 3); got shape {tuple(ddf.shape)}")
    spacing_mm = check_spacing(spacing)
    fixed_points = fixed_points.astype(jnp.float32)
    mapped = fixed_points + sample_ddf_at_points(ddf, fixed_points)
    error_mm = (mapped - moving_points.astype(jnp.float32)) * spacing_mm[None, :]
    return jnp.sqrt(jnp.sum(error_mm * error_mm, axis=-1))
