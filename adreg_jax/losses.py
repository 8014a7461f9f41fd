"""The composite registration loss of AD-RegNet, built from ``config.loss``.

Where this sits: the jitted train step (training.py) calls ``registration_loss`` on the model's
outputs and the batch; every term is reported separately in the returned metrics.

    loss = w_ncc * (1 - NCC(warped, fixed)) + w_ssim * (1 - SSIM(warped, fixed))
         + w_smooth * smoothness(ddf) + w_jac * mean(relu(-det J))
         + w_landmark * mean TRE (mm)            only when the batch carries landmarks
         + w_dice * (1 - soft Dice)              only when the batch carries label maps
         + w_ddf * mean |ddf - true_ddf| (voxels) only when the batch carries the true field

The soft Dice (``soft_dice``) compares the moving one-hot labels warped by the DDF (linear
interpolation of each channel, so that the gradient reaches the field) with the fixed one-hot
labels, over the data set's labels (``labels``, e.g. CSF, GM, WM): SynthMorph's label loss, which
trains a network that does not depend on the images' contrast. The field error (``field_error``)
is the mean end-point error against a known field (generated and synthesised pairs): a dense
target at every voxel, where Dice only pulls at label boundaries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adreg_jax import ops


def tre_errors(batch: dict[str, jnp.ndarray], ddf: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(TRE in mm of every landmark (B, N), float mask (B, N) of the real ones, ``points_mask``)."""
    errors = jax.vmap(ops.tre)(batch["fixed_points"], batch["moving_points"], ddf, batch["spacing"])
    mask = batch.get("points_mask", jnp.ones(errors.shape, jnp.float32)).astype(jnp.float32)
    return errors, mask


def mean_tre(batch: dict[str, jnp.ndarray], ddf: jnp.ndarray) -> jnp.ndarray:
    """Mean TRE (mm) over the batch's real landmarks."""
    errors, mask = tre_errors(batch, ddf)
    return jnp.sum(errors * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_dice(
    fixed_seg: jnp.ndarray, moving_seg: jnp.ndarray, ddf: jnp.ndarray, labels: tuple[int, ...]
) -> jnp.ndarray:
    """Mean soft Dice (B,) of integer label maps (B, D, H, W) after warping the moving one by
    ``ddf`` (B, D, H, W, 3): with one-hot channels m_l warped linearly (``ops.warp``) and f_l,
    ``dice_l = 2 sum(f_l w_l) / (sum f_l + sum w_l)``, averaged over the labels present in
    either map (a label absent from both is left out, as ``ops.dice`` does)."""
    ids = jnp.asarray(labels, fixed_seg.dtype).reshape((1,) * fixed_seg.ndim + (len(labels),))
    fixed_onehot = (fixed_seg[..., None] == ids).astype(jnp.float32)
    moving_onehot = (moving_seg[..., None] == ids).astype(jnp.float32)
    warped = ops.warp(moving_onehot, ddf, order=1)
    axes = (1, 2, 3)
    overlap = jnp.sum(fixed_onehot * warped, axis=axes)
    total = jnp.sum(fixed_onehot, axis=axes) + jnp.sum(warped, axis=axes)
    present = (total > 0).astype(jnp.float32)
    dice = 2.0 * overlap / jnp.maximum(total, 1e-6)
    return jnp.sum(dice * present, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1.0)


def field_error(ddf: jnp.ndarray, true_ddf: jnp.ndarray) -> jnp.ndarray:
    """Mean end-point error (B,) in voxels: the mean over voxels of |ddf(p) - true_ddf(p)|."""
    squared = jnp.sum(jnp.square(ddf - true_ddf), axis=-1)
    # the gradient of sqrt is infinite at 0: a tiny floor keeps an exact match differentiable
    return jnp.mean(jnp.sqrt(squared + 1e-12), axis=(1, 2, 3))


def registration_loss(
    outputs: dict[str, Any],
    batch: dict[str, jnp.ndarray],
    loss_config,
    labels: tuple[int, ...] = (),
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(scalar loss, {term: value}) for model outputs (``warped``, ``ddf``) and a batch.

    ``labels``: the data set's label ids (``data.dataset_labels``) of the soft Dice term, used
    when ``loss_config.dice_weight`` > 0 and the batch carries ``fixed_seg`` and ``moving_seg``.
    The intensity terms (NCC, SSIM) count only the pairs whose ``same_contrast`` is 1 when the
    batch carries that flag (``synth_brain``) and ``loss_config.same_contrast_only`` is on (the
    default), each pair weighing 1 / batch size either way; ``terms`` logs them over every pair.
    """
    warped, ddf, fixed = outputs["warped"], outputs["ddf"], batch["fixed"]

    def reported_only(weight: float, value: jnp.ndarray) -> jnp.ndarray:
        # a term weighted 0 is still computed for the logs, but no gradient is taken through it
        return value if weight else jax.lax.stop_gradient(value)

    ncc_in = reported_only(loss_config.ncc_weight, warped)
    ssim_in = reported_only(loss_config.ssim_weight, warped)
    ncc = ops.ncc_local(ncc_in, fixed, window=int(loss_config.ncc_window))  # (B,)
    ssim = ops.ssim(ssim_in, fixed)
    # the intensity terms count only where fixed and moving share a contrast, when the batch
    # says (synth_brain's "same_contrast"): across contrasts NCC and SSIM reward the wrong match
    same = batch.get("same_contrast") if loss_config.get("same_contrast_only", True) else None
    same = jnp.ones_like(ncc) if same is None else jnp.asarray(same, ncc.dtype).reshape(ncc.shape)
    terms = {
        "ncc": jnp.mean(ncc),
        "ssim": jnp.mean(ssim),
        "smoothness": ops.smoothness(ddf),
        "negative_jacobian": ops.negative_jacobian_penalty(ddf),
    }
    loss = (
        loss_config.ncc_weight * jnp.mean(same * (1.0 - ncc))
        + loss_config.ssim_weight * jnp.mean(same * (1.0 - ssim))
        + loss_config.smooth_weight * terms["smoothness"]
        + loss_config.jacobian_weight * terms["negative_jacobian"]
    )
    if "fixed_points" in batch and loss_config.landmark_weight > 0:
        terms["tre_mm"] = mean_tre(batch, ddf)
        loss = loss + loss_config.landmark_weight * terms["tre_mm"]
    dice_weight = float(loss_config.get("dice_weight", 0.0))
    if dice_weight > 0 and labels and "fixed_seg" in batch and "moving_seg" in batch:
        terms["dice_soft"] = jnp.mean(
            soft_dice(batch["fixed_seg"], batch["moving_seg"], ddf, tuple(labels))
        )
        loss = loss + dice_weight * (1.0 - terms["dice_soft"])
    ddf_weight = float(loss_config.get("ddf_weight", 0.0))
    if ddf_weight > 0 and "true_ddf" in batch:
        terms["ddf_error"] = jnp.mean(field_error(ddf, batch["true_ddf"]))
        loss = loss + ddf_weight * terms["ddf_error"]
    terms["loss"] = loss
    return loss, terms
