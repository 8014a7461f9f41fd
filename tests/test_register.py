"""adreg-register on NIfTI files it writes itself: a blob pair with a known shift."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from adreg_jax.registration import commands

SHAPE = (24, 24, 24)


def main(argv):
    """The command, without the persistent compilation cache (a process-wide JAX setting)."""
    return commands.main([*argv, "--cache-dir", ""])


def write(path, array, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.asarray(SHAPE, np.float32)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    fixed = ndimage.gaussian_filter((radius < 7).astype(np.float32), 1.0)
    fixed_seg = (radius < 7).astype(np.int16)
    moving = ndimage.shift(fixed, (2.0, -1.5, 1.0), order=1)
    moving_seg = ndimage.shift(fixed_seg, (2.0, -1.5, 1.0), order=0)
    return {
        "fixed": write(tmp_path / "fixed.nii.gz", fixed),
        "moving": write(tmp_path / "moving.nii.gz", moving),
        "fixed_seg": write(tmp_path / "fixed_seg.nii.gz", fixed_seg),
        "moving_seg": write(tmp_path / "moving_seg.nii.gz", moving_seg),
        "out": tmp_path / "out",
    }


def test_registers_a_shifted_blob_without_a_model(pair):
    code = main(
        [
            "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(pair["out"]),
            "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"],
            "--instance-steps", "40", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("warped", "ddf", "jacobian", "warped_seg"):
        assert (pair["out"] / f"{name}.nii.gz").exists()
    assert (pair["out"] / "overview.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((pair["out"] / "metrics.json").read_text())
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.1
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert metrics["folding_percent"] < 0.1
    ddf = nib.load(str(pair["out"] / "ddf.nii.gz"))
    assert ddf.shape == (*SHAPE, 3)
    # Moving = fixed shifted by +2 voxels along axis 0: the centre's displacement is ~ +2 voxels,
    # +4 mm at 2 mm spacing (world mm, RAS+ axes of this diagonal affine).
    centre_mm = np.asarray(ddf.dataobj)[12, 12, 12]
    assert centre_mm[0] == pytest.approx(4.0, abs=1.5)


def test_bad_inputs_exit_non_zero_naming_the_file(pair, tmp_path, capsys):
    missing = str(tmp_path / "nope.nii.gz")
    assert main(["--fixed", missing, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "nope.nii.gz" in capsys.readouterr().err
    flat = write(tmp_path / "flat.nii.gz", np.zeros(SHAPE, np.float32))
    assert main(["--fixed", flat, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err
    small_seg = write(tmp_path / "seg.nii.gz", np.zeros((8, 8, 8), np.int16))
    args = ["--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(tmp_path)]
    assert main([*args, "--fixed-seg", small_seg]) == 1
    assert "differs from its image" in capsys.readouterr().err
    two_d = write(tmp_path / "two_d.nii.gz", np.ones((8, 8), np.float32))
    assert main(["--fixed", two_d, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "3-D" in capsys.readouterr().err
    assert main([*args, "--instance-steps", "5", "5", "5"]) == 1
    assert "one per level" in capsys.readouterr().err


def textured_ellipsoid(shape=(32, 32, 32), radii=(11.0, 8.0, 6.0)):
    """Smooth random texture inside an ellipsoid: structure at every position, so that an affine
    map is determined by the images."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    texture = ndimage.gaussian_filter(np.random.default_rng(3).random(shape), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    mask = ndimage.gaussian_filter((r2 < 1).astype(np.float32), 1.0)
    return (mask * (0.5 + texture)).astype(np.float32), centre


def test_affine_stage_recovers_a_rotation_and_shift(tmp_path):
    fixed, centre = textured_ellipsoid()
    angle = np.deg2rad(12.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    shift = np.array([2.0, -1.5, 1.0])
    # moving(y) = fixed(R y + o): rotated about the centre and shifted by -R^-1 shift
    offset = centre - rotation @ centre + shift
    moving = ndimage.affine_transform(fixed, rotation, offset=offset, order=1)
    out = tmp_path / "out"
    argv = ["--fixed", write(tmp_path / "f.nii.gz", fixed, (1.0, 1.0, 1.0))]
    argv += ["--moving", write(tmp_path / "m.nii.gz", moving, (1.0, 1.0, 1.0))]
    argv += ["--out", str(out), "--affine", "--affine-steps", "150", "--instance-steps", "0"]
    assert main([*argv, "--quiet", "--no-png"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The map found takes fixed voxel x to moving voxel q with R q + o = x: its matrix is R^-1.
    np.testing.assert_allclose(metrics["affine_matrix"], rotation.T, atol=0.05)
    assert metrics["ncc_after"] > metrics["ncc_before"] + 0.1


def test_mutual_information_registers_across_a_contrast_change(pair, tmp_path):
    # The moving scan in another "modality": a one-to-one but non-monotonic intensity map of the
    # shifted blob (background 0.6, rim up to 1, core down to 0.1); local NCC assumes a linear
    # relation, MI only that intensities correspond.
    values = np.asarray(nib.load(pair["moving"]).dataobj)
    other = np.where(values < 0.5, 0.6 + 0.8 * values, 0.5 - 0.8 * (values - 0.5))
    moving = write(tmp_path / "t2.nii.gz", other.astype(np.float32))
    argv = ["--fixed", pair["fixed"], "--moving", moving, "--out", str(pair["out"])]
    argv += ["--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"]]
    argv += ["--similarity", "mi", "--instance-steps", "40", "--quiet", "--no-png"]
    assert main(argv) == 0
    metrics = json.loads((pair["out"] / "metrics.json").read_text())
    assert metrics["mi_objective_after"] > metrics["mi_objective_before"]
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.1
    assert metrics["folding_percent"] < 0.1
