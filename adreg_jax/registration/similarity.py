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
    ``stats``): for ``ncc`` its local sums and variances (``ops.ncc_reference_stats``, 2 of the 5
    box sums of every call), for ``mi`` its Parzen weights (``ops.parzen_weights``, half the
    histogramming of every call). The affine and deformable stages compute them once per level."""
    if name == "ncc":
        return ops.ncc_reference_stats(fixed, NCC_WINDOW)
    if name == "mi":
        return ops.parzen_weights(fixed, MI_BINS, MI_SIGMA_RATIO)
    raise ValueError(f"--similarity {name!r}: expected one of {SIMILARITIES}")


def similarity_fn(name: str):
    """``f(warped, fixed, weight=None, stats=None) -> scalar``, higher is better; images
    (1, D, H, W, 1), ``weight`` (1, D, H, W, 1) in [0, 1] or None (every voxel counts),
    ``stats``: ``fixed_statistics(name, fixed)`` or None (computed in the call)."""
    if name == "ncc":

        def ncc(a, b, weight=None, stats=None):
            if weight is None and stats is None:
                return jnp.mean(ops.ncc_local(a, b, window=NCC_WINDOW))
            cc = ops.ncc_local_map(a, b, window=NCC_WINDOW, b_stats=stats)
            if weight is None:
                return jnp.mean(cc)
            return jnp.sum(cc * weight) / jnp.maximum(jnp.sum(weight), 1e-6)

        return ncc
    if name == "mi":

        def mi(a, b, weight=None, stats=None):
            return jnp.mean(
                ops.mutual_information(
                    a, b, MI_BINS, MI_SIGMA_RATIO, weight=weight, b_weights=stats
                )
            )

        return mi
    raise ValueError(f"--similarity {name!r}: expected one of {SIMILARITIES}")
