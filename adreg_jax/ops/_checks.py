"""Shape checks shared by the ops. Shapes are static under jit, so these raise at trace time with
a message that names the argument, its shape and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def check_ddf(ddf: jnp.ndarray, name: str = "ddf") -> None:
    """A displacement field is (..., D, H, W, 3)."""
    if ddf.ndim < 4 or ddf.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape (..., D, H, W, 3) (voxel displacements along D, H, W); "
            f"got shape {tuple(ddf.shape)}"
        )


def check_image_and_ddf(image: jnp.ndarray, ddf: jnp.ndarray) -> None:
    """image (..., D, H, W, C) and ddf (..., D, H, W, 3) must share leading and spatial dims."""
    check_ddf(ddf)
    if image.ndim != ddf.ndim or image.shape[:-1] != ddf.shape[:-1]:
        raise ValueError(
            f"image has shape {tuple(image.shape)} but ddf has shape {tuple(ddf.shape)}; expected "
            f"image (..., D, H, W, C) with the same (..., D, H, W) as ddf (..., D, H, W, 3)"
        )


def check_same_shape(a: jnp.ndarray, b: jnp.ndarray, names: tuple[str, str] = ("a", "b")) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has shape {tuple(b.shape)}; "
            f"expected equal shapes (..., D, H, W, C)"
        )
    if a.ndim < 4:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)}; expected an image (..., D, H, W, C)"
        )


def check_spacing(spacing: Sequence[float] | jnp.ndarray) -> jnp.ndarray:
    spacing_arr = jnp.asarray(spacing, dtype=jnp.float32)
    if spacing_arr.shape != (3,):
        raise ValueError(
            f"spacing must hold 3 values (sd, sh, sw) in mm; got shape {tuple(spacing_arr.shape)}"
        )
    return spacing_arr


def check_points(points: jnp.ndarray, name: str) -> None:
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape (N, 3) (0-based voxel coordinates in D, H, W order); "
            f"got shape {tuple(points.shape)}"
        )


def check_integer(array: jnp.ndarray, name: str) -> None:
    if not (jnp.issubdtype(array.dtype, jnp.integer) or array.dtype == jnp.bool_):
        raise ValueError(
            f"{name} must hold integer label ids; got dtype {array.dtype} with shape "
            f"{tuple(array.shape)}"
        )


def check_labels(labels: Sequence[int]) -> tuple[int, ...]:
    values = np.asarray(labels)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of ints; got {labels!r}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.mod(values, 1) == 0):
            raise ValueError(f"labels must be integers; got {labels!r}")
    return tuple(int(v) for v in values)
