"""The similarities the registration stages maximise, optionally counted inside a mask only.

Where this sits: used by the affine stage, the deformable stage and the metrics of
adreg-register. ``ncc`` is local NCC (window 5, same modality); ``mi`` is Parzen mutual
information (different modalities); ``global_correlation`` the affine stage's same-modality
measure. With a weight map (``--fixed-mask``, and ``--moving-mask``
warped with the moving image) the similarity is the weighted mean of the local NCC map, or the
MI of the weighted joint histogram: voxels outside count for nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

from adreg_jax import ops
from adreg_jax.ops.similarity import box_sum

SIMILARITIES = ("ncc", "mi")
NCC_WINDOW = 5
MI_BINS = 32
MI_SIGMA_RATIO = 0.5  # Parzen sigma in bin widths, as ops.mutual_information's default


def global_correlation(a, b, weight=None):
    """Pearson correlation of images (1, D, H, W, 1), ``ops.ncc_global``; with a weight map
    (1, D, H, W, 1) in [0, 1], the weighted correlation: means, covariance and variances as
    weighted sums over the voxels (weight 1: ``ops.ncc_global``)."""
    if weight is None:
        return jnp.mean(ops.ncc_global(a, b))
    total = jnp.maximum(jnp.sum(weight), 1e-6)
    da = a - jnp.sum(weight * a) / total
    db = b - jnp.sum(weight * b) / total
    covariance = jnp.sum(weight * da * db)
    return covariance / jnp.sqrt(jnp.sum(weight * da * da) * jnp.sum(weight * db * db) + 1e-8)


def fixed_statistics(name: str, fixed):
    """What ``similarity_fn(name)`` can reuse of the fixed image between calls (pass it as
    ``stats``): for ``ncc`` its local sums and variances (2 of the 5 box sums of every call),
    for ``mi`` nothing (None). The deformable stage computes them once per level."""
    if name != "ncc":
        return None
    b = fixed.astype(jnp.float32)
    n = float(NCC_WINDOW**3)
    sb = box_sum(b, NCC_WINDOW)
    return sb, box_sum(b * b, NCC_WINDOW) - sb * sb / n


def _ncc_map_with_stats(a, b, stats, eps: float = 1e-5):
    """``ops.ncc_local_map(a, b, NCC_WINDOW)`` with b's box sums ``stats``
    (``fixed_statistics``): the same formula."""
    n = float(NCC_WINDOW**3)
    sb, var_b = stats
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    sa, saa, sab = (box_sum(x, NCC_WINDOW) for x in (a, a * a, a * b))
    cross = sab - sa * sb / n
    var_a = saa - sa * sa / n
    return cross * cross / (var_a * var_b + eps)


def similarity_fn(name: str):
    """``f(warped, fixed, weight=None, stats=None) -> scalar``, higher is better; images
    (1, D, H, W, 1), ``weight`` (1, D, H, W, 1) in [0, 1] or None (every voxel counts),
    ``stats``: ``fixed_statistics(name, fixed)`` or None (computed in the call)."""
    if name == "ncc":

        def ncc(a, b, weight=None, stats=None):
            if stats is not None:
                cc = _ncc_map_with_stats(a, b, stats)
            elif weight is None:
                return jnp.mean(ops.ncc_local(a, b, window=NCC_WINDOW))
            else:
                cc = ops.ncc_local_map(a, b, window=NCC_WINDOW)
            if weight is None:
                return jnp.mean(cc)
            return jnp.sum(cc * weight) / jnp.maximum(jnp.sum(weight), 1e-6)

        return ncc
    if name == "mi":

        def mi(a, b, weight=None, stats=None):
            return jnp.mean(ops.mutual_information(a, b, MI_BINS, MI_SIGMA_RATIO, weight=weight))

        return mi
    raise ValueError(f"--similarity {name!r}: expected one of {SIMILARITIES}")
