"""Resolution levels of the affine and deformable stages, chosen from the scan itself.

Where this sits: loading (shape, spacing, modality) -> **levels** -> affine stage and deformable
stage, which resize the images of each level to ``level_shape(shape, factors)``.

A level is a per-axis integer downsampling (shrink) factor. As ANTs' shrink factors do, a level
aimed at voxels of ``target_mm`` shrinks the fine axes more than the coarse ones, so that the
voxels of coarse levels are near isotropic (a 0.5 x 0.5 x 3 mm scan at a 4 mm level: factors
8, 8, 1), and no axis is shrunk below a few voxels.

Deformable levels run coarse to fine, doubling the voxel size between levels:
- the finest is the finest voxel size (the fixed scan's smallest spacing times a power of two,
  no finer than the moving scan's smallest spacing) whose level holds at most
  ``MAX_LEVEL_VOXELS`` and whose voxels are near isotropic (longest side at most
  ``MAX_ANISOTROPY`` times the shortest): the cost of a step grows with the voxels, and a
  full-resolution level of a 1 mm brain or a DIR-Lab CT would cost 8 times the next coarser
  (measured: a DIR-Lab-sized CT spent 66 of 81 s at full resolution, for a worse result); a
  level that refines only the fine axes of thick slices adds little (measured on the small
  lung CT, 2.7 x 2.7 x 5 mm: its full-resolution level took about a quarter of the
  command for 0.73 -> 0.69 mm TRE);
- the coarsest has voxels of at least ``motion_mm / CAPTURE_VOXELS``: the local similarity
  (a window of 5 voxels) and the control grid (twice as coarse) then reach across the largest
  expected motion (``DEFAULT_MOTION_MM``: 20 mm of breathing for CT, 10 mm for MR after an affine
  alignment).
For a 1 mm brain this gives factors 4 and 2 (the levels the command used before), for CT at
2 mm voxels 4 and 2 (was 2 and 1), for a 0.5 x 0.5 x 3 mm MR (8, 8, 1), (4, 4, 1) (2 x 2 x 3 mm
the finest), for the small lung CT at 2.7 x 2.7 x 5 mm (4, 4, 2), (2, 2, 1).

Steps (``default_steps``): a level's Adam step costs about its voxel count, so each level gets
``STEP_VOXEL_BUDGET / voxels`` steps, between ``MIN_STEPS`` and ``MAX_STEPS``: cheap levels (every
level of a small scan) run 60, a 1 mm brain's 1/4 level 37-47 and its 1/2 level 20, the least
(measured, Dice of mni_to_scan / scan_to_mni of ``benchmarks/real_scans.py`` against the steps of
the two levels, ``--instance-steps``: 0.7302 / 0.7580 with 47|37 and 8, the defaults before;
0.7372 / 0.7669 with 60 and 16; 0.7381 / 0.7675 with 47|37 and 20, these; 0.7382 / 0.7682 with
60 and 20: the fine level's steps count, the coarse level's barely; a higher learning rate
instead, 0.2 with 47|37 and 14, gave 0.7373 / 0.7675 and folded voxels; the small lung CT 0.73 mm
TRE with 40 at its (2, 2, 1) level, 0.71 mm with 60). CT has ``CT_STEP_VOXEL_BUDGET``, 4.6 times
as much: a DIR-Lab-sized CT's levels get 60 and 20 steps (its TRE 0.675 mm with 35 and 8,
0.494 mm with 60 and 20, after issue 12's full-grid squarings). The affine stage's steps follow
the same rule (``affine_steps``): 100 at its coarsest level, where it finds the map, and where a
step is cheap; fewer on a finer level of a million voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Factors = tuple[int, int, int]

MAX_LEVEL_VOXELS = 1_200_000
MAX_ANISOTROPY = 1.5
CAPTURE_VOXELS = 2.5
DEFAULT_MOTION_MM = {"ct": 20.0, "mr": 10.0}
AFFINE_COARSE_MM = 8.0
# instance-optimisation Adam steps of a level: STEP_VOXEL_BUDGET / its voxels, clipped; CT gets
# more (see default_steps)
STEP_VOXEL_BUDGET = 5_000_000
CT_STEP_VOXEL_BUDGET = 23_000_000
# (20 at the least: the fine level of a 1 mm brain, 0.85-1.1 M voxels, about 0.09 s a step)
MIN_STEPS, MAX_STEPS = 20, 60
# the affine stage's: AFFINE_STEP_VOXEL_BUDGET / voxels, at most AFFINE_MAX_STEPS
AFFINE_STEP_VOXEL_BUDGET = 4_000_000
AFFINE_MIN_STEPS, AFFINE_MAX_STEPS = 20, 100


def level_shape(shape: Sequence[int], factors: int | Sequence[int]) -> tuple[int, ...]:
    """The grid ``factors`` times coarser than ``shape`` (one factor, or one per axis; at least 4
    voxels per axis)."""
    factors = [factors] * len(shape) if np.isscalar(factors) else list(factors)
    return tuple(max(4, int(n) // int(f)) for n, f in zip(shape, factors, strict=True))


def level_spacing(shape: Sequence[int], spacing: Sequence[float], factors) -> np.ndarray:
    """(3,) voxel size in mm of the level's grid (the same extent as the scan's)."""
    coarse = np.asarray(level_shape(shape, factors), np.float64)
    return np.asarray(spacing, np.float64) * np.asarray(shape, np.float64) / coarse


def shrink_factors(
    shape: Sequence[int], spacing: Sequence[float], target_mm: float, min_size: int = 8
) -> Factors:
    """Per-axis factors that bring the voxels closest to ``target_mm`` (never below 1, never
    leaving fewer than ``min_size`` voxels along an axis that had more)."""
    factors = []
    for n, s in zip(shape, spacing, strict=True):
        wanted = max(1, int(round(float(target_mm) / float(s))))
        factors.append(max(1, min(wanted, int(n) // min_size)))
    return tuple(factors)


def deformable_levels(
    shape: Sequence[int],
    spacing: Sequence[float],
    motion_mm: float,
    max_voxels: int = MAX_LEVEL_VOXELS,
    finest_mm: float = 0.0,
) -> list[Factors]:
    """Per-axis factors of each deformable level, coarse to fine (see the module docstring);
    ``finest_mm``: no level finer than this (the moving scan's smallest spacing: its detail ends
    there)."""
    target = float(np.min(spacing))
    while target * 1.1 < finest_mm:
        target *= 2.0

    def too_fine(target: float) -> bool:
        factors = shrink_factors(shape, spacing, target)
        voxel = level_spacing(shape, spacing, factors)
        return (
            np.prod(level_shape(shape, factors)) > max_voxels
            or voxel.max() > MAX_ANISOTROPY * voxel.min() + 1e-6
        )

    # (at most 6 doublings: a level of axes that cannot shrink further stays anisotropic)
    for _ in range(6):
        if not too_fine(target):
            break
        target *= 2.0
    targets = [target]
    # 10 % slack: 2 mm voxels doubled twice (7.8 mm) are coarse enough for 8 mm
    while targets[-1] * 1.1 < motion_mm / CAPTURE_VOXELS and len(targets) < 6:
        targets.append(2.0 * targets[-1])
    levels = []
    for target in reversed(targets):
        factors = shrink_factors(shape, spacing, target)
        if not levels or factors != levels[-1]:
            levels.append(factors)
    return levels


def affine_levels(shape: Sequence[int], spacing: Sequence[float]) -> list[Factors]:
    """Per-axis factors of the affine stage's two levels: voxels of about ``AFFINE_COARSE_MM``
    (each axis keeping at least 16 voxels), then half those factors; an affine map is determined
    by coarse images, and there a step costs milliseconds. (8, 8, 8), (4, 4, 4) for a 1 mm brain;
    (16, 16, 1), (8, 8, 1) for 0.5 x 0.5 x 3 mm slices; (2, 2, 2), (1, 1, 1) for a 32^3 image."""
    coarse = shrink_factors(shape, spacing, AFFINE_COARSE_MM, min_size=16)
    fine = tuple(max(1, f // 2) for f in coarse)
    return [coarse] if fine == coarse else [coarse, fine]


def default_steps(level_voxels: Sequence[int], modality: str = "mr") -> tuple[int, ...]:
    """Adam steps of the deformable levels whose grids hold ``level_voxels`` voxels each:
    ``STEP_VOXEL_BUDGET / voxels`` between ``MIN_STEPS`` and ``MAX_STEPS`` (module docstring);
    for CT (``modality``) ``CT_STEP_VOXEL_BUDGET``: the lungs' motion is large and their texture
    faint, and the field keeps improving with steps where a brain's has settled (measured on the
    DIR-Lab-sized phantom, levels 4 and 2: TRE 0.675 mm with 35 and 8 steps, 0.494 mm with 60 and
    20; a small CT's levels have 60 either way)."""
    budget = CT_STEP_VOXEL_BUDGET if modality == "ct" else STEP_VOXEL_BUDGET
    return tuple(_budget_steps(n, budget, MIN_STEPS, MAX_STEPS) for n in level_voxels)


def affine_steps(level_voxels: Sequence[int]) -> tuple[int, ...]:
    """Adam steps of the affine levels, coarse to fine: ``AFFINE_MAX_STEPS`` at the coarsest
    (where the map is found), ``AFFINE_STEP_VOXEL_BUDGET / voxels`` (clipped) at the finer ones,
    which refine it (a 1 mm brain: 100 and 37 steps; Dice after the deformable stage unchanged
    from 100 and 100)."""
    return tuple(
        AFFINE_MAX_STEPS
        if level == 0
        else _budget_steps(n, AFFINE_STEP_VOXEL_BUDGET, AFFINE_MIN_STEPS, AFFINE_MAX_STEPS)
        for level, n in enumerate(level_voxels)
    )


def parse_levels(values: Sequence[str], flag: str = "--levels") -> list[Factors]:
    """Per-axis factors of levels given as text, coarse to fine: "4" (every axis) or "4x4x1" (one
    per array axis); ``ValueError`` naming ``flag`` and the value for anything else (a factor
    below 1, two or four factors, a non-integer)."""
    levels = []
    for value in values:
        parts = str(value).lower().split("x")
        try:
            factors = tuple(int(part) for part in parts)
        except ValueError:
            factors = ()
        if len(factors) not in (1, 3) or min(factors, default=0) < 1:
            raise ValueError(
                f"{flag} {value!r}: expected a positive integer factor (e.g. 4) or one per axis "
                f"as AxBxC (e.g. 4x4x1)"
            )
        levels.append(factors * 3 if len(factors) == 1 else factors)
    return levels


def level_voxels(shape: Sequence[int], levels: Sequence[Sequence[int] | int]) -> list[int]:
    """The voxel count of each level's grid."""
    return [int(np.prod(level_shape(shape, factors))) for factors in levels]


def _budget_steps(voxels: int, budget: float, low: int, high: int) -> int:
    return int(np.clip(round(budget / max(int(voxels), 1)), low, high))
