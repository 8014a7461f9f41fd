"""Any scans: NIfTI reading/writing and pair lists (CSV or JSON).

Where this sits: files -> **nifti** -> pipeline, and the register command (load_nifti /
save_nifti). Volumes are reoriented to canonical RAS+ so that all scans share one axis order;
the canonical affine is returned so that outputs can be written back in the input's world space.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip

from adreg_jax.data import preprocess
from adreg_jax.data.points import read_point_file

# the masks are adreg-register's (--pairs columns); the training pipeline reads the others
PAIR_KEYS = (
    "fixed",
    "moving",
    "fixed_seg",
    "moving_seg",
    "fixed_points",
    "moving_points",
    "fixed_mask",
    "moving_mask",
)


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file -> (array (D, H, W[, ...]) in canonical RAS+ orientation, 4x4 affine).

    The array's axis k is the canonical voxel axis k; the affine maps its voxel indices to world
    mm, so ``save_nifti(path, array, affine)`` writes it back in the same world space.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file {path} missing")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        # the data are read here: a truncated .nii.gz fails now (EOFError, zlib.error, ...)
        array = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from err
    preprocess.check_finite(array, str(path))
    return array, np.asarray(image.affine, np.float64)


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (D, H, W[, ...]) with the 4x4 ``affine`` from load_nifti."""
    write_image(nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64)), path)


def write_image(image: nib.Nifti1Image, path: str | Path) -> None:
    """``nib.save``, with ``.nii.gz`` compressed by ISA-L (``isal.igzip``, the gzip format, level 1
    as nibabel's default): a 141x256x256x3 float32 field took 11 s through Python's zlib, 0.7 s
    here, for the same size (float fields barely compress)."""
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        path.write_bytes(igzip.compress(image.to_bytes(), compresslevel=1))
    else:
        nib.save(image, str(path))


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """(3,) float32 voxel spacing in mm (column norms of the affine's linear part)."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).astype(np.float32)


def read_pair_list(path: str | Path) -> list[dict[str, str]]:
    """Pair list: CSV with a header or JSON list of objects; keys from PAIR_KEYS plus an
    optional ``split`` column. Relative paths are resolved against the list's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair list {path} missing")
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not row.get("fixed") or not row.get("moving"):
            raise ValueError(f"{path}: pair {number} needs 'fixed' and 'moving' file names")
        pair = {k: str(path.parent / row[k]) for k in PAIR_KEYS if row.get(k)}
        pair["split"] = row.get("split") or "train"
        pairs.append(pair)
    return pairs


class NiftiPairs:
    """Random-access pairs of a pair list (rows whose ``split`` matches; all rows for "train"
    when no row names a split). Images are min-max normalised to [0, 1] and brought to canonical
    RAS+ (``load_nifti``). Point files are read as adreg-register reads them
    (``points.read_point_file``: physical points, voxel indices along their image file's axes in
    an elastix ``index`` file, or voxel coordinates of the canonical arrays) and brought to the
    canonical arrays' voxels."""

    def __init__(self, list_path: str | Path, split: str):
        pairs = read_pair_list(list_path)
        self.pairs = [p for p in pairs if p["split"] == split] or (
            pairs if split == "train" else []
        )
        if not self.pairs:
            raise ValueError(f"{list_path}: no pairs for split {split!r}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        pair = self.pairs[index]
        fixed, affine = load_nifti(pair["fixed"])
        moving, moving_affine = load_nifti(pair["moving"])
        if fixed.shape != moving.shape:
            raise ValueError(
                f"{pair['moving']}: shape {moving.shape} differs from fixed {pair['fixed']} "
                f"{fixed.shape}; resample both to one grid first"
            )
        element = {
            "fixed": _unit(fixed)[..., None],
            "moving": _unit(moving)[..., None],
            "spacing": spacing_of(affine),
        }
        for key in ("fixed_seg", "moving_seg"):
            if key in pair:
                element[key] = load_nifti(pair[key])[0].astype(np.int32)
        for key, image, image_affine in (
            ("fixed_points", "fixed", affine),
            ("moving_points", "moving", moving_affine),
        ):
            if key in pair:
                points = read_point_file(pair[key])
                element[key] = points.to_voxels(image_affine, pair[image])
        return element


def _unit(volume: np.ndarray) -> np.ndarray:
    volume = volume.astype(np.float32)
    low, high = float(volume.min()), float(volume.max())
    return (volume - low) / max(high - low, 1e-6)
