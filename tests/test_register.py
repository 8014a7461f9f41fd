"""adreg-register on NIfTI files it writes itself: a blob pair with a known shift."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from adreg_jax.register import main

SHAPE = (24, 24, 24)


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
