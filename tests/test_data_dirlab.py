"""DIR-Lab loader and preprocessing: DIR-Lab-format files written here, and the real landmarks."""

from pathlib import Path

import numpy as np
import pytest

from adreg_jax.data import dirlab

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/dirlab"


def _write_case(root: Path, case: int, fixed_xyz, moving_xyz, image_bytes=None):
    folder = root / ("Case8Deploy" if case == 8 else f"Case{case}Pack")
    (folder / "ExtremePhases").mkdir(parents=True)
    (folder / "Images").mkdir()
    for phase, xyz in (("T00", fixed_xyz), ("T50", moving_xyz)):
        # the real files' quirks: leading spaces, tabs, trailing tab, CRLF
        text = "".join(f" {x}\t {y}\t {z}\t\r\n" for x, y, z in xyz)
        (folder / "ExtremePhases" / f"case{case}_dirLab300_{phase}_xyz.txt").write_text(text)
    shape = dirlab.case_shape(case)
    for phase in dirlab.PHASES:
        volume = np.full(shape, -1000, "<i2")
        volume[shape[0] // 2, 10, 20] = 400 + int(phase[1:])
        data = volume.tobytes() if image_bytes is None else image_bytes
        (folder / "Images" / dirlab.image_path(root, case, phase).name).write_bytes(data)
    return folder


def test_load_case_axes_and_1_based(tmp_path):
    _write_case(tmp_path, 1, [(21, 11, 48)], [(22, 11, 48)])
    data = dirlab.load_dirlab_case(tmp_path, 1)
    assert data.fixed.shape == (94, 256, 256)
    # bright voxel written at z y x = (47, 10, 20) is 1-based x y z = (21, 11, 48)
    np.testing.assert_allclose(data.fixed_points, [[47, 10, 20]])
    assert data.fixed[47, 10, 20] == 400
    assert dirlab.read_image(tmp_path, 1, "T90")[47, 10, 20] == 490
    np.testing.assert_allclose(data.spacing, [2.5, 0.97, 0.97])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inplane_size=(200, 300), z_multiple=16),
        dict(isotropic_mm=2.0),
        dict(inplane_size=(128, 128), shape=(64, 96, 96)),
    ],
)
def test_landmarks_follow_preprocessing(tmp_path, kwargs):
    _write_case(tmp_path, 1, [(21, 11, 48), (130, 140, 40)], [(25, 12, 50), (128, 141, 44)])
    raw = dirlab.load_dirlab_case(tmp_path, 1)
    before = dirlab.tre_mm(raw.fixed_points, raw.moving_points, raw.grid_map, raw.spacing)
    out = dirlab.preprocess_case(raw, **kwargs)
    assert out.fixed.min() >= 0 and out.fixed.max() <= 1
    after = dirlab.tre_mm(out.fixed_points, out.moving_points, out.grid_map, out.original_spacing)
    np.testing.assert_allclose(after, before, atol=1e-4)
    # independent truth for the crop/pad and the z pad: the bright voxel moves with its landmark
    if "isotropic_mm" not in kwargs and "shape" not in kwargs:
        q = np.round(out.fixed_points[0]).astype(int)
        assert out.fixed[tuple(q)] == out.fixed.max()
        assert out.fixed.shape[0] % 16 == 0
    if "isotropic_mm" in kwargs:
        np.testing.assert_allclose(out.spacing, 2.0, rtol=0.02)


def test_bad_inputs(tmp_path):
    _write_case(tmp_path, 2, [(1, 1, 1)], [(1, 1, 1)], image_bytes=b"\0" * 10)
    with pytest.raises(ValueError, match=r"10 bytes, expected"):
        dirlab.load_dirlab_case(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="Case3Pack"):
        dirlab.load_dirlab_case(tmp_path, 3)
    _write_case(tmp_path, 4, [(1, 1, 500)], [(1, 1, 1)])
    with pytest.raises(ValueError, match="outside the volume"):
        dirlab.load_dirlab_case(tmp_path, 4, images=False)


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/dirlab not present")
@pytest.mark.parametrize("isotropic", [False, True])
def test_real_landmarks_published_before_tre(isotropic):
    for case, (_, _, published) in dirlab.CASES.items():
        data = dirlab.load_dirlab_case(REAL, case, images=False)
        assert data.fixed_points.shape == (300, 3)
        kwargs = dict(isotropic_mm=1.5) if isotropic else dict(inplane_size=(256, 256))
        out = dirlab.preprocess_case(data, **kwargs)
        tre = dirlab.tre_mm(out.fixed_points, out.moving_points, out.grid_map, out.original_spacing)
        assert abs(tre.mean() - published) < 0.01, (case, tre.mean(), published)


def test_dirlab_pipeline_pairs(tmp_path):
    import importlib.util

    from adreg_jax.data import pipeline

    spec = importlib.util.spec_from_file_location(
        "default_config", Path(__file__).resolve().parents[1] / "configs" / "default.py"
    )
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    data = default.get_config().data
    data.update(dict(dataset="dirlab", root=str(tmp_path), test_case=1, image_size=(32, 64, 64)))
    _write_case(tmp_path, 1, [(21, 11, 48), (130, 140, 40)], [(25, 12, 50), (128, 141, 44)])
    pair = pipeline.build_dataset(data, "test", seed=0)[0]
    assert pair["fixed"].shape == (32, 64, 64, 1) and pair["points_mask"].sum() == 2
    assert pair["fixed_points"].shape == (300, 3)
