"""Point files in ANTs', elastix's and the plain form: one set of landmarks, the same voxels."""

import nibabel as nib
import numpy as np
import pytest

from adreg_jax.data.points import read_point_file, write_point_file

SHAPE = (7, 9, 5)
# file axes: i runs anterior-to-posterior, j right-to-left, k inferior-to-superior (a PRS-like
# image, neither RAS nor LPS), oblique by a few degrees, 1.5 x 1.2 x 3 mm
_TURN = np.deg2rad(6.0)
_ROTATION = np.array(
    [[np.cos(_TURN), -np.sin(_TURN), 0.0], [np.sin(_TURN), np.cos(_TURN), 0.0], [0, 0, 1.0]]
)
FILE_AFFINE = np.eye(4)
FILE_AFFINE[:3, :3] = _ROTATION @ np.array([[0, -1.2, 0], [-1.5, 0, 0], [0, 0, 3.0]])
FILE_AFFINE[:3, 3] = (10.0, 14.0, -7.0)
INDICES = np.array([[0, 0, 0], [6, 8, 4], [2, 5, 1], [3.5, 1.25, 2.0]])


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), FILE_AFFINE), str(path))
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    return path, canonical.affine


def test_every_form_gives_the_same_canonical_voxels(image, tmp_path):
    path, canonical_affine = image
    ras = INDICES @ FILE_AFFINE[:3, :3].T + FILE_AFFINE[:3, 3]
    lps = ras * (-1, -1, 1)
    # the truth, independently: world RAS through the canonical image's own affine
    expected = np.linalg.solve(canonical_affine[:3, :3], (ras - canonical_affine[:3, 3]).T).T
    assert not np.allclose(expected, INDICES)  # the file is not canonical

    rows = [f"{x},{y},{z},0,{n},note {n}" for n, (x, y, z) in enumerate(lps)]
    (tmp_path / "ants.csv").write_text("x,y,z,t,label,comment\n" + "\n".join(rows) + "\n")
    body = "\n".join(" ".join(map(str, p)) for p in lps)
    (tmp_path / "elastix_point.txt").write_text(f"point\n{len(lps)}\n{body}\n")
    body = "\n".join(" ".join(map(str, p)) for p in INDICES)
    (tmp_path / "elastix_index.txt").write_text(f"index\n{len(INDICES)}\n{body}\n")
    np.savetxt(tmp_path / "canonical.txt", expected)

    forms = {
        "ants.csv": "ants_csv",
        "elastix_point.txt": "elastix_point",
        "elastix_index.txt": "elastix_index",
        "canonical.txt": "voxel",
    }
    for name, form in forms.items():
        points = read_point_file(tmp_path / name)
        assert points.form == form
        voxels = points.to_voxels(canonical_affine, path)
        np.testing.assert_allclose(voxels, expected, atol=1e-4, err_msg=name)
        # written back in its form: the file's own values, and an ANTs CSV's other columns
        write_point_file(
            tmp_path / f"again_{name}", points.with_voxels(voxels, canonical_affine, path)
        )
        again = read_point_file(tmp_path / f"again_{name}")
        assert again.form == form
        np.testing.assert_allclose(again.values, points.values, atol=1e-4, err_msg=name)
    again = read_point_file(tmp_path / "again_ants.csv")
    assert again.header == ["x", "y", "z", "t", "label", "comment"]
    assert [row["comment"] for row in again.extra] == [f"note {n}" for n in range(len(lps))]


def test_malformed_files_name_the_file_and_line(image, tmp_path):
    path, canonical_affine = image
    cases = {
        "short.txt": ("# landmarks\n1 2 3\n\n4 5\n", "short.txt line 4: expected three numbers"),
        "count.txt": ("point\n3\n1 2 3\n4 5 6\n", "line 2 says 3 points but 2 follow"),
        "word.csv": ("x,y,z,t\n1,2,3,0\n1,b,3,0\n", "word.csv line 3: expected numbers"),
        "cut.csv": ("x,y,z,t\n1,2,3,0\n1,2\n", "cut.csv line 3: expected numbers"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_point_file(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_point_file(tmp_path / "none.txt")
    # voxel indices along a file's axes cannot be placed without that file
    (tmp_path / "index.txt").write_text("index\n1\n1 2 3\n")
    with pytest.raises(ValueError, match="need that image file"):
        read_point_file(tmp_path / "index.txt").to_voxels(canonical_affine)
