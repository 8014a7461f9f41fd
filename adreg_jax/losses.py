"""The composite registration loss of AD-RegNet, built from ``config.loss``.

Where this sits: the jitted train step (training.py) calls ``registration_loss`` on the model's
outputs and the batch; every term is reported separately in the returned metrics.

    loss = w_ncc * (1 - NCC(warped, fixed)) + w_ssim * (1 - SSIM(warped, fixed))
         + w_smooth * smoothness(ddf) + w_jac * mean(relu(-det J))
         + w_landmark * mean TRE (mm)            only when the batch carries landmarks
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


def registration_loss(
    outputs: dict[str, Any], batch: dict[str, jnp.ndarray], loss_config
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(scalar loss, {term: value}) for model outputs (``warped``, ``ddf``) and a batch."""
    warped, ddf, fixed = outputs["warped"], outputs["ddf"], batch["fixed"]
    terms = {
        "ncc": jnp.mean(ops.ncc_local(warped, fixed, window=int(loss_config.ncc_window))),
        "ssim": jnp.mean(ops.ssim(warped, fixed)),
        "smoothness": ops.smoothness(ddf),
        "negative_jacobian": ops.negative_jacobian_penalty(ddf),
    }
    loss = (
        loss_config.ncc_weight * (1.0 - terms["ncc"])
        + loss_config.ssim_weight * (1.0 - terms["ssim"])
        + loss_config.smooth_weight * terms["smoothness"]
        + loss_config.jacobian_weight * terms["negative_jacobian"]
    )
    if "fixed_points" in batch and loss_config.landmark_weight > 0:
        terms["tre_mm"] = mean_tre(batch, ddf)
        loss = loss + loss_config.landmark_weight * terms["tre_mm"]
    terms["loss"] = loss
    return loss, terms
