"""Point files (landmarks) in the forms other tools write them, read to and written back from
0-based voxel coordinates of the canonical RAS+ arrays (``nifti.load_nifti``), which is how every
computation here takes points (TRE, ``Transform.map_points``).

Where this sits: a point file -> **points** -> ``adreg-register --fixed-points/--moving-points``,
``adreg-apply --points`` (which writes its result in the form it read), and the ``pairs`` data
set's ``fixed_points``/``moving_points`` columns.

The form is told by the file's first line:

- ``x,y,z...`` (a CSV header naming the columns x, y and z, as ANTs' ``antsApplyTransformsToPoints``
  reads and writes them: ``x,y,z,t`` and optional more columns): physical points in LPS mm, as
  ITK and ANTs place them. Other columns are kept and written back unchanged.
- ``point`` or ``index`` (elastix and transformix point files: that word, the number of points,
  then one point per line): ``point``, physical points in LPS mm; ``index``, 0-based voxel
  indices along the image file's own array axes (ITK's index).
- anything else: three numbers per line (``#`` comments and blank lines skipped), 0-based voxel
  coordinates along the canonical arrays' axes (what ``load_nifti`` returns; adreg-apply writes
  them so).

Physical points need only the image's world affine; voxel indices along the file's axes need the
image file itself (its orientation), given as ``image_path``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

LPS = np.array([-1.0, -1.0, 1.0])  # RAS mm <-> LPS mm: x and y change sign


@dataclass
class PointFile:
    """Points as a file holds them: ``values`` (N, 3) in the file's own units and axes, ``form``
    ("voxel", "ants_csv", "elastix_point" or "elastix_index"), ``lines`` (N,) the file's 1-based
    line of each point (for errors), and for an ANTs CSV its ``header`` and each row's other
    columns (``extra``), written back."""

    path: str
    form: str
    values: np.ndarray
    lines: np.ndarray
    header: list[str] = field(default_factory=list)
    extra: list[dict[str, str]] = field(default_factory=list)

    def to_voxels(self, affine: np.ndarray, image_path: str | Path | None = None) -> np.ndarray:
        """(N, 3) float32 0-based voxel coordinates of the canonical array whose voxel-to-world
        RAS+ matrix is ``affine`` (the image the points belong to, ``image_path`` its file)."""
        to_voxels = np.linalg.inv(np.asarray(affine, np.float64))  # world RAS mm -> voxels
        if self.form in ("ants_csv", "elastix_point"):
            return _mapped(to_voxels, self.values * LPS).astype(np.float32)
        if self.form == "elastix_index":
            file_affine = _file_affine(self, image_path)
            return _mapped(to_voxels @ file_affine, self.values).astype(np.float32)
        return self.values.astype(np.float32)

    def with_voxels(
        self, voxels: np.ndarray, affine: np.ndarray, image_path: str | Path | None = None
    ) -> PointFile:
        """Points in this file's form from canonical voxel coordinates ``voxels`` (N, 3) of the
        image of ``affine`` (``image_path``): the inverse of ``to_voxels``, for writing."""
        voxels = np.asarray(voxels, np.float64).reshape(-1, 3)
        affine = np.asarray(affine, np.float64)
        if self.form in ("ants_csv", "elastix_point"):
            values = _mapped(affine, voxels) * LPS
        elif self.form == "elastix_index":
            values = _mapped(np.linalg.inv(_file_affine(self, image_path)) @ affine, voxels)
        else:
            values = voxels
        lines = np.arange(1, len(values) + 1)
        return PointFile(self.path, self.form, values, lines, self.header, self.extra)


def read_point_file(path: str | Path) -> PointFile:
    """A point file in any of the module's forms."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point file {path} missing")
    text = path.read_text()
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    numbered = [(n, line) for n, line in numbered if line]
    first = numbered[0][1].lower() if numbered else ""
    columns = [c.strip().lower() for c in first.split(",")]
    if {"x", "y", "z"} <= set(columns):
        return _read_ants_csv(path, text)
    if first.split() and first.split()[0] in ("point", "index"):
        return _read_elastix(path, numbered)
    rows, lines = [], []
    for number, line in numbered:
        content = line.split("#", 1)[0].split()
        if not content:
            continue
        rows.append(_numbers(content, path, number, 3, "three numbers (voxel coordinates)"))
        lines.append(number)
    return PointFile(str(path), "voxel", _array(rows), np.asarray(lines, int))


def write_point_file(path: str | Path, points: PointFile) -> None:
    """``points`` written in their form (an ANTs CSV keeps its header and other columns)."""
    if points.form == "ants_csv":
        handle = io.StringIO()
        writer = csv.DictWriter(handle, fieldnames=points.header, lineterminator="\n")
        writer.writeheader()
        names = _xyz_names(points.header)
        for row, values in zip(points.extra, points.values, strict=True):
            xyz = {name: f"{value:.6f}" for name, value in zip(names, values, strict=True)}
            writer.writerow({**row, **xyz})
        Path(path).write_text(handle.getvalue())
    elif points.form.startswith("elastix"):
        word = "point" if points.form == "elastix_point" else "index"
        body = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in points.values)
        Path(path).write_text(f"{word}\n{len(points.values)}\n{body}\n")
    else:
        np.savetxt(path, points.values, fmt="%.6f")


def _xyz_names(header: list[str]) -> list[str]:
    by_lower = {name.strip().lower(): name for name in header}
    return [by_lower[axis] for axis in ("x", "y", "z")]


def _read_ants_csv(path: Path, text: str) -> PointFile:
    reader = csv.DictReader(io.StringIO(text))
    header = list(reader.fieldnames or [])
    names = _xyz_names(header)
    rows, lines, extra = [], [], []
    for row in reader:
        if not any((value or "").strip() for value in row.values()):
            continue
        number = reader.line_num
        rows.append(
            _numbers([row[n] for n in names], path, number, 3, "numbers in columns x, y, z")
        )
        lines.append(number)
        # cells beyond the header (csv's key None) are dropped
        extra.append({k: v for k, v in row.items() if k not in names and k is not None})
    return PointFile(str(path), "ants_csv", _array(rows), np.asarray(lines, int), header, extra)


def _read_elastix(path: Path, numbered: list[tuple[int, str]]) -> PointFile:
    word = numbered[0][1].split()[0].lower()
    if len(numbered) < 2:
        raise ValueError(f"{path}: an elastix point file ('{word}') needs the number of points")
    count_line, count_text = numbered[1]
    count = _numbers(count_text.split(), path, count_line, 1, "the number of points")[0]
    rows = [_numbers(line.split(), path, n, 3, "three numbers") for n, line in numbered[2:]]
    if len(rows) != int(count):
        raise ValueError(
            f"{path}: line {count_line} says {int(count)} points but {len(rows)} follow"
        )
    lines = np.asarray([n for n, _ in numbered[2:]], int)
    form = "elastix_point" if word == "point" else "elastix_index"
    return PointFile(str(path), form, _array(rows), lines)


def _numbers(fields, path: Path, line: int, count: int, what: str) -> list[float]:
    fields = [value or "" for value in fields]  # a short CSV row's missing cells are None
    try:
        values = [float(value) for value in fields]
    except ValueError:
        values = []
    if len(values) != count or not np.all(np.isfinite(values)):
        raise ValueError(f"{path} line {line}: expected {what}, got {' '.join(fields)!r}")
    return values


def _array(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, np.float64).reshape(-1, 3)


def _mapped(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) through a 4x4 affine map."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _file_affine(points: PointFile, image_path: str | Path | None) -> np.ndarray:
    """The voxel-to-world matrix of the image file's own array axes (its header's affine; the
    canonical array's is this one reoriented, ``nib.as_closest_canonical``)."""
    if image_path is None:
        raise ValueError(
            f"{points.path}: voxel indices along an image file's axes need that image file; "
            "give physical points (an ANTs CSV x,y,z,t or an elastix 'point' file) or voxel "
            "coordinates of the canonical arrays"
        )
    try:
        return np.asarray(nib.load(str(image_path)).affine, np.float64)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"{image_path}: not a readable NIfTI file ({err})") from err
