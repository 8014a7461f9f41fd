"""Jacobian of a deformation and the regularisers built on it.

Where this sits: the loss penalises ``smoothness`` and ``negative_jacobian_penalty`` of the
predicted DDF; evaluation reports ``folding_fraction`` and ``jacobian_stats``.

The map is ``phi(p) = p + ddf(p)``; its Jacobian is ``J = I + grad(ddf)`` with
``J[k, l] = delta_kl + d ddf_k / d x_l``. Derivatives are taken as ``numpy.gradient`` takes them
(central differences inside, one-sided differences at the faces), so that "% of |J| <= 0"
matches the evaluation code behind published tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adreg_jax.ops._checks import check_ddf


def _gradient(field: jnp.ndarray, axis: int) -> jnp.ndarray:
    """numpy.gradient along ``axis`` with unit spacing (edge_order=1)."""
    n = field.shape[axis]
    if n < 2:
        raise ValueError(f"need at least 2 voxels along axis {axis} to differentiate; got {n}")

    def take(start, stop):
        return jax.lax.slice_in_dim(field, start, stop, axis=axis)

    first = take(1, 2) - take(0, 1)
    last = take(n - 1, n) - take(n - 2, n - 1)
    if n == 2:
        return jnp.concatenate([first, last], axis=axis)
    interior = (take(2, n) - take(0, n - 2)) * 0.5
    return jnp.concatenate([first, interior, last], axis=axis)


def jacobian_matrix(ddf: jnp.ndarray) -> jnp.ndarray:
    """J = I + grad(ddf) of the map p -> p + ddf(p): (..., D, H, W, 3, 3), J[..., k, l]."""
    check_ddf(ddf)
    ddf = ddf.astype(jnp.float32)
    spatial_axes = (ddf.ndim - 4, ddf.ndim - 3, ddf.ndim - 2)
    grads = jnp.stack([_gradient(ddf, axis) for axis in spatial_axes], axis=-1)
    return grads + jnp.eye(3, dtype=grads.dtype).reshape((1,) * (grads.ndim - 2) + (3, 3))


@jax.jit  # one program when called eagerly (evaluation, figures); inlined when traced
def jacobian_determinant(ddf: jnp.ndarray) -> jnp.ndarray:
    """det(I + grad ddf) at every voxel: ddf (..., D, H, W, 3) -> (..., D, H, W).

    Values <= 0 mark voxels where the map folds (is not locally invertible).
    """
    jac = jacobian_matrix(ddf)
    a, b, c = jac[..., 0, 0], jac[..., 0, 1], jac[..., 0, 2]
    d, e, f = jac[..., 1, 0], jac[..., 1, 1], jac[..., 1, 2]
    g, h, i = jac[..., 2, 0], jac[..., 2, 1], jac[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def folding_fraction(ddf: jnp.ndarray) -> jnp.ndarray:
    """Fraction of voxels with det(J) <= 0, per batch item: (..., D, H, W, 3) -> (...)."""
    det = jacobian_determinant(ddf)
    return jnp.mean((det <= 0).astype(jnp.float32), axis=(-3, -2, -1))


@jax.jit
def jacobian_stats(ddf: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Summary of det(J) per batch item: mean, std, min and percent of voxels with det <= 0."""
    det = jacobian_determinant(ddf)
    axes = (-3, -2, -1)
    return {
        "mean": jnp.mean(det, axis=axes),
        "std": jnp.std(det, axis=axes),
        "min": jnp.min(det, axis=axes),
        "percent_nonpositive": 100.0 * jnp.mean((det <= 0).astype(jnp.float32), axis=axes),
    }


def negative_jacobian_penalty(ddf: jnp.ndarray) -> jnp.ndarray:
    """mean(relu(-det J)) over voxels and batch: zero for a fold-free field, growing with the depth
    of each fold. Scalar."""
    return jnp.mean(jax.nn.relu(-jacobian_determinant(ddf)))


def smoothness(ddf: jnp.ndarray) -> jnp.ndarray:
    """Diffusion regulariser ("grad l2" of VoxelMorph and TransMorph): scalar

    ``(mean(dD^2) + mean(dH^2) + mean(dW^2)) / 3`` with forward differences
    ``dD = ddf[i+1, j, k] - ddf[i, j, k]`` (all 3 components) along each spatial axis.
    """
    check_ddf(ddf)
    ddf = ddf.astype(jnp.float32)
    total = 0.0
    for axis in (ddf.ndim - 4, ddf.ndim - 3, ddf.ndim - 2):
        diff = jnp.diff(ddf, axis=axis)
        total = total + jnp.mean(diff * diff)
    return total / 3.0
