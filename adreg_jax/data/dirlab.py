"""DIR-Lab 4DCT loader: raw int16 volumes and 300 landmark pairs per case.

Where this sits: files (the DIR-Lab download layout) -> **dirlab** -> preprocess -> pipeline.
Layout: ``CaseNPack/Images/<image name>`` header-less little-endian int16 of shape (z, y, x) and
``CaseNPack/ExtremePhases/*_T00_xyz.txt`` / ``*_T50_xyz.txt`` with 1-based x y z voxel indices
(case 8's folder is ``Case8Deploy``). Everything returned is in (D, H, W) = (z, y, x) order with
0-based voxel coordinates (DESIGN.md); the conversion happens here and nowhere else (and back
in ``write_case``, which writes this layout). ``preprocess_case`` resamples and crops a case,
centred on the volume or on the lungs (``find_lung_box``), with its landmarks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from adreg_jax.data import preprocess

# case -> (size x y z, spacing x y z mm, published "before" TRE mm). Source: DIR-Lab
# (Castillo et al. 2009) as tabulated in ../shared/data/README.md.
CASES: dict[int, tuple[tuple[int, int, int], tuple[float, float, float], float]] = {
    1: ((256, 256, 94), (0.97, 0.97, 2.5), 3.89),
    2: ((256, 256, 112), (1.16, 1.16, 2.5), 4.34),
    3: ((256, 256, 104), (1.15, 1.15, 2.5), 6.94),
    4: ((256, 256, 99), (1.13, 1.13, 2.5), 9.83),
    5: ((256, 256, 106), (1.10, 1.10, 2.5), 7.48),
    6: ((512, 512, 128), (0.97, 0.97, 2.5), 10.89),
    7: ((512, 512, 136), (0.97, 0.97, 2.5), 11.03),
    8: ((512, 512, 128), (0.97, 0.97, 2.5), 14.99),
    9: ((512, 512, 128), (0.97, 0.97, 2.5), 7.92),
    10: ((512, 512, 120), (0.97, 0.97, 2.5), 7.30),
}
PHASES = tuple(f"T{10 * k:02d}" for k in range(10))


def case_shape(case: int) -> tuple[int, int, int]:
    """(D, H, W) = (z, y, x) voxel shape of a case."""
    x, y, z = CASES[_check_case(case)][0]
    return (z, y, x)


def case_spacing(case: int) -> np.ndarray:
    """(3,) float32 spacing in mm, (D, H, W) order."""
    sx, sy, sz = CASES[_check_case(case)][1]
    return np.asarray((sz, sy, sx), np.float32)


def _check_case(case: int) -> int:
    if case not in CASES:
        raise ValueError(f"DIR-Lab case {case!r} unknown; expected one of 1..10")
    return int(case)


def case_dir(root: str | Path, case: int) -> Path:
    """The case folder: ``CaseNPack`` (``Case8Deploy`` for case 8)."""
    name = "Case8Deploy" if _check_case(case) == 8 else f"Case{case}Pack"
    path = Path(root) / name
    if not path.is_dir():
        raise FileNotFoundError(f"DIR-Lab case folder {path} missing; expected the DIR-Lab layout")
    return path


def image_path(root: str | Path, case: int, phase: str) -> Path:
    """Path of one phase image (file names as in the DIR-Lab download)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} unknown; expected one of {PHASES}")
    if case == 1:
        name = f"case1_{phase}_s.img"
    elif 2 <= case <= 5:
        name = f"case{case}_{phase}-ssm.img"
    else:
        name = f"case{case}_{phase}.img"
    return case_dir(root, case) / "Images" / name


def read_image(root: str | Path, case: int, phase: str = "T00") -> np.ndarray:
    """One phase as (D, H, W) int16 HU-like values (raw, no preprocessing)."""
    path = image_path(root, case, phase)
    if not path.is_file():
        raise FileNotFoundError(f"DIR-Lab image {path} missing")
    shape = case_shape(case)
    expected = int(np.prod(shape)) * 2
    size = path.stat().st_size
    if size != expected:
        raise ValueError(
            f"{path}: {size} bytes, expected {expected} (int16 z y x = {shape} for case {case})"
        )
    return np.fromfile(path, dtype="<i2").reshape(shape)


def landmark_path(root: str | Path, case: int, phase: str) -> Path:
    """The ``ExtremePhases/*_{phase}_xyz.txt`` file (names differ between cases)."""
    folder = case_dir(root, case) / "ExtremePhases"
    matches = sorted(folder.glob(f"*_{phase}_xyz.txt"))
    if not matches:
        raise FileNotFoundError(f"no landmark file {folder}/*_{phase}_xyz.txt")
    return matches[0]


def read_landmarks(path: str | Path, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Parse a DIR-Lab x y z file (1-based; tabs, CRLF, leading/trailing blanks allowed).

    Returns (N, 3) float32 0-based (D, H, W) voxel coords. With ``shape`` (D, H, W), a point
    outside the volume is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file {path} missing")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()  # any whitespace: tabs, spaces, the CR of CRLF
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{path}:{line_no}: expected three numbers x y z, got {line!r}")
        try:
            rows.append([float(v) for v in fields])
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: expected numbers x y z, got {line!r}") from err
    if not rows:
        raise ValueError(f"{path}: no landmarks")
    xyz = np.asarray(rows, np.float64) - 1.0
    points = xyz[:, ::-1].astype(np.float32)  # x y z -> z y x = D H W
    if shape is not None:
        outside = np.any((points < 0) | (points > np.asarray(shape) - 1), axis=1)
        if outside.any():
            first = int(np.argmax(outside))
            raise ValueError(
                f"{path}: landmark {first + 1} at x y z {rows[first]} is outside the volume "
                f"(D, H, W) = {shape}"
            )
    return points


@dataclasses.dataclass
class DirLabCase:
    """One case: fixed (T00) and moving (T50) volumes and landmarks.

    fixed, moving: (D, H, W) float32 (raw values, or [0, 1] after ``preprocess_case``).
    fixed_points, moving_points: (N, 3) float32 0-based voxel coords on the current grid.
    spacing: (3,) float32 mm of the current grid. original_spacing: (3,) mm of the raw grid.
    grid_map: current grid <-> raw grid; TRE is reported on the raw grid in mm.
    lung_box: (2, 3) first and last voxel coords of the lungs on the current grid (None when
    not searched); shape: (D, H, W) of the current grid.
    """

    case: int
    fixed: np.ndarray | None
    moving: np.ndarray | None
    fixed_points: np.ndarray
    moving_points: np.ndarray
    spacing: np.ndarray
    original_spacing: np.ndarray
    grid_map: preprocess.GridMap
    lung_box: np.ndarray | None = None
    shape: tuple[int, int, int] | None = None

    def points_inside(self) -> np.ndarray:
        """(N,) bool: landmark pairs whose fixed and moving points both lie in the grid."""
        shape = self.shape or case_shape(self.case)
        return preprocess.inside_grid(self.fixed_points, shape) & preprocess.inside_grid(
            self.moving_points, shape
        )

    def lungs_inside(self) -> bool:
        """Whether the lung box found in the images lies wholly in the grid."""
        if self.lung_box is None:
            raise ValueError(f"case {self.case}: no lung box (preprocess with center='lungs')")
        return bool(
            preprocess.inside_grid(self.lung_box, self.shape or case_shape(self.case)).all()
        )


def load_dirlab_case(root: str | Path, case: int, images: bool = True) -> DirLabCase:
    """Read case ``case`` under ``root``. ``images=False`` reads only the landmarks."""
    shape = case_shape(case)
    fixed_points = read_landmarks(landmark_path(root, case, "T00"), shape)
    moving_points = read_landmarks(landmark_path(root, case, "T50"), shape)
    if len(fixed_points) != len(moving_points):
        raise ValueError(
            f"case {case}: {len(fixed_points)} T00 landmarks but {len(moving_points)} T50"
        )
    fixed = read_image(root, case, "T00").astype(np.float32) if images else None
    moving = read_image(root, case, "T50").astype(np.float32) if images else None
    spacing = case_spacing(case)
    return DirLabCase(
        case,
        fixed,
        moving,
        fixed_points,
        moving_points,
        spacing,
        spacing.copy(),
        preprocess.GridMap.identity(),
        shape=shape,
    )


def find_lung_box(data: DirLabCase, hu_offset: float = 0.0) -> np.ndarray:
    """(2, 3) first and last voxel (D, H, W) of the lungs of both phases, on the current grid.

    The raw values plus ``hu_offset`` must be HU (air about -1000); see
    ``preprocess.lung_bounding_box``.
    """
    boxes = []
    for which in ("fixed", "moving"):
        volume = getattr(data, which)
        if volume is None:
            raise ValueError(f"case {data.case}: the lung box needs the images (images=True)")
        box = preprocess.lung_bounding_box(volume + np.float32(hu_offset))
        if box is None:
            raise ValueError(
                f"case {data.case} {which}: no lungs found (air below -500 HU inside the body); "
                f"expected HU values (air about -1000) after adding hu_offset={hu_offset}; "
                "images stored as HU + 1024 need hu_offset=-1024"
            )
        boxes.append(box)
    return np.stack([np.minimum(*[b[0] for b in boxes]), np.maximum(*[b[1] for b in boxes])])


def preprocess_case(
    data: DirLabCase,
    hu_window: tuple[float, float] | None = (-1000.0, 500.0),
    percentiles: tuple[float, float] | None = None,
    inplane_size: tuple[int, int] | None = None,
    z_multiple: int = 16,
    isotropic_mm: float | None = None,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    center: str = "volume",
    lung_box: np.ndarray | None = None,
    hu_offset: float = 0.0,
) -> DirLabCase:
    """Paper preprocessing; landmarks follow every crop, pad and resample.

    Order: intensity (raw + ``hu_offset``, then HU window, else percentile clip) -> [0, 1]; then
    either resampling to ``spacing_mm`` ((D, H, W) mm, the nearest whole shape) or to
    ``isotropic_mm``, or (centred in-plane crop/pad to ``inplane_size`` and zero pad of z to a
    multiple of ``z_multiple``); finally a crop/pad to ``shape`` if given, centred on the volume
    (``center="volume"``) or on the lungs (``center="lungs"``: the middle of ``lung_box``, raw
    voxel coords (2, 3) first/last, found in both phases' HU values when not given).
    The result's ``lung_box`` is that box on the new grid (None with ``center="volume"``).
    """
    if center not in ("volume", "lungs"):
        raise ValueError(f"center={center!r} unknown; expected 'volume' or 'lungs'")
    base_shape = case_shape(data.case) if data.fixed is None else data.fixed.shape
    if center == "lungs" and lung_box is None:
        lung_box = data.grid_map.inverse(find_lung_box(data, hu_offset).astype(np.float64))
    volumes = [data.fixed, data.moving]
    if hu_offset:
        volumes = [None if v is None else v + np.float32(hu_offset) for v in volumes]
    if hu_window is not None:
        volumes = [None if v is None else preprocess.window(v, *hu_window) for v in volumes]
    elif percentiles is not None:
        volumes = [
            None if v is None else preprocess.percentile_normalise(v, *percentiles) for v in volumes
        ]
    steps: list[tuple[str, tuple[int, ...]]] = []
    current = tuple(int(n) for n in base_shape)
    if spacing_mm is not None or isotropic_mm is not None:
        new_spacing = (isotropic_mm,) * 3 if spacing_mm is None else tuple(spacing_mm)
        target = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(current, data.spacing, new_spacing, strict=True)
        )
        steps.append(("resample", target))
        current = target
    else:
        if inplane_size is not None:
            current = (current[0], *inplane_size)
            steps.append(("crop", current))
        if z_multiple > 1:
            current = (current[0] + (-current[0]) % z_multiple, *current[1:])
            steps.append(("crop", current))  # centred zero pad of z
    if shape is not None:
        steps.append(("final", tuple(int(n) for n in shape)))

    grid_map = data.grid_map
    spacing = np.asarray(data.spacing, np.float64)
    current = tuple(int(n) for n in base_shape)
    for kind, target in steps:
        if kind == "resample":
            step_map = preprocess.resample_map(current, target)
            volumes = [None if v is None else preprocess.resample(v, target)[0] for v in volumes]
        else:
            middle = None
            if kind == "final" and center == "lungs":
                middle = grid_map.forward(np.asarray(lung_box, np.float64).mean(axis=0))
            step_map = preprocess.crop_or_pad_map(current, target, middle)
            volumes = [
                None if v is None else preprocess.crop_or_pad(v, target, middle)[0] for v in volumes
            ]
        grid_map = grid_map.then(step_map)
        spacing = spacing / step_map.scale
        current = target
    raw_box = None if lung_box is None else np.asarray(lung_box, np.float64)
    return dataclasses.replace(
        data,
        fixed=volumes[0],
        moving=volumes[1],
        fixed_points=_apply(data, grid_map, "fixed"),
        moving_points=_apply(data, grid_map, "moving"),
        spacing=spacing.astype(np.float32),
        grid_map=grid_map,
        lung_box=None if raw_box is None else grid_map.forward(raw_box),
        shape=current,
    )


def _apply(data: DirLabCase, grid_map: preprocess.GridMap, which: str) -> np.ndarray:
    raw = data.grid_map.inverse(getattr(data, f"{which}_points"))
    return grid_map.forward(raw).astype(np.float32)


def tre_mm(
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    grid_map: preprocess.GridMap,
    original_spacing: np.ndarray,
) -> np.ndarray:
    """(N,) distances in the original physical mm between processed-grid points."""
    a = grid_map.inverse(np.asarray(fixed_points, np.float64))
    b = grid_map.inverse(np.asarray(moving_points, np.float64))
    return np.linalg.norm((a - b) * np.asarray(original_spacing, np.float64), axis=-1)


# --- writing the DIR-Lab layout (the loader's inverse: conversions, generated test cases) -------


def write_landmarks(path: str | Path, points: np.ndarray) -> None:
    """Write (N, 3) 0-based (D, H, W) points as a DIR-Lab file: 1-based x y z, tab separated,
    CRLF line ends (the original files' format). Points must be whole voxels."""
    xyz = np.asarray(points, np.float64)[:, ::-1] + 1.0
    if not np.allclose(xyz, np.round(xyz)):
        raise ValueError(f"{path}: DIR-Lab landmarks are whole voxel indices; got {xyz[:2]}...")
    text = "".join(f"{int(x)}\t{int(y)}\t{int(z)}\r\n" for x, y, z in np.round(xyz))
    Path(path).write_text(text, newline="")


def write_case(
    root: str | Path,
    case: int,
    images: dict[str, np.ndarray],
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
) -> Path:
    """Write one case in the DIR-Lab download layout under ``root``; returns the case folder.

    images: phase ("T00".."T90") -> (D, H, W) volume of ``case_shape(case)``, stored as
    header-less little-endian int16. fixed_points, moving_points: (N, 3) 0-based (D, H, W)
    whole-voxel coords, written as ``ExtremePhases/caseN_dirLab300_T00_xyz.txt`` / ``_T50_``.
    """
    name = "Case8Deploy" if _check_case(case) == 8 else f"Case{case}Pack"
    folder = Path(root) / name
    (folder / "ExtremePhases").mkdir(parents=True, exist_ok=True)
    (folder / "Images").mkdir(exist_ok=True)
    for phase, points in (("T00", fixed_points), ("T50", moving_points)):
        write_landmarks(folder / "ExtremePhases" / f"case{case}_dirLab300_{phase}_xyz.txt", points)
    for phase, volume in images.items():
        if volume.shape != case_shape(case):
            raise ValueError(
                f"case {case} {phase}: volume shape {volume.shape}, expected {case_shape(case)}"
            )
        image_path(root, case, phase).write_bytes(np.asarray(volume, "<i2").tobytes())
    return folder
