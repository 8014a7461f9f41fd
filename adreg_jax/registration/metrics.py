"""What adreg-register reports about a registered pair (metrics.json): image similarity before and
after, folding, Dice of label maps.

Where this sits: deformable stage -> **metrics** (computed on the fixed grid) -> metrics.json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.registration.deformable import similarity_fn


@functools.partial(jax.jit, static_argnums=3)
def field_and_image_metrics(ddf, moving, fixed, similarity: str):
    """(warped, det J, the image and folding metrics) of the final field, in one program."""
    sim = similarity_fn(similarity)
    warped = ops.warp(moving, ddf)
    metrics = {
        "ncc_before": ops.ncc_local(moving, fixed)[0],
        "ncc_after": ops.ncc_local(warped, fixed)[0],
        f"{similarity}_objective_before": sim(moving, fixed),
        f"{similarity}_objective_after": sim(warped, fixed),
        "folding_percent": 100.0 * ops.folding_fraction(ddf)[0],
    }
    return warped, ops.jacobian_determinant(ddf[0]), metrics


def dice_report(fixed_seg, moving_seg, warped_seg) -> dict:
    """Dice per label (the union of both maps' labels but 0) before and after, and their means."""
    labels = [int(v) for v in np.union1d(np.unique(fixed_seg), np.unique(moving_seg)) if v != 0]
    if not labels:
        return {}
    before = np.asarray(ops.dice(jnp.asarray(moving_seg), jnp.asarray(fixed_seg), labels))
    after = np.asarray(ops.dice(jnp.asarray(warped_seg), jnp.asarray(fixed_seg), labels))
    return {
        "dice": {str(k): float(v) for k, v in zip(labels, after, strict=True)},
        "dice_mean": float(np.nanmean(after)),
        "dice_before": {str(k): float(v) for k, v in zip(labels, before, strict=True)},
        "dice_mean_before": float(np.nanmean(before)),
    }
