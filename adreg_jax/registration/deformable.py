"""The deformable stage of adreg-register: instance optimisation of a stationary velocity, started
from zero or from a trained network's field.

Where this sits: loading -> affine stage -> **deformable stage** -> outputs. The moving image it
sees is already on the fixed grid (and through the affine map, if any); the DDF it returns is in
voxels of the fixed grid.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.ops.resample import resize_linear
from adreg_jax.registration import programs
from adreg_jax.registration.levels import level_shape
from adreg_jax.registration.similarity import SIMILARITIES, fixed_statistics, similarity_fn

__all__ = ["SIMILARITIES", "instance_optimise", "optimise_velocity", "similarity_fn"]

# Weight of the velocity's smoothness (its gradient in mm per mm) by the fixed scan's modality:
# breathing moves the lungs smoothly, and the lungs' little texture leaves the similarity weak
# there. Measured with the default levels (benchmarks/real_scans.py's TRE, mm), weight 1 / 2 / 4
# / 8 / 16 / 32: the small real CT 0.71 / 0.64 / 0.58 / 0.58 / 0.62 / 0.74, the DIR-Lab-sized
# phantom 0.50 / 0.43 / 0.38 / 0.36 / 0.40 / 0.71 (2026-11-28 15:45; at 0.25, in an earlier
# round, 0.83 and 0.75); 4 stays below where both turn (8-16), as real breathing (sliding at the
# chest wall) is less smooth than these known motions. Inter-subject brain anatomy needs the
# freedom of 0.25.
DEFAULT_SMOOTH_WEIGHT = {"ct": 4.0, "mr": 0.25}
# With mutual information (``--similarity mi``), at least this, whatever the modality: its
# gradient pulls harder than local NCC's (measured on the three MR pairs across contrasts of
# benchmarks/real_scans.py and a third, 0.25 -> 1: Dice mni_t2_to_scan 0.731 -> 0.733,
# thick_slice 0.840 -> 0.852, the OASIS scan to the T2-like template 0.740 -> 0.751; 2 gave
# 0.727 on mni_t2_to_scan).
MI_SMOOTH_WEIGHT = 1.0


def default_smooth_weight(modality: str, similarity: str) -> float:
    """The smoothness weight when ``--smooth-weight`` is not given: by the fixed scan's modality
    (``DEFAULT_SMOOTH_WEIGHT``), at least ``MI_SMOOTH_WEIGHT`` with mutual information."""
    weight = DEFAULT_SMOOTH_WEIGHT[modality]
    return max(weight, MI_SMOOTH_WEIGHT) if similarity == "mi" else weight


# Every full-resolution operation here is jitted: run op by op (eagerly), a warp or a composition
# of a 1 mm brain took 2-3 s instead of 0.2 s (no fusion, every intermediate materialised).


@programs.jit(static_argnums=1)
def resize_image(image: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
    """image (1, D, H, W, C) resized (linear, ``jax.image.resize``'s weights) to ``shape``."""
    return resize_linear(image.astype(jnp.float32), tuple(shape)).astype(image.dtype)


def smoothness_mm(velocity: jnp.ndarray, spacing_mm: jnp.ndarray) -> jnp.ndarray:
    """The diffusion regulariser of a velocity (1, d, h, w, 3) in voxels of its grid, in
    physical units: ``sum_a mean((dv_mm / dx_a)^2) / 3`` with the velocity in mm
    (``v_k * spacing_k``) and forward differences along axis a divided by ``spacing_a``. On an
    isotropic grid it equals ``ops.smoothness`` (in voxels), whatever the voxel size; on an
    anisotropic one a 3 mm step costs what a 3 mm step costs, not what a voxel step does."""
    v_mm = velocity * spacing_mm.reshape(1, 1, 1, 1, 3)
    total = 0.0
    for axis in range(3):
        diff = jnp.diff(v_mm, axis=axis + 1) / spacing_mm[axis]
        total = total + jnp.mean(diff * diff)
    return total / 3.0


def lazy_adam(learning_rate: float):
    """A function that returns ``optax.adam(learning_rate)``, made (and Optax imported, 0.1-0.2 s)
    on the first call, when a step is traced: a run whose programs all come from disk
    (``programs``) never imports Optax."""

    @functools.cache
    def optimizer():
        import optax

        return optax.adam(learning_rate)

    return optimizer


def apply_updates(params, updates):
    """``optax.apply_updates`` (Optax imported here, see ``lazy_adam``)."""
    import optax

    return optax.apply_updates(params, updates)


@functools.cache
def _level_step(
    similarity: str, smooth_weight: float, integration_steps: int, learning_rate: float
):
    """(the optimizer (``lazy_adam``), one jitted Adam step on a (coarser) velocity against the
    images of one level). Cached: every pair of a cohort, and every level of the same shapes,
    reuses the compiled program (a new jitted function would be traced and compiled again)."""
    sim = similarity_fn(similarity)
    optimizer = lazy_adam(learning_rate)

    def loss_fn(velocity, fixed, moving, grid_spacing, masks, stats):
        ddf = ops.integrate_velocity(velocity, integration_steps)
        ddf = ops.resize_ddf(ddf, fixed.shape[1:4])
        weight = None
        # index_once: the resized field's points are computed once, not in each corner read
        if masks is not None:
            fixed_mask, moving_mask = masks
            weight = fixed_mask * ops.warp(moving_mask, ddf, index_once=True)
        similarity_value = sim(ops.warp(moving, ddf, index_once=True), fixed, weight, stats)
        return -similarity_value + smooth_weight * smoothness_mm(velocity, grid_spacing)

    # The images are arguments, not closed-over constants: as constants XLA folds the fixed
    # image's statistics at compile time (seconds per level).
    options = (similarity, smooth_weight, integration_steps, learning_rate)

    @programs.jit(key=options)
    def step(velocity, opt_state, fixed, moving, grid_spacing, masks, stats):
        loss, grad = jax.value_and_grad(loss_fn)(
            velocity, fixed, moving, grid_spacing, masks, stats
        )
        updates, opt_state = optimizer().update(grad, opt_state, velocity)
        return apply_updates(velocity, updates), opt_state, loss

    # A level's inputs in one program (op by op, each resize and the optimizer's zeros were
    # programs of their own, each traced, lowered and fetched from the compilation cache).
    @programs.jit(static_argnums=(4, 5), key=options)
    def start(fixed, moving, masks, velocity, image_shape, grid_shape):
        fixed_l, moving_l = resize_image(fixed, image_shape), resize_image(moving, image_shape)
        masks_l = None if masks is None else tuple(resize_image(m, image_shape) for m in masks)
        if velocity is None:
            velocity = jnp.zeros((1, *grid_shape, 3), jnp.float32)
        else:
            velocity = ops.resize_ddf(velocity.astype(jnp.float32), grid_shape)
        # what the similarity reuses of the fixed image at every step of the level
        stats = fixed_statistics(similarity, fixed_l)
        return fixed_l, moving_l, masks_l, velocity, optimizer().init(velocity), stats

    return optimizer, step, start


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
    factors: Sequence[int | Sequence[int]] = (4, 2),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    masks: tuple[jnp.ndarray, jnp.ndarray] | None = None,
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
    over image grids ``1/factor`` of the fixed grid (``factors``: one number per level, or one
    per axis per level, ``levels.deformable_levels``). At each level the stationary velocity lives
    on a grid ``grid_factor`` times coarser than the level's images (a control grid, as in
    free-form deformations): it is integrated there by scaling and squaring, and the resulting
    DDF is resized (trilinear, values rescaled) to the images' grid. The coarse grid regularises
    and keeps the cost down: the gradient through each squaring step is a scatter-add over the
    velocity grid, the dominant cost per step.

    The velocity is carried between levels with ``resize_ddf``. Its DDF on the fixed grid
    (``velocity_to_ddf``) is the last level's integrated field resized, the map the optimisation
    saw, where that map folds no control cell; where it does, exp(v) composed on the fixed grid
    from a root that folds none (``velocity_flow``), a diffeomorphism, as its inverse needs.
    ``spacing``: the fixed grid's voxel size in mm; the smoothness is measured in mm
    (``smoothness_mm``) on each level's control grid. ``masks``: (fixed mask, moving mask on the
    fixed grid), each (1, D, H, W, 1) in [0, 1]: the similarity counts the voxels inside the
    fixed mask whose warped point falls inside the moving mask.
    ``initial`` (a DDF on the fixed grid, e.g. the network's) starts the velocity.
    """
    from tqdm import tqdm

    shape = fixed.shape[1:4]
    velocity = initial
    per_level = [steps] * len(factors) if isinstance(steps, int) else list(steps)
    if len(per_level) != len(factors):
        raise ValueError(f"steps {steps}: expected one number or one per level of {factors}")
    bar = tqdm(total=sum(per_level), desc="deformable", disable=not progress)
    for factor, level_steps in zip(factors, per_level, strict=True):
        image_shape = level_shape(shape, factor)
        grid_shape = level_shape(image_shape, grid_factor)
        # mm per control-grid voxel: the fixed grid's extent over the control grid's size
        grid_spacing = np.asarray(spacing, np.float32) * np.asarray(shape) / np.asarray(grid_shape)
        grid_spacing = jax.device_put(grid_spacing.astype(np.float32))  # no copying program
        _, step, start = _level_step(
            similarity, float(smooth_weight), int(integration_steps), float(learning_rate)
        )
        fixed_l, moving_l, masks_l, velocity, opt_state, stats = start(
            fixed, moving, masks, velocity, tuple(image_shape), tuple(grid_shape)
        )
        for _ in range(level_steps):
            velocity, opt_state, loss = step(
                velocity, opt_state, fixed_l, moving_l, grid_spacing, masks_l, stats
            )
            bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return velocity


def full_grid_squarings(
    integration_steps: int, grid_shape: Sequence[int], shape: Sequence[int]
) -> int:
    """The most squaring steps ``velocity_flow`` takes on the fine grid ``shape``: the
    integration's own steps plus one per doubling from the control grid ``grid_shape`` (as many
    as the whole integration of the resized velocity would take with first steps as small, in
    voxels of their grid, as on the control grid)."""
    ratio = max(n / g for n, g in zip(shape, grid_shape, strict=True))
    return int(integration_steps) + max(0, math.ceil(math.log2(ratio) - 1e-6))


def cells_keep_orientation(ddf: jnp.ndarray) -> jnp.ndarray:
    """Whether the trilinear interpolant of the map p -> p + ddf(p) (ddf (1, d, h, w, 3) in
    voxels of its grid) keeps every cell's orientation: at each of the 8 corners of every cell,
    the determinant of the cell's three edges leaving that corner is positive (the corner
    Jacobians of a hexahedral element; one at or below zero: the cell folds). A positive det J by
    central differences at the grid's points does not say this: the optimised field of a 1 mm
    brain pair had none at or below zero on its control grid and 708 folded cells."""
    shape = ddf.shape[1:4]
    points = [ddf[0, ..., k] + jax.lax.broadcasted_iota(ddf.dtype, shape, k) for k in range(3)]
    # edges[a][k]: component k of the cell edges along axis a
    edges = [[jnp.diff(c, axis=a) for c in points] for a in range(3)]
    cells = [n - 1 for n in shape]
    kept = jnp.bool_(True)
    for corner in itertools.product((0, 1), repeat=3):
        columns = []
        for a in range(3):  # the edge along a through this corner: its other two indices offset
            window = tuple(
                slice(0, cells[b]) if b == a else slice(corner[b], corner[b] + cells[b])
                for b in range(3)
            )
            columns.append([edges[a][k][window] for k in range(3)])
        (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = columns  # det [a b c], columns by axis
        det = a0 * (b1 * c2 - b2 * c1) - b0 * (a1 * c2 - a2 * c1) + c0 * (a1 * b2 - a2 * b1)
        kept = kept & jnp.all(det > 0)
    return kept


def velocity_flow(velocity: jnp.ndarray, integration_steps: int, shape) -> jnp.ndarray:
    """exp(v) on the grid ``shape`` of a velocity (1, g, g, g, 3) on its coarser control grid, as
    exp(v / 2^m) composed with itself m times: exp(v / 2^m) integrated on the control grid
    (``integration_steps`` scaling-and-squaring steps) and resized (trilinear, values rescaled) to
    ``shape``, then m squarings on ``shape``. m is the least (up to ``full_grid_squarings``) for
    which the control-grid maps of v / 2^m and -v / 2^m keep every cell's orientation
    (``cells_keep_orientation``): their trilinear resize is then a map without folds, and the
    squarings compose such maps. The forward field (``velocity_to_ddf``) and the start of the
    inverse (``transform.inverse_field_mm``, with -v) both come from here, with the same m.

    m is 0, the optimisation's own map (integrated on the control grid, then resized), where that
    map folds no cell. Otherwise that map is no diffeomorphism: measured on 1 mm brain pairs
    (default options), resized after integration, 32 (oasis_b -> oasis_a), 333 (mni_to_scan)
    and 79 (scan_to_mni) folded voxels although det J on the control grid was positive or nearly
    so, and no exact inverse: the inverse consistency was off by up to 2.2 mm next to the folds.
    With m = 2, chosen there for all three: no folded voxel. Integrating the resized velocity
    on the full grid from the start (m = 6) gave no folds either but moved the map further from
    the one optimised (mni_to_scan Dice 0.733 -> 0.726, against 0.730 with m = 2) and cost
    six full-grid squarings (0.15 s each at 160x224x192 on 2 cores).

    ``integration_steps`` 0 (the displacement itself was optimised): the field resized.
    """
    shape = tuple(int(n) for n in shape)
    if integration_steps <= 0:
        return ops.resize_ddf(velocity, shape)
    most = full_grid_squarings(integration_steps, velocity.shape[1:4], shape)

    def root(sign, m):  # exp(sign * v / 2^m) on the control grid
        scale = sign * jnp.exp2(-m.astype(velocity.dtype))
        return ops.integrate_velocity(velocity * scale, integration_steps)

    def folds(m):
        return ~(cells_keep_orientation(root(1.0, m)) & cells_keep_orientation(root(-1.0, m)))

    m = jax.lax.while_loop(lambda m: (m < most) & folds(m), lambda m: m + 1, jnp.int32(0))
    ddf = ops.resize_ddf(root(1.0, m), shape)
    return jax.lax.fori_loop(0, m, lambda _, d: ops.compose(d, d), ddf)


@programs.jit(static_argnums=(1, 2))
def velocity_to_ddf(velocity, integration_steps: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """The DDF (1, *shape, 3) of a velocity on its (coarser) control grid: ``velocity_flow``."""
    return velocity_flow(velocity, integration_steps, shape)


resize_ddf = programs.jit(ops.resize_ddf, static_argnums=1)


@functools.lru_cache(maxsize=4)
def restored_network(checkpoint: str | None, model: str | None = None):
    """(config, model.apply as a program, variables) of a run directory (``checkpoint``) or of
    a packaged pretrained model (``model``, ``adreg_jax.pretrained``), restored once per
    process. As a program (``programs.jit``, keyed by the model's config) the forward pass is
    compiled with the registration programs' options (the 4 mm brain model on a 2 mm grid, 96 x
    112 x 96: 2.06 s against 3.01 s under plain ``jax.jit``; on its 4 mm grid 0.29 s either way)
    and kept on disk, so a later command reads it instead of compiling it."""
    if model is not None:
        from adreg_jax.pretrained import load

        config, module, variables = load(model)
    else:
        from adreg_jax.training import restore_for_inference

        config, module, variables = restore_for_inference(checkpoint)
    return config, programs.jit(module.apply, key=config.model.to_json_best_effort()), variables


def network_grid(
    shape: Sequence[int], spacing_mm: Sequence[float], voxels: int, multiple: int
) -> tuple[int, int, int]:
    """The grid a network runs on for a fixed scan of ``shape`` voxels of ``spacing_mm``: the
    scan's extent in mm, sampled with about ``voxels`` voxels (the training images' count), each
    side a multiple of ``multiple`` (the U-Net's downsampling factor). Its voxels are about as
    wide along every axis, as in training, whatever the scan's voxels: a thick-slice scan of 0.5
    x 0.5 x 3 mm is not squeezed into voxels six times thinner along the slices."""
    extent = np.asarray(shape, np.float64) * np.asarray(spacing_mm, np.float64)
    per_mm = (float(voxels) / float(np.prod(extent))) ** (1.0 / 3.0)
    return tuple(int(max(multiple, round(e * per_mm / multiple) * multiple)) for e in extent)


class NetworkField(NamedTuple):
    """A network's prediction: ``ddf`` (1, D, H, W, 3) on the fixed grid, and on the network's
    own grid (``network_grid``) the images it saw, ``fixed`` and ``moving`` (1, d, h, w, 1), and
    the field it found there, ``grid_ddf`` (1, d, h, w, 3)."""

    ddf: jnp.ndarray
    fixed: jnp.ndarray
    moving: jnp.ndarray
    grid_ddf: jnp.ndarray


_warp = programs.jit(ops.warp)
_compose = programs.jit(ops.compose)


def network_field(
    checkpoint: str | None,
    fixed: jnp.ndarray,
    moving: jnp.ndarray,
    model: str | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    scales: Sequence[float] = (1.0,),
) -> NetworkField:
    """The trained network's field: the best checkpoint of a train.py run directory
    (``checkpoint``) or a packaged pretrained model (``model``, a name of
    ``adreg_jax.pretrained.MODELS``).

    The network runs on ``network_grid``: the fixed scan's extent (``spacing``: its voxel size in
    mm) in as many voxels as the run's training images (``config.data.image_size``); its field is
    resized (and rescaled per axis) back to the fixed grid.

    ``scales``: one pass of the network per value, each on that grid made ``scale`` times finer
    along every axis (2: voxels half as wide as in training), on the moving image warped by the
    fields of the passes before it; the fields are composed (a test-time cascade of one network:
    each pass finds part of what is left, the finer ones finer detail). The ``NetworkField``'s
    grid is the last pass's.
    """
    if not scales or any(not float(s) > 0 for s in scales):
        raise ValueError(f"network scales {list(scales)}: give one or more numbers > 0")
    config, apply, variables = restored_network(checkpoint, model)
    voxels = int(np.prod(config.data.image_size))
    multiple = 2 ** (len(config.model.channels) - 1)
    on_grid: dict[tuple[int, ...], tuple[jnp.ndarray, jnp.ndarray]] = {}
    total = None
    for scale in scales:
        shape = network_grid(fixed.shape[1:4], spacing, round(voxels * scale**3), multiple)
        if shape not in on_grid:
            on_grid[shape] = resize_image(fixed, shape), resize_image(moving, shape)
        net_fixed, net_moving = on_grid[shape]
        if total is None:
            total = apply(variables, net_fixed, net_moving)["ddf"]
            continue
        if tuple(total.shape[1:4]) != shape:
            total = resize_ddf(total, shape)
        rest = apply(variables, net_fixed, _warp(net_moving, total))["ddf"]
        total = _compose(total, rest)  # warping by total, then by rest
    return NetworkField(resize_ddf(total, tuple(fixed.shape[1:4])), net_fixed, net_moving, total)
