"""The deformable stage's forward field and its inverse (adreg-register --inverse) against
independent truths: the matrix exponential of a linear velocity, and round trips computed with
scipy's interpolation instead of the package's.

Tiny volumes: velocities on an 8^3 control grid, fields on a 32^3 grid (4 times finer, as the
finest level's control grid is to a 1 mm brain).
"""

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy import ndimage

from adreg_jax import ops
from adreg_jax.registration import Grid, Transform
from adreg_jax.registration.deformable import velocity_to_ddf
from adreg_jax.registration.transform import inverse_consistency, inverse_transform_field

CONTROL, FULL = (8, 8, 8), (32, 32, 32)
SPACING = np.array([1.5, 1.0, 2.0])  # anisotropic: mm and voxels must not be mixed up
STEPS = 4  # --integration-steps' default


def control_points() -> np.ndarray:
    """(8, 8, 8, 3) control-grid coordinates, centred on the volume."""
    grid = np.indices(CONTROL, dtype=np.float64).transpose(1, 2, 3, 0)
    return grid - (np.asarray(CONTROL) - 1) / 2.0


def swirl() -> jnp.ndarray:
    """A strong local swirl with contraction (control-grid voxels): integrated on the control
    grid and resized afterwards, as each optimisation step sees it, its map folds."""
    r = control_points()
    weight = 4.0 * np.exp(-(r**2).sum(-1, keepdims=True) / (2 * 1.5**2))
    rotation = np.stack([-r[..., 1], r[..., 0], np.zeros_like(r[..., 2])], axis=-1)
    return jnp.asarray((weight * (rotation - 0.5 * r))[None], jnp.float32)


def transform_of(velocity: jnp.ndarray) -> Transform:
    """The Transform adreg-register builds (no affine stage): the forward field in world mm on
    the fixed grid, the inverse from the same velocity."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    grid = Grid(FULL, affine)
    ddf_mm = np.asarray(velocity_to_ddf(velocity, STEPS, FULL))[0] * SPACING
    forward = Transform(grid, grid, ddf_mm.astype(np.float32))
    inverse = inverse_transform_field(forward, velocity, STEPS, None)
    return Transform(grid, grid, forward.ddf_mm, inverse)


def interior(margin: float) -> np.ndarray:
    """Mask of the full-grid voxels at least ``margin`` voxels inside the control grid's hull
    (beyond its outer points the resized velocity is constant, not linear)."""
    low = (FULL[0] // CONTROL[0] - 1) / 2.0 + margin  # the first control point's position
    high = FULL[0] - 1 - low
    grid = np.indices(FULL)
    return np.all((grid >= low) & (grid <= high), axis=0)


def test_linear_velocity_flows_and_inverts_as_the_matrix_exponential():
    """v(x) = A x: the flow is expm(A) x and its inverse expm(-A) x wherever the trajectories stay
    where the resized velocity is linear; up to the integration's first-order start
    (I + A / 2^n)^(2^n) ~ expm(A), 0.03 voxel here (displacements of up to 4 voxels)."""
    generator = np.array([[-0.05, -0.25, 0.0], [0.25, -0.05, 0.03], [0.0, -0.03, 0.04]])
    velocity = jnp.asarray((control_points() @ generator.T)[None], jnp.float32)
    # on the fixed grid the same matrix: x_full - centre = 4 (x_control - centre), v_full = 4 v
    centred = np.indices(FULL, dtype=np.float64).transpose(1, 2, 3, 0) - (FULL[0] - 1) / 2.0
    expected = {
        sign: centred @ (scipy.linalg.expm(sign * generator) - np.eye(3)).T for sign in (1, -1)
    }
    transform = transform_of(velocity)
    inside = interior(margin=4.0)
    forward = transform.ddf_mm / SPACING
    inverse = transform.inverse_ddf_mm / SPACING
    np.testing.assert_allclose(forward[inside], expected[1][inside], atol=0.05)
    np.testing.assert_allclose(inverse[inside], expected[-1][inside], atol=0.05)


def test_forward_field_does_not_fold_and_its_inverse_is_exact():
    """The swirl: resized after integration its map folds (no inverse exists there); the
    forward field written does not fold, and |phi(phi^-1(y)) - y|, phi read with scipy, is
    within 0.01 voxel, as ``inverse_consistency`` reports."""
    velocity = swirl()
    resized_after = ops.resize_ddf(ops.integrate_velocity(velocity, STEPS), FULL)
    assert float(ops.folding_fraction(resized_after[0])) > 0.0
    transform = transform_of(velocity)
    forward = transform.ddf_mm / SPACING
    assert float(ops.folding_fraction(jnp.asarray(forward))) == 0.0

    # phi(psi(y)) with scipy's linear interpolation of the forward field (edge values beyond)
    grid = np.indices(FULL, dtype=np.float64).transpose(1, 2, 3, 0)
    preimage = grid + transform.inverse_ddf_mm / SPACING
    coords = preimage.reshape(-1, 3).T
    displacement = np.stack(
        [
            ndimage.map_coordinates(forward[..., k], coords, order=1, mode="nearest")
            for k in range(3)
        ],
        axis=-1,
    ).reshape(*FULL, 3)
    error_mm = np.linalg.norm((preimage + displacement - grid) * SPACING, axis=-1)
    counted = np.all((preimage >= 0) & (preimage <= np.asarray(FULL) - 1), axis=-1)
    assert counted.mean() > 0.7
    assert error_mm[counted].max() < 0.01

    metrics = inverse_consistency(transform)
    assert abs(metrics["inverse_consistency_max_mm"] - error_mm[counted].max()) < 1e-3
    assert abs(metrics["inverse_consistency_mean_mm"] - error_mm[counted].mean()) < 1e-4
    assert metrics["inverse_consistency_voxels_percent"] == 100.0 * counted.mean()
