"""IXI pickles, label tables and NIfTI pair lists, on files the tests write themselves."""

import json
import pickle

import nibabel as nib
import numpy as np
import pytest

from adreg_jax.data import ixi, labels, nifti


def test_label_tables():
    assert len(labels.IXI_FREESURFER_IDS) == 46 and len(labels.IXI_VOI) == 30
    grouped = sorted(i for group in labels.IXI_GROUPS.values() for i in group)
    assert len(labels.IXI_GROUPS) == 17 and grouped == sorted(labels.IXI_VOI)
    fs = np.array([[[0, 2, 41, 255, 999]]])
    np.testing.assert_array_equal(labels.to_ixi_labels(fs), [[[0, 1, 21, 45, 0]]])
    np.testing.assert_array_equal(labels.to_ixi_labels(np.array([3, 45])), [3, 45])


def _pickle(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content))


def test_ixi_pairs_and_bad_pickle(tmp_path):
    shape = (8, 9, 10)
    atlas = (np.full(shape, 0.5, np.float32), np.full(shape, 2, np.int16))  # FreeSurfer ids
    _pickle(tmp_path / "atlas.pkl", atlas)
    _pickle(tmp_path / "Test" / "subject_1.pkl", (np.zeros(shape, np.float32), np.ones(shape)))
    pair = ixi.IXIPairs(tmp_path, "test")[0]
    assert pair["moving"].shape == shape + (1,) and pair["moving"][0, 0, 0, 0] == 0.5
    assert pair["moving_seg"].max() == 2  # ids <= 45 are taken as already remapped
    _pickle(tmp_path / "bad.pkl", {"image": 1})
    with pytest.raises(ValueError, match=r"bad.pkl: expected a pickled tuple"):
        ixi.load_pickle(tmp_path / "bad.pkl")
    _pickle(tmp_path / "nan.pkl", (np.full(shape, np.nan, np.float32), np.zeros(shape)))
    with pytest.raises(ValueError, match="non-finite"):
        ixi.load_pickle(tmp_path / "nan.pkl")


def test_nifti_canonical_roundtrip_and_pairs(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    # LPS-like affine: x and y flipped; canonical RAS must flip those axes back
    affine = np.diag([-2.0, -1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "f.nii.gz"))
    array, canonical = nifti.load_nifti(tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(array, volume[::-1, ::-1, :])
    np.testing.assert_allclose(nifti.spacing_of(canonical), [2, 1, 3])
    # the same world point: voxel (0,0,0) of the canonical array is voxel (3,4,0) of the input
    np.testing.assert_allclose(canonical @ [0, 0, 0, 1], affine @ [3, 4, 0, 1])
    nifti.save_nifti(tmp_path / "out.nii.gz", array, canonical)
    np.testing.assert_array_equal(nifti.load_nifti(tmp_path / "out.nii.gz")[0], array)
    nib.save(nib.Nifti1Image(volume[:3], affine), str(tmp_path / "small.nii.gz"))
    (tmp_path / "pairs.json").write_text(
        json.dumps(
            [
                {"fixed": "f.nii.gz", "moving": "f.nii.gz"},
                {"fixed": "f.nii.gz", "moving": "small.nii.gz", "split": "val"},
            ]
        )
    )
    pair = nifti.NiftiPairs(tmp_path / "pairs.json", "train")[0]
    assert pair["fixed"].shape == (4, 5, 6, 1) and pair["fixed"].max() == 1.0
    with pytest.raises(ValueError, match="small.nii.gz: shape"):
        nifti.NiftiPairs(tmp_path / "pairs.json", "val")[0]
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        nifti.load_nifti(tmp_path / "missing.nii")
