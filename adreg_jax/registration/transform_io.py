"""Transforms on disk: the fields adreg-register writes, in the conventions of DESIGN.md
("Registration from files").

Where this sits: deformable stage -> **transform IO** -> files other tools and ``adreg-apply``
read. ``ddf.nii.gz`` holds the displacement of each fixed voxel in world RAS+ millimetres
(the fixed affine's 3x3 applied to the voxel displacement): world point x of the fixed image
corresponds to x + ddf(x) in the moving image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adreg_jax.data.nifti import save_nifti


def ddf_voxels_to_world_mm(ddf_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(D, H, W, 3) voxel displacements of a grid -> world (RAS+) mm displacements."""
    return np.asarray(ddf_vox) @ np.asarray(affine)[:3, :3].T


def save_ddf(out: Path, ddf_vox: np.ndarray, fixed_affine: np.ndarray) -> None:
    """``out/ddf.nii.gz``: the field (D, H, W, 3) of the fixed grid in world RAS+ mm."""
    ddf_mm = ddf_voxels_to_world_mm(ddf_vox, fixed_affine)
    save_nifti(Path(out) / "ddf.nii.gz", ddf_mm.astype(np.float32), fixed_affine)
