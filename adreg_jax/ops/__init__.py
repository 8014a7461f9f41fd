"""Pure, jit-able array functions of registration: resampling, Jacobians, similarity, metrics.

No Flax here: every function is a pure function of arrays, with the conventions of DESIGN.md
(channels-last, DDF in voxels of the fixed grid, warping pulls).
"""

from adreg_jax.ops.jacobian import (
    folding_fraction,
    jacobian_determinant,
    jacobian_matrix,
    jacobian_stats,
    negative_jacobian_penalty,
    smoothness,
)
from adreg_jax.ops.metrics import dice, sample_ddf_at_points, tre
from adreg_jax.ops.resample import (
    compose,
    identity_grid,
    integrate_velocity,
    resize_ddf,
    sample,
    warp,
)
from adreg_jax.ops.similarity import (
    box_sum,
    gaussian_taps,
    mse,
    mutual_information,
    ncc_global,
    ncc_local,
    ncc_local_map,
    ncc_local_maps,
    ncc_reference_stats,
    parzen_weights,
    ssim,
)

__all__ = [
    "box_sum",
    "compose",
    "dice",
    "folding_fraction",
    "gaussian_taps",
    "identity_grid",
    "integrate_velocity",
    "jacobian_determinant",
    "jacobian_matrix",
    "jacobian_stats",
    "mse",
    "mutual_information",
    "ncc_global",
    "ncc_local",
    "ncc_local_map",
    "ncc_local_maps",
    "ncc_reference_stats",
    "negative_jacobian_penalty",
    "parzen_weights",
    "resize_ddf",
    "sample",
    "sample_ddf_at_points",
    "smoothness",
    "ssim",
    "tre",
    "warp",
]
