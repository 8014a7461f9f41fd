"""The deformable stage of adreg-register: instance optimisation of a stationary velocity, started
from zero or from a trained network's field.

Where this sits: loading -> affine stage -> **deformable stage** -> outputs. The moving image it
sees is already on the fixed grid (and through the affine map, if any); the DDF it returns is in
voxels of the fixed grid.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adreg_jax import ops

SIMILARITIES = ("ncc", "mi")


def similarity_fn(name: str):
    """``f(warped, fixed) -> scalar``, higher is better: local NCC (window 5, same modality) or
    Parzen mutual information (different modalities)."""
    if name == "ncc":
        return lambda a, b: jnp.mean(ops.ncc_local(a, b, window=5))
    if name == "mi":
        return lambda a, b: jnp.mean(ops.mutual_information(a, b))
    raise ValueError(f"--similarity {name!r}: expected one of {SIMILARITIES}")


def level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """The grid ``factor`` times coarser than ``shape`` (at least 4 voxels per axis)."""
    return tuple(max(4, n // factor) for n in shape)


# Every full-resolution operation here is jitted: run op by op (eagerly), a warp or a composition
# of a 1 mm brain took 2-3 s instead of 0.2 s (no fusion, every intermediate materialised).


@functools.partial(jax.jit, static_argnums=1)
def resize_image(image: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
    """image (1, D, H, W, C) resized (linear) to ``shape``."""
    return jax.image.resize(image, (image.shape[0], *shape, image.shape[-1]), "linear")


@functools.cache
def _level_step(
    similarity: str, smooth_weight: float, integration_steps: int, learning_rate: float
):
    """(the optimizer, one jitted Adam step on a (coarser) velocity against the images of one
    level). Cached: every pair of a cohort, and every level of the same shapes, reuses the
    compiled program (a new jitted function would be traced and compiled again)."""
    sim = similarity_fn(similarity)
    optimizer = optax.adam(learning_rate)

    def loss_fn(velocity, fixed, moving):
        ddf = ops.integrate_velocity(velocity, integration_steps)
        ddf = ops.resize_ddf(ddf, fixed.shape[1:4])
        return -sim(ops.warp(moving, ddf), fixed) + smooth_weight * ops.smoothness(velocity)

    # The images are arguments, not closed-over constants: as constants XLA folds the fixed
    # image's statistics at compile time (seconds per level).
    @jax.jit
    def step(velocity, opt_state, fixed, moving):
        loss, grad = jax.value_and_grad(loss_fn)(velocity, fixed, moving)
        updates, opt_state = optimizer.update(grad, opt_state, velocity)
        return optax.apply_updates(velocity, updates), opt_state, loss

    return optimizer, step


def instance_optimise(fixed: jnp.ndarray, moving: jnp.ndarray, steps, **options) -> jnp.ndarray:
    """The DDF (1, D, H, W, 3) on the fixed grid of ``optimise_velocity`` (same arguments)."""
    integration_steps = options.get("integration_steps", 4)
    velocity = optimise_velocity(fixed, moving, steps, **options)
    return velocity_to_ddf(velocity, integration_steps, tuple(fixed.shape[1:4]))


def optimise_velocity(
    fixed: jnp.ndarray,
    moving: jnp.ndarray,
    steps: int | Sequence[int],
    initial: jnp.ndarray | None = None,
    factors: Sequence[int] = (4, 2),
    grid_factor: int = 2,
    similarity: str = "ncc",
    learning_rate: float = 0.1,
    smooth_weight: float = 0.25,
    integration_steps: int = 4,
    progress: bool = True,
) -> jnp.ndarray:
    """Optimise a velocity for one pair (images (1, D, H, W, 1)); returns it, (1, g, g, g, 3) in
    voxels of its control grid (``velocity_to_ddf`` gives the DDF on the fixed grid).

    ``steps`` Adam steps at each level (one number for all, or one per level), coarse to fine
    over image grids ``1/factor`` of the fixed grid. At each level the stationary velocity lives
    on a grid ``grid_factor`` times coarser than the level's images (a control grid, as in
    free-form deformations): it is integrated there by scaling and squaring, and the resulting
    DDF is resized (trilinear, values rescaled) to the images' grid. The coarse grid regularises
    and keeps the cost down: the gradient through each squaring step is a scatter-add over the
    velocity grid, the dominant cost per step.

    The velocity is carried between levels with ``resize_ddf``; its DDF on the fixed grid
    (``velocity_to_ddf``) is the last level's integrated field resized, the map the optimisation
    saw.
    ``factors=(4, 2)`` stops the images at half resolution (at 1 mm brain scans the cost/accuracy
    balance; a full-resolution level costs 8 times the half-resolution one); add 1 to refine.
    ``initial`` (a DDF on the fixed grid, e.g. the network's) starts the velocity.
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    velocity = None if initial is None else initial.astype(jnp.float32)
    per_level = [steps] * len(factors) if isinstance(steps, int) else list(steps)
    if len(per_level) != len(factors):
        raise ValueError(f"steps {steps}: expected one number or one per level of {factors}")
    bar = tqdm(total=sum(per_level), desc="deformable", disable=not progress)
    for factor, level_steps in zip(factors, per_level, strict=True):
        image_shape = level_shape(shape, factor)
        grid_shape = level_shape(image_shape, grid_factor)
        fixed_l, moving_l = resize_image(fixed, image_shape), resize_image(moving, image_shape)
        if velocity is None:
            velocity = jnp.zeros((1, *grid_shape, 3), jnp.float32)
        else:
            velocity = ops.resize_ddf(velocity, grid_shape)
        optimizer, step = _level_step(
            similarity, float(smooth_weight), int(integration_steps), float(learning_rate)
        )
        opt_state = optimizer.init(velocity)
        for _ in range(level_steps):
            velocity, opt_state, loss = step(velocity, opt_state, fixed_l, moving_l)
            bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return velocity


@functools.partial(jax.jit, static_argnums=(1, 2))
def velocity_to_ddf(velocity, integration_steps: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """The DDF (1, *shape, 3) of a velocity on its (coarser) control grid: integrated there by
    scaling and squaring, then resized to ``shape``."""
    return ops.resize_ddf(ops.integrate_velocity(velocity, integration_steps), shape)


def default_levels(spacing: Sequence[float], finest_mm: float = 2.0) -> tuple[int, int]:
    """Two levels, the finer one with voxels of about ``finest_mm`` (never finer than the scan):
    (4, 2) for 1 mm brains, (2, 1) for scans of 2 mm voxels or coarser."""
    finest = max(1, int(finest_mm / float(np.min(spacing)) + 1e-6))
    return (2 * finest, finest)


resize_ddf = jax.jit(ops.resize_ddf, static_argnums=1)


@functools.lru_cache(maxsize=4)
def _restored(checkpoint: str):
    """(config, jitted model.apply, variables) of a run directory, restored once per process."""
    from adreg_jax.training import restore_for_inference

    config, model, variables = restore_for_inference(checkpoint)
    return config, jax.jit(model.apply), variables


def network_ddf(checkpoint: str, fixed: jnp.ndarray, moving: jnp.ndarray) -> jnp.ndarray:
    """The trained network's DDF (1, D, H, W, 3) on the fixed grid.

    The network runs on a grid with the fixed grid's aspect and as many voxels as the run's
    training images (``config.data.image_size``), each side a multiple of the U-Net's downsampling
    factor; its field is resized (and rescaled) back to the fixed grid.
    """
    config, apply, variables = _restored(checkpoint)
    shape = np.asarray(fixed.shape[1:4], np.float64)
    multiple = 2 ** (len(config.model.channels) - 1)
    scale = (np.prod(config.data.image_size) / np.prod(shape)) ** (1.0 / 3.0)
    net_shape = tuple(int(max(multiple, round(n * scale / multiple) * multiple)) for n in shape)
    ddf = apply(variables, resize_image(fixed, net_shape), resize_image(moving, net_shape))
    return resize_ddf(ddf["ddf"], tuple(fixed.shape[1:4]))
