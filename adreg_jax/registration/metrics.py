"""What adreg-register reports about a registered pair (metrics.json): image similarity before and
after, folding, Dice of label maps.

Where this sits: deformable stage -> **metrics** (computed on the fixed grid) -> metrics.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.registration import programs
from adreg_jax.registration.deformable import resize_image
from adreg_jax.registration.similarity import NCC_WINDOW, fixed_statistics, similarity_fn


def _ncc_pair(fixed, images, window: int):
    """``ops.ncc_local(image, fixed, window)`` of each of ``images`` (1, D, H, W, 1), the fixed
    image's box sums computed once (``ops.ncc_local_maps``: a full-resolution box sum of a 1 mm
    brain is ~0.1 s)."""
    # each map materialised before its mean: a mean fused with its elementwise producer ran as a
    # slow loop on XLA:CPU (twice the time of the map and a plain mean)
    maps = ops.ncc_local_maps(images, fixed, window)
    return [jnp.mean(jax.lax.optimization_barrier(m)) for m in maps]


@programs.jit
def warp_and_jacobian(ddf, moving):
    """(moving warped by the final field, det J, % of det J <= 0): what the outputs need first."""
    jacobian = ops.jacobian_determinant(ddf[0])
    folding = 100.0 * jnp.mean((jacobian <= 0).astype(jnp.float32))
    return ops.warp(moving, ddf), jacobian, folding


@programs.jit(static_argnums=(3, 4))
def image_metrics(moving, warped, fixed, similarity: str, objective_shape=None):
    """Local NCC (``ops.ncc_local``, window 9) and the chosen similarity's objective, before
    (``moving``) and after (``warped``) registration: a second program, so that the command
    can draw the PNG and write files while XLA computes it.

    The objective is measured on a grid of ``objective_shape`` (the finest level's, where the
    optimisation measured it; None: the full grid): at full resolution its NCC maps were half
    of a 1 mm brain command's metrics (16 box sums over 7-9 M voxels)."""
    ncc_before, ncc_after = _ncc_pair(fixed, (moving, warped), 9)  # ops.ncc_local's window
    if objective_shape is not None and tuple(objective_shape) != tuple(fixed.shape[1:4]):
        moving, warped, fixed = (resize_image(x, objective_shape) for x in (moving, warped, fixed))
    if similarity == "ncc":  # the objective: local NCC, window NCC_WINDOW
        objective = _ncc_pair(fixed, (moving, warped), NCC_WINDOW)
    else:
        sim = similarity_fn(similarity)
        stats = fixed_statistics(similarity, fixed)  # once for both (MI: the Parzen weights)
        objective = (sim(moving, fixed, stats=stats), sim(warped, fixed, stats=stats))
    return {
        "ncc_before": ncc_before,
        "ncc_after": ncc_after,
        f"{similarity}_objective_before": objective[0],
        f"{similarity}_objective_after": objective[1],
    }


@programs.jit(static_argnums=(3,))
def network_objective_gain(fixed, source, ddf, similarity: str, masks=None):
    """How much a network's field ``ddf`` (1, D, H, W, 3) raises the similarity the command
    optimises: ``similarity(source warped by ddf, fixed) - similarity(source, fixed)``, images
    (1, D, H, W, 1) on one grid (the network's own: ``deformable.NetworkField``; on a 1 mm brain
    the finest level's grid cost 0.1-0.4 s, this one a few ms), inside ``masks`` (fixed, moving,
    on that grid) when given, as the deformable stage counts it."""
    warped = ops.warp(source, ddf)
    weights = (None, None)
    if masks is not None:
        weights = (masks[0] * masks[1], masks[0] * ops.warp(masks[1], ddf))
    sim = similarity_fn(similarity)
    stats = fixed_statistics(similarity, fixed)
    before = sim(source, fixed, weight=weights[0], stats=stats)
    return sim(warped, fixed, weight=weights[1], stats=stats) - before


@programs.jit
def tre_after_before(fixed_points, moving_points, ddf, spacing):
    """(mean TRE in mm through ``ddf`` (1, D, H, W, 3), mean TRE before: through no field)."""
    after = ops.tre(fixed_points, moving_points, ddf[0], spacing)
    before = ops.tre(fixed_points, moving_points, jnp.zeros_like(ddf[0]), spacing)
    return jnp.mean(after), jnp.mean(before)


def _joint_histogram(seg_a, seg_b) -> tuple[np.ndarray, np.ndarray]:
    """(the label values, their joint histogram ``joint[i, j]`` = voxels with value i in
    ``seg_a`` and j in ``seg_b``) of two label maps, counted on the host: per label, reductions
    over every voxel ran as slow fused loops on XLA:CPU, and np.unique sorts (a 1 mm brain's
    two maps: 0.6-1 s for labels and Dice before and after)."""
    a, b = (np.asarray(s).ravel() for s in (seg_a, seg_b))
    low, high = min(int(a.min()), int(b.min())), max(int(a.max()), int(b.max()))
    if np.issubdtype(a.dtype, np.integer) and low >= 0 and (high + 1) ** 2 <= 10_000_000:
        values = np.arange(high + 1)  # small labels index the histogram themselves
        index_a, index_b = a.astype(np.int64), b.astype(np.int64)
    else:
        values = np.union1d(np.unique(a), np.unique(b))
        index_a, index_b = np.searchsorted(values, a), np.searchsorted(values, b)
    joint = np.bincount(index_a * len(values) + index_b, minlength=len(values) ** 2)
    return values, joint.reshape(len(values), len(values))


def _dice_from_joint(values: np.ndarray, joint: np.ndarray, labels: list[int]) -> np.ndarray:
    """``ops.dice`` per label from a joint histogram (NaN for a label in neither map)."""
    scores = []
    for label in labels:
        k = int(np.searchsorted(values, label))
        total = joint[k, :].sum() + joint[:, k].sum() if k < len(values) else 0
        if k == len(values) or values[k] != label or total == 0:
            scores.append(np.nan)
            continue
        scores.append(2.0 * joint[k, k] / total)
    return np.asarray(scores, np.float32)


def _labels(seg: np.ndarray) -> np.ndarray:
    """The values of a label map: by counting when they are small non-negative integers, else
    np.unique (which sorts every voxel)."""
    seg = np.asarray(seg)
    if seg.size and np.issubdtype(seg.dtype, np.integer):
        low, high = int(seg.min()), int(seg.max())
        if low >= 0 and high < 1_000_000:
            return np.flatnonzero(np.bincount(seg.ravel(), minlength=high + 1))
    return np.unique(seg)


def _dice_per_label(seg_a, seg_b, labels: list[int]) -> np.ndarray:
    """``ops.dice`` for a few labels, one boolean pass per label and map (two labels of 1 mm
    brain maps: 0.05 s, against 0.2-0.5 s for the joint histogram)."""
    scores = []
    for label in labels:
        in_a, in_b = seg_a == label, seg_b == label
        total = np.count_nonzero(in_a) + np.count_nonzero(in_b)
        inter = np.count_nonzero(in_a & in_b)
        scores.append(2.0 * inter / total if total > 0 else np.nan)
    return np.asarray(scores, np.float32)


def dice_report(fixed_seg, moving_seg, warped_seg) -> dict:
    """Dice per label (the union of both maps' labels but 0) before and after, and their means."""
    fixed_seg, moving_seg, warped_seg = map(np.asarray, (fixed_seg, moving_seg, warped_seg))
    labels = [int(v) for v in np.union1d(_labels(fixed_seg), _labels(moving_seg)) if v != 0]
    if not labels:
        return {}
    if len(labels) <= 8:
        before = _dice_per_label(moving_seg, fixed_seg, labels)
        after = _dice_per_label(warped_seg, fixed_seg, labels)
    else:
        before = _dice_from_joint(*_joint_histogram(moving_seg, fixed_seg), labels)
        after = _dice_from_joint(*_joint_histogram(warped_seg, fixed_seg), labels)
    return {
        "dice": {str(k): float(v) for k, v in zip(labels, after, strict=True)},
        "dice_mean": float(np.nanmean(after)),
        "dice_before": {str(k): float(v) for k, v in zip(labels, before, strict=True)},
        "dice_mean_before": float(np.nanmean(before)),
    }
