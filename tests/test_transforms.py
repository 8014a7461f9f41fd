"""Saved transforms: adreg-apply, the ITK field read by SimpleITK, inverses, cohorts.

Scans are generated: a smooth function of world millimetres sampled on two oblique grids (the
moving one rotated differently, with another spacing and size, in "HU-like" intensities), the
moving anatomy shifted by a known translation plus a smooth bump.
"""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from adreg_jax.registration import Transform, commands, load_transform, save_transform

# The tests share a module fixture: one xdist worker runs them all (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("registered_pair")

sitk = pytest.importorskip("SimpleITK")

SHIFT_MM = np.array([3.0, -2.0, 1.5])


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i] = matrix[j, j] = np.cos(angle)
    matrix[i, j], matrix[j, i] = -np.sin(angle), np.sin(angle)
    return matrix


def oblique_affine(shape, spacing, rotation_matrix, centre_mm) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix @ np.diag(spacing)
    affine[:3, 3] = centre_mm - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def world_points(shape, affine) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    return grid @ affine[:3, :3].T + affine[:3, 3]


def anatomy(world: np.ndarray) -> np.ndarray:
    """Blobs of several sizes and contrasts (world mm -> intensity in about [0, 1])."""
    blobs = [((0, 0, 0), 9.0, 0.6), ((6, 4, -3), 4.0, 0.5), ((-5, -4, 4), 3.5, 0.7)]
    value = np.zeros(len(world))
    for centre, sigma, weight in blobs:
        value += weight * np.exp(-((world - centre) ** 2).sum(-1) / (2 * sigma**2))
    return value


def moving_anatomy(world: np.ndarray) -> np.ndarray:
    """The anatomy displaced: the structure at fixed world x sits at about x + SHIFT_MM + bump."""
    bump = 1.5 * np.exp(-((world - (4, 0, 0)) ** 2).sum(-1) / (2 * 6.0**2))
    return anatomy(world - SHIFT_MM - bump[:, None] * np.array([0.0, 1.0, 0.0]))


def write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


FIXED_SHAPE, MOVING_SHAPE = (20, 22, 18), (22, 20, 21)
FIXED_AFFINE = oblique_affine(FIXED_SHAPE, (2.0, 1.8, 2.2), rotation(2, 25.0), (1.0, -1.0, 0.5))
MOVING_AFFINE = oblique_affine(
    MOVING_SHAPE, (1.9, 2.1, 2.0), rotation(0, 10.0) @ rotation(1, -15.0), (2.0, 0.0, 1.0)
)


def run(argv):
    return commands.main([*argv, "--cache-dir", "", "--quiet", "--no-png"])


def apply(argv):
    return commands.apply_main([*argv, "--cache-dir", ""])


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One registration with an affine stage and --inverse on the oblique pair."""
    folder = tmp_path_factory.mktemp("oblique")
    fixed = anatomy(world_points(FIXED_SHAPE, FIXED_AFFINE)).reshape(FIXED_SHAPE)
    moving = moving_anatomy(world_points(MOVING_SHAPE, MOVING_AFFINE)).reshape(MOVING_SHAPE)
    labels = lambda image: np.digitize(image, (0.2, 0.45)).astype(np.int16)  # noqa: E731
    files = {
        "fixed": write(folder / "fixed.nii.gz", fixed.astype(np.float32), FIXED_AFFINE),
        # moving in its own units (HU-like), which warped.nii.gz must keep
        "moving": write(
            folder / "moving.nii.gz", (2000 * moving - 1000).astype(np.float32), MOVING_AFFINE
        ),
        "fixed_seg": write(folder / "fixed_seg.nii.gz", labels(fixed), FIXED_AFFINE),
        "moving_seg": write(folder / "moving_seg.nii.gz", labels(moving), MOVING_AFFINE),
    }
    out = folder / "out"
    argv = ["--fixed", files["fixed"], "--moving", files["moving"], "--out", str(out)]
    argv += ["--fixed-seg", files["fixed_seg"], "--moving-seg", files["moving_seg"]]
    argv += ["--affine", "--affine-steps", "40", "--instance-steps", "30", "--inverse"]
    assert run(argv) == 0
    return {**files, "folder": folder, "out": out}


def read_sitk_array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def sitk_resample(moving_path, field_path, reference_path) -> np.ndarray:
    """SimpleITK's own resampling of the moving image through the ITK displacement field."""
    field = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    reference = sitk.ReadImage(str(reference_path))
    moving = sitk.Cast(sitk.ReadImage(str(moving_path)), sitk.sitkFloat32)
    resampled = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(resampled)


def test_outputs_keep_the_moving_intensities_and_register(registered):
    metrics = json.loads((registered["out"] / "metrics.json").read_text())
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.05
    warped = np.asarray(nib.load(str(registered["out"] / "warped.nii.gz")).dataobj)
    moving = np.asarray(nib.load(registered["moving"]).dataobj)
    # HU-like values, not the [0, 1] the optimisation saw: background -1000, peaks near +300
    assert warped.min() == pytest.approx(moving.min(), abs=5.0)
    assert warped.max() > 0.8 * moving.max()
    # The affine stage found about the known translation (world mm, fixed -> moving).
    np.testing.assert_allclose(np.asarray(metrics["affine_world"])[:3, 3], SHIFT_MM, atol=1.0)


def test_simpleitk_reproduces_warped_through_ddf_itk_on_oblique_grids(registered):
    out = registered["out"]
    header = nib.load(str(out / "ddf_itk.nii.gz")).header
    assert header.get_intent()[0] == "vector"
    assert nib.load(str(out / "ddf_itk.nii.gz")).shape == (*FIXED_SHAPE, 1, 3)
    ddf_mm = np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj)
    assert np.abs(ddf_mm).max() > 2.0  # a real displacement, not the identity
    ours = read_sitk_array(out / "warped.nii.gz")
    theirs = sitk_resample(registered["moving"], out / "ddf_itk.nii.gz", out / "warped.nii.gz")
    value_range = float(ours.max() - ours.min())
    assert np.abs(theirs - ours).mean() < 0.01 * value_range
    # The inverse field, on the moving grid: the fixed image pulled onto the moving grid.
    inverse = registered["folder"] / "fixed_on_moving.nii.gz"
    argv = ["--transform", str(out), "--moving", registered["fixed"], "--out", str(inverse)]
    assert apply([*argv, "--inverse"]) == 0
    ours = read_sitk_array(inverse)
    theirs = sitk_resample(registered["fixed"], out / "ddf_inverse_itk.nii.gz", inverse)
    assert np.abs(theirs - ours).mean() < 0.01 * float(ours.max() - ours.min())


def test_apply_reproduces_warped_and_warped_seg_exactly(registered, tmp_path):
    out = registered["out"]
    argv = ["--transform", str(out), "--moving", registered["moving"], "--out"]
    assert apply([*argv, str(tmp_path / "w.nii.gz")]) == 0
    ours, theirs = nib.load(str(tmp_path / "w.nii.gz")), nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    argv = ["--transform", str(out), "--moving", registered["moving_seg"], "--labels", "--out"]
    assert apply([*argv, str(tmp_path / "s.nii.gz")]) == 0
    seg = np.asarray(nib.load(str(tmp_path / "s.nii.gz")).dataobj)
    np.testing.assert_array_equal(seg, np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj))
    assert set(np.unique(seg)) == {0, 1, 2}
    # --reference: the field read on another grid (axis-aligned, 2.5 mm, inside the fixed
    # grid's extent), against SimpleITK resampling onto the same grid
    reference_affine = oblique_affine((11, 11, 11), (2.5, 2.5, 2.5), np.eye(3), (1.0, -1.0, 0.5))
    reference = write(tmp_path / "ref.nii.gz", np.zeros((11, 11, 11), np.float32), reference_affine)
    argv = ["--transform", str(out), "--moving", registered["moving"], "--reference", reference]
    assert apply([*argv, "--out", str(tmp_path / "r.nii.gz")]) == 0
    ours = read_sitk_array(tmp_path / "r.nii.gz")
    assert ours.shape == (11, 11, 11)
    theirs = sitk_resample(registered["moving"], out / "ddf_itk.nii.gz", reference)
    assert np.abs(theirs - ours).mean() < 0.01 * float(ours.max() - ours.min())


def test_points_forward_then_back_and_inverse_consistency(registered, tmp_path):
    out = registered["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inverse_consistency_mean_mm"] < 0.1
    assert metrics["inverse_consistency_max_mm"] < 1.0
    points = np.random.default_rng(0).uniform(4, 14, size=(25, 3))
    np.savetxt(tmp_path / "p.txt", points)
    argv = ["--transform", str(out), "--out"]
    assert apply([*argv, str(tmp_path / "q.txt"), "--points", str(tmp_path / "p.txt")]) == 0
    argv += [str(tmp_path / "r.txt"), "--points", str(tmp_path / "q.txt")]
    assert apply([*argv, "--inverse"]) == 0
    moved, back = np.loadtxt(tmp_path / "q.txt"), np.loadtxt(tmp_path / "r.txt")
    # the points moved by about the known shift (world mm), and came back within 0.1 mm
    to_world = lambda p, a: p @ a[:3, :3].T + a[:3, 3]  # noqa: E731
    shift = to_world(moved, MOVING_AFFINE) - to_world(points, FIXED_AFFINE)
    np.testing.assert_allclose(shift.mean(0), SHIFT_MM + (0, 0.4, 0), atol=1.0)
    error_mm = np.linalg.norm(to_world(back, FIXED_AFFINE) - to_world(points, FIXED_AFFINE), axis=1)
    assert error_mm.max() < 0.1


def test_ants_csv_points_map_as_simpleitk_maps_them_through_ddf_itk(registered, tmp_path):
    """Physical landmarks in ANTs' CSV form (x,y,z,t in LPS mm): adreg-apply maps fixed points
    to moving points as SimpleITK's DisplacementFieldTransform does through ddf_itk.nii.gz (the
    map ITK resamples with, which antsApplyTransformsToPoints applies to points), keeps the
    other columns, and the elastix 'point' form and the plain voxel form give the same points."""
    out = registered["out"]
    voxels = np.random.default_rng(1).uniform(4, 14, size=(12, 3))
    lps = (voxels @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3]) * (-1, -1, 1)
    rows = [f"{x:.6f},{y:.6f},{z:.6f},0,{n}" for n, (x, y, z) in enumerate(lps)]
    (tmp_path / "fixed.csv").write_text("x,y,z,t,label\n" + "\n".join(rows) + "\n")
    argv = ["--transform", str(out), "--points", str(tmp_path / "fixed.csv")]
    assert apply([*argv, "--out", str(tmp_path / "moving.csv")]) == 0
    with open(tmp_path / "moving.csv") as handle:
        mapped = list(csv.DictReader(handle))
    assert [row["label"] for row in mapped] == [str(n) for n in range(len(lps))]
    ours = np.array([[float(row[axis]) for axis in "xyz"] for row in mapped])

    field = sitk.Cast(sitk.ReadImage(str(out / "ddf_itk.nii.gz")), sitk.sitkVectorFloat64)
    itk = sitk.DisplacementFieldTransform(field)
    theirs = np.array([itk.TransformPoint(tuple(map(float, p))) for p in lps])
    assert np.abs(theirs - lps).max() > 2.0  # the points moved
    np.testing.assert_allclose(ours, theirs, atol=1e-3)

    # the same landmarks as an elastix 'point' file and as canonical voxels: the same result
    body = "\n".join(" ".join(f"{v:.6f}" for v in p) for p in lps)
    (tmp_path / "fixed_elastix.txt").write_text(f"point\n{len(lps)}\n{body}\n")
    argv = ["--transform", str(out), "--points", str(tmp_path / "fixed_elastix.txt")]
    assert apply([*argv, "--out", str(tmp_path / "moving_elastix.txt")]) == 0
    lines = (tmp_path / "moving_elastix.txt").read_text().split("\n")
    assert lines[:2] == ["point", str(len(lps))]
    np.testing.assert_allclose(np.loadtxt(lines[2:]), ours, atol=1e-5)
    np.savetxt(tmp_path / "fixed.txt", voxels)
    argv = ["--transform", str(out), "--points", str(tmp_path / "fixed.txt")]
    assert apply([*argv, "--out", str(tmp_path / "moving.txt")]) == 0
    moving_voxels = np.loadtxt(tmp_path / "moving.txt")
    in_mm = (moving_voxels @ MOVING_AFFINE[:3, :3].T + MOVING_AFFINE[:3, 3]) * (-1, -1, 1)
    np.testing.assert_allclose(in_mm, ours, atol=1e-3)


def test_bad_inputs_one_line_errors(registered, tmp_path, capsys):
    out = registered["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    warped = str(tmp_path / "w.nii.gz")
    assert (
        apply(["--transform", str(empty), "--moving", registered["moving"], "--out", warped]) == 1
    )
    assert "no transform.json" in capsys.readouterr().err
    # the fixed image is not on the moving grid that the transform applies to
    assert apply(["--transform", str(out), "--moving", registered["fixed"], "--out", warped]) == 1
    err = capsys.readouterr().err
    assert "fixed.nii.gz" in err and "does not fit" in err and err.count("\n") == 1
    forward_only = tmp_path / "forward_only"
    forward_only.mkdir()
    transform = load_transform(out)
    save_transform(forward_only, Transform(transform.fixed, transform.moving, transform.ddf_mm), {})
    argv = ["--transform", str(forward_only), "--points", str(tmp_path / "p.txt"), "--inverse"]
    np.savetxt(tmp_path / "p.txt", np.ones((2, 3)))
    assert apply([*argv, "--out", str(tmp_path / "q.txt")]) == 1
    assert "--inverse" in capsys.readouterr().err
    # pair lists: a missing file, a missing column
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving\n{registered['fixed']},{tmp_path / 'gone.nii.gz'}\n")
    assert run(["--pairs", str(pairs), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "gone.nii.gz" in err and "pairs.csv" in err and err.count("\n") == 1
    pairs.write_text(f"fixed\n{registered['fixed']}\n")
    assert run(["--pairs", str(pairs), "--out", str(tmp_path / "c")]) == 1
    assert "'moving'" in capsys.readouterr().err


def test_affine_only_inverse_is_the_inverse_matrix(registered):
    """With the affine stage alone the fields are closed forms of the 4x4 world matrix W in
    metrics.json: ddf(x) = W x - x on the fixed grid, ddf_inverse(y) = W^-1 y - y on the moving
    one."""
    out = registered["folder"] / "affine_only"
    argv = ["--fixed", registered["fixed"], "--moving", registered["moving"], "--out", str(out)]
    argv += ["--affine", "--affine-steps", "20", "--instance-steps", "0"]
    assert run([*argv, "--inverse"]) == 0
    world = np.asarray(json.loads((out / "metrics.json").read_text())["affine_world"])
    transform = load_transform(out)
    x = world_points(FIXED_SHAPE, FIXED_AFFINE)
    expected = x @ world[:3, :3].T + world[:3, 3] - x
    np.testing.assert_allclose(transform.ddf_mm.reshape(-1, 3), expected, atol=2e-3)
    y = world_points(MOVING_SHAPE, MOVING_AFFINE)
    inverse = np.linalg.inv(world)
    expected = y @ inverse[:3, :3].T + inverse[:3, 3] - y
    np.testing.assert_allclose(transform.inverse_ddf_mm.reshape(-1, 3), expected, atol=2e-3)


def test_cohort_spreads_pairs_over_devices_and_resumes(registered, tmp_path):
    """Three pairs, one atlas (the fixed scan), two CPU devices (conftest); one pair's results
    removed as a kill would leave them; the rerun registers that pair only."""
    rows = ["fixed,moving,fixed_seg,moving_seg"]
    for name in ("a", "b", "c"):
        shutil.copy(registered["moving"], tmp_path / f"{name}.nii.gz")
        segs = f"{registered['fixed_seg']},{registered['moving_seg']}"
        rows.append(f"{registered['fixed']},{name}.nii.gz,{segs}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cohort = tmp_path / "cohort"
    # the affine stage alone: each device compiles its own programs, and these compile fastest
    argv = ["--pairs", str(tmp_path / "pairs.csv"), "--out", str(cohort), "--affine"]
    argv += ["--affine-steps", "5", "--instance-steps", "0"]
    assert run(argv) == 0
    with (cohort / "metrics.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["pair"] for row in table] == [
        "001_a_to_fixed", "002_b_to_fixed", "003_c_to_fixed",
    ]  # fmt: skip
    assert len({row["device"] for row in table}) == 2
    fields = [np.asarray(nib.load(str(cohort / r["pair"] / "ddf.nii.gz")).dataobj) for r in table]
    # the same pair three times, on either device: the same field
    np.testing.assert_allclose(fields[0], fields[1], atol=1e-4)
    np.testing.assert_allclose(fields[0], fields[2], atol=1e-4)
    kept = {
        name: (cohort / name / "metrics.json").stat().st_mtime_ns
        for name in ("001_a_to_fixed", "003_c_to_fixed")
    }
    (cohort / "002_b_to_fixed" / "metrics.json").unlink()
    assert run(argv) == 0
    summary = json.loads((cohort / "002_b_to_fixed" / "metrics.json").read_text())
    assert summary["dice_mean"] == pytest.approx(float(table[1]["dice_mean"]), abs=1e-6)
    for name, mtime in kept.items():
        assert (cohort / name / "metrics.json").stat().st_mtime_ns == mtime
    with (cohort / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
