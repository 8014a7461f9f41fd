"""Transforms on disk: what adreg-register writes and adreg-apply (or ``load_transform``) reads, in
the conventions of DESIGN.md ("Registration from files").

Where this sits: ``transform.Transform`` -> **transform IO** -> files other tools read.

A transform folder holds:
- ``transform.json``: the grids (shapes and float64 affines, which NIfTI headers store only in
  float32), the file names, the affine stage alone (4x4, fixed world -> moving world mm).
- ``ddf.nii.gz``: (D, H, W, 3) world RAS+ mm on the fixed grid; world point x of the fixed image
  corresponds to x + ddf(x) in the moving image.
- ``ddf_itk.nii.gz``: the same map as ITK, ANTs and SimpleITK read a displacement field: physical
  LPS mm (the RAS x and y components negated), 5-D (D, H, W, 1, 3), NIfTI intent "vector".
- with ``--inverse``: ``ddf_inverse.nii.gz`` and ``ddf_inverse_itk.nii.gz``, the inverse map on
  the moving image's grid in the same two conventions.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np

from adreg_jax.data.nifti import load_nifti, save_nifti, write_image
from adreg_jax.registration import programs
from adreg_jax.registration.transform import Grid, Transform

TRANSFORM_FILE = "transform.json"
FORMAT = "adreg_jax transform 1"
_RAS_TO_LPS = np.asarray([-1.0, -1.0, 1.0], np.float32)


@programs.jit
def ddf_voxels_to_world_mm(ddf_vox: jnp.ndarray, linear: jnp.ndarray) -> jnp.ndarray:
    """(..., D, H, W, 3) voxel displacements of a grid -> world (RAS+) mm displacements, float32,
    on the device; ``linear``: the grid's affine's 3x3 part. One component at a time: a product
    over the size-3 minor axis (numpy, or XLA:CPU) took 0.3-0.6 s for a 1 mm brain's field."""
    components = [ddf_vox[..., j].astype(jnp.float32) for j in range(3)]
    linear = linear.astype(jnp.float32)
    return jnp.stack([sum(linear[k, j] * components[j] for j in range(3)) for k in range(3)], -1)


def ddf_to_itk(ddf_mm: np.ndarray) -> np.ndarray:
    """A world RAS+ mm field (D, H, W, 3) as ITK stores displacement vectors in NIfTI: LPS mm,
    (D, H, W, 1, 3) (the fifth NIfTI dimension holds the vector components)."""
    return (np.asarray(ddf_mm, np.float32) * _RAS_TO_LPS)[:, :, :, None, :]


def save_itk_field(path: Path, ddf_mm: np.ndarray, affine: np.ndarray) -> None:
    """``ddf_to_itk`` written with intent "vector" and the grid's affine as both qform and sform
    (``data.nifti.save_nifti`` sets neither the intent nor a qform, which ITK readers use)."""
    image = nib.Nifti1Image(ddf_to_itk(ddf_mm), np.asarray(affine, np.float64))
    image.header.set_intent("vector")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    write_image(image, path)


def _grid_json(grid: Grid) -> dict:
    return {"shape": list(grid.shape), "affine": np.asarray(grid.affine).tolist()}


def save_transform(folder: Path, transform: Transform, sources: dict[str, str]) -> None:
    """Write the transform files into ``folder`` (see the module docstring); ``sources`` names the
    images registered (recorded in transform.json, not read back)."""
    folder = Path(folder)
    save_nifti(folder / "ddf.nii.gz", transform.ddf_mm, transform.fixed.affine)
    save_itk_field(folder / "ddf_itk.nii.gz", transform.ddf_mm, transform.fixed.affine)
    files = {"ddf": "ddf.nii.gz", "ddf_itk": "ddf_itk.nii.gz"}
    if transform.inverse_ddf_mm is not None:
        affine = transform.moving.affine
        save_nifti(folder / "ddf_inverse.nii.gz", transform.inverse_ddf_mm, affine)
        save_itk_field(folder / "ddf_inverse_itk.nii.gz", transform.inverse_ddf_mm, affine)
        files.update(inverse="ddf_inverse.nii.gz", inverse_itk="ddf_inverse_itk.nii.gz")
    record = {
        "format": FORMAT,
        "map": "fixed world point x (RAS+ mm) -> moving world point x + ddf(x); fields pull",
        "fixed": _grid_json(transform.fixed),
        "moving": _grid_json(transform.moving),
        "files": files,
        "affine_world": (
            None if transform.affine_world is None else np.asarray(transform.affine_world).tolist()
        ),
        "sources": sources,
    }
    (folder / TRANSFORM_FILE).write_text(json.dumps(record, indent=2))


def _read_field(folder: Path, name: str, grid: Grid, what: str) -> np.ndarray:
    path = folder / name
    field, affine = load_nifti(path)
    if field.shape != (*grid.shape, 3) or not grid.fits(field.shape[:3], affine):
        raise ValueError(
            f"{path}: {what} of shape {field.shape} does not lie on the grid that "
            f"{folder / TRANSFORM_FILE} records ({grid.describe()})"
        )
    return np.asarray(field, np.float32)


def load_transform(folder: str | Path) -> Transform:
    """The transform that ``adreg-register --out folder`` wrote: ``Transform`` (apply it with
    ``.warp(image, affine)``, ``.map_points(points)``, ``.inverted()``)."""
    folder = Path(folder)
    record_path = folder / TRANSFORM_FILE
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{folder}: no {TRANSFORM_FILE}; expected the --out folder of adreg-register"
        )
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != FORMAT:
            raise KeyError(f"format {record.get('format')!r}, expected {FORMAT!r}")
        fixed, moving = (
            Grid(tuple(record[k]["shape"]), np.asarray(record[k]["affine"], np.float64))
            for k in ("fixed", "moving")
        )
        files = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{record_path}: not an adreg_jax transform ({error!r})") from error
    ddf_mm = _read_field(folder, files["ddf"], fixed, "the field")
    inverse = None
    if files.get("inverse"):
        inverse = _read_field(folder, files["inverse"], moving, "the inverse field")
    affine_world = record.get("affine_world")
    return Transform(
        fixed,
        moving,
        ddf_mm,
        inverse,
        None if affine_world is None else np.asarray(affine_world, np.float64),
    )
